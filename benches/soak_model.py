"""Soak run of the model-based test: one cache, one long random program (not hypothesis's many
short ones), with the same rules and checks as `tests/test_model.py`; prints the process RSS
every `--every` steps so a leak shows as growth. KV events and eviction events are drained every
1000 steps, as a router or a metrics scrape would (undrained, they are bounded queues that grow
to their caps).

    .venv/bin/python benches/soak_model.py --steps 1000000 --backend asyncio
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_model as tm


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS")))


def prompt(rng: random.Random) -> list[int]:
    chunks = [rng.randrange(len(tm.CHUNKS)) for _ in range(rng.randrange(4))]
    tail = [rng.randrange(10) for _ in range(1 + rng.randrange(3))]
    return [t for c in chunks for t in tm.CHUNKS[c]] + tail


def step(m: tm.CacheMachine, rng: random.Random) -> None:
    pick = lambda: rng.randrange(1001)  # noqa: E731
    toks = lambda: [rng.randrange(10) for _ in range(1 + rng.randrange(6))]  # noqa: E731
    rules = [
        lambda: m.allocate(prompt(rng), rng.choice(tm.SALTS), rng.choice(["now", "wait", "wait"])),
        lambda: m.allocate(prompt(rng), rng.choice(tm.SALTS), "now"),
        lambda: m.extend(pick(), toks(), rng.random() < 0.5),
        lambda: m.extend_by_count(pick(), 1 + rng.randrange(5)),
        lambda: m.deallocate(pick()),
        lambda: m.deallocate(pick()),
        lambda: m.fork(pick()),
        lambda: m.rewrite(pick(), rng.randrange(tm.LAYERS), pick(), 1 + rng.randrange(9)),
        lambda: m.touch_a_moving_sequence(pick()),
        lambda: m.swap(pick(), rng.random() < 0.5),
        lambda: m.pause_copies(rng.random() < 0.3),
        lambda: m.fail_next_copy() if rng.random() < 0.1 else None,
        lambda: m.cancel(pick()),
        lambda: m.free_then_cancel(pick(), pick()),
        lambda: m.free_act_then_cancel(pick(), pick(), rng.choice(["reuse", "extend_again"])),
        lambda: m.gc(rng.choice([0.0, 0.5, 1.0])),
        lambda: m.reset(),
        lambda: (
            m.disk_fault(rng.choice(["fail_next_write", "short_next_read", "flip"]), pick())
            if rng.random() < 0.2
            else None
        ),
    ]
    rng.choice(rules)()
    m.bytes_and_bookkeeping()
    m.first_come_first_served()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000)
    ap.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    machine = {"asyncio": tm.AsyncioMachine, "trio": tm.TrioMachine}[a.backend]()
    t0 = time.monotonic()
    print(f"step 0: RSS {rss_kib()} KiB", flush=True)
    try:
        for i in range(1, a.steps + 1):
            step(machine, rng)
            if i % 1000 == 0:  # a router / metrics consumer drains the event queues
                machine.cache.drain_events()
                machine.cache.drain_eviction_events()
            if i % a.every == 0:
                s = machine.cache.stats()
                print(
                    f"step {i}: RSS {rss_kib()} KiB, {time.monotonic() - t0:.0f} s, "
                    f"{s.num_sequences} sequences, {s.evicted_blocks} evicted, "
                    f"{s.swap_out_count} swaps out, {s.disk_blocks_written} disk writes",
                    flush=True,
                )
    finally:
        machine.teardown()
    print(f"done: {a.steps} steps in {time.monotonic() - t0:.0f} s, RSS {rss_kib()} KiB")


if __name__ == "__main__":
    main()
