"""Helpers shared by the engine tests (import them: `from helpers import make_config`).

- `make_config(**overrides)`: 2 layers, 2 KV heads, head_dim 4, block_size 4, float16 (a
  block is 4 x 2 x 2 x 2 x 4 x 2 = 256 bytes); 8 device blocks unless overridden.
- `assert_stats_unchanged(cache, before)`: a failed call gave back everything it took.
- `check_invariants(cache)`: the engine's own bookkeeping check (panics -> raises).
- `drive`, `wait_until`: run a coroutine to completion, poll a condition on the loop.
- `new_cache`, `alloc`, `extend`, `dealloc`: the synchronous shorthands of many tests.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import ferrumkv

SMALL = {
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 4,
    "block_size": 4,
    "dtype": "float16",
    "num_blocks": 8,
}
SMALL_BYTES_PER_BLOCK = 4 * 2 * 2 * 2 * 4 * 2


def make_config(**overrides: Any) -> ferrumkv.CacheConfig:
    """A small config; `num_blocks=None` with `memory_bytes=...` sizes it by bytes."""
    kwargs = {**SMALL, **overrides}
    if kwargs.get("num_blocks") is None:
        kwargs.pop("num_blocks", None)
    return ferrumkv.CacheConfig(**kwargs)


def stats_dict(cache: ferrumkv.KvCache) -> dict[str, Any]:
    return cache.stats().to_dict()


def assert_stats_unchanged(cache: ferrumkv.KvCache, before: dict[str, Any]) -> None:
    """Every gauge and counter of `cache.stats()` equals `before` (a `to_dict()`)."""
    after = stats_dict(cache)
    diff = {
        k: (before[k], after[k])
        for k in before
        if before[k] != after[k] and not (_both_nan(before[k], after[k]))
    }
    assert not diff, f"stats changed (before, after): {diff}"


def _both_nan(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


GAUGES = ("device", "num_sequences", "num_waiting", "num_swapped", "used_tokens", "free_tokens")


def gauges(cache: ferrumkv.KvCache) -> dict[str, Any]:
    """The occupancy part of the stats (no cumulative counters)."""
    d = stats_dict(cache)
    return {k: d[k] for k in GAUGES}


def check_invariants(cache: ferrumkv.KvCache) -> None:
    """Runs the engine's bookkeeping check; it raises (a pyo3 PanicException) if broken."""
    cache._core.check_invariants()


def assert_tier_consistent(cache: ferrumkv.KvCache) -> None:
    """used + free == total on the device tier and the token figures follow from it."""
    s = cache.stats()
    d = s.device
    bs = cache.config.block_size
    assert d.used_blocks + d.free_blocks == d.total_blocks
    assert 0 <= d.evictable_blocks <= d.free_blocks
    assert s.total_tokens == d.total_blocks * bs
    assert s.used_tokens == d.used_blocks * bs
    assert s.free_tokens == d.free_blocks * bs
    assert d.used_bytes == d.used_blocks * cache.config.bytes_per_block


def drive(awaitable: Awaitable[Any]) -> Any:
    """Runs a coroutine that must finish without suspending; returns its result."""
    coro = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the call suspended, but it should have finished at once")


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yields to the event loop until `cond()` holds (fails after `timeout` seconds)."""
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.001)


BS = 4  # block_size of make_config()


def new_cache(**overrides: Any) -> ferrumkv.KvCache:
    return ferrumkv.KvCache(make_config(**overrides))


def alloc(cache: ferrumkv.KvCache, rid: Any, tokens: Any, **kw: Any) -> Any:
    """allocate, driven to completion without an event loop (it never suspends here)."""
    return drive(cache.allocate(rid, tokens, **kw))


def extend(cache: ferrumkv.KvCache, rid: Any, tokens: Any) -> Any:
    return drive(cache.extend(rid, tokens))


def dealloc(cache: ferrumkv.KvCache, rid: Any) -> None:
    drive(cache.deallocate(rid))
