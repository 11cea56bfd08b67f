"""Block bookkeeping of allocate / extend / deallocate, the queries, and bad input.

Calls that can finish at once are driven with `drive()` (which also checks that they
never suspend); `async with` and the closed-cache checks run on real event loops.
"""

from __future__ import annotations

import numpy as np
import pytest

import ferrumkv
from ferrumkv import (
    CacheClosedError,
    DuplicateRequestError,
    FerrumKVError,
    OutOfBlocksError,
    UnknownRequestError,
)
from helpers import (
    BS,
    SMALL_BYTES_PER_BLOCK,
    alloc,
    assert_stats_unchanged,
    assert_tier_consistent,
    check_invariants,
    dealloc,
    drive,
    extend,
    make_config,
    new_cache,
    stats_dict,
)


def assert_usage(cache: ferrumkv.KvCache, used: int, *, sequences: int, evictable: int = 0):
    """Exact device-tier figures for `used` owned blocks."""
    total = cache.config.num_blocks
    s = cache.stats()
    assert s.device.total_blocks == total
    assert s.device.used_blocks == used
    assert s.device.free_blocks == total - used
    assert s.device.evictable_blocks == evictable
    assert s.device.total_bytes == total * SMALL_BYTES_PER_BLOCK
    assert s.device.used_bytes == used * SMALL_BYTES_PER_BLOCK
    assert s.total_tokens == total * BS
    assert s.used_tokens == used * BS
    assert s.free_tokens == (total - used) * BS
    assert s.usage == used / total
    assert s.num_sequences == sequences
    assert s.num_waiting == 0
    assert len(cache) == sequences
    assert_tier_consistent(cache)
    check_invariants(cache)


# ----------------------------------------------------------------------------- exact ids


def test_fresh_pool_hands_out_block_ids_in_order() -> None:
    cache = new_cache()
    assert_usage(cache, 0, sequences=0)
    a = alloc(cache, "a", [1, 2, 3])
    assert a.block_ids == (0,)
    assert (a.request_id, a.num_tokens, a.num_cached_tokens, a.tier) == ("a", 3, 0, "device")
    assert_usage(cache, 1, sequences=1)
    b = alloc(cache, "b", list(range(100, 105)))
    assert b.block_ids == (1, 2)
    assert_usage(cache, 3, sequences=2)
    c = alloc(cache, 7, list(range(200, 204)))
    assert c.block_ids == (3,)
    assert c.request_id == 7
    assert_usage(cache, 4, sequences=3)
    d = alloc(cache, "d", list(range(300, 316)))
    assert d.block_ids == (4, 5, 6, 7)
    assert_usage(cache, 8, sequences=4)


def test_freed_blank_blocks_go_to_the_back_of_the_queue() -> None:
    cache = new_cache(enable_prefix_cache=False)
    assert alloc(cache, "a", list(range(8))).block_ids == (0, 1)
    assert alloc(cache, "b", [9]).block_ids == (2,)
    dealloc(cache, "a")  # released tail first: 1, then 0
    assert_usage(cache, 1, sequences=1)
    assert alloc(cache, "c", list(range(24))).block_ids == (3, 4, 5, 6, 7, 1)
    assert alloc(cache, "d", [5]).block_ids == (0,)
    assert_usage(cache, 8, sequences=3)


def test_partial_tail_blocks_are_freed_blank_with_the_cache_on() -> None:
    cache = new_cache()
    assert alloc(cache, "a", [1, 2]).block_ids == (0,)
    dealloc(cache, "a")
    assert_usage(cache, 0, sequences=0, evictable=0)
    # 0 went to the back of the blank queue
    assert alloc(cache, "b", list(range(100, 128))).block_ids == (1, 2, 3, 4, 5, 6, 7)
    assert alloc(cache, "c", [3]).block_ids == (0,)


def test_block_table_grows_as_tokens_are_appended() -> None:
    cache = new_cache()
    h = alloc(cache, "a", [1, 2, 3])
    assert h.num_blocks == 1
    assert cache.block_table(["a"]).tolist() == [[0]]
    h = extend(cache, "a", [4, 5])
    assert (h.num_tokens, h.block_ids) == (5, (0, 1))
    assert cache.block_table(["a"]).tolist() == [[0, 1]]
    assert_usage(cache, 2, sequences=1)
    h = extend(cache, "a", [6, 7, 8])  # fills block 1 exactly
    assert (h.num_tokens, h.block_ids) == (8, (0, 1))
    h = extend(cache, "a", 1)  # a bare count
    assert (h.num_tokens, h.block_ids) == (9, (0, 1, 2))
    h = extend(cache, "a", 8)
    assert (h.num_tokens, h.block_ids) == (17, (0, 1, 2, 3, 4))
    assert cache.get("a") == h
    assert_usage(cache, 5, sequences=1)
    st = cache.stats()
    assert st.gen_alloc_blocks == 4
    assert st.alloc_total_blocks == 1
    assert (st.input_tokens, st.cache_tokens) == (3, 0)


def test_extend_accepts_arrays_and_tuples() -> None:
    cache = new_cache()
    alloc(cache, "a", [1])
    h = extend(cache, "a", np.array([2, 3, 4, 5], dtype=np.int64))
    assert (h.num_tokens, h.block_ids) == (5, (0, 1))
    h = extend(cache, "a", (6, 7))
    assert h.num_tokens == 7
    h = extend(cache, "a", np.arange(3, dtype=np.uint32))
    assert (h.num_tokens, h.block_ids) == (10, (0, 1, 2))


def test_block_table_pads_and_is_int32() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(9)))
    alloc(cache, 5, [1])
    alloc(cache, "c", list(range(50, 55)))
    t = cache.block_table(["a", 5, "c"])
    assert t.dtype == np.int32 and t.shape == (3, 3)
    # The default pad is block 0: a real block, safe to gather with (mask by length).
    assert t.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    t = cache.block_table(["a", 5, "c"], pad=-1)
    assert t.tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]
    t = cache.block_table(("c", "a"), pad=0)
    assert t.tolist() == [[4, 5, 0], [0, 1, 2]]
    with pytest.raises(TypeError):
        cache.block_table("a")  # a str is one id, not a sequence of them
    assert cache.block_table([5], pad=99).tolist() == [[3]]
    empty = cache.block_table([])
    assert empty.dtype == np.int32 and empty.shape == (0, 0)
    before = stats_dict(cache)
    with pytest.raises(UnknownRequestError):
        cache.block_table(["a", "zz"])
    assert_stats_unchanged(cache, before)


def test_queries_get_contains_len_can_allocate() -> None:
    cache = new_cache()
    assert cache.get("a") is None
    assert "a" not in cache and len(cache) == 0
    h = alloc(cache, "a", list(range(6)))
    assert cache.get("a") == h
    assert "a" in cache and 1 not in cache and len(cache) == 1
    alloc(cache, 1, [1])
    assert 1 in cache and "1" not in cache and len(cache) == 2
    # 3 blocks used, 5 free: 20 tokens fit, 21 do not
    assert cache.can_allocate(0) is True
    assert cache.can_allocate(20) is True
    assert cache.can_allocate(21) is False
    assert cache.can_allocate(33) is False
    with pytest.raises(ValueError):
        cache.can_allocate(-1)
    with pytest.raises(TypeError):
        cache.can_allocate(1.5)  # type: ignore[arg-type]
    dealloc(cache, "a")
    assert cache.get("a") is None and "a" not in cache and len(cache) == 1
    assert cache.can_allocate(28) is True


def test_handle_is_a_frozen_value() -> None:
    cache = new_cache()
    h = alloc(cache, "a", [1, 2, 3, 4, 5])
    assert h.to_dict() == {
        "request_id": "a",
        "num_tokens": 5,
        "num_cached_tokens": 0,
        "num_prompt_tokens": 5,
        "block_ids": (0, 1),
        "tier": "device",
    }
    assert "request_id='a'" in repr(h) and "num_tokens=5" in repr(h)
    assert "num_prompt_tokens=5" in repr(h)
    assert "block_ids=(0, 1)" in repr(h)
    with pytest.raises(AttributeError):
        h.num_tokens = 3  # type: ignore[misc]
    extend(cache, "a", [6])
    assert h.num_tokens == 5, "a handle is a snapshot"
    assert cache.get("a") != h


@pytest.mark.parametrize(
    "tokens",
    [
        [5, 6, 7, 8, 9],
        (5, 6, 7, 8, 9),
        np.array([5, 6, 7, 8, 9], dtype=np.int64),
        np.array([5, 6, 7, 8, 9], dtype=np.int32),
        np.array([5, 6, 7, 8, 9], dtype=np.uint32),
        np.array([5, 6, 7, 8, 9], dtype=np.uint64),
        np.array([5, 6, 7, 8, 9], dtype=np.int16),
        np.array([5, 6, 7, 8, 9], dtype=np.uint8),
        np.array([5, 0, 6, 0, 7, 0, 8, 0, 9, 0], dtype=np.int64)[::2],  # strided view
    ],
    ids=lambda t: type(t).__name__ + (f"[{t.dtype}]" if isinstance(t, np.ndarray) else ""),
)
def test_token_containers_are_equivalent(tokens) -> None:
    # the same ids in any container hash alike: a second request with them as a list hits
    cache = new_cache()
    h = alloc(cache, "a", tokens)
    assert (h.num_tokens, h.block_ids) == (5, (0, 1))
    h2 = alloc(cache, "b", [5, 6, 7, 8, 9])
    assert h2.block_ids[0] == 0 and h2.num_cached_tokens == 4


def test_largest_token_id_is_accepted() -> None:
    cache = new_cache()
    alloc(cache, "a", [0, 2**32 - 1])
    alloc(cache, "b", np.array([2**32 - 1], dtype=np.uint32))
    alloc(cache, "c", np.array([2**32 - 1], dtype=np.int64))
    assert len(cache) == 3


def test_list_items_that_are_not_exact_ints_take_the_slow_path() -> None:
    """Exact ints are read straight from the list; int subclasses and numpy scalars are
    converted one by one, to the same tokens."""

    class TokenId(int):
        pass

    cache = new_cache()
    alloc(cache, "a", [1, 2, 3, 4, 5])
    h = alloc(cache, "b", [TokenId(1), np.int64(2), np.uint32(3), 4, TokenId(5)])
    assert h.num_cached_tokens == 4  # the same block of tokens as "a"
    assert cache.lookup_prefix([1, 2, 3, 4, np.int32(9)]).num_cached_tokens == 4


def test_request_ids_str_and_int_are_distinct() -> None:
    cache = new_cache()
    alloc(cache, "1", [1])
    alloc(cache, 1, [1])
    alloc(cache, -(2**63), [1])
    alloc(cache, "", [1])
    assert len(cache) == 4
    assert cache.get(1).request_id == 1
    assert cache.get("1").request_id == "1"


# ----------------------------------------------------------------------------- bad input


def _prepared() -> tuple[ferrumkv.KvCache, dict]:
    cache = new_cache()
    alloc(cache, "a", list(range(6)))
    alloc(cache, "b", [40, 41])
    return cache, stats_dict(cache)


def test_duplicate_id_raises_and_changes_nothing() -> None:
    cache, before = _prepared()
    with pytest.raises(DuplicateRequestError) as err:
        alloc(cache, "a", [1, 2, 3])
    assert isinstance(err.value, ValueError) and isinstance(err.value, FerrumKVError)
    assert_stats_unchanged(cache, before)
    with pytest.raises(DuplicateRequestError):
        cache.try_allocate("b", [1])


def test_unknown_id_raises_key_error_and_changes_nothing() -> None:
    cache, before = _prepared()
    for call in (
        lambda: extend(cache, "zz", [1]),
        lambda: extend(cache, "zz", 2),
        lambda: dealloc(cache, "zz"),
        lambda: drive(cache.fork("zz", "c")),
        lambda: cache.read_kv("zz", 0, 0, 1),
        lambda: cache.write_kv("zz", 0, 0, *_kv(1)),
        lambda: cache.block_table(["zz"]),
        lambda: extend(cache, 1, [1]),
    ):
        with pytest.raises(UnknownRequestError) as err:
            call()
        assert isinstance(err.value, KeyError) and isinstance(err.value, FerrumKVError)
        assert "zz" in str(err.value) or "1" in str(err.value)
        assert_stats_unchanged(cache, before)
    check_invariants(cache)


def _kv(n: int, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 2, 4), dtype=dtype), np.ones((n, 2, 4), dtype=dtype)


@pytest.mark.parametrize(
    ("tokens", "exc"),
    [
        ([], ValueError),
        (np.array([], dtype=np.int64), ValueError),
        ([1, -1], ValueError),
        ([2**32], ValueError),
        ([2**64], ValueError),
        (np.array([3, -1], dtype=np.int64), ValueError),
        (np.array([2**32], dtype=np.int64), ValueError),
        (np.array([2**63], dtype=np.uint64), ValueError),
        (np.zeros((2, 2), dtype=np.int64), ValueError),
        ([1, 2.0], TypeError),
        ([1.5], TypeError),
        ([True], TypeError),
        ([1, "2"], TypeError),
        ([None], TypeError),
        (np.array([1.0, 2.0]), TypeError),
        (np.array([1.0, 2.0], dtype=np.float32), TypeError),
        ("abc", TypeError),
        (b"abc", TypeError),
        (5, TypeError),
        (None, TypeError),
        ({1, 2}, TypeError),
    ],
    ids=repr,
)
def test_bad_tokens_raise_and_change_nothing(tokens, exc) -> None:
    cache, before = _prepared()
    with pytest.raises(exc) as err:
        alloc(cache, "new", tokens)
    assert not isinstance(err.value, FerrumKVError)
    with pytest.raises(exc):
        cache.try_allocate("new", tokens)
    # extend takes the same ids (an int there is a count, and empty ids a ValueError too)
    if not isinstance(tokens, int):
        with pytest.raises(exc):
            extend(cache, "a", tokens)
    assert "new" not in cache
    assert_stats_unchanged(cache, before)
    check_invariants(cache)


@pytest.mark.parametrize(("count", "exc"), [(0, ValueError), (-3, ValueError), (True, TypeError)])
def test_bad_extend_counts(count, exc) -> None:
    cache, before = _prepared()
    with pytest.raises(exc):
        extend(cache, "a", count)
    with pytest.raises(ValueError):
        extend(cache, "a", [])
    assert_stats_unchanged(cache, before)


@pytest.mark.parametrize("rid", [1.0, None, True, b"a", ("a",), ["a"]], ids=repr)
def test_request_id_of_wrong_type(rid) -> None:
    cache, before = _prepared()
    with pytest.raises(TypeError):
        alloc(cache, rid, [1])
    with pytest.raises(TypeError):
        cache.try_allocate(rid, [1])
    with pytest.raises(TypeError):
        extend(cache, rid, [1])
    with pytest.raises(TypeError):
        dealloc(cache, rid)
    with pytest.raises(TypeError):
        cache.get(rid)
    with pytest.raises(TypeError):
        drive(cache.fork("a", rid))
    with pytest.raises(TypeError):
        cache.block_table(["a", rid])
    assert rid not in cache
    assert_stats_unchanged(cache, before)


def test_request_larger_than_the_tier_fails_at_once() -> None:
    cache, before = _prepared()
    with pytest.raises(OutOfBlocksError, match="whole tier"):
        alloc(cache, "big", list(range(33)))  # 9 blocks > 8
    with pytest.raises(OutOfBlocksError):
        cache.try_allocate("big", list(range(33)))
    with pytest.raises(OutOfBlocksError):
        alloc(cache, "big", list(range(33)), timeout=10)  # must not wait
    assert_stats_unchanged(cache, before)
    # a whole-tier request fits once everything is free
    dealloc(cache, "a")
    dealloc(cache, "b")
    assert alloc(cache, "big", list(range(32))).num_blocks == 8


def test_extend_past_the_whole_tier_fails_at_once() -> None:
    cache, before = _prepared()
    with pytest.raises(OutOfBlocksError):
        extend(cache, "a", 100)
    assert_stats_unchanged(cache, before)


def test_try_allocate_returns_none_when_short() -> None:
    cache, _ = _prepared()  # 3 of 8 blocks used
    before = stats_dict(cache)
    assert cache.try_allocate("c", list(range(1000, 1021))) is None  # 6 blocks
    assert "c" not in cache
    assert_stats_unchanged(cache, before)
    with pytest.raises(OutOfBlocksError):
        alloc(cache, "c", list(range(1000, 1021)), timeout=0)
    assert_stats_unchanged(cache, before)
    h = cache.try_allocate("c", list(range(1000, 1020)))  # 5 blocks: exactly what is left
    assert h is not None and h.block_ids == (3, 4, 5, 6, 7)
    assert_usage(cache, 8, sequences=3)


def test_extend_when_short_without_waiting() -> None:
    cache, _ = _prepared()
    alloc(cache, "c", list(range(1000, 1020)))
    before = stats_dict(cache)
    assert cache.try_extend("b", [1, 2, 3]) is None
    with pytest.raises(OutOfBlocksError):
        drive(cache.extend("b", [1, 2, 3], timeout=0))
    assert_stats_unchanged(cache, before)
    h = extend(cache, "b", [1, 2])  # fills block 2 exactly, needs nothing new
    assert (h.num_tokens, h.block_ids) == (4, (2,))


@pytest.mark.parametrize("timeout", [-1, -0.5, float("nan")])
def test_negative_timeout_is_a_value_error(timeout) -> None:
    cache, before = _prepared()
    with pytest.raises(ValueError, match="timeout"):
        alloc(cache, "c", [1], timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        drive(cache.extend("a", [1], timeout=timeout))
    assert "c" not in cache
    assert_stats_unchanged(cache, before)


def test_extend_after_deallocate_is_unknown() -> None:
    cache, _ = _prepared()
    dealloc(cache, "a")
    before = stats_dict(cache)
    with pytest.raises(UnknownRequestError):
        extend(cache, "a", [1])
    with pytest.raises(UnknownRequestError):
        dealloc(cache, "a")
    assert_stats_unchanged(cache, before)


def test_id_is_reusable_after_deallocate() -> None:
    cache = new_cache(enable_prefix_cache=False)
    alloc(cache, "a", [1])
    dealloc(cache, "a")
    assert alloc(cache, "a", [2, 3]).block_ids == (1,)


def test_read_and_write_kv_bad_arguments_change_nothing() -> None:
    cache, before = _prepared()  # "a" has 6 tokens
    k, v = _kv(1)
    with pytest.raises(ValueError, match="past the end"):
        cache.read_kv("a", 0, 6, 1)
    with pytest.raises(ValueError, match="past the end"):
        cache.read_kv("a", 0, 0, 7)
    with pytest.raises(ValueError):
        cache.read_kv("a", 2, 0, 1)  # layer out of range
    with pytest.raises(ValueError):
        cache.read_kv("a", 0, -1, 1)
    with pytest.raises(ValueError):
        cache.read_kv("a", 0, 0, -1)
    with pytest.raises(TypeError):
        cache.read_kv("a", 0.0, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="past the end"):
        cache.write_kv("a", 0, 5, *_kv(2))
    with pytest.raises(ValueError):
        cache.write_kv("a", 2, 0, k, v)
    with pytest.raises(ValueError):
        cache.write_kv("a", -1, 0, k, v)
    with pytest.raises(ValueError):
        cache.write_kv("a", 0, 0, np.zeros((1, 2, 3), np.float16), v)
    with pytest.raises(ValueError):
        cache.write_kv("a", 0, 0, np.zeros((1, 8), np.float16), np.zeros((1, 8), np.float16))
    with pytest.raises(ValueError):
        cache.write_kv("a", 0, 0, k, np.zeros((2, 2, 4), np.float16))  # k and v disagree
    with pytest.raises(ValueError):
        cache.write_kv("a", 0, 0, np.zeros((1, 4, 2), np.float16), np.zeros((1, 4, 2), np.float16))
    with pytest.raises(TypeError):
        cache.write_kv("a", 0, 0, np.zeros((1, 2, 4), np.float32), v)
    with pytest.raises(TypeError):
        cache.write_kv("a", 0, 0, k, np.zeros((1, 2, 4), np.uint16))
    with pytest.raises(TypeError):
        cache.write_kv("a", 0, 0, k.tolist(), v)  # type: ignore[arg-type]
    assert_stats_unchanged(cache, before)
    # a failed write left the data alone
    kk, vv = cache.read_kv("a", 0, 5, 1)
    cache.write_kv("a", 0, 5, np.full((1, 2, 4), 3, np.float16), np.full((1, 2, 4), 4, np.float16))
    with pytest.raises(ValueError):
        cache.write_kv("a", 0, 5, *_kv(2))
    kk, vv = cache.read_kv("a", 0, 5, 1)
    assert (kk == 3).all() and (vv == 4).all()


# ----------------------------------------------------------------------------- closing


def _every_call(cache: ferrumkv.KvCache) -> list:
    k, v = _kv(1)
    return [
        lambda: alloc(cache, "x", [1]),
        lambda: cache.try_allocate("x", [1]),
        lambda: extend(cache, "a", [1]),
        lambda: extend(cache, "a", 1),
        lambda: dealloc(cache, "a"),
        lambda: drive(cache.fork("a", "f")),
        lambda: drive(cache.gc()),
        lambda: cache.can_allocate(1),
        lambda: cache.get("a"),
        lambda: "a" in cache,
        lambda: len(cache),
        lambda: cache.pressure_level,
        lambda: cache.on_pressure(lambda ev: None),
        lambda: cache.stats(),
        lambda: cache.iteration_stats(),
        lambda: cache.drain_events(),
        lambda: cache.drain_eviction_events(),
        lambda: cache.reset_prefix_cache(),
        lambda: cache.kv_view(0),
        lambda: cache.block_table(["a"]),
        lambda: cache.write_kv("a", 0, 0, k, v),
        lambda: cache.read_kv("a", 0, 0, 1),
    ]


def test_every_call_after_close_raises_cache_closed() -> None:
    cache, _ = _prepared()
    calls = _every_call(cache)
    cache.close()
    cache.close()  # idempotent
    assert cache.closed
    for call in calls:
        with pytest.raises(CacheClosedError):
            call()
    cache.close()
    assert "closed" in repr(cache)


@pytest.mark.anyio
async def test_async_with_closes() -> None:
    async with ferrumkv.KvCache(make_config()) as cache:
        h = await cache.allocate("a", [1, 2, 3])
        assert h.block_ids == (0,)
        await cache.extend("a", [4, 5])
    assert cache.closed
    with pytest.raises(CacheClosedError):
        await cache.allocate("b", [1])
    with pytest.raises(CacheClosedError):
        await cache.deallocate("a")
    with pytest.raises(CacheClosedError):
        cache.stats()


@pytest.mark.anyio
async def test_async_with_closes_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with ferrumkv.KvCache(make_config()) as cache:
            await cache.allocate("a", [1])
            raise RuntimeError("boom")
    assert cache.closed
    with pytest.raises(CacheClosedError):
        len(cache)


def test_sync_with_closes() -> None:
    with ferrumkv.KvCache(make_config()) as cache:
        alloc(cache, "a", [1])
    assert cache.closed
    with pytest.raises(CacheClosedError):
        cache.try_allocate("b", [1])
