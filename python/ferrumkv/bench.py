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
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import CacheConfig, KvCache

BLOCK = 16


def _cfg(num_blocks: int, prefix: bool) -> CacheConfig:
    # A tiny model shape: these cases time bookkeeping, not memory.
    return CacheConfig(
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        block_size=BLOCK,
        num_blocks=num_blocks,
        enable_prefix_cache=prefix,
        enable_kv_events=False,
    )


def _median_us(run_round: Callable[[], None], ops: int, rounds: int) -> float:
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


async def _decode_step(rounds: int) -> list[tuple[str, float, float, str]]:
    nseq, steps = 256, 64
    # Room for every token the rounds append (blocks are never freed in between).
    max_tokens = 17 + (rounds + 1) * steps + max(3, rounds // 4) * (steps // 8)
    num_blocks = nseq * (-(-max_tokens // BLOCK) + 1)
    with KvCache(_cfg(num_blocks, prefix=True)) as cache:
        base = PyFreeList(num_blocks)
        rids = list(range(nseq))
        for r in rids:
            await cache.allocate(r, np.arange(100 + r, 117 + r, dtype=np.int64))
            base.allocate(r, list(range(17)))
        next_tokens = np.arange(nseq, dtype=np.int64)

        async def batch_round() -> None:
            for _ in range(steps):
                await cache.extend_batch(rids, next_tokens)

        async def one_by_one_round() -> None:
            for _ in range(steps // 8):
                for r in rids:
                    await cache.extend(r, [7])

        def base_round() -> None:
            for _ in range(steps):
                for r in rids:
                    base.extend(r, 7)

        batch = await _amedian_us(batch_round, steps, rounds)
        b = _median_us(base_round, steps, rounds)
        each = await _amedian_us(one_by_one_round, steps // 8, max(3, rounds // 4))
    return [
        ("decode step: 256 seqs +1 token, extend_batch", batch, b, "us/step"),
        ("decode step: 256 awaited extend() calls", each, b, "us/step"),
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
        index = {h: i for i, h in enumerate(_py_chain_hashes(prompt.tolist())[:31])}
        ops = 200

        def ours() -> None:
            for _ in range(ops):
                cache.lookup_prefix(query)

        def theirs() -> None:
            for _ in range(ops):
                _py_lookup(index, plist)

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
                view = memoryview(data)
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
        ),
        _decode_step,
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


def format_table(rows: list[Row]) -> str:
    """One line per case; "speedup" is ferrumkv relative to the baseline (above 1x: faster),
    so for throughputs (GB/s, MB/s) it is ferrumkv / baseline, e.g. 0.9x = 90% of copyto."""
    w = max(len(r[0]) for r in rows)
    lines = [f"{'case':<{w}}  {'ferrumkv':>10}  {'baseline':>10}  {'speedup':>8}  unit"]
    for name, ours, base, unit in rows:
        ratio = ours / base if _is_rate(unit) else base / ours
        lines.append(f"{name:<{w}}  {ours:>10.2f}  {base:>10.2f}  {ratio:>7.2f}x  {unit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferrumkv bench", description=__doc__)
    p.add_argument("--rounds", type=int, default=21, help="timed rounds per case (median)")
    p.add_argument(
        "--only",
        metavar="NAME",
        help="run only the cases whose name (or group: "
        + ", ".join(g for g, _, _ in GROUPS)
        + ") contains NAME, case-insensitive",
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    rows = asyncio.run(run_suite(args.rounds, args.only))
    if not rows:
        p.error(f"no case matches --only {args.only!r}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
