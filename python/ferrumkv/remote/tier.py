"""``RemoteTier``: one cache's connection to its store: the writer thread, the lookups, and
local-only operation while the store is away.

Threads: writers (two for Redis, one for Mooncake) drain the engine's write queue
(``take_remote_writes`` waits without the GIL) and put each batch they take; lookups run on a small
pool of worker threads and are awaited from the event loop (asyncio or trio) with
``remote_timeout_s`` as the bound, so a slow or paused store never blocks the loop: the
lookup gives up, its blocks are misses, and the store is marked down. While down, lookups
skip the store and writes are dropped (counted) until the backoff (0.1 s doubling to 5 s)
has passed; then the next call tries again (reconnecting when the store was never reached).

Nothing here holds the engine lock: the engine stages writes and checks values under it;
this module only moves bytes (the engine remembers which blocks the store has lately, so a
block that came from the store, or was written to it, is not written again when it leaves).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import CacheClosedError, FerrumKVError, RemoteUnavailableError
from .backend import RemoteBackend, open_backend, parse_url

log = logging.getLogger("ferrumkv")
T = TypeVar("T")

# Values per batched call: at most 64, and at most about 16 MiB (Mooncake's client moves a
# batch through its local buffer; smaller batches also let a lookup import one chunk while
# the next is on the wire).
_BATCH_VALUES = 64
_BATCH_BYTES = 16 << 20
# Writer threads per backend: Redis gains from two batches in flight (one is framed while the
# other is on the wire); Mooncake's client loses (measured: benches/remote_store.py).
_WRITERS = {"redis": 2, "redis+cluster": 2, "mooncake": 1}
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.1, 5.0


class RemoteTier:
    def __init__(
        self, core: Any, url: str, *, timeout: float, required: bool, value_bytes: int
    ) -> None:
        self._core = core
        self._batch = max(1, min(_BATCH_VALUES, _BATCH_BYTES // value_bytes))
        self._url = url
        self._timeout = timeout
        self._lock = threading.Lock()
        self._backend: RemoteBackend | None = None
        self._down_until = 0.0
        self._backoff = _BACKOFF_MIN_S
        self._stopping = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="ferrumkv-remote"
        )
        try:
            self._backend = self._connect()
        except Exception as e:
            if required:
                self._pool.shutdown(wait=False)
                raise RemoteUnavailableError(
                    f"the store at {url} is unreachable: {e} (remote_required=False runs "
                    "local-only and reconnects)"
                ) from e
            log.warning("ferrumkv: remote store %s unreachable, running local-only: %s", url, e)
            self._mark_down()
        self._writers = [
            threading.Thread(
                target=self._write_loop, name=f"ferrumkv-remote-writer-{i}", daemon=True
            )
            for i in range(_WRITERS.get(parse_url(url).scheme, 1))
        ]
        for w in self._writers:
            w.start()

    # ----- connection ------------------------------------------------------------------------

    def _connect(self) -> RemoteBackend:
        """Opens the backend within the timeout (its client may block longer: it runs on a
        daemon thread, and an unfinished attempt counts as a failure)."""
        fut: concurrent.futures.Future[RemoteBackend] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(open_backend(self._url, self._timeout))
            except BaseException as e:
                fut.set_exception(e)

        threading.Thread(target=run, name="ferrumkv-remote-connect", daemon=True).start()
        try:
            return fut.result(timeout=self._timeout + 1.0)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no answer within {self._timeout} s") from None

    def _mark_down(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)

    def _mark_up(self) -> None:
        with self._lock:
            self._backoff = _BACKOFF_MIN_S

    def _usable(self) -> RemoteBackend | None:
        """The backend if the store is not marked down (reconnecting if it never was)."""
        if time.monotonic() < self._down_until:
            return None
        if self._backend is None:
            try:
                backend = open_backend(self._url, self._timeout)
            except Exception as e:
                log.debug("ferrumkv: remote store %s still unreachable: %s", self._url, e)
                self._mark_down()
                return None
            with self._lock:
                spare = self._backend is not None  # another thread connected meanwhile
                if not spare:
                    self._backend = backend
            if spare:
                backend.close()
            else:
                log.info("ferrumkv: remote store %s reached", self._url)
        return self._backend

    # ----- writes ----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        core = self._core
        while True:
            try:
                writes = core.take_remote_writes(self._batch, 0.05 if self._stopping else 0.5)
            except CacheClosedError:
                return
            except Exception:  # the engine stopped serving (a device fault)
                log.exception("ferrumkv: remote writer stopped")
                return
            if not writes:
                if self._stopping:
                    return
                continue
            self._write(writes)

    def _write(self, writes: list[tuple[int, str, Any]]) -> None:
        seqs = [w[0] for w in writes]
        # Views of the engine's staged buffers: the client reads them, nothing copies them.
        items = [(k, memoryview(v)) for _, k, v in writes]
        t0 = time.perf_counter()
        backend = self._usable() if items else None
        if items and backend is None:
            self._core.finish_remote_writes(seqs, [], len(items), 0, 0.0)
            return
        stored: list[int] = []
        refused = errors = 0
        if backend is not None:
            try:
                landed = backend.put(items)
                stored = [s for s, ok in zip(seqs, landed, strict=True) if ok]
                refused = len(items) - len(stored)
                self._mark_up()
            except Exception as e:
                log.warning("ferrumkv: remote write of %d blocks failed: %s", len(items), e)
                refused, errors = len(items), 1
                self._mark_down()
        self._core.finish_remote_writes(seqs, stored, refused, errors, time.perf_counter() - t0)

    # ----- lookups ---------------------------------------------------------------------------

    async def lookup(self, tokens: Any, salt: Any) -> int:
        """Imports the blocks of ``tokens`` the store holds after its local prefix; returns
        how many. Never raises for the store's sake: a failure is counted, and a miss."""
        if time.monotonic() < self._down_until:
            return 0
        start, keys = self._core.remote_plan(tokens, salt)
        if not keys:
            return 0
        t0 = time.perf_counter()
        imported = asked = 0
        try:
            # Even this may wait: the worker threads can be held by calls to a paused store.
            backend = await self._call(self._usable)
            if backend is None:
                return 0
            present = await self._call(backend.exists, keys)
            n = 0
            while n < len(present) and present[n]:
                n += 1
            # The run found, in chunks: the next chunk is fetched while this one is imported.
            chunks = [keys[i : i + self._batch] for i in range(0, n, self._batch)]
            fetch = self._pool.submit(backend.get, chunks[0]) if chunks else None
            for i, chunk in enumerate(chunks):
                assert fetch is not None
                values: list[bytes | None] = await self._wait(fetch)
                fetch = (
                    self._pool.submit(backend.get, chunks[i + 1]) if i + 1 < len(chunks) else None
                )
                last = fetch is None
                # The chunk's import counts its misses; the last counts the keys never fetched.
                looked_up = len(keys) - asked if last else len(chunk)
                got, _refused = self._core.import_remote(
                    tokens, salt, start + asked, values, looked_up, time.perf_counter() - t0
                )
                t0 = time.perf_counter()
                asked += looked_up
                imported += got
                if got < len(chunk):  # the chain ends here: the rest cannot be used
                    if fetch is not None:
                        fetch.cancel()
                    self._core.remote_lookup_failed(0, len(keys) - asked, 0.0)
                    break
            if not chunks:
                self._core.import_remote(
                    tokens, salt, start, [], len(keys), time.perf_counter() - t0
                )
        except FerrumKVError:
            raise  # the engine's own (closed, stopped): not the store's fault
        except Exception as e:
            log.warning("ferrumkv: remote lookup of %d blocks failed: %s", len(keys), e)
            self._mark_down()
            self._core.remote_lookup_failed(1, len(keys) - asked, time.perf_counter() - t0)
            return imported
        self._mark_up()
        return imported

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread, awaited on the running loop (asyncio or trio)
        for at most the timeout (then TimeoutError; the thread finishes on its own)."""
        return await self._wait(self._pool.submit(fn, *args))

    async def _wait(self, fut: concurrent.futures.Future[T]) -> T:
        """Awaits a worker thread's call for at most the timeout (see `_call`)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return await _trio_wait(fut, self._timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self._timeout)
        except TimeoutError:
            raise TimeoutError(f"the store did not answer within {self._timeout} s") from None

    # ----- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Drains the queued writes (bounded by the timeout), then stops."""
        self._stopping = True
        self._core.wake_remote_writer()
        deadline = time.monotonic() + self._timeout + 1.0
        for w in self._writers:
            w.join(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False)
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:
                log.debug("ferrumkv: closing the remote store client failed", exc_info=True)


async def _trio_wait(fut: concurrent.futures.Future[T], timeout: float) -> T:
    import trio

    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run ended: nobody waits
            token.run_sync_soon(done.set)

    fut.add_done_callback(wake)
    with trio.move_on_after(timeout):
        await done.wait()
    if not fut.done():
        raise TimeoutError(f"the store did not answer within {timeout} s")
    return fut.result()
