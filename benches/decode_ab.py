"""Before / after timing of the decode-step calls every version has: `extend_batch` (one
token id each, a 1-D array), `block_table` and `stats()`, on the case of `python -m ferrumkv
bench --only decode` (256 sequences of 1,024 prompt tokens, 64 steps a round, the sequences
freed and allocated again before each round, 21 rounds, medians).

Run it once per build, e.g. an older commit's package first on the path:
`PYTHONPATH=/path/to/old/python .venv/bin/python benches/decode_ab.py`, then without it.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np

import ferrumkv
from ferrumkv import CacheConfig, KvCache

BLOCK, SEQS, PROMPT, STEPS, ROUNDS = 16, 256, 1024, 64, 21


async def main() -> None:
    cfg = CacheConfig(
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        block_size=BLOCK,
        num_blocks=2 * SEQS * (-(-(PROMPT + STEPS) // BLOCK) + 1),
        enable_kv_events=False,
    )
    rids = list(range(SEQS))
    prompts = [np.arange(PROMPT, dtype=np.int64) + 10_000 * r for r in rids]
    tokens = np.arange(SEQS, dtype=np.int64)
    extend_us, table_us, stats_us = [], [], []
    with KvCache(cfg) as cache:
        for _ in range(ROUNDS):
            for r in rids:
                if r in cache:
                    await cache.deallocate(r)
            for r, p in zip(rids, prompts, strict=True):
                await cache.allocate(r, p)
            t0 = time.perf_counter_ns()
            for _ in range(STEPS):
                await cache.extend_batch(rids, tokens)
            extend_us.append((time.perf_counter_ns() - t0) / STEPS / 1e3)
            t0 = time.perf_counter_ns()
            for _ in range(STEPS):
                cache.block_table(rids)
            table_us.append((time.perf_counter_ns() - t0) / STEPS / 1e3)
        for _ in range(ROUNDS):
            t0 = time.perf_counter_ns()
            for _ in range(2000):
                cache.stats()
            stats_us.append((time.perf_counter_ns() - t0) / 2000 / 1e3)
    print(ferrumkv.__file__)
    print(
        f"extend_batch {statistics.median(extend_us):.2f} us/step, "
        f"block_table {statistics.median(table_us):.2f} us, "
        f"stats() {statistics.median(stats_us):.2f} us"
    )


if __name__ == "__main__":
    asyncio.run(main())
