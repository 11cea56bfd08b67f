"""Helpers of the tier tests (`test_tiers_*.py`): the secondary tiers, host memory (swaps,
offload on eviction, onboard on a prefix hit) and the disk file (spills of evicted host
blocks, checksummed read-back), byte for byte.

Where a block goes (`helpers.make_config`: 2 layers, 2 heads, head_dim 4, block_size 4,
256-byte blocks): a device cache evicts its least recently released cached block first, and
a sequence releases its blocks tail first, so of a prompt's full blocks A0, A1, A2 the
eviction order is A2, A1, A0. The host tier does the same; disk slots are handed out blank
first in order 0, 1, 2, ... Swaps moving 1 MiB or more copy on a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import numpy as np

import ferrumkv
from helpers import (
    SMALL_BYTES_PER_BLOCK,
    alloc,
    check_invariants,
    dealloc,
    drive,
    make_config,
    stats_dict,
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


def disk_config(path: Any, **overrides: Any) -> ferrumkv.CacheConfig:
    kw = {"num_blocks": 4, "host_blocks": 1, "disk_blocks": 8, **overrides}
    return make_config(disk_path=str(path), **kw)


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


def flipped(data: Data, position: int, offset: int) -> bytes:
    """The bytes of layer 0 K at `position` with byte `offset` flipped (as FlipByte does on
    disk at byte `offset` of the position's slot, when position is a block's first)."""
    raw = bytearray(data[0][0][position].tobytes())
    raw[offset] ^= 0xFF
    return bytes(raw)


ONE_BITS = {"float16": 0x3C00, "bfloat16": 0x3F80, "float32": 0x3F800000}
