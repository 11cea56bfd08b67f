"""Delivery of engine notifications on the event loop's thread (asyncio or trio).

The engine never calls Python. When a waiting call finishes or the pressure level changes,
it makes an eventfd readable. The dispatcher watches that fd on the running loop
(asyncio: `loop.add_reader`; trio: a system task in `wait_readable`), and on readiness
drains the finished tickets and pressure events and resolves them on the loop thread.
A waiter is a future (asyncio) or an Event (trio) keyed by its ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ferrumkv")


def _running_trio_token() -> Any:
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        return trio.lowlevel.current_trio_token()
    except RuntimeError:
        return None


class Dispatcher:
    """Watches one engine's notify fd and wakes its waiters."""

    def __init__(self, core: Any, on_pressure: Callable[[tuple[int, ...]], None]) -> None:
        self._core = core
        self._fd: int = core.notify_fd
        self._on_pressure = on_pressure
        self._waiters: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trio_token: Any = None
        self._closed = False

    # ----- attaching to the running loop -----------------------------------------------

    def attach(self) -> None:
        """Makes sure the fd is watched by the loop this coroutine runs on."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            if loop is not self._loop:
                self._detach_asyncio()
                loop.add_reader(self._fd, self.drain)
                self._loop = loop
            return
        token = _running_trio_token()
        if token is None:
            raise RuntimeError("ferrumkv's async calls need a running asyncio or trio loop")
        if token is not self._trio_token:
            import trio

            self._trio_token = token
            trio.lowlevel.spawn_system_task(self._trio_watch, token)

    def _detach_asyncio(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self._fd)

    async def _trio_watch(self, token: Any) -> None:
        import trio

        try:
            while not self._closed and self._trio_token is token:
                await trio.lowlevel.wait_readable(self._fd)
                self.drain()
        except (trio.ClosedResourceError, trio.Cancelled):
            pass
        finally:
            if self._trio_token is token:
                self._trio_token = None

    # ----- draining --------------------------------------------------------------------

    def drain(self) -> None:
        """Runs on the loop thread: wakes finished waiters, fires pressure callbacks."""
        tickets, pressure = self._core.drain_notifications()
        for t in tickets:
            w = self._waiters.get(t)
            if w is None:
                continue
            if isinstance(w, asyncio.Future):
                if not w.done():
                    w.set_result(None)
            else:
                w.set()
        for ev in pressure:
            self._on_pressure(ev)

    # ----- waiting ---------------------------------------------------------------------

    async def wait(self, ticket: int, timeout: float | None) -> None:
        """Returns when `ticket` finished; raises TimeoutError after `timeout` seconds."""
        self.attach()
        if self._loop is not None and _running_trio_token() is None:
            fut = self._loop.create_future()
            self._waiters[ticket] = fut
            try:
                if timeout is None:
                    await fut
                else:
                    async with asyncio.timeout(timeout):
                        await fut
            finally:
                self._waiters.pop(ticket, None)
            return
        import trio

        event = trio.Event()
        self._waiters[ticket] = event
        try:
            if timeout is None:
                await event.wait()
            else:
                with trio.fail_after(timeout):
                    await event.wait()
        except trio.TooSlowError:
            raise TimeoutError from None
        finally:
            self._waiters.pop(ticket, None)

    def close(self) -> None:
        """Wakes every waiter (their tickets failed with CacheClosedError) and stops."""
        if self._closed:
            return
        self.drain()
        self._closed = True
        self._detach_asyncio()
        if self._trio_token is not None:
            token, self._trio_token = self._trio_token, None
            import trio

            if _running_trio_token() is token:
                trio.lowlevel.notify_closing(self._fd)
