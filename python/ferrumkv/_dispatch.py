"""Delivery of engine notifications on the event loop's thread (asyncio or trio).

The engine never calls Python. When a waiting call finishes or the pressure level changes,
it makes an eventfd readable. The dispatcher watches that fd on the running loop
(asyncio: `loop.add_reader`; trio: a system task in `wait_readable`), and on readiness
drains the finished tickets and pressure events and resolves them on the loop thread.
A waiter is a future (asyncio) or an Event (trio) keyed by its ticket.

Lifetime: the loop holds the dispatcher, and so the cache, only weakly (the reader callback
and the trio watcher keep a weak reference; the pressure callback is a weak method), so a
`KvCache` dropped without `close()` is garbage collected even while a loop watches its fd.
Its finalizer (`close_dropped`) then closes the engine (threads joined, disk lock released),
detaches the fd from the loop, and warns. The fd is the engine's and closes when the engine
is freed: until the loop has let go of it (a trio watcher woken by `notify_closing`, a reader
removed from another thread by `call_soon_threadsafe`), whoever still waits on it holds the
engine, so the loop never watches a closed or reused fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import Ticket
    from .types import PressureEvent

log = logging.getLogger("ferrumkv")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


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

    def __init__(self, core: Any, on_pressure: Callable[[list[PressureEvent]], None]) -> None:
        self._core = core
        self._fd: int = core.notify_fd
        # A bound method (the cache's) is held weakly: the dispatcher must not keep it alive.
        self._on_pressure: Callable[[], Callable[[list[PressureEvent]], None] | None] = (
            weakref.WeakMethod(on_pressure)
            if inspect.ismethod(on_pressure)
            else lambda: on_pressure
        )
        self._waiters: dict[Ticket, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trio_token: Any = None
        # The thread of the loop watching the fd (pressure is delivered there).
        self._thread: int | None = None
        self._closed = False
        self.incidents = IncidentLog()

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
                loop.add_reader(self._fd, _drain_asyncio, weakref.ref(self), loop, self._fd)
                self._loop = loop
                self._thread = threading.get_ident()
            return
        token = _running_trio_token()
        if token is None:
            raise RuntimeError("ferrumkv's async calls need a running asyncio or trio loop")
        if token is not self._trio_token:
            import trio

            self._trio_token = token
            self._thread = threading.get_ident()
            trio.lowlevel.spawn_system_task(
                _trio_watch, weakref.ref(self), self._core, self._fd, token
            )

    def on_loop_thread(self) -> bool:
        """Whether the caller runs on the thread of the loop watching the fd, or no loop
        watches it (then the caller's thread is the only one to deliver on)."""
        loop = self._loop
        if (loop is None or loop.is_closed()) and self._trio_token is None:
            return True
        return self._thread == threading.get_ident()

    def _detach_asyncio(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        if loop.is_running() and _running_loop() is not loop:
            # Not the loop's thread (a close or a garbage collection elsewhere): the loop
            # removes its reader itself; the engine, and so the fd, stays open until then.
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_remove_reader, loop, self._fd, self._core)
            return
        with contextlib.suppress(Exception):
            loop.remove_reader(self._fd)

    # ----- draining --------------------------------------------------------------------

    def drain(self) -> None:
        """Runs on the loop thread: wakes finished waiters, fires pressure callbacks, logs
        the engine's incidents."""
        self.incidents.log(self._core)
        tickets, pressure = self._core.drain_notifications()
        on_pressure = self._on_pressure()
        for t in tickets:
            w = self._waiters.get(t)
            if w is None:
                continue
            if isinstance(w, asyncio.Future):
                if not w.done():
                    w.set_result(None)
            else:
                w.set()
        if on_pressure is not None and pressure:
            on_pressure(pressure)

    # ----- waiting ---------------------------------------------------------------------

    async def wait(self, ticket: Ticket, timeout: float | None) -> None:
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
            else:  # another thread: the watcher, holding the engine, wakes on the trio thread
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(trio.lowlevel.notify_closing, self._fd)


def _drain_asyncio(ref: weakref.ref[Dispatcher], loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """The asyncio reader: drains through a weak reference, and removes itself once the
    dispatcher is gone or closed (it is normally removed before)."""
    d = ref()
    if d is None or d._closed:
        loop.remove_reader(fd)
        return
    d.drain()


def _remove_reader(loop: asyncio.AbstractEventLoop, fd: int, core: Any) -> None:
    """Runs on the loop's thread; `core` (the fd's owner) is held until the reader is gone."""
    loop.remove_reader(fd)


async def _trio_watch(ref: weakref.ref[Dispatcher], core: Any, fd: int, token: Any) -> None:
    """The trio system task watching `fd`. It holds the dispatcher weakly (never across an
    await) and the engine strongly, so the fd stays open while it waits; `Dispatcher.close`
    wakes it with `notify_closing`."""
    import trio

    try:
        while True:
            d = ref()
            if d is None or d._closed or d._trio_token is not token:
                return
            del d
            await trio.lowlevel.wait_readable(fd)
            d = ref()
            if d is None:
                return
            d.drain()
            del d
    except (trio.ClosedResourceError, trio.Cancelled):
        pass
    finally:
        d = ref()
        if d is not None and d._trio_token is token:
            d._trio_token = None


class IncidentLog:
    """Logs the engine's incidents (failures it got over: a disk block that failed its
    checksum, a failed disk read or write, KV events dropped) as WARNINGs of the "ferrumkv"
    logger, at most one record per kind every `every_s` seconds; a record says how many of
    its kind were held back since the last one. Drained when the event loop is woken (the
    engine wakes it for each incident) and by `KvCache.stats()`."""

    def __init__(self, every_s: float = 10.0) -> None:
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, core: Any) -> None:
        incidents, dropped = core.drain_incidents()
        if dropped:
            incidents.append(("incidents_dropped", f"{dropped} more incidents were not kept"))
        if not incidents:
            return
        now = time.monotonic()
        with self._lock:
            for kind, message in incidents:
                last = self._last.get(kind)
                if last is not None and now - last < self._every_s:
                    self._held[kind] = self._held.get(kind, 0) + 1
                    continue
                self._last[kind] = now
                held = self._held.pop(kind, 0)
                more = f" ({held} more of this kind since the last report)" if held else ""
                log.warning("ferrumkv: %s%s", message, more)


def close_dropped(core: Any, dispatcher: Dispatcher, what: str) -> None:
    """The finalizer of a `KvCache` collected without `close()`: closes its engine (pending
    waiters fail, threads are joined, the disk file's lock is released) and its dispatcher
    (the fd leaves the loop), then warns: logged, and as a ResourceWarning."""
    try:
        core.close()
    finally:
        dispatcher.close()
    msg = f"{what} was garbage-collected without close(); it is closed now"
    log.warning("%s (close it, or use `with` / `async with`)", msg)
    warnings.warn(msg, ResourceWarning, stacklevel=2)
