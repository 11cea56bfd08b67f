"""`ferrumkv.hitrate` (``bench --only policy``): the engine's hit rates under each eviction
policy beside Belady's rule and the infinite cache, on the same prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ferrumkv
from ferrumkv.hitrate import (
    Prompt,
    engine_hit_rate,
    format_policy_table,
    main,
    policy_table,
    prompts_of,
    simulated_hit_rate,
)
from ferrumkv.workload import DEFAULT_VOCAB_SIZE, load_trace, prompt_block_hashes

TRACE = Path(__file__).resolve().parent / "data" / "mooncake_first100.jsonl"
BS = 4


def prompt(first: int, n: int) -> Prompt:
    tokens = np.arange(first, first + n, dtype=np.int64)
    return Prompt(tokens, prompt_block_hashes(tokens, BS).tolist())


def test_belady_keeps_the_block_needed_soonest() -> None:
    """3 blocks; prompts of 5 tokens take 2 (one full block, cached, and a blank tail). C
    must evict A or B: LRU evicts A (released first), Belady B (needed later), so the
    second A hits under Belady only, and under `lru2`, which evicts the newest of the
    blocks seen once (B) too."""
    a, b, c = prompt(0, 5), prompt(100, 5), prompt(200, 5)
    prompts = [a, b, c, a]
    for policy in ferrumkv.EVICTION_POLICIES:
        hits = engine_hit_rate(prompts, BS, 3, policy)
        want = 1 if policy == "lru2" else 0
        assert (hits.hit_blocks, hits.lookup_blocks) == (want, 8), policy
    belady = simulated_hit_rate(prompts, BS, 3)
    assert (belady.hit_blocks, belady.lookup_blocks) == (1, 8)
    assert simulated_hit_rate(prompts, BS, None).hit_blocks == 1
    # Room for all three: every policy hits like the infinite cache.
    for policy in ferrumkv.EVICTION_POLICIES:
        assert engine_hit_rate(prompts, BS, 6, policy).hit_blocks == 1


def test_a_prompt_that_never_fits_is_skipped_alike() -> None:
    prompts = [prompt(0, 9), prompt(0, 40), prompt(0, 9)]  # the 40 tokens need 10 blocks
    for policy in ferrumkv.EVICTION_POLICIES:
        hits = engine_hit_rate(prompts, BS, 6, policy)
        assert (hits.hit_blocks, hits.lookup_blocks) == (2, 3 + 10 + 3), policy
    assert simulated_hit_rate(prompts, BS, 6).hit_blocks == 2


def test_adaptive_follows_the_rule_the_traffic_favours() -> None:
    """32 blocks. Frequency wins when 4 hot prompts come back every 80 prompts between
    one-time prompts (76 blocks between two uses of one: LRU never keeps them); recency
    wins when each phase cycles 12 new prompts 10 times (LRU keeps the phase, `lfu` keeps
    the last phase's counted blocks). `adaptive` gets what the better rule gets, nearly."""
    hot = [prompt(10**6 * (k + 1), 5) for k in range(4)]
    frequency = [hot[(i // 20) % 4] if i % 20 == 0 else prompt(10 * i, 5) for i in range(4000)]
    recency = [prompt(10**7 + 100 * (ph * 12 + j % 12), 5) for ph in range(60) for j in range(120)]

    def hits(prompts: list[Prompt], policy: str) -> int:
        return engine_hit_rate(prompts, BS, 32, policy).hit_blocks

    lru, lfu, adaptive = (hits(frequency, p) for p in ("lru", "lfu", "adaptive"))
    assert lru == 0 and lfu > 150, (lru, lfu)
    assert adaptive >= 0.95 * lfu, (adaptive, lfu)
    lru, lfu, adaptive = (hits(recency, p) for p in ("lru", "lfu", "adaptive"))
    assert lfu < 0.7 * lru, (lru, lfu)
    assert adaptive >= 0.99 * lru, (adaptive, lru)


@pytest.fixture(scope="module")
def trace_prompts() -> list[Prompt]:
    return prompts_of(load_trace(TRACE, vocab_size=DEFAULT_VOCAB_SIZE, limit=60), 16)


def test_no_policy_beats_belady_and_no_eviction_matches_the_infinite_cache(
    trace_prompts: list[Prompt],
) -> None:
    infinite = simulated_hit_rate(trace_prompts, 16, None)
    assert infinite.rate > 0
    big = sum(len(p.tokens) // 16 + 1 for p in trace_prompts)
    for policy in ferrumkv.EVICTION_POLICIES:
        assert engine_hit_rate(trace_prompts, 16, big, policy) == infinite, policy
    for blocks in (3000, 8000):
        belady = simulated_hit_rate(trace_prompts, 16, blocks)
        assert belady.rate <= infinite.rate
        for policy in ferrumkv.EVICTION_POLICIES:
            assert engine_hit_rate(trace_prompts, 16, blocks, policy).rate <= belady.rate


def test_the_table_and_its_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ferrumkv.workload import Workload

    workload = load_trace(TRACE, vocab_size=DEFAULT_VOCAB_SIZE, limit=30)
    rows = policy_table([("first30", workload)], {"first30": [2000, 6000]})
    assert [r.num_blocks for r in rows] == [2000, 6000]
    assert all(set(r.rates) == set(ferrumkv.EVICTION_POLICIES) for r in rows)
    assert all(max(r.rates.values()) <= r.belady <= r.infinite for r in rows)
    table = format_policy_table(rows)
    assert table.splitlines()[0].split() == [
        "workload", "blocks", *ferrumkv.EVICTION_POLICIES, "belady", "infinite"
    ]  # fmt: skip
    assert isinstance(workload, Workload)
    plot = tmp_path / "policies.png"
    assert main(["--trace", str(TRACE), "--capacities", "4000", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "mooncake_first100" in out and "synthetic chats" in out
    assert plot.read_bytes().startswith(b"\x89PNG")
