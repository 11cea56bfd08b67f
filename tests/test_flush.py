"""`await flush()`: waits for exactly the disk writes issued before it, on asyncio and trio,
without blocking the loop; a timeout or a cancel gives back nothing because it takes nothing."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import ferrumkv
from helpers import make_config

pytestmark = pytest.mark.anyio


def disk_cache(tmp_path: Path) -> ferrumkv.KvCache:
    cfg = make_config(num_blocks=4, host_blocks=2, disk_blocks=8, disk_path=str(tmp_path / "kv"))
    return ferrumkv.KvCache(cfg)


async def spill_two(cache: ferrumkv.KvCache) -> None:
    """A0, A1 go device -> host -> disk: 2 disk writes issued (behind, on the workers)."""
    await cache.allocate("a", list(range(9)))
    await cache.deallocate("a")
    await cache.allocate("b", list(range(100, 116)))  # offloads A0, A1 to the host tier
    await cache.deallocate("b")
    await cache.allocate("c", list(range(200, 216)))  # the host tier spills them (and b's)
    await cache.deallocate("c")


async def test_without_a_disk_tier_flush_returns_at_once() -> None:
    with ferrumkv.KvCache(make_config()) as cache:
        await cache.flush()
        await cache.flush(timeout=0)


async def test_flush_waits_for_the_writes_in_flight(tmp_path: Path) -> None:
    with disk_cache(tmp_path) as cache:
        cache._core.pause_disk_writes(True)
        await spill_two(cache)
        assert cache.stats().inflight_disk_ops == 4
        # Held writes: the flush times out, and the loop kept running meanwhile.
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            with pytest.raises(TimeoutError, match="still in flight"):
                await cache.flush(timeout=0.05)
            tg.cancel_scope.cancel()
        assert ticks > 5
        assert cache.stats().disk_blocks_written == 0
        assert cache._core.num_tickets() == 0  # the timed-out flush left nothing behind
        cache._core.pause_disk_writes(False)
        await cache.flush()
        s = cache.stats()
        assert (s.disk_blocks_written, s.inflight_disk_ops) == (4, 0)
        assert cache.lookup_prefix(list(range(9))).disk_tokens == 8  # readable now
        assert cache._core.num_tickets() == 0


async def test_a_cancelled_flush_takes_nothing(tmp_path: Path) -> None:
    with disk_cache(tmp_path) as cache:
        cache._core.pause_disk_writes(True)
        await spill_two(cache)
        with anyio.move_on_after(0.02):
            await cache.flush()
        assert cache._core.num_tickets() == 0
        cache._core.pause_disk_writes(False)
        await cache.flush()
        assert cache.stats().disk_blocks_written == 4


async def test_close_answers_a_waiting_flush(tmp_path: Path) -> None:
    cache = disk_cache(tmp_path)
    cache._core.pause_disk_writes(True)
    await spill_two(cache)

    async def close_soon() -> None:
        await anyio.sleep(0.02)
        cache.close()  # lifts the pause and lands every write, then fails the waiter

    async with anyio.create_task_group() as tg:
        tg.start_soon(close_soon)
        with pytest.raises(ferrumkv.CacheClosedError):
            await cache.flush()


async def test_flushes_are_answered_in_order_as_writes_land(tmp_path: Path) -> None:
    with disk_cache(tmp_path) as cache:
        cache._core.pause_disk_writes(True)
        await spill_two(cache)
        done: list[str] = []

        async def flush(name: str) -> None:
            await cache.flush()
            done.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flush, "first")
            await anyio.sleep(0.01)
            tg.start_soon(flush, "second")
            await anyio.sleep(0.01)
            assert done == []
            cache._core.pause_disk_writes(False)
        assert sorted(done) == ["first", "second"]
        assert cache.stats().disk_blocks_written == 4
