"""Drive a :class:`~ferrumkv.KvCache` the way a serving loop would (``ferrumkv replay``).

Every request is an asyncio task: it waits for its arrival (and for the previous turn of its
chat), takes one of ``max_concurrency`` slots, allocates its prompt, decodes one token per
step (yielding to the other tasks between steps) and deallocates. With ``chunk_size`` the
prompt is prefilled in chunks, as vLLM v1 and SGLang do: the allocation looks the whole prompt
up and reserves the cached tokens plus one chunk, and each later step reserves the next chunk
(``extend(num_new_tokens=)``), interleaved with the other sequences' decode steps.

Scheduling follows vLLM's first-come-first-served policy:

* Admission is FIFO. A request is admitted when no preempted sequence is waiting to resume
  and its prompt leaves the device tier above the CRITICAL watermark (or nothing runs).
* On CRITICAL pressure (reported through ``on_pressure``) a controller task preempts the
  newest running sequences, never the oldest one, until the level drops. Preemption is a
  ``swap_out`` when the cache has a host tier, otherwise ``deallocate`` followed later by
  recomputation: re-allocating the tokens so far with ``preempted=True`` (the prefix cache
  mostly serves them, and the lookup stays out of the hit rates), chunk by chunk again when
  ``chunk_size`` is set.
* A sequence whose extend cannot get a block within ``wait_timeout_s`` preempts itself,
  unless it is the oldest running one, which keeps waiting: everything newer yields to it.
* Preempted sequences resume oldest first once the device tier would stay at LOW pressure
  with them back (or nothing else runs).
* A request is rejected when it needs more blocks than the device tier holds, or when a
  call for it fails although no other live sequence owns a device block (waiting for
  releases cannot help then). The two reasons are counted apart (``requests_rejected_too_large``,
  ``requests_rejected_no_room``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import itertools
import json
import math
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferrumkv import (
    CacheConfig,
    CacheStats,
    KvCache,
    OutOfBlocksError,
    PressureEvent,
    PressureLevel,
)
from ferrumkv._console import Column, Progress, Table, progress_bar, render_table
from ferrumkv.workload import InfiniteCacheHits, Request, Workload

PROGRESS_INTERVAL_S = 0.1
"""How often the progress line on stderr is redrawn."""

DEFAULT_WAIT_TIMEOUT_S = 0.1
"""How long one engine call may wait for blocks before the loop reconsiders."""


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay a workload.

    ``speedup``: arrival times are divided by it; ``None`` ignores them (as fast as
    possible). ``wait_timeout_s``: how long one engine call may wait for blocks before the
    scheduler reconsiders. ``sample_interval_s``: period of the time series kept for plots,
    ``None`` for none. ``chunk_size``: prefill prompts this many uncached tokens per step
    (``None``: the whole prompt at admission).
    """

    max_concurrency: int
    chunk_size: int | None = None
    speedup: float | None = None
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
    progress: bool = False
    sample_interval_s: float | None = None


class Rejection(enum.Enum):
    """Why the loop rejected a request (the value is what the table says)."""

    TOO_LARGE = "larger than the device tier"
    """It needs more blocks than the whole device tier holds."""
    NO_ROOM = "no room on an otherwise empty device"
    """A call for it failed although no other live sequence owns a device block."""


@dataclass
class Counters:
    """What the serving loop itself counted."""

    done: int = 0
    rejected_too_large: int = 0
    rejected_no_room: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_chunks: int = 0
    preemptions: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    recomputes: int = 0
    critical_events: int = 0
    engine_ops: int = 0
    peak_usage: float = 0.0
    peak_used_blocks: int = 0

    @property
    def rejected(self) -> int:
        """Requests rejected, for either reason."""
        return self.rejected_too_large + self.rejected_no_room

    def reject(self, reason: Rejection) -> None:
        """Count one rejection for `reason`."""
        if reason is Rejection.TOO_LARGE:
            self.rejected_too_large += 1
        else:
            self.rejected_no_room += 1


@dataclass(frozen=True)
class Sample:
    """One point of the time series: seconds since start, device usage, cumulative block hit
    rate, pressure level, requests finished (done or rejected) so far, the cumulative
    preemptions and offloaded / onboarded blocks, and the host and disk tiers' usage (None
    without that tier)."""

    time_s: float
    usage: float
    hit_rate: float
    pressure: int
    finished: int = 0
    preemptions: int = 0
    offload_blocks: int = 0
    onboard_blocks: int = 0
    host_usage: float | None = None
    disk_usage: float | None = None


@dataclass(frozen=True)
class ReplayResult:
    """Everything a replay measured: loop counters, final engine stats, wall time, samples,
    and the requests whose prompts the engine looked up (admitted), in admission order: the
    infinite-cache figure is computed on exactly these, so it compares with the hit rates."""

    counters: Counters
    stats: CacheStats
    wall_s: float
    samples: tuple[Sample, ...]
    admitted: tuple[Request, ...]


@dataclass(eq=False)
class _Sequence:
    """A request between admission and completion.

    ``order`` is the admission rank (larger: newer). ``busy``: inside an engine call that
    may wait, so not preemptible. ``preempted``: off the device (``swapped`` to the host
    tier, or dropped for recompute) until ``resumed`` is set. ``dropped``: rejected while
    preempted. ``reserved``: how many of the tokens so far have slots (fewer than
    ``num_tokens`` while a chunked prefill or a recompute is under way).
    """

    request: Request
    order: int
    prompt: np.ndarray
    output: np.ndarray
    reserved: int
    generated: int = 0
    busy: bool = False
    preempted: bool = False
    swapped: bool = False
    dropped: bool = False
    resumed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + self.generated

    @property
    def prefilling(self) -> bool:
        """Whether some of the tokens so far still have no slots (the next step is a chunk)."""
        return self.reserved < self.num_tokens

    def tokens(self) -> np.ndarray:
        """Prompt plus the tokens generated so far (what a recompute re-allocates)."""
        return np.concatenate([self.prompt, self.output[: self.generated]])


class _Broadcast:
    """Wakes every current waiter on ``notify`` (unlike an Event, nobody has to clear it)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Replayer:
    """The serving loop: request tasks, the preemption controller and the observers."""

    def __init__(
        self,
        cache: KvCache,
        config: CacheConfig,
        workload: Workload,
        options: ReplayOptions,
        finished: dict[str, asyncio.Event] | None = None,
    ) -> None:
        """`finished`: the requests' completion events, shared by replicas that serve one
        workload (a conversation's next turn may go to another replica)."""
        self._cache = cache
        self._workload = workload
        self._options = options
        self._block_size = config.block_size
        self._total_blocks = cache.stats().device.total_blocks
        self._low_watermark = config.low_watermark
        self._high_watermark = config.high_watermark
        self._host_tier = config.host_blocks > 0
        self.counters = Counters()
        self.samples: list[Sample] = []
        self._running: dict[str, _Sequence] = {}
        self._preempted: list[_Sequence] = []
        self.admitted: list[Request] = []
        self._finished = (
            finished
            if finished is not None
            else {request.request_id: asyncio.Event() for request in workload.requests}
        )
        self._slots = asyncio.Semaphore(options.max_concurrency)
        self._admission = asyncio.Lock()
        self._changed = _Broadcast()
        self._wake_controller = asyncio.Event()
        self._start = time.perf_counter()

    # ------------------------------------------------------------------ running

    async def run(self) -> float:
        """Serve every request; return the wall time in seconds."""
        subscription = self._cache.on_pressure(self._on_pressure)
        self._start = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as group:
                helpers = self.start_helpers(group, progress=self._options.progress)
                requests = [group.create_task(self._serve(r)) for r in self._workload.requests]
                group.create_task(_cancel_when_done(requests, helpers))
        except BaseExceptionGroup as group_error:
            raise _first_leaf(group_error) from None
        finally:
            subscription.cancel()
        self._sample()
        return time.perf_counter() - self._start

    def start_helpers(
        self, group: asyncio.TaskGroup, *, progress: bool
    ) -> list[asyncio.Task[None]]:
        """The preemption controller and the observers, as tasks of `group`."""
        helpers = [group.create_task(self._control())]
        if self._options.sample_interval_s is not None:
            helpers.append(group.create_task(self._sample_periodically()))
        if progress:
            helpers.append(group.create_task(self._show_progress()))
        return helpers

    async def _serve(self, request: Request) -> None:
        """One request from arrival to completion (or rejection)."""
        try:
            await self._arrive(request)
            await self.serve_arrived(request)
        finally:
            self._finished[request.request_id].set()

    async def serve_arrived(self, request: Request) -> None:
        """One request that has arrived, from admission to completion (or rejection)."""
        async with self._slots:
            seq = await self._admit(request)
            if seq is not None and await self._decode(seq):
                await self._finish(seq)

    async def _arrive(self, request: Request) -> None:
        """Wait for the arrival time (scaled by the speedup) and the previous turn."""
        await arrival(request, self._finished, self._start, self._options.speedup)

    async def _admit(self, request: Request) -> _Sequence | None:
        """Allocate the prompt, first come first served; ``None`` when rejected."""
        vocab = self._workload.vocab_size
        prompt = request.prompt_tokens(vocab)
        async with self._admission:
            while True:
                await self._wait_for_room(len(prompt))
                try:
                    handle = await self._engine(
                        self._cache.allocate(
                            request.request_id,
                            prompt,
                            timeout=self._timeout_for(len(prompt)),
                            num_new_tokens=self._options.chunk_size,
                        )
                    )
                    break
                except OutOfBlocksError:
                    reason = self._rejection(len(prompt), own_blocks=0)
                    if reason is not None:
                        self.counters.reject(reason)
                        return None
        self.admitted.append(request)
        output = request.output_tokens(vocab)
        seq = _Sequence(request, len(self.admitted), prompt, output, reserved=handle.num_tokens)
        self._running[seq.request_id] = seq
        self.counters.prompt_tokens += len(prompt)
        self._note_usage()
        return seq

    async def _wait_for_room(self, num_tokens: int) -> None:
        """Wait until no preempted sequence waits to resume and ``num_tokens`` fit without
        making the pressure CRITICAL, or nothing runs. A prompt that can never fit goes at
        once (the engine rejects it)."""
        while not self._never_fits(num_tokens) and (
            self._preempted
            or (self._running and not self._has_room(num_tokens, self._high_watermark))
        ):
            await self._changed.wait()

    async def _decode(self, seq: _Sequence) -> bool:
        """Prefill the rest of the prompt one chunk per step, then generate the output one
        token per step; False when the sequence was rejected.

        Each step first yields to the other tasks, so steps interleave and the last one is
        directly followed by the deallocation (a finished sequence is never preempted).
        """
        while seq.prefilling or seq.generated < len(seq.output):
            await asyncio.sleep(0)
            if not await self._step(seq):
                return False
        return True

    async def _step(self, seq: _Sequence) -> bool:
        """Append the next token, preempting or rejecting this sequence when it cannot."""
        while True:
            while seq.preempted:
                await seq.resumed.wait()
            if seq.dropped:
                return False
            if await self._try_extend(seq):
                return True
            handle = self._cache.get(seq.request_id)
            own_blocks = 0 if handle is None else len(handle.block_ids)
            reason = self._rejection(seq.num_tokens + 1, own_blocks)
            if reason is not None:
                await self._reject_running(seq, reason)
                return False
            if seq is not self._oldest_running():
                await self._preempt(seq)

    async def _try_extend(self, seq: _Sequence) -> bool:
        """One step: the next prefill chunk, or else the next token; False when no block came
        within the wait timeout."""
        prefill = seq.prefilling
        seq.busy = True
        try:
            if prefill:
                chunk = min(
                    self._options.chunk_size or seq.num_tokens, seq.num_tokens - seq.reserved
                )
                call = self._cache.extend(
                    seq.request_id, num_new_tokens=chunk, timeout=self._timeout_for(seq.num_tokens)
                )
            else:
                token = [int(seq.output[seq.generated])]
                timeout = self._timeout_for(seq.num_tokens + 1)
                call = self._cache.extend(seq.request_id, token, timeout=timeout)
            handle = await self._engine(call)
        except OutOfBlocksError:
            self._notify()
            return False
        finally:
            seq.busy = False
        blocks_before = math.ceil(seq.reserved / self._block_size)
        if prefill:
            self.counters.prefill_chunks += 1
        else:
            seq.generated += 1
            self.counters.generated_tokens += 1
        seq.reserved = handle.num_tokens
        if math.ceil(seq.reserved / self._block_size) > blocks_before:
            self._note_usage()
        return True

    async def _finish(self, seq: _Sequence) -> None:
        del self._running[seq.request_id]
        await self._engine(self._cache.deallocate(seq.request_id))
        self.counters.done += 1
        self._notify()

    async def _reject_running(self, seq: _Sequence, reason: Rejection) -> None:
        """Drop a running sequence that cannot take its next step, for `reason`."""
        del self._running[seq.request_id]
        await self._engine(self._cache.deallocate(seq.request_id))
        self.counters.reject(reason)
        self._notify()

    # ------------------------------------------------------------------ preemption

    async def _control(self) -> None:
        """Rebalance whenever something changed (pressure level, a finish, a failed wait),
        and at least every ``wait_timeout_s`` while a preempted sequence waits to resume."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(
                    self._options.wait_timeout_s if self._preempted else None
                ):
                    await self._wake_controller.wait()
            self._wake_controller.clear()
            await self._rebalance()

    async def _rebalance(self) -> None:
        """Preempt the newest sequences while CRITICAL, else resume the oldest preempted."""
        while self._cache.pressure_level is PressureLevel.CRITICAL:
            victim = self._newest_preemptible()
            if victim is None:
                break
            await self._preempt(victim)
        while self._preempted and self._cache.pressure_level is not PressureLevel.CRITICAL:
            seq = self._preempted[0]
            if self._running and not self._has_room(seq.num_tokens, self._low_watermark):
                break
            if await self._resume(seq):
                continue
            if not self._hopeless(own_blocks=0):
                break
            await self._drop_preempted(seq)

    async def _preempt(self, seq: _Sequence) -> None:
        """Take a running sequence off the device: swap it out, or drop it to recompute."""
        del self._running[seq.request_id]
        seq.preempted = True
        seq.resumed.clear()
        self.counters.preemptions += 1
        seq.swapped = self._host_tier and await self._swap_out(seq)
        if not seq.swapped:
            await self._engine(self._cache.deallocate(seq.request_id))
        bisect.insort(self._preempted, seq, key=lambda s: s.order)
        self._notify()

    async def _swap_out(self, seq: _Sequence) -> bool:
        """Move the sequence to the host tier; False when the host tier is full."""
        try:
            await self._engine(self._cache.swap_out(seq.request_id))
        except OutOfBlocksError:
            return False
        self.counters.swap_outs += 1
        return True

    async def _resume(self, seq: _Sequence) -> bool:
        """Bring a preempted sequence back; False when its blocks are not available yet."""
        try:
            if seq.swapped:
                # No timeout here: swap_in never waits for blocks (it raises OutOfBlocksError
                # at once), and timing out its copy would not stop it (a swap in flight
                # finishes), so a retry would find the swap still in progress.
                await self._engine(self._cache.swap_in(seq.request_id))
                self.counters.swap_ins += 1
            else:
                # preempted=True: the lookup of a resumed request stays out of the hit rates
                # (they compare with the infinite-cache rate of first admissions).
                handle = await self._engine(
                    self._cache.allocate(
                        seq.request_id,
                        seq.tokens(),
                        timeout=self._options.wait_timeout_s,
                        num_new_tokens=self._options.chunk_size,
                        preempted=True,
                    )
                )
                seq.reserved = handle.num_tokens
                self.counters.recomputes += 1
        except (OutOfBlocksError, TimeoutError):
            return False
        self._preempted.remove(seq)
        self._running[seq.request_id] = seq
        seq.preempted = False
        seq.swapped = False
        seq.resumed.set()
        self._note_usage()
        self._notify()
        return True

    async def _drop_preempted(self, seq: _Sequence) -> None:
        """Reject a preempted sequence the device cannot take back even when empty."""
        self._preempted.remove(seq)
        if seq.swapped:
            await self._engine(self._cache.deallocate(seq.request_id))
        seq.dropped = True
        seq.preempted = False
        seq.resumed.set()
        self.counters.reject(Rejection.NO_ROOM)
        self._notify()

    def _newest_preemptible(self) -> _Sequence | None:
        """The newest running sequence that is not inside an engine call and not the oldest."""
        oldest = self._oldest_running()
        candidates = [s for s in self._running.values() if not s.busy and s is not oldest]
        return max(candidates, key=lambda s: s.order, default=None)

    def _oldest_running(self) -> _Sequence | None:
        return min(self._running.values(), key=lambda s: s.order, default=None)

    def _on_pressure(self, event: PressureEvent) -> None:
        """Pressure callback: note CRITICAL episodes, sample, and wake the controller."""
        if event.level is PressureLevel.CRITICAL:
            self.counters.critical_events += 1
        if self._options.sample_interval_s is not None:
            self._sample()
        self._notify()

    def _notify(self) -> None:
        self._wake_controller.set()
        self._changed.notify()

    # ------------------------------------------------------------------ capacity

    def _never_fits(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` need more blocks than the whole device tier holds."""
        return math.ceil(num_tokens / self._block_size) > self._total_blocks

    def _timeout_for(self, num_tokens: int) -> float:
        """How long a call for ``num_tokens`` may wait: not at all when it can never fit."""
        return 0.0 if self._never_fits(num_tokens) else self._options.wait_timeout_s

    def _rejection(self, num_tokens: int, own_blocks: int) -> Rejection | None:
        """Why a call for `num_tokens` by a sequence holding `own_blocks` device blocks,
        which failed after waiting, rejects it; ``None`` when waiting can still help."""
        if self._never_fits(num_tokens):
            return Rejection.TOO_LARGE
        if self._hopeless(own_blocks):
            return Rejection.NO_ROOM
        return None

    def _hopeless(self, own_blocks: int) -> bool:
        """Whether waiting cannot help a call that failed after waiting: every device block a
        live sequence owns is among the caller's ``own_blocks``, so no release frees any."""
        return self._cache.stats().device.used_blocks <= own_blocks

    def _has_room(self, num_tokens: int, floor_ratio: float) -> bool:
        """Whether ``num_tokens`` more tokens leave at least ``floor_ratio`` of the device
        tier reclaimable (free or evictable)."""
        free = self._cache.stats().device.free_blocks
        needed = math.ceil(num_tokens / self._block_size)
        return free - needed >= floor_ratio * self._total_blocks

    async def _engine(self, call: Awaitable[Any]) -> Any:
        """Await one engine call, counting it."""
        self.counters.engine_ops += 1
        return await call

    # ------------------------------------------------------------------ observers

    def _note_usage(self) -> None:
        """Track the peak device usage (called whenever usage may have grown)."""
        stats = self._cache.stats()
        self.counters.peak_usage = max(self.counters.peak_usage, stats.usage)
        self.counters.peak_used_blocks = max(
            self.counters.peak_used_blocks, stats.device.used_blocks
        )

    def _sample(self) -> None:
        stats = self._cache.stats()
        elapsed = time.perf_counter() - self._start

        def used(tier: Any) -> float | None:
            return tier.used_blocks / tier.total_blocks if tier.total_blocks else None

        self.samples.append(
            Sample(
                elapsed,
                stats.usage,
                stats.cache_hit_rate,
                int(stats.pressure_level),
                finished=self.counters.done + self.counters.rejected,
                preemptions=self.counters.preemptions,
                offload_blocks=stats.offload_blocks,
                onboard_blocks=stats.onboard_blocks,
                host_usage=used(stats.host),
                disk_usage=used(stats.disk),
            )
        )

    async def _sample_periodically(self) -> None:
        interval = self._options.sample_interval_s
        assert interval is not None, "started only with a sample interval"
        while True:
            self._sample()
            await asyncio.sleep(interval)

    async def _show_progress(self) -> None:
        """Redraw the progress bar on stderr until cancelled, and once more at the end."""
        with progress_bar(len(self._workload), "requests", sys.stderr) as bar:
            try:
                while True:
                    self._draw(bar)
                    await asyncio.sleep(PROGRESS_INTERVAL_S)
            finally:
                self._draw(bar)

    def _draw(self, bar: Progress) -> None:
        usage = self._cache.stats().usage
        status = (
            f"running {len(self._running)}  preempted {len(self._preempted)}  usage {usage:6.1%}"
        )
        bar.update(self.counters.done + self.counters.rejected, status)


async def arrival(
    request: Request,
    finished: dict[str, asyncio.Event],
    start: float,
    speedup: float | None,
) -> None:
    """Returns when `request` arrives: after the request it follows (`after`) finished, and
    not before its arrival time divided by `speedup` from `start` (`perf_counter` seconds)."""
    if request.after is not None:
        await finished[request.after].wait()
    if speedup is not None:
        delay = start + request.arrival_s / speedup - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def _cancel_when_done(
    requests: list[asyncio.Task[None]], helpers: list[asyncio.Task[None]]
) -> None:
    """Stop the helper tasks once every request task has finished."""
    await asyncio.wait(requests)
    for helper in helpers:
        helper.cancel()


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception inside a (possibly nested) exception group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def replay(
    cache: KvCache, config: CacheConfig, workload: Workload, options: ReplayOptions
) -> ReplayResult:
    """Replay ``workload`` against ``cache`` (built from ``config``), closing it at the end."""
    async with cache:
        replayer = _Replayer(cache, config, workload, options)
        wall_s = await replayer.run()
        return ReplayResult(
            replayer.counters,
            cache.stats(),
            wall_s,
            tuple(replayer.samples),
            tuple(replayer.admitted),
        )


# ---------------------------------------------------------------------- reporting


def summarize(
    result: ReplayResult, workload: Workload, infinite: InfiniteCacheHits
) -> dict[str, Any]:
    """The figures of a replay as one flat dict (the table's and the JSON file's)."""
    counters, stats = result.counters, result.stats
    return {
        "workload": workload.description,
        "requests": len(workload),
        "requests_done": counters.done,
        "requests_rejected": counters.rejected,
        "requests_rejected_too_large": counters.rejected_too_large,
        "requests_rejected_no_room": counters.rejected_no_room,
        "prompt_tokens": counters.prompt_tokens,
        "generated_tokens": counters.generated_tokens,
        "prefill_chunks": counters.prefill_chunks,
        "block_hit_rate": stats.cache_hit_rate,
        "infinite_block_hit_rate": infinite.block_hit_rate,
        "token_hit_rate": stats.token_hit_rate,
        "infinite_token_hit_rate": infinite.token_hit_rate,
        "device_blocks": stats.device.total_blocks,
        "peak_usage": counters.peak_usage,
        "peak_used_blocks": counters.peak_used_blocks,
        "critical_events": counters.critical_events,
        "preemptions": counters.preemptions,
        "swap_outs": counters.swap_outs,
        "swap_ins": counters.swap_ins,
        "recomputes": counters.recomputes,
        "preempted_prompt_tokens": stats.preempted_prompt_tokens,
        "preempted_cache_tokens": stats.preempted_cache_tokens,
        "offload_blocks": stats.offload_blocks,
        "offload_bytes": stats.offload_bytes,
        "onboard_blocks": stats.onboard_blocks,
        "onboard_bytes": stats.onboard_bytes,
        "disk_blocks_written": stats.disk_blocks_written,
        "disk_blocks_read": stats.disk_blocks_read,
        "disk_errors": stats.disk_write_errors + stats.disk_read_errors,
        "disk_checksum_failures": stats.disk_checksum_failures,
        "dropped_events": stats.dropped_events,
        "remote_hit_blocks": stats.remote_hit_blocks,
        "remote_miss_blocks": stats.remote_miss_blocks,
        "remote_read_bytes": stats.remote_read_bytes,
        "remote_write_blocks": stats.remote_write_blocks,
        "remote_write_bytes": stats.remote_write_bytes,
        "remote_dropped_writes": stats.remote_dropped_writes,
        "remote_errors": stats.remote_errors,
        "engine_ops": counters.engine_ops,
        "engine_ops_per_s": counters.engine_ops / result.wall_s if result.wall_s else 0.0,
        "wall_s": result.wall_s,
    }


def summary_table(summary: dict[str, Any]) -> Table:
    """The figures of a summary as label / value rows (what ``ferrumkv replay`` prints)."""
    s = summary
    rows = [
        ("workload", s["workload"]),
        ("requests", _requests_cell(s)),
        ("prompt tokens", f"{s['prompt_tokens']:,} ({s['prefill_chunks']:,} later prefill chunks)"),
        ("generated tokens", f"{s['generated_tokens']:,}"),
        (
            "block hit rate",
            f"{s['block_hit_rate']:.1%} (infinite cache {s['infinite_block_hit_rate']:.1%})",
        ),
        (
            "token hit rate",
            f"{s['token_hit_rate']:.1%} (infinite cache {s['infinite_token_hit_rate']:.1%})",
        ),
        (
            "peak usage",
            f"{s['peak_usage']:.1%} ({s['peak_used_blocks']:,} of {s['device_blocks']:,} blocks)",
        ),
        ("CRITICAL episodes", f"{s['critical_events']:,}"),
        (
            "preemptions",
            f"{s['preemptions']:,} ({s['swap_outs']:,} swapped out, "
            f"{s['swap_ins']:,} swapped in, {s['recomputes']:,} recomputed)",
        ),
        (
            "recomputed prompts",
            f"{s['preempted_prompt_tokens']:,} tokens, "
            f"{_ratio(s['preempted_cache_tokens'], s['preempted_prompt_tokens']):.1%} cached "
            "(not in the hit rates)",
        ),
        ("offloaded", f"{_bytes(s['offload_bytes'])} ({s['offload_blocks']:,} blocks)"),
        ("onboarded", f"{_bytes(s['onboard_bytes'])} ({s['onboard_blocks']:,} blocks)"),
        (
            "disk I/O",
            f"{s['disk_blocks_written']:,} blocks written, {s['disk_blocks_read']:,} read "
            f"({s['disk_errors']:,} errors, {s['disk_checksum_failures']:,} checksum failures)",
        ),
        ("KV events dropped", f"{s['dropped_events']:,} (undrained past the 64 MiB cap)"),
        (
            "remote store",
            f"{s['remote_hit_blocks']:,} blocks hit ({_bytes(s['remote_read_bytes'])}), "
            f"{s['remote_miss_blocks']:,} missed; {s['remote_write_blocks']:,} written "
            f"({_bytes(s['remote_write_bytes'])}), {s['remote_dropped_writes']:,} dropped, "
            f"{s['remote_errors']:,} errors",
        ),
        ("engine ops", f"{s['engine_ops']:,} ({s['engine_ops_per_s']:,.0f}/s)"),
        ("wall time", f"{s['wall_s']:.2f} s"),
    ]
    return Table((Column("figure"), Column("value")), tuple(rows), show_header=False)


def format_table(summary: dict[str, Any]) -> str:
    """The table of a summary as plain text (:func:`summary_table`, rendered for a file)."""
    return render_table(summary_table(summary))


def _requests_cell(s: dict[str, Any]) -> str:
    """Requests done and rejected, each reason of a rejection with its count."""
    cell = f"{s['requests']:,} ({s['requests_done']:,} done, {s['requests_rejected']:,} rejected"
    counts = {
        Rejection.TOO_LARGE: s["requests_rejected_too_large"],
        Rejection.NO_ROOM: s["requests_rejected_no_room"],
    }
    reasons = [f"{n:,} {reason.value}" for reason, n in counts.items() if n]
    return cell + (": " + ", ".join(reasons) if reasons else "") + ")"


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _bytes(count: float) -> str:
    """A byte count with a binary unit."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1024
    return f"{count:.1f} TiB"


def write_json(path: Path, summary: dict[str, Any], result: ReplayResult) -> None:
    """Write the summary plus the final ``stats().to_dict()`` under ``"stats"``."""
    write_document(path, {**summary, "stats": result.stats.to_dict()})


def write_document(path: Path, document: dict[str, Any]) -> None:
    """`document` as indented JSON into `path` (``-``: standard output)."""
    text = json.dumps(document, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        path.write_text(text)


def write_plot(
    path: Path,
    samples: tuple[Sample, ...],
    title: str,
    *,
    infinite_hit_rate: float | None = None,
    low_watermark: float | None = None,
    high_watermark: float | None = None,
) -> None:
    """The operator's view of a run, against requests finished (the trace's progress):
    device usage with the pressure thresholds (usage above ``1 - low_watermark`` is HIGH,
    above ``1 - high_watermark`` CRITICAL) and the host and disk tiers' usage when they
    exist, preemptions marked where they happened; the cumulative block hit rate on an axis
    scaled to the data beside the infinite-cache rate; the pressure level; and the blocks
    offloaded to and onboarded from the host tier."""
    from matplotlib.figure import Figure

    x = [s.finished for s in samples]
    figure = Figure(figsize=(10, 9), layout="constrained")
    usage, hits, pressure, moved = figure.subplots(4, 1, sharex=True)
    usage.plot(x, [s.usage for s in samples], label="device")
    for name, values in (
        ("host", [s.host_usage for s in samples]),
        ("disk", [s.disk_usage for s in samples]),
    ):
        if any(v is not None for v in values):
            usage.plot(x, [v or 0.0 for v in values], label=name)
    for wm, level, style in ((low_watermark, "HIGH", ":"), (high_watermark, "CRITICAL", "--")):
        if wm is not None:
            usage.axhline(1 - wm, color="tab:red", linestyle=style, linewidth=1, label=level)
    marks = [(a.finished, b.usage) for a, b in itertools.pairwise(samples)
             if b.preemptions > a.preemptions]  # fmt: skip
    if marks:
        usage.scatter(*zip(*marks, strict=True), marker="v", color="tab:red", s=18,
                      label="preemption", zorder=3)  # fmt: skip
    usage.set_ylabel("usage")
    usage.set_ylim(0, 1.05)
    usage.legend(loc="lower right", fontsize="small", ncols=3)
    rates = [s.hit_rate for s in samples]
    hits.plot(x, rates, label="measured (cumulative)")
    top = max([*rates, infinite_hit_rate or 0.0, 0.01])
    if infinite_hit_rate is not None:
        hits.axhline(infinite_hit_rate, color="tab:green", linestyle="--", linewidth=1,
                     label=f"infinite cache {infinite_hit_rate:.1%}")  # fmt: skip
    hits.set_ylim(0, min(1.0, top * 1.15))
    hits.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    hits.set_ylabel("block hit rate")
    hits.legend(loc="lower right", fontsize="small")
    pressure.step(x, [s.pressure for s in samples], where="post")
    pressure.set_yticks([level.value for level in PressureLevel])
    pressure.set_yticklabels([level.name for level in PressureLevel])
    pressure.set_ylabel("pressure")
    moved.plot(x, [s.offload_blocks for s in samples], label="offloaded to host")
    moved.plot(x, [s.onboard_blocks for s in samples], label="onboarded from host/disk")
    moved.set_ylabel("blocks (cumulative)")
    moved.legend(loc="upper left", fontsize="small")
    moved.set_xlabel("requests finished")
    figure.suptitle(title)
    figure.savefig(path)
