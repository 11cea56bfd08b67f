"""DLPack views of the K/V memory across swaps.

Shared setup: `tiers_helpers` (what goes where, the helpers).
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest
import torch

import ferrumkv
from ferrumkv import InvalidStateError
from helpers import BS, alloc, assert_stats_unchanged, drive, make_config, new_cache, stats_dict
from tiers_helpers import (
    DTYPES,
    LAYERS,
    LAYOUTS,
    ONE_BITS,
    assert_all_unused,
    assert_reads,
    disk_cache,
    fill,
    same_bits,
    spill_chain,
)

TORCH_BITS = {"float16": torch.int16, "bfloat16": torch.int16, "float32": torch.int32}
"""The integer dtype of each float dtype's width, to compare tensors bit for bit."""


@pytest.mark.anyio
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
async def test_dlpack_views_see_swapped_in_blocks(dtype: str, layout: str) -> None:
    """Views taken before a swap-out/in read the sequence's data at its new block ids
    (numpy has no bfloat16: only torch views it)."""
    rng = np.random.default_rng(17)
    with ferrumkv.KvCache(make_config(dtype=dtype, layout=layout, host_blocks=8)) as cache:
        with_numpy = dtype != "bfloat16"
        arrays = [np.from_dlpack(cache.kv_view(layer)) for layer in range(LAYERS) if with_numpy]
        tensors = [torch.from_dlpack(cache.kv_view(layer)) for layer in range(LAYERS)]
        before = await cache.allocate("a", list(range(10)))
        data = fill(cache, "a", 10, rng, dtype)
        await cache.swap_out("a")
        await cache.allocate("x", list(range(100, 112)))  # takes blank blocks 3, 4, 5
        after = await cache.swap_in("a")
        assert after.block_ids == (6, 7, 2) != before.block_ids
        bits = DTYPES[dtype][1]
        for layer in range(LAYERS):
            k, v = data[layer]
            t = tensors[layer].view(TORCH_BITS[dtype])
            for p in range(10):
                b, slot = after.block_ids[p // BS], p % BS
                if with_numpy:
                    arr = arrays[layer]
                    assert same_bits(arr[b, 0, slot], k[p]) and same_bits(arr[b, 1, slot], v[p])
                tk = t[b, 0, slot].numpy().view(bits)
                tv = t[b, 1, slot].numpy().view(bits)
                assert tk.tobytes() == k[p].tobytes() and tv.tobytes() == v[p].tobytes()
        # A write through torch (and numpy) into the new blocks shows in read_kv.
        b = after.block_ids[1]
        tensors[0][b, 0, 2].fill_(1.0)
        if with_numpy:
            arrays[1][b, 1, 3] = 1.0
            _, got_v = cache.read_kv("a", 1, 7, 1)
            assert (got_v.view(bits) == ONE_BITS[dtype]).all()
        got_k, _ = cache.read_kv("a", 0, 6, 1)
        assert (got_k.view(bits) == ONE_BITS[dtype]).all()
        await cache.deallocate("a")
        await cache.deallocate("x")
        assert_all_unused(cache)


def test_a_swapped_sequence_has_no_block_table() -> None:
    cache = new_cache(num_blocks=8, host_blocks=8)
    alloc(cache, "a", list(range(10)))
    alloc(cache, "b", list(range(100, 105)))
    drive(cache.swap_out("a"))
    before = stats_dict(cache)
    with pytest.raises(InvalidStateError, match="not resident"):
        cache.block_table(["b", "a"])
    assert_stats_unchanged(cache, before)
    drive(cache.swap_in("a"))
    assert cache.block_table(["a"]).shape == (1, 3)


@pytest.mark.anyio
async def test_a_disk_hit_is_read_off_the_event_loop(tmp_path: Any) -> None:
    rng = np.random.default_rng(21)
    with disk_cache(tmp_path) as cache:
        prompt, data = spill_chain(cache, rng)
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.sleep(0)
            before = ticks
            h = await cache.allocate("a2", prompt)
            done = True
        assert ticks > before, "the allocation suspended while the disk reader worked"
        assert h.num_cached_tokens == 12
        assert_reads(cache, "a2", data, 0, 12)
        assert cache.stats().disk_blocks_read == 2


def test_try_allocate_reads_a_disk_hit_inline(tmp_path: Any) -> None:
    rng = np.random.default_rng(22)
    with disk_cache(tmp_path) as cache:
        prompt, data = spill_chain(cache, rng)
        h = cache.try_allocate("a2", prompt)
        assert h is not None and h.num_cached_tokens == 12
        assert_reads(cache, "a2", data, 0, 12)
