"""Prefix-cache hit rates of the eviction policies against their limits (``bench --only policy``).

The protocol is the one the eviction-policy figures in BENCHMARKS.md use: prompts only, one
request at a time, in trace order; each prompt is allocated (its longest cached run of whole
blocks is reused, the rest computed and registered) and deallocated at once, so its blocks
become evictable, tail first. The figure is the *full-block* hit rate: blocks served from the
cache / blocks the prompts occupy (``ceil(len / block_size)`` each; at most
``(len - 1) // block_size`` can hit, one token is always computed). Partial-block copies are
left out of every column alike.

* A policy's rate is measured on the engine itself: a real :class:`~ferrumkv.KvCache` with
  that ``eviction_policy`` (``full_reused_blocks``).
* ``belady`` simulates the same protocol with Belady's offline rule: when a block must go, the
  free cached block whose next lookup is furthest in the future (never: infinitely far) goes;
  ties, the deeper block first (a child is never needed before its parent). It is the usual
  upper reference, not a proven optimum here: prefix chains couple the blocks.
* ``infinite`` is the same simulation with no eviction at all.

Cost: the simulation walks every block of every prompt in Python (a few seconds per million
blocks); the engine runs take about a microsecond per block.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferrumkv import EVICTION_POLICIES, CacheConfig, KvCache
from ferrumkv._console import Column, Table, print_table, render_table
from ferrumkv.workload import Workload, prompt_block_hashes

_NEVER = 1 << 62


@dataclass(frozen=True)
class Prompt:
    """One prompt of the protocol: its tokens and the chained hash of each full block."""

    tokens: np.ndarray
    hashes: list[int]


def prompts_of(workload: Workload, block_size: int) -> list[Prompt]:
    """The workload's prompts with their block hashes (generated tokens are left out)."""
    out = []
    for request in workload.requests:
        tokens = request.prompt_tokens(workload.vocab_size)
        out.append(Prompt(tokens, prompt_block_hashes(tokens, block_size).tolist()))
    return out


@dataclass(frozen=True)
class HitRate:
    """Blocks served from the cache out of the blocks the prompts occupy."""

    hit_blocks: int
    lookup_blocks: int

    @property
    def rate(self) -> float:
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0


def engine_hit_rate(
    prompts: list[Prompt], block_size: int, num_blocks: int, policy: str
) -> HitRate:
    """Replays the prompts on a real cache of ``num_blocks`` with ``policy``."""
    return asyncio.run(_engine_hit_rate(prompts, block_size, num_blocks, policy))


def bookkeeping_config(num_blocks: int, block_size: int = 16, **kw: Any) -> CacheConfig:
    """A cache of a tiny model shape with KV events off: what measures bookkeeping (and hit
    rates), not memory."""
    return CacheConfig(
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        block_size=block_size,
        num_blocks=num_blocks,
        enable_kv_events=False,
        **kw,
    )


async def _engine_hit_rate(
    prompts: list[Prompt], block_size: int, num_blocks: int, policy: str
) -> HitRate:
    config = bookkeeping_config(num_blocks, block_size, eviction_policy=policy)
    lookups = 0
    async with KvCache(config) as cache:
        for i, prompt in enumerate(prompts):
            needed = math.ceil(len(prompt.tokens) / block_size)
            lookups += needed
            if needed > num_blocks:
                continue  # never fits: no lookup either (the simulation skips it too)
            if cache.try_allocate(i, prompt.tokens) is None:
                raise RuntimeError(f"prompt {i} did not fit in an empty cache")
            await cache.deallocate(i)
        hits = cache.stats().full_reused_blocks
    return HitRate(hits, lookups)


def simulated_hit_rate(prompts: list[Prompt], block_size: int, num_blocks: int | None) -> HitRate:
    """Belady's rule on ``num_blocks`` (``None``: the infinite cache), same protocol."""
    next_use = _next_uses(prompts, block_size)
    cached: set[int] = set()
    heap: list[tuple[int, int, int, int]] = []  # (-next use, -depth, version, hash)
    version: dict[int, int] = {}  # hash -> version of its live heap entry (free blocks)
    blank = num_blocks if num_blocks is not None else _NEVER
    capacity = blank
    hits = lookups = tick = 0
    for i, prompt in enumerate(prompts):
        n, hashes = len(prompt.tokens), prompt.hashes
        needed = math.ceil(n / block_size)
        lookups += needed
        if needed > capacity:
            continue
        k = 0
        while k < (n - 1) // block_size and hashes[k] in cached:
            k += 1
        hits += k
        for h in hashes[:k]:
            del version[h]  # owned again: its heap entry is stale
        for _ in range(needed - k):
            if blank:
                blank -= 1
                continue
            while True:
                _, _, v, h = heapq.heappop(heap)
                if version.get(h) == v:
                    del version[h]
                    cached.discard(h)
                    break
        new = [j for j in range(k, len(hashes)) if hashes[j] not in cached]
        cached.update(hashes[j] for j in new)
        for j in (*range(k), *new):
            tick += 1
            version[hashes[j]] = tick
            heapq.heappush(heap, (-next_use[i][j], -j, tick, hashes[j]))
        blank += needed - k - len(new)  # duplicates of cached blocks go back blank
    return HitRate(hits, lookups)


def _next_uses(prompts: list[Prompt], block_size: int) -> list[list[int]]:
    """For prompt i and block j: the index of the next prompt that looks block j's hash up."""
    following: dict[int, int] = {}
    out: list[list[int]] = [[] for _ in prompts]
    for i in range(len(prompts) - 1, -1, -1):
        n, hashes = len(prompts[i].tokens), prompts[i].hashes
        out[i] = [following.get(h, _NEVER) for h in hashes]
        for h in hashes[: (n - 1) // block_size]:
            following[h] = i
    return out


@dataclass(frozen=True)
class PolicyRow:
    """One workload at one capacity: every policy's rate, Belady's and the infinite cache's."""

    workload: str
    num_blocks: int
    rates: dict[str, float]
    belady: float
    infinite: float


def policy_table(
    workloads: list[tuple[str, Workload]],
    capacities: dict[str, list[int]],
    block_size: int = 16,
    policies: tuple[str, ...] = EVICTION_POLICIES,
    progress: bool = False,
) -> list[PolicyRow]:
    """Every policy on every workload at each of its capacities."""
    rows = []
    for name, workload in workloads:
        prompts = prompts_of(workload, block_size)
        infinite = simulated_hit_rate(prompts, block_size, None).rate
        for num_blocks in capacities[name]:
            rates = {p: engine_hit_rate(prompts, block_size, num_blocks, p).rate for p in policies}
            belady = simulated_hit_rate(prompts, block_size, num_blocks).rate
            rows.append(PolicyRow(name, num_blocks, rates, belady, infinite))
            if progress:
                print(f"  {name} at {num_blocks:,} blocks done", file=sys.stderr, flush=True)
    return rows


def policy_table_view(rows: list[PolicyRow]) -> Table:
    """The rows as a table: rates in percent, each policy after LRU with its ratio to LRU."""
    policies = list(rows[0].rates)
    body = []
    for r in rows:
        lru = r.rates.get("lru", 0.0)
        cells = [r.workload, f"{r.num_blocks:,}"]
        for p in policies:
            rate = r.rates[p]
            ratio = f" ({rate / lru:.2f}x)" if p != "lru" and lru else ""
            cells.append(f"{rate:.1%}{ratio}")
        body.append((*cells, f"{r.belady:.1%}", f"{r.infinite:.1%}"))
    columns = (
        Column("workload"),
        *(Column(h, "right") for h in ("blocks", *policies, "belady", "infinite")),
    )
    return Table(columns, tuple(body))


def format_policy_table(rows: list[PolicyRow]) -> str:
    """`policy_table_view` as plain text (what a pipe or a file gets)."""
    return render_table(policy_table_view(rows))


# ---------------------------------------------------------------------- the command

_DATA = Path(__file__).resolve().parents[2] / "benches" / "data"
"""The traces of the repository's checkout (absent from an installed wheel: pass --trace)."""

DEFAULT_TRACES = {
    "conversation": _DATA / "mooncake_conversation_first2000.jsonl",
    "synthetic trace": _DATA / "mooncake_synthetic_trace.jsonl",
}
DEFAULT_CAPACITIES = {
    "conversation": [20_000, 60_000, 120_000],
    "synthetic trace": [20_000, 60_000, 120_000],
    "synthetic chats": [1_000, 3_000, 10_000],
}
CHATS = 2000
"""Requests of the replay's synthetic chats (seed 0) in the table."""


def _workloads(traces: list[Path]) -> list[tuple[str, Workload]]:
    from ferrumkv.workload import DEFAULT_VOCAB_SIZE, load_trace, synthetic_workload

    named = [(p.stem, p) for p in traces] if traces else list(DEFAULT_TRACES.items())
    out = [
        (name, load_trace(path, vocab_size=DEFAULT_VOCAB_SIZE))
        for name, path in named
        if traces or path.exists()
    ]
    out.append(
        ("synthetic chats", synthetic_workload(CHATS, seed=0, vocab_size=DEFAULT_VOCAB_SIZE))
    )
    return out


def write_plot(path: Path, rows: list[PolicyRow]) -> None:
    """Hit rate against capacity, one panel per workload, one line per policy."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r.workload for r in rows))
    figure = Figure(figsize=(4.2 * len(names), 4), layout="constrained")
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        mine = [r for r in rows if r.workload == name]
        x = [r.num_blocks for r in mine]
        for policy in mine[0].rates:
            ax.plot(x, [r.rates[policy] for r in mine], marker="o", label=policy)
        ax.plot(x, [r.belady for r in mine], "k--", marker="x", label="belady (offline)")
        ax.axhline(mine[0].infinite, color="grey", linestyle=":", label="infinite cache")
        ax.set_xscale("log")
        ax.set_xlabel("device blocks (16 tokens)")
        ax.set_ylabel("full-block hit rate")
        ax.set_ylim(0, max(mine[0].infinite, *(r.belady for r in mine)) * 1.1 or 1)
        ax.set_title(name)
    axes[0].legend(fontsize="small")
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m ferrumkv bench --only policy [--trace FILE ...] [--plot FILE.png]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m ferrumkv bench --only policy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--trace",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a Mooncake JSONL trace (repeatable; default: benches/data's two)",
    )
    p.add_argument(
        "--capacities",
        metavar="N,N,...",
        help="device blocks to try on every trace (default: 20k, 60k, 120k)",
    )
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="hit rate against capacity")
    args = p.parse_args(argv)
    workloads = _workloads(args.trace)
    capacities = dict(DEFAULT_CAPACITIES)
    for name, _ in workloads:
        if args.capacities:
            capacities[name] = [int(c) for c in args.capacities.split(",")]
        capacities.setdefault(name, DEFAULT_CAPACITIES["conversation"])
    rows = policy_table(workloads, capacities, progress=True)
    print_table(policy_table_view(rows), sys.stdout)
    if args.plot is not None:
        write_plot(args.plot, rows)
    return 0
