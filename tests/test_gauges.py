"""O(1) gauges (`num_free_blocks`, `num_evictable_blocks`, `num_used_blocks`,
`num_waiting`) against the snapshot, the snapshot's keys against the stats types' fields
(`stats()` fills its dataclasses straight from them), and the swapped-sequence count the
engine now keeps as sequences move."""

from __future__ import annotations

import dataclasses

import anyio
import pytest

import ferrumkv
from ferrumkv import CacheClosedError, CacheStats, IterationStats, PressureLevel, TierStats
from helpers import alloc, check_invariants, dealloc, drive, make_config, new_cache, wait_until


def gauges(cache: ferrumkv.KvCache) -> tuple[int, int, int, int]:
    return (
        cache.num_free_blocks,
        cache.num_evictable_blocks,
        cache.num_used_blocks,
        cache.num_waiting,
    )


def from_stats(cache: ferrumkv.KvCache) -> tuple[int, int, int, int]:
    s = cache.stats()
    return (s.device.free_blocks, s.device.evictable_blocks, s.device.used_blocks, s.num_waiting)


def test_gauges_follow_allocations_and_releases() -> None:
    cache = new_cache(num_blocks=10)
    assert gauges(cache) == (10, 0, 0, 0)
    alloc(cache, "a", list(range(9)))  # 3 blocks, 2 of them full
    alloc(cache, "b", [1])
    assert gauges(cache) == (6, 0, 4, 0) == from_stats(cache)
    dealloc(cache, "a")  # its 2 full blocks stay cached (evictable), the partial one is blank
    assert gauges(cache) == (9, 2, 1, 0) == from_stats(cache)
    assert cache.num_free_blocks + cache.num_used_blocks == cache.config.num_blocks
    cache.close()
    with pytest.raises(CacheClosedError):
        _ = cache.num_free_blocks


@pytest.mark.anyio
async def test_num_waiting_counts_waiting_calls() -> None:
    cache = new_cache(num_blocks=4)
    await cache.allocate("a", list(range(16)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.allocate, "w1", [1, 2])
        tg.start_soon(cache.allocate, "w2", [3, 4])
        await wait_until(lambda: cache.num_waiting == 2)
        assert gauges(cache) == (0, 0, 4, 2) == from_stats(cache)
        assert cache.pressure_level == PressureLevel.CRITICAL
        await cache.deallocate("a")
    assert gauges(cache) == (2, 2, 2, 0) == from_stats(cache)


def test_snapshot_keys_are_the_stats_fields() -> None:
    cache = new_cache()
    raw = cache._core.stats()
    assert set(raw) == {f.name for f in dataclasses.fields(CacheStats)}
    assert set(raw["device"]) == {f.name for f in dataclasses.fields(TierStats)}
    s = cache.stats()
    assert s == cache.stats() and isinstance(s.device, TierStats)
    assert isinstance(s.pressure_level, PressureLevel)
    assert repr(s).startswith("CacheStats(alloc_total_blocks=0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_sequences = 3  # type: ignore[misc]
    it = cache.iteration_stats()
    assert set(it.to_dict()) >= {f.name for f in dataclasses.fields(IterationStats)}
    assert it.primary_max_num_blocks == cache.config.num_blocks


def test_num_swapped_follows_swaps_and_deallocation() -> None:
    cache = ferrumkv.KvCache(make_config(num_blocks=8, host_blocks=8))
    alloc(cache, "a", list(range(6)))
    alloc(cache, "b", [1, 2])
    drive(cache.swap_out("a"))
    drive(cache.swap_out("b"))
    assert cache.stats().num_swapped == 2
    drive(cache.swap_in("a"))
    assert cache.stats().num_swapped == 1
    dealloc(cache, "b")  # a swapped sequence leaves the count when it goes
    assert cache.stats().num_swapped == 0
    drive(cache.swap_out("a"))
    assert cache.stats().num_swapped == 1
    check_invariants(cache)  # the engine checks its count against its sequences
    cache.close()
