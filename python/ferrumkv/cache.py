"""`KvCache`: the async engine that serving loops await.

Every call goes straight to the Rust engine. A call that can finish at once returns
without suspending and without a thread hop. A call that must wait for blocks gets a
ticket; the coroutine parks on a future (asyncio) or Event (trio) until the engine
signals the ticket through its eventfd (see `_dispatch`), then takes the result. A waiter
that is cancelled or times out withdraws its ticket, and the engine gives back anything
it had already granted, so no block is ever lost to an abandoned wait.

Pressure: a call that changed the level delivers the transition itself before it returns
(`_pressure_now`: one atomic load when nothing is pending), on the loop's thread and after
the engine lock is released; transitions that engine threads cause (a swap's copy ending)
arrive through the eventfd. Each subscriber sees every transition in level order: a plain
callback runs inline, an `async def` one is queued on that subscriber's own runner task,
so a slow subscriber delays only itself.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from . import _core
from ._dispatch import Dispatcher, close_dropped
from .errors import CacheClosedError, InvalidStateError, OutOfBlocksError
from .kv_events import KvEventPublisher
from .remote import RemoteTier
from .types import (
    CacheStats,
    EvictionEvent,
    GcStats,
    IterationStats,
    KvEvent,
    PrefixMatch,
    PressureEvent,
    PressureLevel,
)

log = logging.getLogger("ferrumkv")

CacheConfig = _core.CacheConfig
SequenceHandle = _core.SequenceHandle
Ticket = _core.Ticket
BatchLayout = _core.BatchLayout
RequestId = str | int
PressureCallback = Callable[[PressureEvent], Awaitable[None] | None]

_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}


class Subscription:
    """A registered pressure callback (`callback`); `cancel()` removes it (idempotent)."""

    __slots__ = ("_cache", "_queue", "_running", "callback")

    def __init__(self, cache: KvCache, callback: PressureCallback) -> None:
        self._cache: KvCache | None = cache
        self.callback = callback
        # Awaitables the callback returned, run one after another by this subscriber's task.
        self._queue: collections.deque[Awaitable[None]] = collections.deque()
        self._running = False

    def cancel(self) -> None:
        """Removes the callback; events already queued for it are not delivered."""
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._unsubscribe(self)

    @property
    def active(self) -> bool:
        """Whether the callback is still registered."""
        return self._cache is not None


class KvCache:
    """A paged KV cache: block pools, a prefix cache, tiers, and the calls a serving
    scheduler makes (README: "Concepts", "Guarantees", "A scheduler step, end to end")."""

    def __init__(self, config: CacheConfig, *, clock_start: float | None = None) -> None:
        """`clock_start`: run on a manual clock starting there (tests); see `set_time`."""
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, not {type(config).__name__}")
        self.config = config
        """The `CacheConfig` the cache was made with."""
        if clock_start is None:
            self._core = _core.Engine(config)
        else:
            self._core = _core.Engine.with_manual_clock(config, float(clock_start))
        self._subs: list[Subscription] = []
        self._dispatcher = Dispatcher(self._core, self._fire_pressure)
        self._async_tasks: set[Any] = set()
        # Pressure transitions drained but not yet delivered to every subscriber.
        self._pressure: collections.deque[PressureEvent] = collections.deque()
        self._delivering = False
        self._closed = False
        dtype = _NUMPY_DTYPES.get(config.dtype, np.uint16)  # bfloat16: raw uint16 bits
        self._np_dtype = np.dtype(dtype)
        self._kv_shape = (config.num_kv_heads, config.head_dim)
        # Closes the engine if this cache is collected without close() (see _dispatch).
        what = f"ferrumkv.KvCache(device={config.device!r}, disk_path={config.disk_path!r})"
        self._finalizer = weakref.finalize(self, close_dropped, self._core, self._dispatcher, what)
        self._finalizer.atexit = False  # at exit the engine is torn down as it always was
        self._publisher: KvEventPublisher | None = None
        self._remote: RemoteTier | None = None
        try:
            if config.kv_events_endpoint is not None:
                self._publisher = KvEventPublisher(self._core, config)
            if config.remote_url is not None:
                self._remote = RemoteTier(
                    self._core,
                    config.remote_url,
                    timeout=config.remote_timeout_s,
                    required=config.remote_required,
                    value_bytes=config.bytes_per_block,
                )
        except BaseException:
            self.close()
            raise

    # ----- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> KvCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> KvCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the cache (idempotent). Waiting calls fail with CacheClosedError."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        if self._remote is not None:
            self._remote.close()  # drains the queued writes first
        if self._publisher is not None:
            self._publisher.close()  # publishes what is pending first
        self._core.close()
        self._dispatcher.close()
        self._subs.clear()

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError("the cache is closed")

    def set_time(self, now_s: float) -> None:
        """Sets the manual clock (only for caches made with `clock_start`)."""
        self._core.set_time(now_s)

    # ----- waiting -------------------------------------------------------------------------

    async def _redeem(self, ticket: _core.Ticket, timeout: float | None) -> SequenceHandle:
        """Waits for a ticket a call returned and takes its answer; a wait that is cancelled
        or times out withdraws the ticket (the engine gives back what it reserved)."""
        try:
            await self._dispatcher.wait(ticket, timeout)
        except TimeoutError:
            self._core.cancel_ticket(ticket)
            self._pressure_now()
            raise OutOfBlocksError(f"no blocks became free within {timeout} s") from None
        except BaseException:
            self._core.cancel_ticket(ticket)
            self._pressure_now()
            raise
        try:
            return self._core.take_ticket(ticket)
        finally:
            if self._subs:
                self._pressure_now()

    @staticmethod
    def _check_timeout(timeout: float | None) -> None:
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")

    # ----- the engine calls ----------------------------------------------------------------

    async def allocate(
        self,
        request_id: RequestId,
        tokens: Sequence[int] | np.ndarray,
        *,
        salt: str | bytes | int | None = None,
        timeout: float | None = None,
        num_new_tokens: int | None = None,
        preempted: bool = False,
    ) -> SequenceHandle:
        """Reserves KV space for `tokens` (the whole prompt), reusing the longest cached
        prefix; waits for blocks (first come, first served) up to `timeout` seconds (0:
        never).

        `num_new_tokens` (chunked prefill): slots only for the cached tokens plus that many
        (default: all of them); `extend(num_new_tokens=...)` reserves the next chunks.
        `preempted=True`: a request resumed after preemption by recompute, whose lookup is
        counted in `preempted_*` and in no hit-rate counter."""
        if self._subs:
            self._dispatcher.attach()
        if timeout is not None:
            self._check_timeout(timeout)
        if self._remote is not None:
            # The store's blocks after the local prefix become cached blocks first.
            await self._remote.lookup(tokens, salt)
        r = self._core.allocate(request_id, tokens, salt, timeout != 0, num_new_tokens, preempted)
        if self._subs:
            self._pressure_now()
        if isinstance(r, Ticket):  # queued: blocks are short
            return await self._redeem(r, timeout)
        return r

    def try_allocate(
        self,
        request_id: RequestId,
        tokens: Sequence[int] | np.ndarray,
        *,
        salt: str | bytes | int | None = None,
        num_new_tokens: int | None = None,
        preempted: bool = False,
    ) -> SequenceHandle | None:
        """Like `allocate`, synchronous and never waiting: None when blocks are short."""
        h = self._core.try_allocate(request_id, tokens, salt, num_new_tokens, preempted)
        if self._subs:
            self._pressure_now()
        return h

    async def extend(
        self,
        request_id: RequestId,
        tokens: Sequence[int] | np.ndarray | int | None = None,
        *,
        num_new_tokens: int | None = None,
        timeout: float | None = None,
    ) -> SequenceHandle:
        """Appends generated tokens (ids, or an int count when ids are unknown); or, while
        prompt tokens are still without slots, `num_new_tokens=n` reserves the next `n` of
        them (the next chunk). Waits for blocks like `allocate`."""
        if self._subs:
            self._dispatcher.attach()
        if timeout is not None:
            self._check_timeout(timeout)
        r = self._core.extend(request_id, tokens, timeout != 0, num_new_tokens)
        if self._subs:
            self._pressure_now()
        if isinstance(r, Ticket):  # queued: blocks are short
            return await self._redeem(r, timeout)
        return r

    def try_extend(
        self,
        request_id: RequestId,
        tokens: Sequence[int] | np.ndarray | int | None = None,
        *,
        num_new_tokens: int | None = None,
    ) -> SequenceHandle | None:
        """Like `extend`, synchronous and never waiting: None when blocks are short."""
        try:
            h = self._core.extend(request_id, tokens, False, num_new_tokens)
        except OutOfBlocksError:
            return None
        if self._subs:
            self._pressure_now()
        assert not isinstance(h, Ticket), "a call that may not wait returns no ticket"
        return h

    async def truncate(self, request_id: RequestId, num_tokens: int) -> SequenceHandle:
        """Drops the tokens past `num_tokens` (1 <= num_tokens <= the sequence's
        `num_tokens`): rejected speculative tokens, or a rollback. Blocks past the new end
        are freed; a block that was full and is now partial is never written in place while
        the prefix cache names its old tokens (the next append copies it if it is shared)."""
        h = self._core.truncate(request_id, num_tokens)
        if self._subs:
            self._pressure_now()
        return h

    async def extend_batch(
        self,
        request_ids: Sequence[RequestId],
        tokens: Sequence[int | Sequence[int] | np.ndarray] | np.ndarray | Any = None,
        *,
        counts: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """One decode step in one engine call, all or nothing (never waits).

        `tokens`: a flat sequence of ints, a 1-D integer array or a CPU tensor holds ONE new
        token id per request; an entry that is a list (or array) of ids appends them all.
        `counts=` (instead of `tokens`): per request, a number of tokens whose ids are
        unknown (those blocks are never cached). Raises OutOfBlocksError, with nothing
        changed, when blocks are short. Then `batch_layout(request_ids, n)` gives the
        kernels' metadata for the step."""
        self._core.extend_batch(request_ids, tokens, counts=counts)
        if self._subs:
            self._pressure_now()

    def lookup_prefix(
        self, tokens: Sequence[int] | np.ndarray, *, salt: str | bytes | int | None = None
    ) -> PrefixMatch:
        """What `allocate` would reuse of `tokens` now, per tier (nothing is allocated)."""
        return PrefixMatch._from_core(self._core.lookup_prefix(tokens, salt))

    async def deallocate(self, request_id: RequestId) -> None:
        """Releases the sequence: full hashed blocks stay cached (evictable)."""
        self._core.deallocate(request_id)
        if self._subs:
            self._pressure_now()

    async def fork(self, parent_id: RequestId, child_id: RequestId) -> SequenceHandle:
        """The child shares every block of the parent, copy-on-write."""
        h = self._core.fork(parent_id, child_id)
        if self._subs:
            self._pressure_now()
        return h

    async def swap_out(self, request_id: RequestId) -> SequenceHandle:
        """Moves the sequence's blocks to the host tier, byte for byte, and frees its device
        blocks. Raises OutOfBlocksError (the sequence stays resident and intact) when the
        host tier is short, InvalidStateError when it is already swapped out."""
        r = self._core.swap_out(request_id)
        if self._subs:
            self._pressure_now()
        if isinstance(r, Ticket):  # queued: blocks are short
            return await self._redeem(r, None)
        return r

    async def swap_in(self, request_id: RequestId) -> SequenceHandle:
        """Moves a swapped-out sequence back to the device tier (block ids may change).
        Raises OutOfBlocksError (nothing changed) when device blocks are short: swap in when
        pressure allows, as a scheduler resumes preempted requests."""
        r = self._core.swap_in(request_id)
        if self._subs:
            self._pressure_now()
        if isinstance(r, Ticket):  # queued: blocks are short
            return await self._redeem(r, None)
        return r

    async def flush(self, *, timeout: float | None = None) -> None:
        """Waits until every disk and remote write issued so far has landed (both tiers
        write behind: a spilled block is on disk, readable by later lookups, once its write
        landed; a failed write is counted in `disk_write_errors` / `remote_dropped_writes`
        and lands as a miss). Writes issued after the call are not waited for. The event
        loop keeps running meanwhile; `timeout` (seconds) raises TimeoutError, and
        cancelling it is safe (a flush holds nothing). Without a write-behind tier it
        returns at once. `close()` lands every write too (remote ones within
        `remote_timeout_s`)."""
        self._check_timeout(timeout)
        ticket = self._core.flush()
        if ticket is None:
            return
        try:
            await self._dispatcher.wait(ticket, timeout)
        except TimeoutError:
            self._core.cancel_ticket(ticket)
            raise TimeoutError(f"writes still in flight after {timeout} s") from None
        except BaseException:
            self._core.cancel_ticket(ticket)
            raise
        self._core.take_flush(ticket)

    async def gc(self, *, target_free_ratio: float | None = None) -> GcStats:
        """Evicts LRU cached blocks until the blank share of the device tier reaches the
        target (default: low_watermark)."""
        g = GcStats(**self._core.gc(target_free_ratio))
        if self._subs:
            self._pressure_now()
        return g

    def can_allocate(
        self,
        tokens_or_count: Sequence[int] | np.ndarray | int,
        *,
        salt: str | bytes | int | None = None,
        num_new_tokens: int | None = None,
    ) -> bool:
        """Whether a prompt fits now without waiting. An int counts tokens with nothing
        cached; a prompt's tokens (with its `salt`, and `num_new_tokens` for a first chunk)
        answer exactly whether `allocate` would succeed now, prefix hits included. False
        while any call waits for blocks."""
        return self._core.can_allocate(tokens_or_count, salt, num_new_tokens)

    def get(self, request_id: RequestId) -> SequenceHandle | None:
        """The live sequence of `request_id` as it is now, or None."""
        return self._core.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._core

    def __len__(self) -> int:
        return len(self._core)

    def reset_prefix_cache(self) -> bool:
        """Drops every evictable cached block; False (nothing dropped) while any sequence
        is live."""
        return self._core.reset_prefix_cache()

    # ----- gauges (O(1), no snapshot) ------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Device blocks no live sequence owns (evictable ones included)."""
        return self._core.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        """Free device blocks that still hold cached prefixes."""
        return self._core.num_evictable_blocks

    @property
    def num_used_blocks(self) -> int:
        """Device blocks owned by live sequences (used + free == num_blocks)."""
        return self._core.num_used_blocks

    @property
    def num_waiting(self) -> int:
        """Calls waiting for blocks."""
        return self._core.num_waiting

    # ----- pressure ------------------------------------------------------------------------

    @property
    def pressure_level(self) -> PressureLevel:
        """The device tier's pressure now (LOW, HIGH or CRITICAL; see the watermarks)."""
        return PressureLevel(self._core.pressure_level())

    def on_pressure(self, callback: PressureCallback) -> Subscription:
        """Calls `callback(event)` on each change of pressure level, on the event loop's
        thread and never under an engine lock: a plain callback before the call that changed
        the level returns; an `async def` one scheduled at once on this subscription's own
        task (its invocations run one after another, in level order). A callback that
        raises is logged and counted (`callback_errors`)."""
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        sub = Subscription(self, callback)
        self._subs.append(sub)
        self._core.set_subscribed(True)
        if _in_async_context():
            self._dispatcher.attach()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if not self._subs and not self._closed:
            self._core.set_subscribed(False)

    def _pressure_now(self) -> None:
        """Delivers the transitions a call just made before it returns to its caller (on
        the loop's thread; from another thread they wait for the loop, through the eventfd)."""
        if self._core.pressure_pending and self._dispatcher.on_loop_thread():
            self._fire_pressure(self._core.drain_pressure())

    def _fire_pressure(self, events: Sequence[PressureEvent]) -> None:
        """Delivers transitions, oldest first, each to every subscriber before the next.
        NOTE: a callback's own calls (a CRITICAL handler that frees blocks) queue their
        transitions here and return; this loop delivers them after the current one reached
        every subscriber, so every subscriber sees the levels in the order they happened."""
        self._pressure.extend(events)
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._pressure:
                event = self._pressure.popleft()
                for sub in list(self._subs):
                    if sub.active:
                        self._call_subscriber(sub, event)
        finally:
            self._delivering = False

    def _call_subscriber(self, sub: Subscription, event: PressureEvent) -> None:
        try:
            result = sub.callback(event)
        except Exception:
            log.exception("ferrumkv pressure callback %r raised", sub.callback)
            self._core.record_callback_error()
            return
        if result is not None and inspect.isawaitable(result):
            sub._queue.append(result)
            if not sub._running:
                self._start_runner(sub)

    def _start_runner(self, sub: Subscription) -> None:
        """Starts the task that awaits `sub`'s queued callbacks one after another (asyncio
        or trio, whichever runs this thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            sub._running = True
            task = loop.create_task(self._run_callbacks(sub))
            self._async_tasks.add(task)
            task.add_done_callback(self._async_tasks.discard)
            return
        trio = sys.modules.get("trio")
        if trio is not None and _in_async_context():
            sub._running = True
            trio.lowlevel.spawn_system_task(self._run_callbacks, sub)
            return
        # No event loop runs on this thread, so nothing can await the callback.
        while sub._queue:
            _close_awaitable(sub._queue.popleft())
        log.error("ferrumkv async pressure callback %r needs a running event loop", sub.callback)
        self._core.record_callback_error()

    async def _run_callbacks(self, sub: Subscription) -> None:
        try:
            while sub._queue:
                awaitable = sub._queue.popleft()
                try:
                    await awaitable
                except Exception:
                    log.exception("ferrumkv async pressure callback %r raised", sub.callback)
                    if not self._closed:
                        self._core.record_callback_error()
        except BaseException:  # the loop is shutting down: nothing will await the rest
            while sub._queue:
                _close_awaitable(sub._queue.popleft())
            raise
        finally:
            sub._running = False

    # ----- stats and events ----------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A snapshot of every gauge and counter (a few microseconds; the O(1) gauges
        `num_free_blocks` etc. are cheaper still). Logs the engine's incidents since the
        last look (see `_dispatch.IncidentLog`)."""
        self._dispatcher.incidents.log(self._core)
        stats: CacheStats = self._core.stats_object()
        return stats

    def iteration_stats(self) -> IterationStats:
        """The counters' changes since the previous call (one serving iteration), with the
        tiers' block counts now."""
        return IterationStats._from_core(self._core.iteration_stats())

    def drain_events(self) -> list[KvEvent]:
        """The KV events recorded since the last drain, oldest first. With
        `kv_events_endpoint` set they are published there instead (InvalidStateError)."""
        if self._publisher is not None:
            raise InvalidStateError(
                f"KV events are published on {self.config.kv_events_endpoint}: the publisher "
                "is their consumer"
            )
        return self._core.drain_events()

    def drain_eviction_events(self) -> list[EvictionEvent]:
        """The sampled blocks evicted since the last drain, with their residency (what
        `ferrumkv.metrics` turns into histograms; a bounded queue)."""
        return self._core.drain_eviction_events()

    # ----- data ----------------------------------------------------------------------------

    def block_table(self, request_ids: Sequence[RequestId], pad: int = 0) -> np.ndarray:
        """int32 `[len(request_ids), max_blocks]` block ids, padded with `pad`. The default
        pad 0 is a real block, so a kernel may gather with the table as it is: mask the
        padded entries by the sequence lengths (`pad=-1` marks them instead)."""
        raw, rows, cols = self._core.block_table(request_ids, int(pad))
        return np.frombuffer(raw, dtype=np.int32).reshape(rows, cols)

    def batch_layout(
        self,
        request_ids: Sequence[RequestId],
        num_new_tokens: int | Sequence[int] | np.ndarray,
        *,
        pad: int = 0,
    ) -> BatchLayout:
        """The metadata paged-attention kernels take for one forward step over
        `request_ids`, whose last `num_new_tokens` tokens (an int, or one per request) are
        computed now: `block_table` int32 `[B, max_blocks]` (padded with `pad`: 0, a real
        block, masked by `seq_lens`), `seq_lens` int32 `[B]`, `query_start_loc` int32
        `[B + 1]` and `slot_mapping` int64 (`block_id * block_size + offset` per new
        token, in batch order), as numpy arrays; `.to_torch(device)` gives tensors. An
        unknown request raises UnknownRequestError, a swapped one InvalidStateError, a bad
        count ValueError; nothing changes either way."""
        return self._core.batch_layout(request_ids, num_new_tokens, pad)

    def set_compute_stream(self, stream: Any) -> None:
        """Order the cache's GPU block copies against your kernels on `stream`: a
        `torch.cuda.Stream` (its device must be the cache's), a raw `CUstream` handle as an
        int, or None for the legacy default stream (torch's default, the initial setting).

        Every copy the cache makes (swap, offload, onboard, copy-on-write, partial reuse)
        first waits, on the GPU, for the work enqueued on this stream so far, and work you
        enqueue on it afterwards waits for the copy: no CPU thread waits for either. Set it
        once to the stream your attention kernels run on, or before each step if that
        changes. The stream must stay alive while it is set (torch's streams live as long as
        the process); set None before destroying one you created with `ExternalStream`. On
        `device="cpu"` only None is accepted (there are no streams)."""
        self._check_open()
        if stream is None:
            handle = 0
        elif isinstance(stream, int) and not isinstance(stream, bool):
            if stream < 0:
                raise ValueError(f"stream must be a CUstream handle >= 0, got {stream}")
            handle = stream
        elif hasattr(stream, "cuda_stream"):
            device = getattr(stream, "device", None)
            index = getattr(device, "index", None)
            if getattr(device, "type", "cuda") != "cuda" or (
                index is not None and f"cuda:{index}" != self.config.device
            ):
                raise ValueError(
                    f"stream is on {device}, but the cache's device is {self.config.device}"
                )
            handle = int(stream.cuda_stream)
        else:
            raise TypeError(
                "stream must be a torch.cuda.Stream, a CUstream handle (int) or None, "
                f"not {type(stream).__name__}"
            )
        self._core.set_compute_stream(handle)

    @property
    def compute_stream(self) -> int:
        """The `CUstream` handle copies are ordered against (0: the legacy default)."""
        return self._core.compute_stream

    def kv_view(self, layer: int) -> Any:
        """Zero-copy DLPack view `[num_blocks, 2, block_size, heads, head_dim]` of a layer."""
        _check_index("layer", layer)
        return self._core.kv_view(layer)

    def _kv_array(self, name: str, a: Any, n: int | None, *, contiguous: bool = True) -> np.ndarray:
        """`a` (an array or a CPU tensor) as a numpy array of the cache's dtype and shape
        `[n, heads, head_dim]`, viewed without a copy; `contiguous`: copied into C order if
        it is not."""
        if not isinstance(a, np.ndarray):
            a = self._from_tensor(name, a)
        if a.dtype != self._np_dtype:
            raise TypeError(f"{name} must have dtype {self._np_dtype} (the cache's), not {a.dtype}")
        if a.ndim != 3 or a.shape[1:] != self._kv_shape or (n is not None and a.shape[0] != n):
            want = f"[{'n' if n is None else n}, {self._kv_shape[0]}, {self._kv_shape[1]}]"
            raise ValueError(f"{name} must have shape {want}, got {list(a.shape)}")
        return np.ascontiguousarray(a) if contiguous else a

    def _from_tensor(self, name: str, t: Any) -> np.ndarray:
        """A numpy view (no copy) of a CPU tensor of the cache's dtype: torch, or anything
        else that exports DLPack. bfloat16 and fp8 tensors, which numpy has no type for,
        are read as their raw bits (the cache stores them so)."""
        if not hasattr(t, "__dlpack__"):
            raise TypeError(f"{name} must be a numpy array or a CPU tensor, not {type(t).__name__}")
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(t, torch.Tensor):
            if t.device.type != "cpu":
                raise TypeError(
                    f"{name} must be a CPU tensor, not one on {t.device} (write_kv and read_kv "
                    "copy on the host; use kv_view for device memory)"
                )
            have = str(t.dtype).removeprefix("torch.")
            want = self.config.dtype
            if have != want and not (want == "uint8" and have.startswith("float8")):
                raise TypeError(f"{name} must have dtype {want} (the cache's), not {have}")
            t = t.detach()
            if have == "bfloat16":
                t = t.view(torch.int16)
            elif have.startswith("float8"):
                t = t.view(torch.uint8)
            return np.from_dlpack(t).view(self._np_dtype)
        return np.from_dlpack(t)

    def write_kv(self, request_id: RequestId, layer: int, start: int, k: Any, v: Any) -> None:
        """Copies K and V (`[n, num_kv_heads, head_dim]` of the cache's dtype: numpy arrays
        or CPU tensors) into token positions `start .. start+n` of one layer."""
        k = self._kv_array("k", k, None)
        v = self._kv_array("v", v, k.shape[0])
        _check_index("layer", layer)
        _check_index("start", start)
        self._core.write_kv(request_id, layer, start, k.view(np.uint8), v.view(np.uint8))
        if self._subs:
            self._pressure_now()  # a copy-on-write takes blocks

    def read_kv(
        self,
        request_id: RequestId,
        layer: int,
        start: int,
        n: int,
        *,
        out: tuple[Any, Any] | None = None,
    ) -> tuple[Any, Any]:
        """Copies K and V of token positions `start .. start+n` of one layer out: into new
        numpy arrays, or into `out=(k, v)` (C-contiguous numpy arrays or CPU tensors
        `[n, num_kv_heads, head_dim]` of the cache's dtype), which it returns."""
        _check_index("layer", layer)
        _check_index("start", start)
        _check_index("n", n)
        if out is None:
            k = np.empty((n, *self._kv_shape), dtype=self._np_dtype)
            v = np.empty_like(k)
            result: tuple[Any, Any] = (k, v)
        else:
            k_out, v_out = out
            k = self._kv_array("k", k_out, n, contiguous=False)
            v = self._kv_array("v", v_out, n, contiguous=False)
            for name, a in (("k", k), ("v", v)):
                if not (a.flags.c_contiguous and a.flags.writeable):
                    raise ValueError(f"out {name} must be C-contiguous and writable")
            result = (k_out, v_out)
        self._core.read_kv(request_id, layer, start, k.view(np.uint8), v.view(np.uint8), k.nbytes)
        return result

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} sequences"
        c = self.config
        return f"KvCache(device={c.device!r}, num_blocks={c.num_blocks}, {state})"


def _close_awaitable(awaitable: Awaitable[None]) -> None:
    """Closes an awaitable that will never be awaited (no 'never awaited' warning)."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


def _check_index(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def _in_async_context() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()
        return True
    except RuntimeError:
        return False
