"""Byte-for-byte round trips through the host and disk tiers: swaps, offload on eviction,
onboard on a prefix hit, disk spill and checksummed read-back, in every layout and dtype.

Shared setup: `tiers_helpers` (what goes where, the helpers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ferrumkv
from helpers import alloc, dealloc, drive, make_config, stats_dict
from tiers_helpers import (
    BPB,
    DTYPES,
    LAYERS,
    LAYOUTS,
    assert_all_unused,
    assert_reads,
    assert_tiers_consistent,
    delta,
    disk_cache,
    fill,
    random_kv,
)


@pytest.mark.anyio
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
async def test_swap_round_trip_is_byte_for_byte(dtype: str, layout: str) -> None:
    """device -> host (swap_out) -> device (swap_in) of a sequence whose first blocks are
    shared with another one, with a partly filled last block; the swap-in lands on other
    block ids (it evicts and offloads cached blocks on the way)."""
    rng = np.random.default_rng(11)
    with ferrumkv.KvCache(make_config(dtype=dtype, layout=layout, host_blocks=8)) as cache:
        a = await cache.allocate("a", list(range(10)))  # A0 A1 + 2-token tail
        assert a.block_ids == (0, 1, 2)
        data_a = fill(cache, "a", 10, rng, dtype)
        b = await cache.allocate("b", [*range(8), 500, 501])  # shares A0 A1
        assert (b.num_cached_tokens, b.block_ids) == (8, (0, 1, 3))
        data_b = {}
        for layer in range(LAYERS):
            k, v = random_kv(rng, 2, dtype)
            cache.write_kv("b", layer, 8, k, v)
            ka, va = data_a[layer]
            data_b[layer] = (np.concatenate([ka[:8], k]), np.concatenate([va[:8], v]))
        cache.iteration_stats()
        before = stats_dict(cache)

        out = await cache.swap_out("a")
        assert out.tier == "host" and out.block_ids == (0, 1, 2)  # host block ids
        assert (out.num_tokens, out.request_id) == (10, "a")
        assert cache.get("a") == out
        s = cache.stats()
        # A0, A1 stay held by "b"; only a's tail block was freed on the device.
        assert (s.device.used_blocks, s.host.used_blocks, s.host.free_blocks) == (3, 3, 5)
        bpb = cache.config.bytes_per_block
        assert (s.num_swapped, s.num_sequences, s.host.used_bytes) == (1, 2, 3 * bpb)
        assert delta(before, cache, "swap_out_count", "d2h_blocks_copied", "d2h_transfers") == (
            1,
            3,
            1,
        )
        it = cache.iteration_stats()
        assert (it.secondary_max_num_blocks, it.secondary_used_num_blocks) == (8, 3)
        assert (it.secondary_free_num_blocks, it.primary_used_num_blocks) == (5, 3)
        assert_reads(cache, "b", data_b)  # the sharer is untouched
        assert_tiers_consistent(cache)

        # Move everything else around so the swap-in gets other blocks: "b" leaves (A0, A1
        # become evictable), "x" takes every blank block, so swap_in evicts A1 then A0.
        await cache.deallocate("b")
        await cache.allocate("x", list(range(1000, 1020)))  # 5 blocks: 4, 5, 6, 7, 2
        before = stats_dict(cache)
        back = await cache.swap_in("a")
        assert back.tier == "device" and back.block_ids == (3, 1, 0)
        assert cache.get("a") == back
        assert_reads(cache, "a", data_a)
        s = cache.stats()
        assert (s.device.used_blocks, s.host.used_blocks, s.num_swapped) == (8, 0, 0)
        assert delta(
            before,
            cache,
            "swap_in_count",
            "h2d_blocks_copied",
            "h2d_transfers",
            "evicted_blocks",
            "offload_blocks",
        ) == (1, 3, 1, 2, 2)
        assert s.host.evictable_blocks == 2  # A1, A0 offloaded on eviction
        # Resident again: it can grow, be written and read.
        await cache.deallocate("x")
        await cache.extend("a", [10, 11, 12])
        k, v = random_kv(rng, 3, dtype)
        cache.write_kv("a", 1, 10, k, v)
        ka, va = data_a[1]
        assert_reads(cache, "a", {0: data_a[0]})
        assert_reads(cache, "a", {1: (np.concatenate([ka, k]), np.concatenate([va, v]))})
        await cache.deallocate("a")
        assert_all_unused(cache)


@pytest.mark.anyio
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
async def test_disk_round_trip_through_offload_and_spill(
    dtype: str, layout: str, tmp_path: Any
) -> None:
    """device -> host (offload on eviction) -> disk (spill on host eviction) -> device (a
    prefix hit read back from disk, checksum verified)."""
    rng = np.random.default_rng(5)
    with disk_cache(tmp_path, dtype=dtype, layout=layout, host_blocks=2) as cache:
        bpb = cache.config.bytes_per_block
        prompt = list(range(9))  # A0 A1 + 1-token tail
        await cache.allocate("a", prompt)
        data = fill(cache, "a", 9, rng, dtype)
        await cache.deallocate("a")
        await cache.allocate("b", list(range(100, 116)))  # evicts A1, A0 to the host
        s = cache.stats()
        assert (s.evicted_blocks, s.offload_blocks, s.offload_bytes) == (2, 2, 2 * bpb)
        assert (s.host.evictable_blocks, s.disk.evictable_blocks) == (2, 0)
        await cache.deallocate("b")
        await cache.allocate("c", list(range(200, 216)))  # the host spills A1, A0, B3, B2
        await cache.deallocate("c")
        cache._core.wait_disk_idle()
        s = cache.stats()
        assert (s.disk_blocks_written, s.disk_write_errors, s.inflight_disk_ops) == (4, 0, 0)
        assert (s.disk.evictable_blocks, s.disk.used_blocks) == (4, 0)
        assert (s.offload_blocks, s.host.evictable_blocks) == (6, 2)
        assert cache.lookup_prefix(prompt) == ferrumkv.PrefixMatch(0, 0, 8)  # A0 A1 on disk

        before = stats_dict(cache)
        a2 = await cache.allocate("a2", prompt)
        assert a2.num_cached_tokens == 8
        assert delta(
            before,
            cache,
            "disk_blocks_read",
            "onboard_blocks",
            "onboard_bytes",
            "full_reused_blocks",
            "cache_tokens",
            "disk_checksum_failures",
            "disk_read_errors",
        ) == (2, 2, 2 * bpb, 2, 8, 0, 0)
        assert_reads(cache, "a2", data, 0, 8)
        await cache.deallocate("a2")
        assert_all_unused(cache)


@pytest.mark.anyio
async def test_offload_and_onboard_through_the_host_tier() -> None:
    rng = np.random.default_rng(3)
    with ferrumkv.KvCache(make_config(num_blocks=3, host_blocks=4)) as cache:
        await cache.allocate("a", list(range(9)))
        data = fill(cache, "a", 9, rng)
        await cache.deallocate("a")
        await cache.allocate("b", list(range(500, 512)))  # all 3 blocks: evicts A1, A0
        s = cache.stats()
        assert (s.evicted_blocks, s.offload_blocks, s.offload_bytes) == (2, 2, 2 * BPB)
        assert (s.d2h_blocks_copied, s.host.evictable_blocks, s.host.used_blocks) == (2, 2, 0)
        await cache.deallocate("b")
        assert cache.lookup_prefix(list(range(9))) == ferrumkv.PrefixMatch(0, 8, 0)
        before = stats_dict(cache)
        a2 = await cache.allocate("a2", list(range(9)))
        assert a2.num_cached_tokens == 8
        assert delta(
            before,
            cache,
            "onboard_blocks",
            "onboard_bytes",
            "full_reused_blocks",
            "h2d_blocks_copied",
        ) == (2, 2 * BPB, 2, 2)
        assert_reads(cache, "a2", data, 0, 8)
        # The host copies stay cached; b's 3 evicted blocks took the other 2 host blocks
        # (B0 evicting B2: A0, A1 were pinned while they were copied).
        assert cache.stats().host.evictable_blocks == 4
        assert delta(before, cache, "evicted_blocks", "offload_blocks") == (3, 3)
        await cache.deallocate("a2")
        g = await cache.gc(target_free_ratio=1.0)
        assert (g.evicted_blocks, g.offloaded_blocks) == (2, 0)  # A0, A1 are on the host
        assert_all_unused(cache)


def test_blocks_read_back_from_disk_go_back_to_it_leaf_first(tmp_path: Any) -> None:
    """Leaves first in the disk tier too: after a read-back, the chain's last block is the
    first the full disk tier gives up (the read pins its slots and releases them leaf first,
    as a sequence releases its blocks)."""
    from tiers_helpers import alloc_from_disk, spill_chain

    with disk_cache(tmp_path, disk_blocks=2) as cache:
        prompt, _ = spill_chain(cache, np.random.default_rng(3))  # A2, A1 fill the disk
        stored = {
            e.token_ids[i * 4]: h
            for e in cache.drain_events()
            if isinstance(e, ferrumkv.BlockStored) and e.tier == "device"
            for i, h in enumerate(e.block_hashes)
        }
        a2 = stored[8]  # the chain's last full block (tokens 8..11)
        alloc_from_disk(cache, "a2", prompt)  # A1, A2 read back from disk
        assert cache.stats().disk_blocks_read == 2
        dealloc(cache, "a2")
        cache.drain_events()
        # A new chain pushes blocks down to the full disk tier, which makes room.
        alloc(cache, "d", list(range(300, 313)))
        dealloc(cache, "d")
        drive(cache.gc(target_free_ratio=1.0))
        cache._core.wait_disk_idle()
        removed = [
            h
            for e in cache.drain_events()
            if isinstance(e, ferrumkv.BlockRemoved) and e.tier == "disk"
            for h in e.block_hashes
        ]
        assert removed and removed[0] == a2, "the leaf leaves the disk tier first"
        assert_tiers_consistent(cache)
