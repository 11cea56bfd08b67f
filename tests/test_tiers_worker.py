"""Big swaps on the copy worker thread: the event loop keeps running, and the bytes arrive whole.

Shared setup: `tiers_helpers` (what goes where, the helpers).
"""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import ferrumkv
from helpers import alloc, drive, make_config, wait_until
from tiers_helpers import (
    Ticker,
    assert_all_unused,
    assert_reads,
    assert_tiers_consistent,
    big_cache,
    checkpoints_until,
    fill,
)


@pytest.mark.anyio
async def test_big_swaps_suspend_and_round_trip() -> None:
    rng = np.random.default_rng(2)
    cache = big_cache()
    n = 72 * 16  # 72 blocks = 9 MiB, far above the 1 MiB inline threshold
    try:
        await cache.allocate("a", list(range(n)))
        data = fill(cache, "a", n, rng)
        ticker = Ticker()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0)
            t0 = ticker.turns
            out = await cache.swap_out("a")
            t1 = ticker.turns
            back = await cache.swap_in("a")
            t2 = ticker.turns
            tg.cancel_scope.cancel()
        assert t1 > t0, "swap_out did not suspend"
        assert t2 > t1, "swap_in did not suspend"
        assert out.tier == "host" and len(out.block_ids) == 72
        assert back.tier == "device" and len(back.block_ids) == 72
        assert_reads(cache, "a", data)
        s = cache.stats()
        assert (s.d2h_transfers, s.h2d_transfers, s.swap_out_count, s.swap_in_count) == (1, 1, 1, 1)
        assert s.d2h_transfer_ns > 0 and s.h2d_transfer_ns > 0
        assert (s.d2h_blocks_copied, s.h2d_blocks_copied) == (72, 72)
        assert (s.device.used_blocks, s.host.used_blocks, s.num_swapped) == (72, 0, 0)
        await cache.deallocate("a")
        assert_all_unused(cache)
    finally:
        cache.close()


@pytest.mark.anyio
async def test_small_swaps_finish_without_suspending() -> None:
    with ferrumkv.KvCache(make_config(host_blocks=8)) as cache:
        alloc(cache, "a", list(range(10)))
        assert drive(cache.swap_out("a")).tier == "host"
        assert drive(cache.swap_in("a")).tier == "device"


@pytest.mark.anyio
@pytest.mark.parametrize("direction", ["out", "in"])
async def test_cancelling_the_waiter_mid_swap_still_completes_the_swap(direction: str) -> None:
    rng = np.random.default_rng(4)
    cache = big_cache(num_blocks=160, host_blocks=160)
    n = 128 * 16  # 16 MiB
    try:
        await cache.allocate("a", list(range(n)))
        data = fill(cache, "a", n, rng)
        if direction == "in":
            await cache.swap_out("a")
        want = "host" if direction == "out" else "device"
        call = cache.swap_out if direction == "out" else cache.swap_in
        started = False

        async def swap() -> None:
            nonlocal started
            started = True
            await call("a")

        async with anyio.create_task_group() as tg:
            tg.start_soon(swap)
            await checkpoints_until(lambda: started)
            tg.cancel_scope.cancel()
        # The copy goes on without its waiter and the sequence ends up moved.
        await wait_until(lambda: cache.get("a").tier == want)
        s = cache.stats()
        if direction == "out":
            assert (s.device.used_blocks, s.host.used_blocks, s.num_swapped) == (0, 128, 1)
            assert s.swap_out_count == 1
            await cache.swap_in("a")
        else:
            assert (s.device.used_blocks, s.host.used_blocks, s.num_swapped) == (128, 0, 0)
            assert s.swap_in_count == 1
        assert_tiers_consistent(cache)
        assert_reads(cache, "a", data)
        await cache.deallocate("a")
        assert_all_unused(cache)
    finally:
        cache.close()
