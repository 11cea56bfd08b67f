"""Eviction policies in simulation: rules the engine does not have, beside the ones it has, on
the protocol of `python -m ferrumkv bench --only policy` (prompts only, one request at a time:
look up the longest cached prefix, pin it, evict until the rest fits, cache it, release it
tail first).

Why it exists: to try a policy in seconds before building it into the pool. It reproduces the
engine's `lru` to 0.1 point on every row of the README's policy table and its `lfu` to about
0.4 (the engine bounds `lfu`'s ghost; here it is unbounded), so a rule's figure here is what
the engine's would be. The Mooncake traces are simulated per 512-token hash id (32 blocks of
16 tokens; a prompt's last id counts the blocks its tokens reach), the synthetic chats per
block (from `ferrumkv.workload`). "conversation x3" is the conversation trace followed by two
copies of itself under fresh ids (all but the shared first id): a long run where the first
copy's history is dead, which a policy that never ages what it protects loses on.

Rules (`RULES`; each orders the free cached blocks, the least valuable first; ties go to the
earliest release, which keeps a chain's leaves ahead of its root):
- `lru`: by release.
- `lfu`: by min(hits, 4), then release; hits outlive evictions (unbounded), a block's count
  never above its parent's (the engine's `lfu`).
- `lru2`: LRU-2, by the time of the second-to-last access (never: first); the last access of
  an evicted block is remembered, at most `4 x capacity` of them (FIFO).
- `lru2-new-last`: `lru2`, with blocks seen once evicted newest request first (a request
  re-read after a long gap finds its blocks; one read soon after is the loser).
- `lfu2-new-last`: `lfu` capped at 2, blocks never hit evicted newest request first.
- `lru2-new-last-w200`: `lru2-new-last`, a second-to-last access more than 200 requests
  before the release counted as 200 before it (among blocks whose history is that old, the
  least recently released go first).

Run: `.venv/bin/python benches/policy_sim.py` (about a minute; `--quick`: the conversation
only). Results and the conclusions drawn are in BENCHMARKS.md ("Eviction rules in
simulation").
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
Request = tuple[list[object], list[int]]  # (chain of ids, blocks per id)


def load_trace(path: Path) -> list[Request]:
    """A Mooncake trace: one id per 512 tokens, 32 blocks each but the last."""
    out: list[Request] = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ids = r["hash_ids"]
        weights = [32] * len(ids)
        weights[-1] = max(1, -(-(r["input_length"] - 512 * (len(ids) - 1)) // 16))
        out.append((list(ids), weights))
    return out


def synthetic_chats() -> list[Request]:
    """The policy table's synthetic chats, one id per full block (and one for the tail)."""
    from ferrumkv.hitrate import CHATS, prompts_of
    from ferrumkv.workload import DEFAULT_VOCAB_SIZE, synthetic_workload

    out: list[Request] = []
    prompts = prompts_of(synthetic_workload(CHATS, seed=0, vocab_size=DEFAULT_VOCAB_SIZE), 16)
    for i, p in enumerate(prompts):
        ids: list[object] = list(p.hashes)
        if len(p.tokens) % 16:
            ids.append(("tail", i))
        out.append((ids, [1] * len(ids)))
    return out


def repeated(reqs: list[Request], copies: int) -> list[Request]:
    """`reqs` then `copies - 1` copies under fresh ids (the shared first id kept)."""
    out = list(reqs)
    for k in range(1, copies):
        out += [([u if u == 0 else (k, u) for u in ids], w) for ids, w in reqs]
    return out


class Rule:
    """LRU; subclasses override what they track and `key`."""

    def hit(self, u: object, t: int) -> None: ...

    def new(self, u: object, t: int, parent: object | None) -> None: ...

    def evicted(self, u: object) -> None: ...

    def key(self, u: object, t: int) -> tuple:
        return ()


class Lfu(Rule):
    def __init__(self, cap: int = 4, new_last: bool = False) -> None:
        self.hits: dict[object, int] = {}
        self.ghost: dict[object, int] = {}
        self.cap, self.new_last = cap, new_last

    def hit(self, u: object, t: int) -> None:
        self.hits[u] = min(self.hits.get(u, 0) + 1, self.cap)

    def new(self, u: object, t: int, parent: object | None) -> None:
        r = self.ghost.pop(u, None)
        c = 0 if r is None else min(r + 1, self.cap)
        if parent is not None:
            c = min(c, self.hits.get(parent, self.cap))
        self.hits[u] = c

    def evicted(self, u: object) -> None:
        self.ghost[u] = self.hits.pop(u, 0)

    def key(self, u: object, t: int) -> tuple:
        c = self.hits[u]
        return (c, -t) if self.new_last and c == 0 else (c, t)


class Lru2(Rule):
    def __init__(self, history: int, new_last: bool = False, window: int | None = None) -> None:
        self.last2: dict[object, list[int]] = {}
        self.history: OrderedDict[object, int] = OrderedDict()
        self.limit, self.new_last, self.window = history, new_last, window

    def _access(self, u: object, t: int) -> None:
        a = self.last2.get(u)
        if a is None:
            h = self.history.pop(u, None)
            a = [] if h is None else [h]
        a.append(t)
        self.last2[u] = a[-2:]

    def hit(self, u: object, t: int) -> None:
        self._access(u, t)

    def new(self, u: object, t: int, parent: object | None) -> None:
        self._access(u, t)

    def evicted(self, u: object) -> None:
        a = self.last2.pop(u, None)
        if a:
            self.history[u] = a[-1]
            if len(self.history) > self.limit:
                self.history.popitem(last=False)

    def key(self, u: object, t: int) -> tuple:
        a = self.last2[u]
        if len(a) >= 2:
            return (1, a[-2] if self.window is None else max(a[-2], t - self.window))
        return (0, -t) if self.new_last else (0, t)


def hit_rate(reqs: list[Request], capacity: int, rule: Rule) -> float:
    """Blocks served from the cache out of all prompt blocks, under `rule`."""
    cached: dict[object, int] = {}
    used = hits = total = seq = 0
    heap: list[tuple] = []
    version: dict[object, int] = {}
    for t, (ids, w) in enumerate(reqs):
        total += sum(w)
        k = 0  # a full hit must end before the prompt's last block
        while k < len(ids) - 1 and ids[k] in cached:
            k += 1
        for u in ids[:k]:
            version[u] = version.get(u, 0) + 1  # pinned: its heap entry is stale
            rule.hit(u, t)
        hits += sum(w[:k])
        for u in ids[k:]:  # cached past a miss: unreachable, recomputed
            if u in cached:
                used -= cached.pop(u)
                version[u] = version.get(u, 0) + 1
                rule.evicted(u)
        need, pinned = sum(w[k:]), set(ids[:k])
        while used + need > capacity and heap:
            *_, u, v = heapq.heappop(heap)
            if version.get(u) == v and u in cached and u not in pinned:
                used -= cached.pop(u)
                rule.evicted(u)
        if used + need > capacity:
            continue  # never fits
        for i in range(k, len(ids)):
            cached[ids[i]] = w[i]
            used += w[i]
            rule.new(ids[i], t, ids[i - 1] if i else None)
        for u in reversed(ids):  # released tail first
            seq += 1
            version[u] = version.get(u, 0) + 1
            heapq.heappush(heap, (rule.key(u, t), seq, u, version[u]))
    return hits / total


def belady(reqs: list[Request], capacity: int) -> float:
    """Belady's rule: evict the block used furthest in the future (leaves first on ties)."""
    next_use: list[dict[object, float]] = [{} for _ in reqs]
    upcoming: dict[object, float] = {}
    for t in range(len(reqs) - 1, -1, -1):
        ids = reqs[t][0]
        next_use[t] = {u: upcoming.get(u, math.inf) for u in ids}
        for u in ids:
            upcoming[u] = t

    class Oracle(Rule):
        def key(self, u: object, t: int) -> tuple:
            return (-next_use[t][u],)

    return hit_rate(reqs, capacity, Oracle())


RULES: dict[str, Callable[[int], Rule]] = {
    "lru": lambda units: Rule(),
    "lfu": lambda units: Lfu(),
    "lru2": lambda units: Lru2(4 * units),
    "lru2-new-last": lambda units: Lru2(4 * units, new_last=True),
    "lfu2-new-last": lambda units: Lfu(2, new_last=True),
    "lru2-new-last-w200": lambda units: Lru2(4 * units, new_last=True, window=200),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the conversation trace only")
    args = ap.parse_args()
    conv = load_trace(DATA / "mooncake_conversation_first2000.jsonl")
    rows: list[tuple[str, list[Request], list[int], int]] = [
        ("conversation", conv, [20_000, 60_000, 120_000], 32),
    ]
    if not args.quick:
        rows += [
            ("conversation x3", repeated(conv, 3), [60_000], 32),
            (
                "synthetic trace",
                load_trace(DATA / "mooncake_synthetic_trace.jsonl"),
                [20_000, 60_000, 120_000],
                32,
            ),
            ("synthetic chats", synthetic_chats(), [1_000, 3_000, 10_000], 1),
        ]
    print(f"{'workload':<16} {'blocks':>7}  " + "  ".join(f"{n:>15}" for n in RULES) + "   belady")
    for name, reqs, capacities, blocks_per_id in rows:
        for capacity in capacities:
            units = capacity // blocks_per_id
            rates = {n: hit_rate(reqs, capacity, make(units)) for n, make in RULES.items()}
            lru = rates["lru"]
            cells = [f"{rates['lru']:>14.2%} "] + [
                f"{r:>6.2%} ({r / lru:.2f}x)" for n, r in rates.items() if n != "lru"
            ]
            print(
                f"{name:<16} {capacity:>7,}  "
                + "  ".join(cells)
                + f"  {belady(reqs, capacity):>6.2%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
