"""The secondary tiers: host memory (swaps, offload on eviction, onboard on a prefix hit) and
the disk file (spills of evicted host blocks, checksummed read-back), byte for byte.

Where a block goes (`helpers.make_config`: 2 layers, 2 heads, head_dim 4, block_size 4,
256-byte blocks): a device cache evicts its least recently released cached block first, and
a sequence releases its blocks tail first, so of a prompt's full blocks A0, A1, A2 the
eviction order is A2, A1, A0. The host tier does the same; disk slots are handed out blank
first in order 0, 1, 2, ... Swaps moving 1 MiB or more copy on a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ferrumkv
from ferrumkv import (
    CacheClosedError,
    DuplicateRequestError,
    InvalidStateError,
    OutOfBlocksError,
    UnknownRequestError,
)
from helpers import (
    BS,
    SMALL_BYTES_PER_BLOCK,
    alloc,
    assert_stats_unchanged,
    check_invariants,
    dealloc,
    drive,
    make_config,
    new_cache,
    stats_dict,
    wait_until,
)

HEADS, HEAD_DIM, LAYERS = 2, 4, 2
BPB = SMALL_BYTES_PER_BLOCK
TOKEN_BYTES = HEADS * HEAD_DIM * 2  # float16
LAYOUTS = ["block_major", "layer_major"]
# dtype -> (numpy dtype of the cache's arrays, unsigned int of the same width)
DTYPES = {
    "float16": (np.float16, np.uint16),
    "bfloat16": (np.uint16, np.uint16),  # raw bf16 bit patterns
    "float32": (np.float32, np.uint32),
}
TIERS = ("device", "host", "disk")


# ----- helpers ------------------------------------------------------------------------------


def random_kv(
    rng: np.random.Generator, n: int, dtype: str = "float16", heads: int = HEADS, hd: int = HEAD_DIM
) -> tuple[np.ndarray, np.ndarray]:
    """Random bit patterns (NaNs and infinities included) of the cache's dtype."""
    np_dtype, bits = DTYPES[dtype]
    info = np.iinfo(bits)
    k = rng.integers(0, info.max, size=(n, heads, hd), dtype=bits, endpoint=True).view(np_dtype)
    v = rng.integers(0, info.max, size=(n, heads, hd), dtype=bits, endpoint=True).view(np_dtype)
    return k, v


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


Data = dict[int, tuple[np.ndarray, np.ndarray]]


def fill(
    cache: ferrumkv.KvCache, rid: Any, n: int, rng: np.random.Generator, dtype: str = "float16"
) -> Data:
    """Writes random K/V to positions 0..n of every layer; returns what was written."""
    c = cache.config
    data = {}
    for layer in range(c.num_layers):
        k, v = random_kv(rng, n, dtype, c.num_kv_heads, c.head_dim)
        cache.write_kv(rid, layer, 0, k, v)
        data[layer] = (k, v)
    return data


def assert_reads(
    cache: ferrumkv.KvCache, rid: Any, data: Data, start: int = 0, n: int | None = None
) -> None:
    """Positions start..start+n (default: to the end of `data`) of every layer in `data`
    of `rid` hold exactly `data[layer]` at those positions."""
    for layer, (k, v) in data.items():
        m = len(k) - start if n is None else n
        got_k, got_v = cache.read_kv(rid, layer, start, m)
        assert same_bits(got_k, k[start : start + m]), f"K of layer {layer} of {rid!r}"
        assert same_bits(got_v, v[start : start + m]), f"V of layer {layer} of {rid!r}"


def assert_tiers_consistent(cache: ferrumkv.KvCache) -> None:
    """used + free == total on every tier; evictable blocks are free; bytes follow blocks."""
    s = cache.stats()
    bpb = cache.config.bytes_per_block
    for name in TIERS:
        t = getattr(s, name)
        assert t.used_blocks + t.free_blocks == t.total_blocks, f"{name}: {t}"
        assert 0 <= t.evictable_blocks <= t.free_blocks, f"{name}: {t}"
        assert t.total_bytes == t.total_blocks * bpb, f"{name}: {t}"
        assert t.used_bytes == t.used_blocks * bpb, f"{name}: {t}"
    check_invariants(cache)


def assert_all_unused(cache: ferrumkv.KvCache) -> None:
    """Nothing is owned on any tier (run after every sequence was released)."""
    cache._core.wait_disk_idle()
    assert_tiers_consistent(cache)
    s = cache.stats()
    assert [getattr(s, t).used_blocks for t in TIERS] == [0, 0, 0]
    assert (s.num_sequences, s.num_swapped, s.num_waiting, s.inflight_disk_ops) == (0, 0, 0, 0)


def delta(before: dict[str, Any], cache: ferrumkv.KvCache, *names: str) -> tuple[int, ...]:
    after = stats_dict(cache)
    return tuple(after[n] - before[n] for n in names)


def disk_cache(tmp_path: Any, **overrides: Any) -> ferrumkv.KvCache:
    kw = {"num_blocks": 4, "host_blocks": 1, "disk_blocks": 8}
    kw.update(overrides)
    return ferrumkv.KvCache(make_config(disk_path=str(tmp_path / "kv.bin"), **kw))


async def checkpoints_until(cond: Any, tries: int = 10_000) -> None:
    """Yields (no sleeping) until `cond()` holds: for catching a state that lasts briefly."""
    for _ in range(tries):
        if cond():
            return
        await anyio.sleep(0)
    raise AssertionError("condition never held")


# ----- 1. byte-for-byte round trips -------------------------------------------------------


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


# ----- 2. big swaps on the worker thread ---------------------------------------------------

BIG = {
    "num_layers": 4,
    "num_kv_heads": 8,
    "head_dim": 64,
    "block_size": 16,
    "dtype": "float16",
}
BIG_BPB = 16 * 4 * 2 * 8 * 64 * 2  # 128 KiB


def big_cache(num_blocks: int = 160, host_blocks: int = 160) -> ferrumkv.KvCache:
    cfg = ferrumkv.CacheConfig(**BIG, num_blocks=num_blocks, host_blocks=host_blocks)
    assert cfg.bytes_per_block == BIG_BPB
    return ferrumkv.KvCache(cfg)


class Ticker:
    """A task that counts its turns: if it advanced, the awaiting task was suspended."""

    def __init__(self) -> None:
        self.turns = 0

    async def run(self) -> None:
        while True:
            self.turns += 1
            await anyio.sleep(0)


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


# ----- 3. bad inputs and faults -----------------------------------------------------------


@pytest.mark.anyio
async def test_swap_out_with_the_host_tier_full_keeps_the_sequence_resident() -> None:
    rng = np.random.default_rng(8)
    with ferrumkv.KvCache(make_config(num_blocks=8, host_blocks=3)) as cache:
        await cache.allocate("h", list(range(100, 108)))  # 2 blocks
        await cache.swap_out("h")  # the host tier: 2 of 3 owned
        a = await cache.allocate("a", list(range(10)))  # 3 blocks
        data = fill(cache, "a", 10, rng)
        before = stats_dict(cache)
        with pytest.raises(OutOfBlocksError):
            await cache.swap_out("a")
        assert_stats_unchanged(cache, before)
        assert cache.get("a") == a and a.tier == "device"
        assert_reads(cache, "a", data)
        assert_tiers_consistent(cache)
        # A sequence bigger than the whole host tier can never be swapped out.
        await cache.deallocate("h")
        big = await cache.allocate("big", list(range(300, 316)))  # 4 blocks > 3
        before = stats_dict(cache)
        with pytest.raises(OutOfBlocksError):
            await cache.swap_out("big")
        assert_stats_unchanged(cache, before)
        assert cache.get("big") == big
        # Cached (evictable) host blocks do not make the tier full: a swap reuses them.
        await cache.deallocate("big")
        await cache.gc(target_free_ratio=1.0)  # offloads big's 4 full blocks: 3 stay
        assert cache.stats().host.evictable_blocks == 3
        out = await cache.swap_out("a")
        assert out.tier == "host"
        s = cache.stats()
        assert (s.host.used_blocks, s.host.evictable_blocks) == (3, 0)
        await cache.swap_in("a")
        assert_reads(cache, "a", data)
        await cache.deallocate("a")
        assert_all_unused(cache)


@pytest.mark.anyio
async def test_swap_in_with_the_device_short_changes_nothing() -> None:
    rng = np.random.default_rng(9)
    with ferrumkv.KvCache(make_config(num_blocks=8, host_blocks=8)) as cache:
        await cache.allocate("a", list(range(10)))
        data = fill(cache, "a", 10, rng)
        out = await cache.swap_out("a")
        await cache.allocate("x", list(range(100, 124)))  # 6 of 8 device blocks
        before = stats_dict(cache)
        with pytest.raises(OutOfBlocksError):
            await cache.swap_in("a")
        assert_stats_unchanged(cache, before)
        assert cache.get("a") == out
        assert_tiers_consistent(cache)
        await cache.deallocate("x")
        back = await cache.swap_in("a")
        assert back.tier == "device"
        assert_reads(cache, "a", data)
        await cache.deallocate("a")
        assert_all_unused(cache)


@pytest.mark.anyio
async def test_bad_swap_calls_raise_and_change_nothing() -> None:
    cache = ferrumkv.KvCache(make_config(host_blocks=8))
    bare = ferrumkv.KvCache(make_config())  # no host tier
    try:
        await cache.allocate("r", [1, 2, 3, 4, 5])
        await cache.allocate("s", [6, 7, 8])
        await cache.swap_out("s")
        cases = [
            (cache, cache.swap_out, "s", InvalidStateError, "swapped out"),
            (cache, cache.swap_in, "r", InvalidStateError, "resident"),
            (cache, cache.swap_out, "nope", UnknownRequestError, "nope"),
            (cache, cache.swap_in, "nope", UnknownRequestError, "nope"),
            (cache, cache.swap_out, 12345, UnknownRequestError, "12345"),
        ]
        await bare.allocate("r", [1, 2, 3])
        cases += [
            (bare, bare.swap_out, "r", InvalidStateError, "host"),
            (bare, bare.swap_in, "r", InvalidStateError, "resident"),
            (bare, bare.swap_in, "nope", UnknownRequestError, "nope"),
        ]
        for c, call, rid, exc, words in cases:
            before = stats_dict(c)
            with pytest.raises(exc, match=words):
                await call(rid)
            assert_stats_unchanged(c, before)
        with pytest.raises(KeyError):  # UnknownRequestError is a KeyError too
            await cache.swap_in("nope")
        assert cache.get("s").tier == "host" and cache.get("r").tier == "device"
        for c in (cache, bare):
            assert_tiers_consistent(c)
    finally:
        cache.close()
        bare.close()


@pytest.mark.anyio
async def test_a_swapped_sequence_refuses_data_calls() -> None:
    with ferrumkv.KvCache(make_config(host_blocks=8)) as cache:
        await cache.allocate("a", list(range(6)))
        await cache.swap_out("a")
        k = np.zeros((1, HEADS, HEAD_DIM), np.float16)

        async def extend_ids() -> Any:
            return await cache.extend("a", [7])

        async def extend_count() -> Any:
            return await cache.extend("a", 3)

        async def extend_batch() -> Any:
            return await cache.extend_batch(["a"], [[7]])

        async def write() -> Any:
            return cache.write_kv("a", 0, 0, k, k)

        async def read() -> Any:
            return cache.read_kv("a", 0, 0, 1)

        async def fork() -> Any:
            return await cache.fork("a", "child")

        async def try_extend() -> Any:
            return cache.try_extend("a", [7])

        for call in (extend_ids, extend_count, extend_batch, write, read, fork, try_extend):
            before = stats_dict(cache)
            with pytest.raises(InvalidStateError, match="swapped out"):
                await call()
            assert_stats_unchanged(cache, before)
        before = stats_dict(cache)
        with pytest.raises(DuplicateRequestError):
            await cache.allocate("a", [1, 2])
        assert_stats_unchanged(cache, before)
        assert "child" not in cache and len(cache) == 1
        assert cache.get("a").num_tokens == 6
        assert_tiers_consistent(cache)


@pytest.mark.anyio
async def test_deallocating_a_swapped_sequence_frees_its_host_blocks() -> None:
    with ferrumkv.KvCache(make_config(host_blocks=8)) as cache:
        await cache.allocate("a", list(range(10)))
        await cache.swap_out("a")
        s = cache.stats()
        assert (s.host.used_blocks, s.num_swapped, s.num_sequences) == (3, 1, 1)
        await cache.deallocate("a")
        s = cache.stats()
        assert (s.host.used_blocks, s.host.free_blocks, s.host.evictable_blocks) == (0, 8, 0)
        assert (s.num_swapped, s.num_sequences) == (0, 0)
        assert "a" not in cache
        with pytest.raises(UnknownRequestError):
            await cache.swap_in("a")
        await cache.allocate("a", [1, 2])  # the id is free again
        assert_tiers_consistent(cache)


@pytest.mark.parametrize("kind", ["missing directory", "a directory"])
def test_an_unwritable_disk_path_raises_oserror_naming_it(kind: str, tmp_path: Any) -> None:
    path = tmp_path / "nope" / "kv.bin" if kind == "missing directory" else tmp_path
    cfg = make_config(host_blocks=2, disk_path=str(path), disk_blocks=4)
    with pytest.raises(OSError, match=re.escape(str(path))):
        ferrumkv.KvCache(cfg)


def disk_config(path: Any, **overrides: Any) -> ferrumkv.CacheConfig:
    kw = {"num_blocks": 4, "host_blocks": 1, "disk_blocks": 8, **overrides}
    return make_config(disk_path=str(path), **kw)


def test_a_disk_path_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path: Any) -> None:
    target = tmp_path / "precious.txt"
    target.write_bytes(b"the user's own bytes")
    link = tmp_path / "kv.bin"
    link.symlink_to(target)
    with pytest.raises(OSError, match=f"{re.escape(str(link))} is a symbolic link"):
        ferrumkv.KvCache(disk_config(link))
    assert target.read_bytes() == b"the user's own bytes"


def test_an_existing_file_the_cache_did_not_make_is_never_overwritten(tmp_path: Any) -> None:
    path = tmp_path / "kv.bin"
    path.write_bytes(b"user data " * 100)
    with pytest.raises(OSError, match="not a ferrumkv disk tier file"):
        ferrumkv.KvCache(disk_config(path))
    assert path.read_bytes() == b"user data " * 100


def test_a_failed_preallocation_keeps_a_file_that_was_there(tmp_path: Any) -> None:
    """An empty file (as mktemp makes) is taken over; when its preallocation fails (here: a
    file size limit of 1 MiB, in a subprocess) it is left there, empty, as it was; a file the
    failed call created itself is removed again."""
    path = tmp_path / "kv.bin"
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
import pathlib, pytest, ferrumkv
from helpers import make_config
path = pathlib.Path({str(path)!r})
cfg = make_config(num_blocks=4, host_blocks=1, disk_blocks=64, head_dim=1024, disk_path=str(path))
path.write_bytes(b"")
with pytest.raises(OSError, match="cannot preallocate"):
    ferrumkv.KvCache(cfg)
assert path.exists() and path.stat().st_size == 0
path.unlink()
with pytest.raises(OSError, match="cannot preallocate"):
    ferrumkv.KvCache(cfg)
assert not path.exists()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def alloc_from_disk(cache: ferrumkv.KvCache, rid: str, tokens: list[int]) -> Any:
    """An awaited allocation whose prefix hits are on disk: it waits (on a fresh event loop)
    while the disk reader reads them ahead."""
    return asyncio.run(cache.allocate(rid, tokens))


def spill_chain(cache: ferrumkv.KvCache, rng: np.random.Generator) -> tuple[list[int], Data]:
    """A 13-token prompt A0 A1 A2 + tail, written and evicted with host_blocks=1: A2 spills
    to disk slot 0, A1 to slot 1, A0 stays on the host. Returns the prompt and its data."""
    prompt = list(range(13))
    alloc(cache, "a", prompt)
    data = fill(cache, "a", 13, rng)
    dealloc(cache, "a")
    drive(cache.gc(target_free_ratio=1.0))
    cache._core.wait_disk_idle()
    s = cache.stats()
    assert (s.offload_blocks, s.disk_blocks_written) == (3, 2)
    assert (s.host.evictable_blocks, s.disk.evictable_blocks) == (1, 2)
    match = cache.lookup_prefix(prompt)
    assert (match.num_cached_tokens, match.host_tokens, match.disk_tokens) == (12, 4, 8)
    return prompt, data


def test_the_disk_chain_reads_back_exactly(tmp_path: Any) -> None:
    rng = np.random.default_rng(12)
    with disk_cache(tmp_path) as cache:
        prompt, data = spill_chain(cache, rng)
        before = stats_dict(cache)
        h = alloc_from_disk(cache, "a2", prompt)
        assert h.num_cached_tokens == 12
        assert delta(before, cache, "onboard_blocks", "disk_blocks_read", "full_reused_blocks") == (
            3,
            2,
            3,
        )
        assert_reads(cache, "a2", data, 0, 12)
        dealloc(cache, "a2")
        assert_all_unused(cache)


def test_a_second_cache_on_the_same_disk_path_fails_and_the_first_keeps_its_tier(
    tmp_path: Any,
) -> None:
    rng = np.random.default_rng(21)
    first = disk_cache(tmp_path)
    with pytest.raises(OSError, match=f"{re.escape(str(tmp_path / 'kv.bin'))} is in use"):
        disk_cache(tmp_path)
    prompt, data = spill_chain(first, rng)
    with pytest.raises(OSError, match="in use by another cache"):
        disk_cache(tmp_path, disk_blocks=16)  # once the first has spilled, too
    before = stats_dict(first)
    h = alloc_from_disk(first, "a2", prompt)
    assert h.num_cached_tokens == 12
    assert delta(before, first, "disk_blocks_read", "disk_checksum_failures") == (2, 0)
    assert_reads(first, "a2", data, 0, 12)
    dealloc(first, "a2")
    # Closing the first gives the file up: a new cache takes it over (trusting none of it).
    first.close()
    with disk_cache(tmp_path) as second:
        assert second.lookup_prefix(prompt).num_cached_tokens == 0
        prompt, data = spill_chain(second, rng)
        assert alloc_from_disk(second, "b", prompt).num_cached_tokens == 12
        assert_reads(second, "b", data, 0, 12)
        dealloc(second, "b")
        assert_all_unused(second)


def flipped(data: Data, position: int, offset: int) -> bytes:
    """The bytes of layer 0 K at `position` with byte `offset` flipped (as FlipByte does on
    disk at byte `offset` of the position's slot, when position is a block's first)."""
    raw = bytearray(data[0][0][position].tobytes())
    raw[offset] ^= 0xFF
    return bytes(raw)


@pytest.mark.parametrize(("slot", "cached"), [(1, 4), (0, 8)])
def test_a_flipped_disk_byte_is_a_miss_never_data(tmp_path: Any, slot: int, cached: int) -> None:
    """Slot 1 holds A1 (the first disk block of the chain), slot 0 holds A2."""
    rng = np.random.default_rng(13)
    with disk_cache(tmp_path) as cache:
        prompt, data = spill_chain(cache, rng)
        cache._core.inject_disk_fault("flip", slot, 1)  # layer 0, K, first position, byte 1
        bad_position = cached  # the first position of the corrupt block
        before = stats_dict(cache)
        h = alloc_from_disk(cache, "a2", prompt)
        assert h.num_cached_tokens == cached  # the corrupt block and the rest are recomputed
        assert delta(
            before,
            cache,
            "disk_checksum_failures",
            "disk_read_errors",
            "disk_blocks_read",
            "onboard_blocks",
            "full_reused_blocks",
            "cache_tokens",
        ) == (1, 0, (cached - 4) // BS, cached // BS, cached // BS, cached)
        assert_reads(cache, "a2", data, 0, cached)
        got_k, _ = cache.read_kv("a2", 0, bad_position, 1)
        assert got_k.tobytes() != flipped(data, bad_position, 1), "corrupt data was returned"
        # The corrupt block was dropped from the disk tier: the prefix now ends before it.
        s = cache.stats()
        assert s.disk.evictable_blocks == 1
        dealloc(cache, "a2")
        drive(cache.gc(target_free_ratio=1.0))
        cache._core.wait_disk_idle()
        # The recomputed positions were never written, so what "a2" registered is not
        # trusted here; the point is that the disk never served the corrupt block again.
        before = stats_dict(cache)
        alloc_from_disk(cache, "a3", prompt)
        assert delta(before, cache, "disk_checksum_failures") == (0,)
        dealloc(cache, "a3")
        assert_all_unused(cache)


def test_a_short_disk_read_is_a_miss(tmp_path: Any) -> None:
    rng = np.random.default_rng(14)
    with disk_cache(tmp_path) as cache:
        prompt, data = spill_chain(cache, rng)
        cache._core.inject_disk_fault("short_next_read")
        before = stats_dict(cache)
        h = alloc_from_disk(cache, "a2", prompt)
        assert h.num_cached_tokens == 4  # A0 from the host; A1's read came back short
        assert delta(
            before,
            cache,
            "disk_read_errors",
            "disk_checksum_failures",
            "disk_blocks_read",
            "onboard_blocks",
        ) == (1, 0, 0, 1)
        assert_reads(cache, "a2", data, 0, 4)
        assert cache.stats().disk.evictable_blocks == 1  # A1 dropped, A2 kept
        dealloc(cache, "a2")
        assert_all_unused(cache)


def test_a_failed_disk_write_loses_only_that_block(tmp_path: Any) -> None:
    rng = np.random.default_rng(15)
    with disk_cache(tmp_path) as cache:
        prompt = list(range(9))  # A0 A1 + tail
        alloc(cache, "a", prompt)
        data = fill(cache, "a", 9, rng)
        dealloc(cache, "a")
        cache._core.inject_disk_fault("fail_next_write")
        drive(cache.gc(target_free_ratio=1.0))  # A1 spills to disk (fails), A0 on the host
        cache._core.wait_disk_idle()
        s = cache.stats()
        assert (s.disk_write_errors, s.disk_blocks_written, s.inflight_disk_ops) == (1, 0, 0)
        assert (s.disk.evictable_blocks, s.disk.free_blocks, s.disk.used_blocks) == (0, 8, 0)
        assert s.host.evictable_blocks == 1
        # A0 is on the host; A1 is not readable from disk
        assert cache.lookup_prefix(prompt) == ferrumkv.PrefixMatch(0, 4, 0)
        before = stats_dict(cache)
        h = alloc(cache, "a2", prompt)
        assert h.num_cached_tokens == 4  # a miss on disk, not an error
        assert delta(before, cache, "onboard_blocks", "disk_blocks_read", "disk_read_errors") == (
            1,
            0,
            0,
        )
        assert_reads(cache, "a2", data, 0, 4)  # A0 survived
        # Later spills write and read back fine.
        k, v = random_kv(rng, 5)
        cache.write_kv("a2", 0, 4, k, v)
        cache.write_kv("a2", 1, 4, k, v)
        data2 = {layer: (k, v) for layer in range(LAYERS)}
        dealloc(cache, "a2")
        # Evicts A1' (the host spills A0), then A0' (the host spills A1'): both written.
        drive(cache.gc(target_free_ratio=1.0))
        cache._core.wait_disk_idle()
        s = cache.stats()
        assert (s.disk_write_errors, s.disk_blocks_written) == (1, 2)
        assert (s.host.evictable_blocks, s.disk.evictable_blocks) == (1, 2)
        h = alloc_from_disk(cache, "a3", prompt)
        assert h.num_cached_tokens == 8  # A0' from the host, A1' from disk
        assert_reads(cache, "a3", data, 0, 4)
        for layer in range(LAYERS):
            got_k, got_v = cache.read_kv("a3", layer, 4, 4)
            assert same_bits(got_k, data2[layer][0][:4]) and same_bits(got_v, data2[layer][1][:4])
        dealloc(cache, "a3")
        assert_all_unused(cache)


def test_inject_disk_fault_without_a_disk_tier_or_out_of_range(tmp_path: Any) -> None:
    bare = ferrumkv.KvCache(make_config(host_blocks=2))
    cache = disk_cache(tmp_path)
    try:
        with pytest.raises(ValueError, match="disk"):
            bare._core.inject_disk_fault("fail_next_write")
        with pytest.raises(ValueError):
            cache._core.inject_disk_fault("flip", 8, 0)
        with pytest.raises(ValueError):
            cache._core.inject_disk_fault("flip", 0, BPB)
        with pytest.raises(ValueError, match="unknown"):
            cache._core.inject_disk_fault("melt")
    finally:
        bare.close()
        cache.close()


@pytest.mark.anyio
@pytest.mark.parametrize("direction", ["out", "in"])
async def test_close_while_a_big_swap_is_in_flight(direction: str) -> None:
    """close() returns after the copy finished (the swapped-in bytes are in their device
    blocks, seen through a DLPack view that outlives the cache); the waiter and every later
    call get CacheClosedError."""
    rng = np.random.default_rng(16)
    cache = big_cache(num_blocks=256, host_blocks=128)
    n = 128 * 16  # 16 MiB
    try:
        view = np.from_dlpack(cache.kv_view(3))
        await cache.allocate("a", list(range(n)))
        data = fill(cache, "a", n, rng)
        if direction == "in":
            await cache.swap_out("a")  # device blocks 0..127 become evictable; 128.. are blank
        call = cache.swap_out if direction == "out" else cache.swap_in
        outcome: list[BaseException] = []
        started = False

        async def swap() -> None:
            nonlocal started
            started = True
            try:
                await call("a")
            except CacheClosedError as e:
                outcome.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(swap)
            await checkpoints_until(lambda: started)  # it awaits its swap's ticket now
            cache.close()
        assert len(outcome) == 1 and isinstance(outcome[0], CacheClosedError)
        assert cache.closed
        cache.close()  # idempotent
        for later in (
            lambda: cache.stats(),
            lambda: cache.get("a"),
            lambda: drive(cache.swap_in("a")),
            lambda: drive(cache.swap_out("a")),
            lambda: drive(cache.allocate("b", [1])),
        ):
            with pytest.raises(CacheClosedError):
                later()
        if direction == "in":  # blank blocks are taken first, in order: 128..255
            k, v = data[3]
            for i in range(128):
                assert same_bits(view[128 + i, 0], k[16 * i : 16 * i + 16]), f"block {i}"
                assert same_bits(view[128 + i, 1], v[16 * i : 16 * i + 16]), f"block {i}"
    finally:
        cache.close()


@pytest.mark.anyio
async def test_swap_out_after_a_granted_extend_then_cancelling_its_waiter() -> None:
    """An extend waits for a block; a deallocate grants it (the ticket is granted, its waiter
    has not run yet); the scheduler then swaps the sequence out (preemption) and cancels the
    waiter. The grant is not applied before it is taken, so the sequence is unchanged and the
    swap is refused while the extend's ticket is open; the cancel gives back its block."""
    with ferrumkv.KvCache(make_config(num_blocks=4, host_blocks=8)) as cache:
        await cache.allocate("a", [1, 2, 3, 4])  # 1 full block
        await cache.allocate("x", list(range(100, 112)))  # 3 blocks: the device is full
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.extend, "a", [5])  # needs a block: waits
            await wait_until(lambda: cache.stats().num_waiting == 1)
            await cache.deallocate("x")  # grants the extend at once
            assert cache.get("a").num_tokens == 4  # reserved, not applied
            with pytest.raises(InvalidStateError, match="still waiting"):
                await cache.swap_out("a")
            tg.cancel_scope.cancel()  # the waiter gives up: the reservation goes back
        check_invariants(cache)
        assert_tiers_consistent(cache)
        assert cache.get("a").num_tokens == 4
        await cache.deallocate("a")
        assert_all_unused(cache)


@pytest.mark.anyio
async def test_swap_out_after_a_granted_allocate_then_cancelling_its_waiter() -> None:
    """The same with a waiting allocate: its waiter never got the handle, so it never wrote
    the K/V of its blocks; the grant publishes nothing before it is taken (no sequence to
    swap, no prefix hit on data that was never written), and cancelling gives it back."""
    with ferrumkv.KvCache(make_config(num_blocks=4, host_blocks=8)) as cache:
        await cache.allocate("x", list(range(100, 116)))  # 4 blocks: the device is full
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.allocate, "a", [1, 2, 3, 4, 5])  # 2 blocks: waits
            await wait_until(lambda: cache.stats().num_waiting == 1)
            await cache.deallocate("x")  # grants the allocate at once
            assert cache.get("a") is None  # reserved, not published
            # nothing registered yet
            assert cache.lookup_prefix([1, 2, 3, 4, 5]).num_cached_tokens == 0
            with pytest.raises(ferrumkv.UnknownRequestError):
                await cache.swap_out("a")
            tg.cancel_scope.cancel()  # the waiter gives up: the allocation is undone
        assert "a" not in cache
        match = cache.lookup_prefix([1, 2, 3, 4, 5])
        assert match.num_cached_tokens == 0, "a never-written block stays cached"
        assert_all_unused(cache)


# ----- 4. property test ---------------------------------------------------------------------

P_DEVICE, P_HOST, P_DISK = 8, 4, 8
# Prompts are made of a few fixed blocks (two agree on their first 3 tokens) and a tail, so
# they share whole blocks and partial blocks often; "again" repeats an earlier prompt (or
# its first blocks), so a prefix evicted to the host or the disk is asked for again.
P_CHUNKS = [[1, 2, 3, 4], [1, 2, 3, 5], [6, 6, 6, 6]]
p_prompts = st.builds(
    lambda chunks, tail: [t for c in chunks for t in P_CHUNKS[c]] + tail,
    st.lists(st.integers(0, len(P_CHUNKS) - 1), min_size=1, max_size=4),
    st.lists(st.integers(0, 9), max_size=3),
)
p_pick = st.integers(0, 50)
p_ops = st.one_of(
    st.tuples(st.just("alloc"), p_prompts),
    st.tuples(st.just("alloc"), p_prompts),
    st.tuples(st.just("again"), p_pick, st.integers(1, 4)),
    st.tuples(st.just("again"), p_pick, st.integers(1, 4)),
    st.tuples(st.just("again"), p_pick, st.integers(1, 4)),
    st.tuples(st.just("swap_out"), p_pick),
    st.tuples(st.just("swap_out"), p_pick),
    st.tuples(st.just("swap_in"), p_pick),
    st.tuples(st.just("swap_in"), p_pick),
    st.tuples(st.just("dealloc"), p_pick),
    st.tuples(st.just("dealloc"), p_pick),
    st.tuples(
        st.just("extend"),
        p_pick,
        st.one_of(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(1, 4)),
    ),
    st.tuples(st.just("rewrite"), p_pick),
    st.tuples(st.just("gc"), st.sampled_from([0.5, 1.0])),
    st.tuples(st.just("gc"), st.just(1.0)),
)

_ROWS: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray]] = {}


def kv_row(prefix: tuple[int, ...], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of the last position of `prefix`: a function of the tokens up to it."""
    key = (prefix, layer)
    row = _ROWS.get(key)
    if row is None:
        h = hashlib.blake2b(repr(key).encode(), digest_size=2 * TOKEN_BYTES).digest()
        raw = np.frombuffer(h, dtype=np.uint16).view(np.float16).reshape(2, HEADS, HEAD_DIM)
        row = _ROWS[key] = (raw[0], raw[1])
    return row


class TierModel:
    """Each live sequence's token ids (-1 for tokens extended by count) and tier."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.swapped: set[int] = set()
        self.next_id = 0
        self.prompts: list[list[int]] = []

    def pick(self, i: int, swapped_first: bool = False) -> int | None:
        """The i-th live sequence (a swapped-out one if any and `swapped_first`)."""
        rids = sorted(self.swapped) if swapped_first and self.swapped else sorted(self.tokens)
        return rids[i % len(rids)] if rids else None

    def expected(self, rid: int, start: int, stop: int, layer: int) -> tuple[bytes, bytes]:
        toks = tuple(self.tokens[rid])
        rows = [kv_row(toks[: p + 1], layer) for p in range(start, stop)]
        return b"".join(r[0].tobytes() for r in rows), b"".join(r[1].tobytes() for r in rows)


def write_model(cache: ferrumkv.KvCache, model: TierModel, rid: int, start: int) -> None:
    n = len(model.tokens[rid])
    if start >= n:
        return
    for layer in range(LAYERS):
        kb, vb = model.expected(rid, start, n, layer)
        shape = (n - start, HEADS, HEAD_DIM)
        k = np.frombuffer(kb, dtype=np.float16).reshape(shape)
        v = np.frombuffer(vb, dtype=np.float16).reshape(shape)
        cache.write_kv(rid, layer, start, k, v)


def check_model(cache: ferrumkv.KvCache, model: TierModel) -> None:
    s = cache.stats()
    assert s.num_sequences == len(model.tokens) == len(cache)
    assert s.num_swapped == len(model.swapped)
    device_owned: set[int] = set()
    host_owned = 0
    for rid, toks in model.tokens.items():
        h = cache.get(rid)
        assert h is not None and h.num_tokens == len(toks)
        if rid in model.swapped:
            assert h.tier == "host"
            host_owned += len(h.block_ids)
            with pytest.raises(InvalidStateError):
                cache.read_kv(rid, 0, 0, 1)
            continue
        assert h.tier == "device"
        device_owned.update(h.block_ids)
        for layer in range(LAYERS):
            k, v = cache.read_kv(rid, layer, 0, len(toks))
            want_k, want_v = model.expected(rid, 0, len(toks), layer)
            assert k.tobytes() == want_k, f"K of request {rid}, layer {layer}"
            assert v.tobytes() == want_v, f"V of request {rid}, layer {layer}"
    assert s.device.used_blocks == len(device_owned)
    assert s.host.used_blocks == host_owned
    assert_tiers_consistent(cache)


def run_program(program: list[tuple[Any, ...]], disk_path: str) -> None:
    cfg = make_config(
        num_blocks=P_DEVICE, host_blocks=P_HOST, disk_path=disk_path, disk_blocks=P_DISK
    )
    cache = ferrumkv.KvCache(cfg)
    model = TierModel()
    try:
        for op in program:
            kind = op[0]
            cache._core.wait_disk_idle()  # deterministic: every spill has landed
            before = stats_dict(cache)
            if kind in ("alloc", "again"):
                if kind == "again" and not model.prompts:
                    continue
                prompt = op[1] if kind == "alloc" else model.prompts[op[1] % len(model.prompts)]
                if kind == "again":
                    prompt = prompt[: op[2] * BS + 1]  # the first op[2] blocks and a token
                model.prompts.append(prompt)
                rid = model.next_id
                model.next_id += 1
                looked_up = cache.lookup_prefix(prompt).num_cached_tokens
                try:
                    h = drive(cache.allocate(rid, prompt, timeout=0))
                except OutOfBlocksError:
                    assert_stats_unchanged(cache, before)
                else:
                    assert h.num_cached_tokens <= min(looked_up, len(prompt) - 1)
                    model.tokens[rid] = list(prompt)
                    write_model(cache, model, rid, h.num_cached_tokens)
            elif kind == "gc":
                drive(cache.gc(target_free_ratio=op[1]))
            else:
                rid = model.pick(op[1], swapped_first=kind == "swap_in")
                if rid is None:
                    continue
                swapped = rid in model.swapped
                nblocks = len(cache.get(rid).block_ids)
                if kind == "swap_out":
                    if swapped:
                        with pytest.raises(InvalidStateError):
                            drive(cache.swap_out(rid))
                        assert_stats_unchanged(cache, before)
                    elif nblocks > cache.stats().host.free_blocks:
                        with pytest.raises(OutOfBlocksError):
                            drive(cache.swap_out(rid))
                        assert_stats_unchanged(cache, before)
                    else:
                        assert drive(cache.swap_out(rid)).tier == "host"
                        model.swapped.add(rid)
                elif kind == "swap_in":
                    if not swapped:
                        with pytest.raises(InvalidStateError):
                            drive(cache.swap_in(rid))
                        assert_stats_unchanged(cache, before)
                    elif nblocks > cache.stats().device.free_blocks:
                        with pytest.raises(OutOfBlocksError):
                            drive(cache.swap_in(rid))
                        assert_stats_unchanged(cache, before)
                    else:
                        assert drive(cache.swap_in(rid)).tier == "device"
                        model.swapped.discard(rid)
                elif kind == "dealloc":
                    dealloc(cache, rid)
                    del model.tokens[rid]
                    model.swapped.discard(rid)
                elif kind == "extend":
                    new = op[2]
                    if swapped:
                        with pytest.raises(InvalidStateError):
                            drive(cache.extend(rid, new, timeout=0))
                        assert_stats_unchanged(cache, before)
                        continue
                    try:
                        drive(cache.extend(rid, new, timeout=0))
                    except OutOfBlocksError:
                        assert_stats_unchanged(cache, before)
                    else:
                        start = len(model.tokens[rid])
                        model.tokens[rid] += [-1] * new if isinstance(new, int) else new
                        write_model(cache, model, rid, start)
                elif kind == "rewrite" and not swapped:
                    # The same bytes again: shared blocks are copied first (copy-on-write).
                    try:
                        write_model(cache, model, rid, 0)
                    except OutOfBlocksError:
                        assert_stats_unchanged(cache, before)
            check_model(cache, model)
        s = cache.stats()
        event(f"swaps out/in > 0: {s.swap_out_count > 0}/{s.swap_in_count > 0}")
        event(f"host onboards > 0: {s.onboard_blocks - s.disk_blocks_read > 0}")
        event(f"disk reads > 0: {s.disk_blocks_read > 0}")
        event(f"partial reuse > 0: {s.partial_reused_blocks > 0}")
        for rid in list(model.tokens):
            dealloc(cache, rid)
        assert_all_unused(cache)
        assert cache.reset_prefix_cache()
        cache._core.wait_disk_idle()
        s = cache.stats()
        assert [getattr(s, t).evictable_blocks for t in TIERS] == [0, 0, 0]
    finally:
        cache.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=st.lists(p_ops, min_size=30, max_size=80))
def test_tiers_keep_every_sequence_exact(program: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        run_program(program, os.path.join(d, "kv.bin"))


# ----- 5. DLPack views across swaps -----------------------------------------------------------


ONE_BITS = {"float16": 0x3C00, "bfloat16": 0x3F80, "float32": 0x3F800000}
TORCH_BITS = {"float16": torch.int16, "bfloat16": torch.int16, "float32": torch.int32}


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
