"""The benchmark suite: engine bookkeeping beside naive Python baselines, in one run.

Each case is timed in rounds of `ops` operations; the figure reported is the median time per
operation over the rounds (so a GC pause or a scheduler hiccup does not move it). Baselines
are what a Python serving stack does without ferrumkv: a deque free list, and chained
prefix hashing with `hashlib` / dict lookups. The tier cases (swap, disk) report throughput
beside the physical limit measured in the same run, round by round in turn with it:
`numpy.copyto` between preallocated arrays, and plain `os.pwrite` / `os.pread` of the same
blocks (page cache, no fsync on either side). Run: `python -m ferrumkv bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import CacheConfig, CacheStats, KvCache, PressureLevel, TierStats
from ._console import Column, Table, print_table, render_table
from .hitrate import bookkeeping_config
from .types import COUNTER_FIELDS

BLOCK = 16


def _cfg(num_blocks: int, prefix: bool) -> CacheConfig:
    # A tiny model shape: these cases time bookkeeping, not memory.
    return bookkeeping_config(num_blocks, BLOCK, enable_prefix_cache=prefix)


def _median_us(run_round: Callable[[], object], ops: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        run_round()
        times.append((time.perf_counter_ns() - t0) / ops / 1e3)
    return statistics.median(times)


async def _amedian_us(run_round: Callable[[], Any], ops: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        await run_round()
        times.append((time.perf_counter_ns() - t0) / ops / 1e3)
    return statistics.median(times)


class PyFreeList:
    """Baseline: the plain Python block manager (deque free list, dict of block lists)."""

    def __init__(self, num_blocks: int) -> None:
        self.free = collections.deque(range(num_blocks))
        self.tables: dict[Any, list[int]] = {}
        self.lens: dict[Any, int] = {}

    def allocate(self, rid: Any, tokens: Any) -> list[int]:
        n = -(-len(tokens) // BLOCK)
        if n > len(self.free):
            raise MemoryError
        blocks = [self.free.popleft() for _ in range(n)]
        self.tables[rid] = blocks
        self.lens[rid] = len(tokens)
        return blocks

    def extend(self, rid: Any, token: int) -> None:
        n = self.lens[rid]
        if n % BLOCK == 0:
            self.tables[rid].append(self.free.popleft())
        self.lens[rid] = n + 1

    def deallocate(self, rid: Any) -> None:
        self.free.extend(reversed(self.tables.pop(rid)))
        del self.lens[rid]

    async def aallocate(self, rid: Any, tokens: Any) -> list[int]:
        return self.allocate(rid, tokens)

    async def adeallocate(self, rid: Any) -> None:
        self.deallocate(rid)


def _py_chain_hashes(tokens: list[int]) -> list[bytes]:
    """Baseline: vLLM-style chained sha256 block hashes in Python."""
    out, parent = [], b""
    for i in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
        parent = hashlib.sha256(parent + repr(tokens[i : i + BLOCK]).encode()).digest()
        out.append(parent)
    return out


def _py_lookup(index: dict[bytes, int], tokens: list[int]) -> int:
    hits = 0
    for h in _py_chain_hashes(tokens):
        if h not in index:
            break
        hits += 1
    return hits


async def _alloc_dealloc(rounds: int) -> list[tuple[str, float, float, str]]:
    ops = 200
    prompt = np.arange(512, dtype=np.int64)
    prompt_list = prompt.tolist()
    rows = []
    with KvCache(_cfg(4096, prefix=False)) as cache:
        base = PyFreeList(4096)

        def sync_round() -> None:
            for i in range(ops):
                cache.try_allocate(i, prompt)
                cache._core.deallocate(i)

        def base_sync_round() -> None:
            for i in range(ops):
                base.allocate(i, prompt_list)
                base.deallocate(i)

        async def awaited_round() -> None:
            for i in range(ops):
                await cache.allocate(i, prompt)
                await cache.deallocate(i)

        async def awaited_list_round() -> None:
            for i in range(ops):
                await cache.allocate(i, prompt_list)
                await cache.deallocate(i)

        async def base_awaited_round() -> None:
            for i in range(ops):
                await base.aallocate(i, prompt_list)
                await base.adeallocate(i)

        ours = _median_us(sync_round, ops, rounds)
        rows.append(
            (
                "allocate+deallocate 512 tok, sync",
                ours,
                _median_us(base_sync_round, ops, rounds),
                "us/req",
            )
        )
        b = await _amedian_us(base_awaited_round, ops, rounds)
        rows.append(
            (
                "allocate+deallocate 512 tok, awaited",
                await _amedian_us(awaited_round, ops, rounds),
                b,
                "us/req",
            )
        )
        rows.append(
            (
                "  same, tokens as a Python list",
                await _amedian_us(awaited_list_round, ops, rounds),
                b,
                "us/req",
            )
        )
    return rows


class PyDecodeBaseline:
    """Baseline: vLLM-style Python bookkeeping of a decode step: the deque free list of
    `PyFreeList` (one block list per request), then the attention metadata built with
    numpy from those lists (a row copy per request, vectorized slot arithmetic)."""

    def __init__(self, mgr: PyFreeList) -> None:
        self.mgr = mgr

    def step(self, rids: list[Any], tokens: list[int]) -> tuple[np.ndarray, ...]:
        mgr = self.mgr
        for r, t in zip(rids, tokens, strict=True):
            mgr.extend(r, t)
        tables = [mgr.tables[r] for r in rids]
        n = len(rids)
        seq_lens = np.fromiter((mgr.lens[r] for r in rids), dtype=np.int32, count=n)
        block_table = np.zeros((n, max(map(len, tables))), dtype=np.int32)
        for i, row in enumerate(tables):
            block_table[i, : len(row)] = row
        return _numpy_layout(block_table, seq_lens)


def _numpy_layout(block_table: np.ndarray, seq_lens: np.ndarray) -> tuple[np.ndarray, ...]:
    """query_start_loc and slot_mapping of a decode step (one new token each), in numpy."""
    n = len(seq_lens)
    query_start_loc = np.arange(n + 1, dtype=np.int32)
    pos = seq_lens.astype(np.int64) - 1
    slot_mapping = block_table[np.arange(n), pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK
    return block_table, seq_lens, query_start_loc, slot_mapping


DECODE_SEQS, DECODE_PROMPT, DECODE_STEPS = 256, 1024, 64


async def _decode_step(rounds: int) -> list[tuple[str, float, float, str]]:
    """256 sequences of 1,024 prompt tokens decode 64 steps per round; every round starts
    from the same lengths (the sequences are freed and allocated again, untimed), so each
    step sees 256 sequences of 1,024 to 1,088 tokens (64 to 68 blocks)."""
    nseq, steps = DECODE_SEQS, DECODE_STEPS
    blocks_each = -(-(DECODE_PROMPT + steps) // BLOCK) + 1
    num_blocks = 2 * nseq * blocks_each  # the cached prompts of the last round, and ours
    rids = list(range(nseq))
    str_rids = [f"cmpl-{r:08d}" for r in rids]  # vLLM-style string ids: dearer to convert
    prompts = [np.arange(DECODE_PROMPT, dtype=np.int64) + 10_000 * r for r in rids]
    next_tokens = np.arange(nseq, dtype=np.int64)
    token_list = next_tokens.tolist()
    times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name: str, ops: int, t0: int) -> None:
        times[name].append((time.perf_counter_ns() - t0) / ops / 1e3)

    with KvCache(_cfg(num_blocks, prefix=True)) as cache:
        base = PyFreeList(num_blocks)
        naive = PyDecodeBaseline(base)

        async def reset(ids: list[Any] = rids) -> None:
            all_ids: list[str | int] = [*rids, *str_rids]
            for r in all_ids:
                if r in cache:
                    await cache.deallocate(r)
                if r in base.tables:
                    base.deallocate(r)
            for r, p in zip(ids, prompts, strict=True):
                await cache.allocate(r, p)
                base.allocate(r, p)

        async def layouts(ids: list[Any], name: str) -> None:
            await reset(ids)
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                await cache.extend_batch(ids, next_tokens)
                cache.batch_layout(ids, 1)
            timed(name, steps, t0)
            await reset(ids)
            lens = np.full(nseq, DECODE_PROMPT, dtype=np.int32)
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                await cache.extend_batch(ids, next_tokens)
                lens += 1
                _numpy_layout(cache.block_table(ids), lens.copy())
            timed(name + ", block_table + numpy", steps, t0)

        for _ in range(rounds):
            await reset()
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                await cache.extend_batch(rids, next_tokens)
            timed("extend_batch", steps, t0)
            await reset()
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                for r in rids:
                    base.extend(r, 7)
            timed("py extend", steps, t0)
            await layouts(rids, "int ids")
            await layouts(str_rids, "str ids")
            await reset()
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                naive.step(rids, token_list)
            timed("python bookkeeping + numpy", steps, t0)
        await reset()
        t0 = time.perf_counter_ns()
        for _ in range(steps // 8):
            for r in rids:
                await cache.extend(r, [7])
        each = (time.perf_counter_ns() - t0) / (steps // 8) / 1e3
        # A check that the layouts agree (the baseline's is built from the engine's table).
        ours = cache.batch_layout(rids, 1)
        theirs = _numpy_layout(cache.block_table(rids), ours.seq_lens.copy())
        for a, b in zip(
            (ours.block_table, ours.seq_lens, ours.query_start_loc, ours.slot_mapping),
            theirs,
            strict=True,
        ):
            if not np.array_equal(a, b):
                raise RuntimeError("batch_layout and the numpy baseline disagree")
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        (
            "decode step: 256 seqs +1 token, extend_batch",
            med["extend_batch"],
            med["py extend"],
            "us/step",
        ),
        ("decode step: 256 awaited extend() calls", each, med["py extend"], "us/step"),
        (
            "decode step + layout: extend_batch + batch_layout (vs block_table + numpy)",
            med["int ids"],
            med["int ids, block_table + numpy"],
            "us/step",
        ),
        (
            "  same, vs Python block lists + numpy layout (vLLM-style)",
            med["int ids"],
            med["python bookkeeping + numpy"],
            "us/step",
        ),
        (
            "  same, str request ids (vs block_table + numpy)",
            med["str ids"],
            med["str ids, block_table + numpy"],
            "us/step",
        ),
    ]


def _stats(rounds: int) -> list[tuple[str, float, float, str]]:
    """stats() beside the same snapshot built through the dataclass constructors (what it
    cost before), and the O(1) gauge beside reading it from a snapshot."""
    ops = 2000
    with KvCache(_cfg(4096, prefix=True)) as cache:
        for r in range(64):
            cache.try_allocate(r, np.arange(100, dtype=np.int64) + 1000 * r)

        def by_fields() -> CacheStats:
            raw = cache._core.stats()
            tiers = {k: TierStats(**raw[k]) for k in ("device", "host", "disk")}
            counters = {k: raw[k] for k in COUNTER_FIELDS}
            gauges = {k: raw[k] for k in raw if k not in counters and k not in tiers}
            gauges["pressure_level"] = PressureLevel(gauges["pressure_level"])
            fields: dict[str, Any] = {**tiers, **gauges, **counters}
            return CacheStats(**fields)

        if by_fields() != cache.stats():
            raise RuntimeError("stats() and the field-by-field snapshot disagree")

        def many(f: Callable[[], Any]) -> Callable[[], None]:
            def run() -> None:
                for _ in range(ops):
                    f()

            return run

        return [
            (
                "stats() (vs its dataclasses built field by field)",
                _median_us(many(cache.stats), ops, rounds),
                _median_us(many(by_fields), ops, rounds),
                "us",
            ),
            (
                "num_free_blocks gauge (vs stats().device.free_blocks)",
                _median_us(many(lambda: cache.num_free_blocks), ops, rounds),
                _median_us(many(lambda: cache.stats().device.free_blocks), ops, rounds),
                "us",
            ),
        ]


async def _prefix(rounds: int) -> list[tuple[str, float, float, str]]:
    rng = np.random.default_rng(0)
    rows = []
    with KvCache(_cfg(8192, prefix=True)) as cache:
        long_prompt = rng.integers(0, 32000, 32768, dtype=np.int64)
        long_list = long_prompt.tolist()
        hash_us = _median_us(lambda: cache.lookup_prefix(long_prompt), 1, rounds)
        base_hash = _median_us(lambda: _py_chain_hashes(long_list), 1, max(3, rounds // 4))
        rows.append(("hash+lookup 32k-token prompt (miss)", hash_us, base_hash, "us"))

        prompt = rng.integers(0, 32000, 32 * BLOCK, dtype=np.int64)
        await cache.allocate("warm", prompt)
        await cache.deallocate("warm")
        assert cache.lookup_prefix(prompt).num_cached_tokens == 31 * BLOCK + BLOCK - 1
        query = prompt.copy()
        query[-1] += 1  # hits 31 full blocks, then a partial match
        plist = query.tolist()
        first31 = {h: i for i, h in enumerate(_py_chain_hashes(prompt.tolist())[:31])}
        ops = 200

        def ours() -> None:
            for _ in range(ops):
                cache.lookup_prefix(query)

        def theirs() -> None:
            for _ in range(ops):
                _py_lookup(first31, plist)

        rows.append(
            (
                "lookup 32-block prompt, 31 hits",
                _median_us(ours, ops, rounds),
                _median_us(theirs, ops, rounds),
                "us",
            )
        )

    # 1,000 512-token requests, half sharing a 256-token system prompt.
    shared = rng.integers(0, 32000, 256, dtype=np.int64)
    prompts = []
    for i in range(1000):
        tail = rng.integers(0, 32000, 256, dtype=np.int64)
        prompts.append(
            np.concatenate([shared, tail])
            if i % 2 == 0
            else rng.integers(0, 32000, 512, dtype=np.int64)
        )
    prompt_lists = [p.tolist() for p in prompts]
    with KvCache(_cfg(4096, prefix=True)) as cache:
        base = PyFreeList(4096)
        index: dict[bytes, int] = {}

        async def ours_round() -> None:
            for i, p in enumerate(prompts):
                await cache.allocate(i, p)
                await cache.deallocate(i)

        def base_round() -> None:
            for i, p in enumerate(prompt_lists):
                _py_lookup(index, p)
                for h in _py_chain_hashes(p):
                    index.setdefault(h, i)
                base.allocate(i, p)
                base.deallocate(i)

        ours_us = await _amedian_us(ours_round, len(prompts), max(3, rounds // 4))
        base_us = _median_us(base_round, len(prompts), max(3, rounds // 4))
        st = cache.stats()
        rows.append(
            (
                f"alloc+dealloc 512 tok, caching on (hit rate {st.cache_hit_rate:.2f})",
                ours_us,
                base_us,
                "us/req",
            )
        )
    return rows


def _copy_bandwidth(rounds: int) -> list[tuple[str, float, float, str]]:
    """write_kv/read_kv of 64 KiB per call beside numpy.copyto of the same bytes."""
    cfg = CacheConfig(num_layers=1, num_kv_heads=8, head_dim=128, block_size=16, num_blocks=256)
    n = 16 * 16  # tokens per call: 16 blocks
    with KvCache(cfg) as cache:
        cache.try_allocate("s", np.arange(n, dtype=np.int64))
        k = np.random.default_rng(1).standard_normal((n, 8, 128)).astype(np.float16)
        nbytes = 2 * k.nbytes
        ours = _median_us(lambda: cache.write_kv("s", 0, 0, k, k), 1, rounds)
        dst = np.empty_like(k)

        def base() -> None:
            np.copyto(dst, k)
            np.copyto(dst, k)

        ref = _median_us(base, 1, rounds)
        return [
            (
                f"write_kv {nbytes >> 10} KiB (GB/s: ours {nbytes / ours / 1e3:.1f}, "
                f"copyto {nbytes / ref / 1e3:.1f})",
                ours,
                ref,
                "us",
            )
        ]


# ----- tiers: swap and disk ---------------------------------------------------------------

SWAP_BLOCKS = 1000


def _tier_cfg(**kw: Any) -> CacheConfig:
    # 64 KiB blocks: 2 layers x (K, V) x 16 tokens x 8 heads x 64 dims x 2 bytes.
    return CacheConfig(
        num_layers=2,
        num_kv_heads=8,
        head_dim=64,
        block_size=BLOCK,
        dtype="float16",
        enable_kv_events=False,
        **kw,
    )


async def _interleaved(cases: list[Callable[[], Any]], rounds: int) -> list[float]:
    """Median seconds per round of each case; every round runs the cases in turn, so a busy
    machine weighs on a case and its baseline alike."""
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for t, case in zip(times, cases, strict=True):
            t0 = time.perf_counter_ns()
            r = case()
            if r is not None:
                await r
            t.append((time.perf_counter_ns() - t0) / 1e9)
    return [statistics.median(t) for t in times]


async def _swap(rounds: int) -> list[tuple[str, float, float, str]]:
    """await swap_out + await swap_in of 1,000 blocks beside numpy.copyto of the same bytes."""
    cfg = _tier_cfg(num_blocks=2 * SWAP_BLOCKS + 48, host_blocks=SWAP_BLOCKS + 24)
    bpb = cfg.bytes_per_block
    moved = 2 * SWAP_BLOCKS * bpb  # out and back in
    src = np.full(SWAP_BLOCKS * bpb, 1, dtype=np.uint8)
    dst = np.full_like(src, 2)

    def copyto() -> None:
        np.copyto(dst, src)
        np.copyto(src, dst)

    with KvCache(cfg) as cache:
        for layer in range(cfg.num_layers):
            # Touch every page, so no copy reads the kernel's shared zero page.
            np.from_dlpack(cache.kv_view(layer))[...] = 1
        await cache.allocate("one", np.arange(SWAP_BLOCKS * BLOCK, dtype=np.int64))
        # The same number of blocks as sequences of 16 blocks (the last one shorter).
        sizes = [16] * (SWAP_BLOCKS // 16) + ([SWAP_BLOCKS % 16] if SWAP_BLOCKS % 16 else [])
        rids = list(range(len(sizes)))
        for r, n in zip(rids, sizes, strict=True):
            await cache.allocate(r, np.arange(n * BLOCK, dtype=np.int64) + (r + 1) * 100_000)

        async def one() -> None:
            await cache.swap_out("one")
            await cache.swap_in("one")

        async def many() -> None:
            # One by one, as a scheduler loop preempts and later resumes requests.
            for r in rids:
                await cache.swap_out(r)
            for r in rids:
                await cache.swap_in(r)

        await one()  # warm-up: the host tier's pages fault in once, outside the timing
        await many()
        one_s, many_s, ref_s = await _interleaved([one, many, copyto], rounds)
        st = cache.stats()
        if st.d2h_transfers == 0 or st.num_swapped != 0:
            raise RuntimeError(f"swap bench did not swap as planned: {st}")
    ref = moved / ref_s / 1e9
    return [
        (
            f"swap out+in {SWAP_BLOCKS} x 64 KiB, 1 seq (vs copyto)",
            moved / one_s / 1e9,
            ref,
            "GB/s",
        ),
        (
            f"  same, {len(sizes)} seqs of <=16 blocks in turn",
            moved / many_s / 1e9,
            ref,
            "GB/s",
        ),
    ]


async def _disk(rounds: int) -> list[tuple[str, float, float, str]]:
    """Blocks spilled device -> host -> disk, and prefix hits read back from disk only,
    beside os.pwrite / os.pread of the same number of 64 KiB blocks (page cache, no fsync)."""
    device, host, disk, per = 64, 256, 2048, 16  # tiers in blocks; blocks per prompt
    resident = (device + host) // per  # prompts the device and host tiers hold
    nprompts = disk // per - resident - 4  # the disk tier never evicts in a round
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 32000, per * BLOCK, dtype=np.int64) for _ in range(nprompts)]
    w_times: list[float] = []
    r_times: list[float] = []
    pw_times: list[float] = []
    pr_times: list[float] = []
    written = read = 0
    with tempfile.TemporaryDirectory(prefix="ferrumkv-bench-") as tmp:
        path = os.path.join(tmp, "tier")
        cfg = _tier_cfg(num_blocks=device, host_blocks=host, disk_path=path, disk_blocks=disk)
        bpb = cfg.bytes_per_block
        data = np.full(disk * bpb, 3, dtype=np.uint8)
        for _ in range(rounds):
            with KvCache(cfg) as cache:
                # Write: allocate and free distinct prompts; evictions cascade down the tiers.
                s0 = cache.stats()
                t0 = time.perf_counter_ns()
                for i, p in enumerate(prompts):
                    await cache.allocate(i, p)
                    await cache.deallocate(i)
                cache._core.wait_disk_idle()
                w_times.append((time.perf_counter_ns() - t0) / 1e9)
                s1 = cache.stats()
                written = s1.disk_blocks_written - s0.disk_blocks_written
                # Untimed: hits on the first prompts push what the device and host tiers
                # still hold down to disk, so the timed hits below find their blocks on
                # disk only, and evict only blocks that are on disk already (no writes).
                for i in range(resident):
                    await cache.allocate(f"w{i}", prompts[i])
                    await cache.deallocate(f"w{i}")
                cache._core.wait_disk_idle()
                s2 = cache.stats()
                t0 = time.perf_counter_ns()
                for i in range(resident, nprompts):
                    await cache.allocate(f"r{i}", prompts[i])
                    await cache.deallocate(f"r{i}")
                cache._core.wait_disk_idle()
                r_times.append((time.perf_counter_ns() - t0) / 1e9)
                s3 = cache.stats()
                read = s3.disk_blocks_read - s2.disk_blocks_read
                if (
                    written == 0
                    or read == 0
                    or s3.disk_blocks_written != s2.disk_blocks_written
                    or s3.onboard_bytes - s2.onboard_bytes != read * bpb
                    or s3.disk_write_errors + s3.disk_read_errors + s3.disk_checksum_failures
                ):
                    raise RuntimeError(f"disk bench did not run as planned: {s3}")
            os.unlink(path)
            # Baseline: the same blocks through plain Python positioned writes and reads.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, disk * bpb)
                view = data.data  # the array's own buffer, no copy
                t0 = time.perf_counter_ns()
                for b in range(written):
                    os.pwrite(fd, view[b * bpb : (b + 1) * bpb], b * bpb)
                pw_times.append((time.perf_counter_ns() - t0) / 1e9)
                t0 = time.perf_counter_ns()
                for b in range(read):
                    os.pread(fd, bpb, b * bpb)
                pr_times.append((time.perf_counter_ns() - t0) / 1e9)
            finally:
                os.close(fd)
                os.unlink(path)
    w_s, r_s = statistics.median(w_times), statistics.median(r_times)
    mb = 1e6 / bpb

    def rate(blocks: int, times: list[float]) -> float:
        return blocks / statistics.median(times) / mb

    return [
        (
            f"disk write: {written} blocks spilled, vs pwrite ({written / w_s:,.0f} blocks/s)",
            rate(written, w_times),
            rate(written, pw_times),
            "MB/s",
        ),
        (
            f"disk read: {read} blocks of prefix hits, vs pread ({read / r_s:,.0f} blocks/s)",
            rate(read, r_times),
            rate(read, pr_times),
            "MB/s",
        ),
    ]


Row = tuple[str, float, float, str]

TRACE = Path(__file__).resolve().parents[2] / "benches" / "data" / "mooncake_synthetic_trace.jsonl"
"""The trace `_trace_replay` replays (in a checkout; the case is skipped without it)."""


def _trace_replay(rounds: int) -> list[Row]:
    """The Mooncake synthetic trace, prompts only, one request at a time on 60k blocks
    (allocate, deallocate), in ns per prompt block, with numpy token arrays (the baseline:
    the same replay with Python int lists); then the cost of converting a Python int list,
    from lookups of one 32k-token prompt as a list and as an array, in turn round by round."""
    if not TRACE.exists():
        return []
    from .workload import DEFAULT_VOCAB_SIZE, load_trace

    workload = load_trace(TRACE, vocab_size=DEFAULT_VOCAB_SIZE)
    arrays = [r.prompt_tokens(workload.vocab_size) for r in workload.requests]
    lists = [a.tolist() for a in arrays]
    blocks = sum(-(-len(a) // BLOCK) for a in arrays)

    def replay(prompts: list[Any]) -> float:
        cache = KvCache(_cfg(60_000, prefix=True))
        core = cache._core  # the synchronous engine calls, as `try_allocate` makes them
        t0 = time.perf_counter_ns()
        for i, p in enumerate(prompts):
            core.try_allocate(i, p, None, None, False)
            core.deallocate(i)
        ns = time.perf_counter_ns() - t0
        cache.close()
        return ns

    r = max(3, rounds // 7)
    times = [(replay(arrays), replay(lists)) for _ in range(r)]
    numpy_ns = statistics.median(a for a, _ in times)
    list_ns = statistics.median(b for _, b in times)

    long = np.random.default_rng(1).integers(0, 32000, 32768, dtype=np.int64)
    long_list = long.tolist()
    with KvCache(_cfg(8192, prefix=True)) as cache:
        diffs = []
        for _ in range(rounds * 5):
            t0 = time.perf_counter_ns()
            cache.lookup_prefix(long_list)
            t1 = time.perf_counter_ns()
            cache.lookup_prefix(long)
            diffs.append((t1 - t0) - (time.perf_counter_ns() - t1))
    per_token = statistics.median(diffs) / len(long)
    return [
        (
            f"synthetic trace replay, 60k blocks ({blocks:,} prompt blocks), numpy vs lists",
            numpy_ns / blocks,
            list_ns / blocks,
            "ns/block",
        ),
        ("  int-list conversion, 32k-token prompt", per_token, per_token, "ns/token"),
    ]


# (group, the fixed part of each case name, runner): `--only` picks groups by these names.
GROUPS: list[tuple[str, tuple[str, ...], Callable[[int], Any]]] = [
    (
        "alloc",
        (
            "allocate+deallocate 512 tok, sync",
            "allocate+deallocate 512 tok, awaited",
            "same, tokens as a Python list",
        ),
        _alloc_dealloc,
    ),
    (
        "decode",
        (
            "decode step: 256 seqs +1 token, extend_batch",
            "decode step: 256 awaited extend() calls",
            "decode step + layout",
            "vs Python block lists",
            "str request ids",
        ),
        _decode_step,
    ),
    (
        "stats",
        ("stats()", "num_free_blocks gauge"),
        _stats,
    ),
    (
        "prefix",
        (
            "hash+lookup 32k-token prompt (miss)",
            "lookup 32-block prompt, 31 hits",
            "alloc+dealloc 512 tok, caching on",
        ),
        _prefix,
    ),
    ("copy", ("write_kv 1024 KiB",), _copy_bandwidth),
    ("swap", ("swap out+in", "seqs of <=16 blocks in turn"), _swap),
    ("disk", ("disk write", "disk read"), _disk),
    ("replay", ("synthetic trace replay", "int-list conversion"), _trace_replay),
]


async def run_suite(rounds: int, only: str | None = None) -> list[Row]:
    """Runs the cases (those whose name or group contains `only`, case-insensitive)."""
    key = (only or "").lower()
    rows: list[Row] = []
    for group, names, runner in GROUPS:
        whole = key in group
        if not whole and not any(key in n.lower() for n in names):
            continue
        disk_rounds = max(3, rounds // 3)  # a disk round is a whole fresh cache
        r = runner(disk_rounds if group == "disk" else rounds)
        got = await r if asyncio.iscoroutine(r) else r
        rows += [row for row in got if whole or key in row[0].lower()]
    return rows


def _is_rate(unit: str) -> bool:
    return unit.endswith("/s")


BENCH_COLUMNS = (
    Column("case"),
    Column("ferrumkv", "right"),
    Column("baseline", "right"),
    Column("speedup", "right"),
    Column("unit"),
)
"""The suite's table: each case, its two figures, ferrumkv relative to the baseline."""


def bench_table(rows: list[Row]) -> Table:
    """One row per case; "speedup" is ferrumkv relative to the baseline (above 1x: faster),
    so for throughputs (GB/s, MB/s) it is ferrumkv / baseline, e.g. 0.9x = 90% of copyto."""
    cells = []
    for name, ours, base, unit in rows:
        ratio = ours / base if _is_rate(unit) else base / ours
        cells.append((name, f"{ours:.2f}", f"{base:.2f}", f"{ratio:.2f}x", unit))
    return Table(BENCH_COLUMNS, tuple(cells))


def format_table(rows: list[Row]) -> str:
    """The suite's table as plain text (:func:`bench_table`, rendered for a file)."""
    return render_table(bench_table(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferrumkv bench", description=__doc__)
    p.add_argument("--rounds", type=int, default=21, help="timed rounds per case (median)")
    p.add_argument(
        "--only",
        metavar="NAME",
        help="run only the cases whose name (or group: "
        + ", ".join(g for g, _, _ in GROUPS)
        + ") contains NAME, case-insensitive; 'policy' prints the eviction policies' hit "
        "rates beside Belady's and the infinite cache's instead (ferrumkv.hitrate)",
    )
    args, rest = p.parse_known_args(argv)
    if args.only == "policy":  # hit rates, not timings: a table of its own
        from .hitrate import main as policy_main

        return policy_main(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    rows = asyncio.run(run_suite(args.rounds, args.only))
    if not rows:
        p.error(f"no case matches --only {args.only!r}")
    print_table(bench_table(rows), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
