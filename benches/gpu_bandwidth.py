"""Block-copy bandwidth of the ferrumkv tiers beside torch's own copies of the same bytes, in
the same run, round by round in turn (issue 13's device check, step 2).

For each block size (64 KiB, 256 KiB, 1 MiB, 2 MiB; float16, 16 tokens a block, the model
shape picked so that `bytes_per_block` is that size) one sequence of N contiguous blocks
(N * block = `--total-mib`) is moved, and each case is timed beside its baseline:

- `d2h swap_out` / `h2d swap_in`: a fresh cache each round, so the sequence's device and
  host blocks are both ascending runs and each swap is ONE coalesced copy (`runs` = 1),
  against torch's pinned-memory `copy_(non_blocking=True)` of the same bytes (+ synchronize).
- `... reused cache`: the same swaps back and forth on one cache, as a serving loop makes
  them: the block ids the free lists hand out then decide how many runs a swap is
  (`runs`, the median, from the handles' block ids).
- `d2h offload (gc)` / `h2d onboard (prefix hit)`: the N cached blocks evicted to the host
  tier by `gc(target_free_ratio=1.0)`, then brought back by a prefix hit of the same prompt
  (`allocate`), against the same torch copies.
- `d2d copy-on-write`: N children forked from a parent whose only block is partial; one
  `extend_batch` appends a token to each, so each child copies the shared block (N copies of
  one block), against torch `copy_` of the same block N times (one synchronize), and a
  single torch `copy_` of all N blocks (`bulk`, the ceiling).

What is measured: wall-clock (`time.perf_counter_ns`) around each awaited ferrumkv call and
around each torch copy plus `torch.cuda.synchronize()`; for the swaps also the engine's own
copy time (`stats().d2h_transfer_ns` / `h2d_transfer_ns` deltas: the copy's enqueue and
wait, without the await), shown as `engine GB/s`. GB/s = bytes moved / median seconds / 1e9;
`ratio` = ferrumkv / baseline (1.0: as fast; the goal on a GPU is >= 0.8 for the swaps).

With `--device cpu` it runs without a GPU: the device tier and the host tier are both host
memory, the baselines are numpy's `copyto` of the same bytes (torch's CPU `copy_`, slower
here, is in the JSON as `torch_cpu_gbps`). The figures then check the machinery, not a GPU
(a fresh cache's host tier is faulted in by its first copy, which the coalesced CPU rows
therefore include).

    python benches/gpu_bandwidth.py --device cuda:0 --json out/bandwidth.json
    python benches/gpu_bandwidth.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ferrumkv
from ferrumkv import CacheConfig, KvCache

KIB = 1 << 10
MIB = 1 << 20
BLOCK_SIZE = 16
GOAL = 0.8
"""The swaps' goal on a GPU: at least this share of torch's pinned copy bandwidth."""

# (label, block bytes, model shape): bytes_per_block = layers * 2 * 16 * heads * dim * 2.
SIZES: list[tuple[str, int, dict[str, int]]] = [
    ("64 KiB", 64 * KIB, {"num_layers": 2, "num_kv_heads": 8, "head_dim": 64}),
    ("256 KiB", 256 * KIB, {"num_layers": 8, "num_kv_heads": 8, "head_dim": 64}),
    ("1 MiB", 1 * MIB, {"num_layers": 16, "num_kv_heads": 8, "head_dim": 128}),
    ("2 MiB", 2 * MIB, {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}),
]

SWAP_CASES = ("d2h swap_out", "h2d swap_in")
"""The coalesced swaps the goal applies to."""


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _runs(src: tuple[int, ...], dst: tuple[int, ...]) -> int:
    """How many copies the engine makes of a block mapping src[i] -> dst[i]: a block joins
    the previous run when both its ids follow the previous block's (`transfer::Runs`)."""
    if not src:
        return 0
    n = 1
    for i in range(1, len(src)):
        if not (src[i] == src[i - 1] + 1 and dst[i] == dst[i - 1] + 1):
            n += 1
    return n


class Baseline:
    """The same bytes copied by torch on a GPU (pinned host memory, `non_blocking=True`, then
    one synchronize), by numpy's `copyto` on the CPU; timed like ferrumkv's calls."""

    def __init__(self, device: str, nbytes: int, block_bytes: int) -> None:
        self.nbytes, self.block_bytes = nbytes, block_bytes
        self.cuda = device.startswith("cuda")
        n = nbytes // block_bytes
        if self.cuda:
            import torch

            self.torch = torch
            self.host = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
            self.dev = torch.full((nbytes,), 2, dtype=torch.uint8, device=device)
            self.dev2 = torch.full((nbytes,), 3, dtype=torch.uint8, device=device)
            self.dev_blocks = self.dev.view(n, block_bytes)
            self.dev2_blocks = self.dev2.view(n, block_bytes)
            torch.cuda.synchronize()
        else:
            self.np_a = np.full(nbytes, 1, dtype=np.uint8)
            self.np_b = np.full(nbytes, 2, dtype=np.uint8)
            self.np_b_blocks = self.np_b.reshape(n, block_bytes)

    @property
    def name(self) -> str:
        return "torch pinned copy_(non_blocking)" if self.cuda else "numpy copyto"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _timed(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter_ns()
        fn()
        self.sync()
        return (time.perf_counter_ns() - t0) / 1e9

    def d2h(self) -> float:
        if not self.cuda:
            return self._timed(lambda: np.copyto(self.np_b, self.np_a))
        return self._timed(lambda: self.host.copy_(self.dev, non_blocking=True))

    def h2d(self) -> float:
        if not self.cuda:
            return self._timed(lambda: np.copyto(self.np_a, self.np_b))
        return self._timed(lambda: self.dev.copy_(self.host, non_blocking=True))

    def d2d_per_block(self, copies: int) -> float:
        """`copies` copies of one block (one source, as copy-on-write copies a parent's)."""
        if not self.cuda:
            src, dst = self.np_a[: self.block_bytes], self.np_b_blocks

            def run_np() -> None:
                for i in range(copies):
                    np.copyto(dst[i], src)

            return self._timed(run_np)
        src, dst = self.dev_blocks[0], self.dev2_blocks

        def run() -> None:
            for i in range(copies):
                dst[i].copy_(src, non_blocking=True)

        return self._timed(run)

    def d2d_bulk(self, copies: int) -> float:
        nbytes = copies * self.block_bytes
        if not self.cuda:
            return self._timed(lambda: np.copyto(self.np_b[:nbytes], self.np_a[:nbytes]))
        return self._timed(lambda: self.dev2[:nbytes].copy_(self.dev[:nbytes], non_blocking=True))


def _torch_cpu_gbps(nbytes: int, rounds: int) -> float | None:
    """torch's CPU `copy_` of the same bytes (shown beside numpy's on the CPU), or None."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.full((nbytes,), 2, dtype=torch.uint8)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        b.copy_(a)
        times.append((time.perf_counter_ns() - t0) / 1e9)
    return nbytes / _median(times) / 1e9


class Timer:
    """Wall-clock around awaited calls."""

    def __init__(self, base: Baseline) -> None:
        self.base = base

    async def __call__(self, coro: Any) -> tuple[float, Any]:
        self.base.sync()
        t0 = time.perf_counter_ns()
        result = await coro
        return (time.perf_counter_ns() - t0) / 1e9, result


def _touch(cache: KvCache) -> None:
    """Faults the pages of a CPU device tier in (no copy reads the kernel's zero page)."""
    if cache.config.device == "cpu":
        for layer in range(cache.config.num_layers):
            np.from_dlpack(cache.kv_view(layer))[...] = 1


class _Swaps:
    """One case pair's samples: swap_out then swap_in of sequence "s", each beside the
    baseline's copy of the same bytes, with the engine's own copy time and the copies (runs)
    each swap made."""

    def __init__(self) -> None:
        self.ours: tuple[list[float], list[float]] = ([], [])
        self.engine: tuple[list[float], list[float]] = ([], [])
        self.base: tuple[list[float], list[float]] = ([], [])
        self.runs: tuple[list[int], list[int]] = ([], [])

    async def time_pair(self, cache: KvCache, base: Baseline, h: Any) -> Any:
        """Times one swap out and back of "s" (whose handle is `h`); its handle after."""
        timed = Timer(base)
        s0 = cache.stats()
        self.base[0].append(base.d2h())
        t, o = await timed(cache.swap_out("s"))
        self.ours[0].append(t)
        s1 = cache.stats()
        self.base[1].append(base.h2d())
        t, i = await timed(cache.swap_in("s"))
        self.ours[1].append(t)
        s2 = cache.stats()
        self.engine[0].append((s1.d2h_transfer_ns - s0.d2h_transfer_ns) / 1e9)
        self.engine[1].append((s2.h2d_transfer_ns - s1.h2d_transfer_ns) / 1e9)
        self.runs[0].append(_runs(h.block_ids, o.block_ids))
        self.runs[1].append(_runs(o.block_ids, i.block_ids))
        return i

    def rows(
        self, label: str, bpb: int, n: int, nbytes: int, base_name: str, cases: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        return [
            _row(
                label,
                bpb,
                cases[d],
                n,
                nbytes,
                self.ours[d],
                self.base[d],
                base_name,
                engine_s=self.engine[d],
                runs=self.runs[d],
            )
            for d in (0, 1)
        ]


def _row(
    size: str,
    block_bytes: int,
    case: str,
    blocks: int,
    nbytes: float,
    ours_s: list[float],
    base_s: list[float],
    baseline: str,
    *,
    engine_s: list[float] | None = None,
    runs: list[int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ours, base = _median(ours_s), _median(base_s)
    row: dict[str, Any] = {
        "size": size,
        "block_bytes": block_bytes,
        "case": case,
        "blocks": blocks,
        "bytes": int(nbytes),
        "runs": None if not runs else int(statistics.median(runs)),
        "ferrumkv_ms": ours * 1e3,
        "ferrumkv_gbps": nbytes / ours / 1e9,
        "engine_gbps": None,
        "baseline": baseline,
        "baseline_ms": base * 1e3,
        "baseline_gbps": nbytes / base / 1e9,
        "rounds": len(ours_s),
    }
    row["ratio"] = row["ferrumkv_gbps"] / row["baseline_gbps"]
    if engine_s:
        row["engine_gbps"] = nbytes / _median(engine_s) / 1e9
    row.update(extra or {})
    return row


async def bench_size(
    device: str, label: str, block_bytes: int, shape: dict[str, int], total: int, rounds: int
) -> list[dict[str, Any]]:
    kw: dict[str, Any] = dict(
        shape, block_size=BLOCK_SIZE, dtype="float16", device=device, enable_kv_events=False
    )
    bpb = CacheConfig(**kw, num_blocks=1).bytes_per_block
    if bpb != block_bytes:
        raise RuntimeError(f"{label}: bytes_per_block is {bpb}, expected {block_bytes}")
    n = max(2, total // bpb)
    nbytes = n * bpb
    base = Baseline(device, nbytes, bpb)
    timed = Timer(base)
    rows: list[dict[str, Any]] = []
    tokens = np.arange(n * BLOCK_SIZE, dtype=np.int64)

    # 1. Coalesced swaps: a fresh cache each round, ascending runs on both tiers.
    fresh = _Swaps()
    for r in range(rounds):
        with KvCache(CacheConfig(**kw, num_blocks=2 * n, host_blocks=n)) as cache:
            _touch(cache)
            h = await cache.allocate("s", tokens + r * 10**7)
            s0 = cache.stats()
            await fresh.time_pair(cache, base, h)
            s2 = cache.stats()
            if (s2.d2h_blocks_copied - s0.d2h_blocks_copied, s2.h2d_blocks_copied) != (n, n):
                raise RuntimeError(f"{label}: the swaps did not move {n} blocks: {s2}")
    rows += fresh.rows(label, bpb, n, nbytes, base.name, SWAP_CASES)

    # 2. The same swaps back and forth on one cache (the free lists pick the block ids).
    reused = _Swaps()
    with KvCache(CacheConfig(**kw, num_blocks=2 * n, host_blocks=n)) as cache:
        _touch(cache)
        h = await cache.allocate("s", tokens)
        await cache.swap_out("s")  # warm-up: the host tier's pages fault in once, untimed
        h = await cache.swap_in("s")
        for _ in range(rounds):
            h = await reused.time_pair(cache, base, h)
    cases = ("d2h swap_out, reused cache", "h2d swap_in, reused cache")
    rows += reused.rows(label, bpb, n, nbytes, base.name, cases)

    # 3. Offload (eviction to the host tier) and onboard (a prefix hit found there).
    off_s, on_s, bd2h, bh2d, off_bytes, on_bytes = [], [], [], [], [], []
    prompt = np.arange(n * BLOCK_SIZE + 1, dtype=np.int64)
    for r in range(rounds):
        with KvCache(CacheConfig(**kw, num_blocks=n + 1, host_blocks=n)) as cache:
            _touch(cache)
            p = prompt + r * 10**7
            await cache.allocate("p", p)
            await cache.deallocate("p")
            s0 = cache.stats()
            bd2h.append(base.d2h())
            t, _ = await timed(cache.gc(target_free_ratio=1.0))
            off_s.append(t)
            s1 = cache.stats()
            bh2d.append(base.h2d())
            t, h = await timed(cache.allocate("p", p))
            on_s.append(t)
            s2 = cache.stats()
            off_bytes.append(s1.offload_bytes - s0.offload_bytes)
            on_bytes.append(s2.onboard_bytes - s1.onboard_bytes)
            if off_bytes[-1] != nbytes or on_bytes[-1] != nbytes:
                raise RuntimeError(
                    f"{label}: offload/onboard moved {off_bytes[-1]}/{on_bytes[-1]} bytes, "
                    f"expected {nbytes} ({s2})"
                )
    rows.append(_row(label, bpb, "d2h offload (gc)", n, nbytes, off_s, bd2h, base.name))
    rows.append(_row(label, bpb, "h2d onboard (prefix hit)", n, nbytes, on_s, bh2d, base.name))

    # 4. Copy-on-write: N children of a one-partial-block parent each copy that block.
    cow_s, per_s, bulk_s = [], [], []
    kids = [f"k{i}" for i in range(n)]
    step = np.ones(n, dtype=np.int64)
    with KvCache(CacheConfig(**kw, num_blocks=n + 2)) as cache:
        _touch(cache)
        await cache.allocate("parent", np.arange(BLOCK_SIZE // 2, dtype=np.int64) + 5 * 10**8)
        for _ in range(rounds):
            for k in kids:
                await cache.fork("parent", k)
            s0 = cache.stats()
            per_s.append(base.d2d_per_block(n))
            t, _ = await timed(cache.extend_batch(kids, step))
            cow_s.append(t)
            s1 = cache.stats()
            bulk_s.append(base.d2d_bulk(n))
            copied = s1.intra_device_copy_bytes - s0.intra_device_copy_bytes
            if copied != nbytes:
                raise RuntimeError(f"{label}: copy-on-write copied {copied}, not {nbytes}")
            for k in kids:
                await cache.deallocate(k)
    d2d_name = "torch copy_ per block" if base.cuda else "numpy copyto per block"
    rows.append(
        _row(
            label,
            bpb,
            "d2d copy-on-write",
            n,
            nbytes,
            cow_s,
            per_s,
            d2d_name,
            runs=[n],
            extra={"bulk_gbps": nbytes / _median(bulk_s) / 1e9},
        )
    )
    if not base.cuda:
        torch_gbps = _torch_cpu_gbps(nbytes, rounds)
        for row in rows:
            row["torch_cpu_gbps"] = torch_gbps
    return rows


def format_table(doc: dict[str, Any]) -> str:
    head = (
        f"{'size':>7}  {'case':<26} {'blocks':>6} {'runs':>5} {'ferrumkv':>9} "
        f"{'engine':>8} {'baseline':>9} {'ratio':>6}  baseline"
    )
    lines = [
        f"ferrumkv {doc['ferrumkv_version']} on {doc['device']} ({doc['device_name']}), "
        f"{doc['total_bytes'] / MIB:.0f} MiB a run, {doc['rounds']} rounds, medians, GB/s",
        head,
        "-" * len(head),
    ]
    for r in doc["rows"]:
        eng = "" if r["engine_gbps"] is None else f"{r['engine_gbps']:.1f}"
        runs = "" if r["runs"] is None else str(r["runs"])
        base = r["baseline"] + (f" (bulk {r['bulk_gbps']:.1f})" if "bulk_gbps" in r else "")
        lines.append(
            f"{r['size']:>7}  {r['case']:<26} {r['blocks']:>6} {runs:>5} "
            f"{r['ferrumkv_gbps']:>9.2f} {eng:>8} {r['baseline_gbps']:>9.2f} "
            f"{r['ratio']:>6.2f}  {base}"
        )
    s = doc["summary"]
    goal = {True: "met", False: "MISSED", None: "applies on a GPU"}[s["goal_met"]]
    lines.append(
        f"coalesced swaps: min ratio {s['min_swap_ratio']:.2f} (goal >= {GOAL}: {goal}); "
        f"copy-on-write min ratio {s['min_cow_ratio']:.2f}"
    )
    return "\n".join(lines)


def run(device: str, total: int, rounds: int, sizes: list[str] | None = None) -> dict[str, Any]:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_bandwidth: {device} asked for, but torch sees no GPU")
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = platform.processor() or platform.machine()
    picked = [s for s in SIZES if sizes is None or s[0].replace(" ", "") in sizes]
    rows: list[dict[str, Any]] = []
    for label, block_bytes, shape in picked:
        rows += asyncio.run(bench_size(device, label, block_bytes, shape, total, rounds))
    swaps = [r["ratio"] for r in rows if r["case"] in SWAP_CASES]
    cows = [r["ratio"] for r in rows if r["case"] == "d2d copy-on-write"]
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "device": device,
        "device_name": device_name,
        "ferrumkv_version": ferrumkv.__version__,
        "ferrumkv_file": ferrumkv.__file__,
        "torch_version": torch_version,
        "python": sys.version.split()[0],
        "total_bytes": total,
        "rounds": rounds,
        "measure": "wall-clock around each awaited call and each torch copy + synchronize; "
        "engine_gbps from stats().d2h_transfer_ns / h2d_transfer_ns deltas",
        "sizes": [r[0] for r in picked],
        "rows": rows,
        "summary": {
            "min_swap_ratio": min(swaps),
            "min_cow_ratio": min(cows),
            "goal": GOAL,
            # The goal is a GPU's: on the CPU both sides are memcpy (and page faults).
            "goal_met": min(swaps) >= GOAL if device.startswith("cuda") else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="benches/gpu_bandwidth.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda:0", help="cuda:N or cpu (default: cuda:0)")
    p.add_argument("--quick", action="store_true", help="small runs, 3 rounds (a smoke test)")
    p.add_argument(
        "--total-mib",
        type=float,
        help="bytes a run moves (default 256 on a GPU, 64 on the CPU; --quick: 32 and 8)",
    )
    p.add_argument("--rounds", type=int, help="timed rounds per case (default 7, --quick 3)")
    p.add_argument("--sizes", help="comma-separated subset, e.g. 64KiB,2MiB (default: all)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.total_mib is None:
        args.total_mib = (32 if cuda else 8) if args.quick else (256 if cuda else 64)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    if rounds < 1 or args.total_mib <= 0:
        p.error("--rounds and --total-mib must be positive")
    sizes = None if args.sizes is None else [s.strip() for s in args.sizes.split(",")]
    known = [s[0].replace(" ", "") for s in SIZES]
    if sizes is not None and not set(sizes) <= set(known):
        p.error(f"--sizes takes {', '.join(known)}")
    doc = run(args.device, int(args.total_mib * MIB), rounds, sizes)
    doc["quick"] = args.quick
    print(format_table(doc))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
