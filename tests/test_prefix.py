"""The prefix cache: sharing, partial reuse, salts, LRU eviction, fork (copy-on-write), gc,
reset, KV events, iteration stats and residency sampling. block_size is 4 throughout."""

from __future__ import annotations

import numpy as np
import pytest

import ferrumkv
from ferrumkv import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DuplicateRequestError,
    EvictionEvent,
    GcStats,
    UnknownRequestError,
)
from helpers import (
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


def fork(cache, parent, child):
    return drive(cache.fork(parent, child))


def gc(cache, **kw) -> GcStats:
    return drive(cache.gc(**kw))


def kv_fill(cache, rid, n, seed) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Writes random K/V for positions 0..n of both layers; returns them per layer."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(2):
        k = rng.standard_normal((n, 2, 4)).astype(np.float16)
        v = rng.standard_normal((n, 2, 4)).astype(np.float16)
        cache.write_kv(rid, layer, 0, k, v)
        out[layer] = (k, v)
    return out


def stored_hashes(events) -> list[int]:
    return [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]


def settled(cache) -> None:
    assert_tier_consistent(cache)
    check_invariants(cache)


# ----------------------------------------------------------------------------- sharing


def test_shared_prefix_shares_block_ids() -> None:
    cache = new_cache()
    prefix = list(range(100, 112))  # 3 full blocks
    a = alloc(cache, "a", [*prefix, 1, 2])
    b = alloc(cache, "b", [*prefix, 99, 98, 97])
    assert a.block_ids == (0, 1, 2, 3)
    assert b.block_ids == (0, 1, 2, 4)
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 12)
    s = cache.stats()
    assert s.device.used_blocks == 5 and s.device.evictable_blocks == 0
    assert (s.alloc_total_blocks, s.alloc_new_blocks) == (8, 5)
    assert (s.full_reused_blocks, s.partial_reused_blocks, s.missed_blocks) == (3, 0, 5)
    assert (s.cache_tokens, s.input_tokens) == (12, 17)
    assert cache.block_table(["a", "b"]).tolist() == [[0, 1, 2, 3], [0, 1, 2, 4]]
    # releasing one sharer keeps the shared blocks owned
    dealloc(cache, "a")
    s = cache.stats()
    assert s.device.used_blocks == 4 and s.device.evictable_blocks == 0
    dealloc(cache, "b")
    s = cache.stats()
    assert s.device.used_blocks == 0 and s.device.evictable_blocks == 3
    settled(cache)


def test_shared_blocks_hold_the_same_data() -> None:
    cache = new_cache()
    a = alloc(cache, "a", list(range(9)))
    data = kv_fill(cache, "a", 9, seed=1)
    b = alloc(cache, "b", [*range(8), 77, 78])
    assert b.block_ids[:2] == a.block_ids[:2] and b.num_cached_tokens == 8
    for layer, (k, v) in data.items():
        bk, bv = cache.read_kv("b", layer, 0, 8)
        assert bk.tobytes() == k[:8].tobytes() and bv.tobytes() == v[:8].tobytes()


def test_at_least_one_token_is_left_to_compute() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(8)))
    cache.iteration_stats()
    # a prompt of exactly 2 full cached blocks: 1 full hit + a copy of 3 tokens of the 2nd
    b = alloc(cache, "b", list(range(8)))
    assert b.block_ids == (0, 2)
    assert b.num_cached_tokens == 7
    it = cache.iteration_stats()
    assert (it.full_reused_blocks, it.partial_reused_blocks, it.missed_blocks) == (1, 1, 0)
    assert (it.alloc_total_blocks, it.alloc_new_blocks) == (2, 1)
    assert it.intra_device_copy_blocks == 1
    assert it.intra_device_copy_bytes == SMALL_BYTES_PER_BLOCK
    assert (it.cache_tokens, it.input_tokens) == (7, 1)
    assert it.reused_blocks == 2 and it.cache_hit_rate == 1.0
    assert it.token_hit_rate == 7 / 8
    # one cached block, same tokens: only a partial copy of 3
    c = alloc(cache, "c", [0, 1, 2, 3])
    assert c.num_cached_tokens == 3 and c.block_ids == (3,)
    # a single token is never served from the cache
    d = alloc(cache, "d", [0])
    assert d.num_cached_tokens == 0
    settled(cache)


def test_fully_cached_prompt_after_deallocate() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(8)))
    data = kv_fill(cache, "a", 8, seed=2)
    dealloc(cache, "a")  # blocks 1, 0 evictable (tail first)
    b = alloc(cache, "b", list(range(8)))
    assert b.block_ids == (0, 2) and b.num_cached_tokens == 7
    for layer, (k, v) in data.items():
        bk, bv = cache.read_kv("b", layer, 0, 7)
        assert bk.tobytes() == k[:7].tobytes() and bv.tobytes() == v[:7].tobytes()
    # the partial source (block 1) is still cached and evictable
    assert cache.stats().device.evictable_blocks == 1
    settled(cache)


def test_partial_reuse_copies_the_matching_tokens() -> None:
    cache = new_cache()
    a = alloc(cache, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert a.block_ids == (0, 1, 2)
    data = kv_fill(cache, "a", 9, seed=3)
    b = alloc(cache, "b", [1, 2, 3, 4, 5, 6, 70, 80, 90])
    assert b.block_ids == (0, 3, 4)
    assert b.num_cached_tokens == 6  # 4 shared + 2 copied
    s = cache.stats()
    assert (s.full_reused_blocks, s.partial_reused_blocks, s.intra_device_copy_blocks) == (1, 1, 1)
    for layer, (k, v) in data.items():
        bk, bv = cache.read_kv("b", layer, 0, 6)
        assert bk.tobytes() == k[:6].tobytes() and bv.tobytes() == v[:6].tobytes()
    # the copy is private: writing b's copied slots leaves a alone
    z = np.zeros((2, 2, 4), np.float16)
    cache.write_kv("b", 0, 4, z, z)
    ak, av = cache.read_kv("a", 0, 4, 2)
    assert ak.tobytes() == data[0][0][4:6].tobytes()
    assert av.tobytes() == data[0][1][4:6].tobytes()
    settled(cache)


def test_partial_reuse_of_the_first_block() -> None:
    cache = new_cache()
    alloc(cache, "a", [1, 2, 3, 4, 5])
    data = kv_fill(cache, "a", 5, seed=4)
    b = alloc(cache, "b", [1, 2, 9, 9, 9])
    assert b.block_ids == (2, 3) and b.num_cached_tokens == 2
    bk, bv = cache.read_kv("b", 1, 0, 2)
    assert bk.tobytes() == data[1][0][:2].tobytes() and bv.tobytes() == data[1][1][:2].tobytes()
    c = alloc(cache, "c", [7, 2, 3, 4, 5])
    assert c.num_cached_tokens == 0


def test_partial_reuse_picks_the_longest_match() -> None:
    cache = new_cache()
    alloc(cache, "a", [1, 2, 5, 6, 0])  # block 0: [1, 2, 5, 6]
    da = kv_fill(cache, "a", 5, seed=5)
    alloc(cache, "c", [1, 2, 3, 7, 0])  # block 2: [1, 2, 3, 7]
    dc = kv_fill(cache, "c", 5, seed=6)
    b = alloc(cache, "b", [1, 2, 3, 8, 0])
    assert b.num_cached_tokens == 3
    bk, _ = cache.read_kv("b", 0, 0, 3)
    assert bk.tobytes() == dc[0][0][:3].tobytes()
    assert bk.tobytes() != da[0][0][:3].tobytes()


def test_salt_isolates_tenants() -> None:
    cache = new_cache(num_blocks=32)
    toks = list(range(9))
    a = alloc(cache, "a", toks, salt="tenant-1")
    assert a.block_ids == (0, 1, 2)
    for rid, salt in [("b", "tenant-2"), ("c", None), ("d", b"tenant-1"), ("e", 1)]:
        h = alloc(cache, rid, toks, salt=salt)
        assert h.num_cached_tokens == 0, salt
        assert not set(h.block_ids) & {0, 1, 2}, salt
    same = alloc(cache, "f", toks, salt="tenant-1")
    assert same.block_ids[:2] == (0, 1) and same.num_cached_tokens == 8
    # int and str salts with the same digits differ; equal ints share
    g = alloc(cache, "g", [50, 51, 52, 53, 54], salt=1)
    assert alloc(cache, "h", [50, 51, 52, 53, 55], salt="1").num_cached_tokens == 0
    assert alloc(cache, "i", [50, 51, 52, 53, 56], salt=1).block_ids[0] == g.block_ids[0]
    settled(cache)


@pytest.mark.parametrize("salt", [1.5, True, ["a"], ("a",), {"a": 1}, object()], ids=repr)
def test_salt_of_wrong_type(salt) -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(5)))
    before = stats_dict(cache)
    with pytest.raises(TypeError, match="salt"):
        alloc(cache, "b", list(range(5)), salt=salt)
    with pytest.raises(TypeError, match="salt"):
        cache.try_allocate("b", list(range(5)), salt=salt)
    assert "b" not in cache
    assert_stats_unchanged(cache, before)
    assert cache.drain_events()[-1].block_hashes  # only a's Stored
    assert len(cache.drain_events()) == 0


# ----------------------------------------------------------------------------- eviction


def test_deallocated_full_blocks_are_evictable_and_evicted_lru_tails_first() -> None:
    cache = new_cache()
    a = alloc(cache, "a", list(range(12)))
    b = alloc(cache, "b", list(range(100, 108)))
    assert (a.block_ids, b.block_ids) == ((0, 1, 2), (3, 4))
    ev = cache.drain_events()
    ha = ev[0].block_hashes
    assert len(ha) == 3
    dealloc(cache, "a")  # evictable LRU: 2, 1, 0
    dealloc(cache, "b")  # ... then 4, 3
    s = cache.stats()
    assert (s.device.used_blocks, s.device.free_blocks, s.device.evictable_blocks) == (0, 8, 5)
    assert cache.can_allocate(32)
    c = alloc(cache, "c", list(range(200, 220)))  # 5 blocks: 3 blank, then evicts 2 and 1
    assert c.block_ids == (5, 6, 7, 2, 1)
    s = cache.stats()
    assert s.evicted_blocks == 2 and s.device.evictable_blocks == 3
    removed = [e for e in cache.drain_events() if isinstance(e, BlockRemoved)]
    assert [e.block_hashes for e in removed] == [(ha[2], ha[1])]
    assert removed[0].tier == "device"
    # block 0 is still cached
    d = alloc(cache, "d", [0, 1, 2, 3, 50])
    assert d.block_ids == (0, 4) and d.num_cached_tokens == 4  # 4 = next LRU victim
    assert cache.stats().evicted_blocks == 3
    settled(cache)


def test_a_hit_block_is_never_evicted_for_its_own_request() -> None:
    cache = new_cache()
    alloc(cache, "a", [1, 2, 3, 4, 5])  # blocks 0 (cached), 1 (partial)
    alloc(cache, "b", [11, 12, 13, 14, 15])  # blocks 2 (cached), 3
    dealloc(cache, "a")  # 1 -> blank, 0 -> evictable
    dealloc(cache, "b")  # 3 -> blank, 2 -> evictable; LRU: 0, 2
    s = cache.stats().device
    assert (s.free_blocks, s.evictable_blocks) == (8, 2)
    e = alloc(cache, "e", [1, 2, 3, 4, *range(500, 528)])  # 8 blocks, block 0 is a hit
    assert e.block_ids == (0, 4, 5, 6, 7, 1, 3, 2)
    assert e.num_cached_tokens == 4
    assert cache.stats().evicted_blocks == 1
    settled(cache)


def test_hit_block_counts_once_against_availability() -> None:
    cache = new_cache()
    alloc(cache, "a", [1, 2, 3, 4, 5])
    dealloc(cache, "a")  # block 0 cached and evictable; 8 free
    alloc(cache, "hold", [900])  # takes blank block 2; 7 free, one of them block 0
    before = stats_dict(cache)
    # 8 blocks: the hit on block 0 plus 7 new, but only 6 other free blocks: short
    assert cache.try_allocate("x", [1, 2, 3, 4, *range(600, 628)]) is None
    assert_stats_unchanged(cache, before)
    # 7 blocks: the hit plus 6 new fits exactly, evicting nothing
    h = cache.try_allocate("x", [1, 2, 3, 4, *range(600, 624)])
    assert h is not None and h.block_ids == (0, 3, 4, 5, 6, 7, 1)
    assert h.num_cached_tokens == 4
    s = cache.stats()
    assert (s.device.free_blocks, s.evicted_blocks) == (0, 0)
    settled(cache)


def test_decode_that_fills_a_block_registers_it() -> None:
    cache = new_cache()
    alloc(cache, "a", [1, 2, 3])
    assert cache.drain_events() == []
    extend(cache, "a", [4])
    (ev,) = cache.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.token_ids == (1, 2, 3, 4) and ev.parent_block_hash is None
    assert ev.block_size == 4 and ev.tier == "device"
    extend(cache, "a", [5, 6, 7, 8, 9])
    (ev2,) = cache.drain_events()
    assert ev2.token_ids == (5, 6, 7, 8) and ev2.parent_block_hash == ev.block_hashes[0]
    b = alloc(cache, "b", [1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert b.block_ids[:2] == (0, 1) and b.num_cached_tokens == 8
    settled(cache)


def test_count_extend_is_never_cached() -> None:
    cache = new_cache()
    alloc(cache, "a", [1, 2, 3])
    extend(cache, "a", 1)
    extend(cache, "a", [5, 6, 7, 8])  # ids after unknown ones: not cacheable either
    assert cache.drain_events() == []
    b = alloc(cache, "b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert b.num_cached_tokens == 0
    dealloc(cache, "a")
    dealloc(cache, "b")
    assert cache.stats().device.evictable_blocks == 2  # only b's own full blocks


# ----------------------------------------------------------------------------- fork


def test_fork_shares_blocks_copy_on_write() -> None:
    cache = new_cache()
    a = alloc(cache, "a", [1, 2, 3, 4, 5, 6])
    data = kv_fill(cache, "a", 6, seed=7)
    b = fork(cache, "a", "b")
    assert b.block_ids == a.block_ids == (0, 1)
    assert (b.request_id, b.num_tokens) == ("b", 6)
    s = cache.stats()
    assert (s.device.used_blocks, s.num_sequences) == (2, 2)
    for layer, (k, v) in data.items():
        bk, bv = cache.read_kv("b", layer, 0, 6)
        assert bk.tobytes() == k.tobytes() and bv.tobytes() == v.tobytes()
    # the first append into the shared partial tail copies it in that branch only
    b = extend(cache, "b", [7])
    assert b.block_ids == (0, 2)
    assert cache.get("a").block_ids == (0, 1)
    assert cache.stats().intra_device_copy_blocks == 1
    a = extend(cache, "a", [70])  # a's tail is now its own: no copy
    assert a.block_ids == (0, 1)
    assert cache.stats().intra_device_copy_blocks == 1
    for layer, (k, v) in data.items():
        bk, bv = cache.read_kv("b", layer, 0, 6)
        assert bk.tobytes() == k.tobytes() and bv.tobytes() == v.tobytes()
    # writes of one branch are invisible in the other
    one = np.ones((1, 2, 4), np.float16)
    cache.write_kv("a", 0, 6, one, one)
    cache.write_kv("b", 0, 6, one * 2, one * 3)
    assert (cache.read_kv("a", 0, 6, 1)[1] == 1).all()
    assert (cache.read_kv("b", 0, 6, 1)[1] == 3).all()
    # a write into the shared full block 0 copies it first
    cache.write_kv("b", 1, 0, one * 5, one * 5)
    assert cache.get("b").block_ids == (3, 2)
    assert cache.get("a").block_ids == (0, 1)
    assert cache.stats().intra_device_copy_blocks == 2
    ak, av = cache.read_kv("a", 1, 0, 1)
    assert ak.tobytes() == data[1][0][:1].tobytes() and av.tobytes() == data[1][1][:1].tobytes()
    assert (cache.read_kv("b", 1, 0, 1)[0] == 5).all()
    bk, _ = cache.read_kv("b", 1, 1, 3)  # the rest of the copied block came along
    assert bk.tobytes() == data[1][0][1:4].tobytes()
    settled(cache)
    dealloc(cache, "a")
    assert cache.stats().device.used_blocks == 2
    dealloc(cache, "b")
    assert cache.stats().device.used_blocks == 0
    settled(cache)


def test_fork_of_full_blocks_needs_no_copy() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(8)))
    fork(cache, "a", "b")
    assert extend(cache, "b", [9]).block_ids == (0, 1, 2)
    assert extend(cache, "a", [9]).block_ids == (0, 1, 3)
    assert cache.stats().intra_device_copy_blocks == 0
    fork(cache, "b", "c")
    dealloc(cache, "b")
    assert cache.get("c").block_ids == (0, 1, 2)
    assert cache.stats().device.used_blocks == 4
    settled(cache)


def test_fork_errors_change_nothing() -> None:
    cache = new_cache()
    alloc(cache, "a", [1, 2, 3, 4, 5])
    alloc(cache, "b", [9])
    before = stats_dict(cache)
    with pytest.raises(UnknownRequestError):
        fork(cache, "nope", "c")
    with pytest.raises(DuplicateRequestError):
        fork(cache, "a", "b")
    with pytest.raises(DuplicateRequestError):
        fork(cache, "a", "a")
    with pytest.raises(TypeError):
        fork(cache, "a", 2.5)
    assert "c" not in cache and len(cache) == 2
    assert_stats_unchanged(cache, before)
    settled(cache)


def test_fork_needs_the_parent_resident_but_no_free_block() -> None:
    cache = new_cache(num_blocks=2)
    alloc(cache, "a", [1, 2, 3, 4, 5, 6, 7])
    assert cache.stats().device.free_blocks == 0
    assert fork(cache, "a", "b").block_ids == (0, 1)
    before = stats_dict(cache)
    # the copy-on-write append needs a free block: none
    assert cache.try_extend("b", [8]) is None
    assert_stats_unchanged(cache, before)


# ----------------------------------------------------------------------------- gc / reset


def test_gc_full_evicts_every_evictable_block() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(12)))
    alloc(cache, "b", list(range(100, 108)))
    alloc(cache, "live", list(range(200, 205)))
    dealloc(cache, "a")
    dealloc(cache, "b")
    assert cache.stats().device.evictable_blocks == 5
    g = gc(cache, target_free_ratio=1.0)
    assert isinstance(g, GcStats)
    assert g.evicted_blocks == 5
    assert g.freed_bytes == 5 * SMALL_BYTES_PER_BLOCK
    assert g.offloaded_blocks == 0
    assert g.duration_s >= 0.0
    s = cache.stats()
    assert s.device.evictable_blocks == 0 and s.evicted_blocks == 5
    assert s.device.used_blocks == 2 and s.device.free_blocks == 6
    assert alloc(cache, "a2", list(range(12))).num_cached_tokens == 0
    g2 = gc(cache, target_free_ratio=1.0)
    assert (g2.evicted_blocks, g2.freed_bytes) == (0, 0)
    assert g.to_dict()["evicted_blocks"] == 5
    settled(cache)


def test_gc_default_target_is_low_watermark_and_evicts_tails_first() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(32)))  # every block
    dealloc(cache, "a")  # LRU: 7, 6, ..., 0
    assert cache.stats().device.evictable_blocks == 8
    g = gc(cache)  # blank share must reach 0.3 of 8: 3 blocks
    assert g.evicted_blocks == 3
    assert cache.stats().device.evictable_blocks == 5
    h = alloc(cache, "b", list(range(32)))
    assert h.block_ids[:5] == (0, 1, 2, 3, 4)
    assert h.num_cached_tokens == 20
    assert gc(cache, target_free_ratio=0.0).evicted_blocks == 0


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_gc_bad_ratio(ratio) -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(8)))
    dealloc(cache, "a")
    before = stats_dict(cache)
    with pytest.raises(ValueError):
        gc(cache, target_free_ratio=ratio)
    assert_stats_unchanged(cache, before)


def test_reset_prefix_cache() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(8)))
    alloc(cache, "b", list(range(50, 58)))
    dealloc(cache, "a")
    cache.drain_events()
    before = stats_dict(cache)
    assert cache.reset_prefix_cache() is False  # b is live
    assert_stats_unchanged(cache, before)
    assert cache.drain_events() == []
    assert alloc(cache, "a2", [*range(8), 9]).num_cached_tokens == 8
    dealloc(cache, "a2")
    dealloc(cache, "b")
    assert cache.stats().device.evictable_blocks == 4
    assert cache.reset_prefix_cache() is True
    s = cache.stats()
    assert (s.device.evictable_blocks, s.device.free_blocks) == (0, 8)
    assert cache.drain_events() == [AllBlocksCleared()]
    assert alloc(cache, "c", list(range(8))).num_cached_tokens == 0
    assert alloc(cache, "d", list(range(50, 58))).num_cached_tokens == 0
    settled(cache)


# ----------------------------------------------------------------------------- events


def test_event_order_stored_removed_cleared() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(8)))
    alloc(cache, "b", [0, 1, 2, 3, 9, 9, 9, 9, 9])
    dealloc(cache, "a")
    dealloc(cache, "b")
    gc(cache, target_free_ratio=1.0)
    events = cache.drain_events()
    assert cache.drain_events() == []
    s1, s2, rem = events
    assert isinstance(s1, BlockStored) and isinstance(s2, BlockStored)
    h0, h1 = s1.block_hashes
    assert s1.parent_block_hash is None and s1.token_ids == tuple(range(8))
    assert s1.block_size == 4 and s1.tier == "device"
    (hb,) = s2.block_hashes
    assert s2.parent_block_hash == h0 and s2.token_ids == (9, 9, 9, 9)
    assert len({h0, h1, hb}) == 3
    assert isinstance(rem, BlockRemoved) and rem.tier == "device"
    # LRU: a released 1 then 0 (b still held 0), then b released hb then 0
    assert rem.block_hashes == (h1, hb, h0)
    # every hash is stored before it is removed
    for h in rem.block_hashes:
        assert stored_hashes(events[: events.index(rem)]).count(h) == 1
    alloc(cache, "c", [0, 1, 2, 3, 5])
    dealloc(cache, "c")
    assert cache.reset_prefix_cache()
    events = cache.drain_events()
    assert isinstance(events[0], BlockStored) and events[-1] == AllBlocksCleared()
    assert events[0].to_dict()["token_ids"] == (0, 1, 2, 3)
    assert repr(AllBlocksCleared()) == "AllBlocksCleared()"


def test_events_disabled() -> None:
    cache = new_cache(enable_kv_events=False)
    alloc(cache, "a", list(range(8)))
    dealloc(cache, "a")
    gc(cache, target_free_ratio=1.0)
    cache.reset_prefix_cache()
    assert cache.drain_events() == []


# ----------------------------------------------------------------------------- stats


def test_iteration_stats_are_deltas_and_stats_accumulate() -> None:
    cache = new_cache()
    alloc(cache, "a", list(range(12)))
    it = cache.iteration_stats()
    assert (it.alloc_total_blocks, it.alloc_new_blocks, it.missed_blocks) == (3, 3, 3)
    assert (it.full_reused_blocks, it.reused_blocks) == (0, 0)
    assert it.cache_hit_rate == 0.0
    assert (it.input_tokens, it.cache_tokens, it.prompt_tokens) == (12, 0, 12)
    assert it.token_hit_rate == 0.0
    assert (it.primary_max_num_blocks, it.primary_used_num_blocks) == (8, 3)
    assert it.primary_free_num_blocks == 5
    assert it.secondary_max_num_blocks == 0

    alloc(cache, "b", [*range(12), 50])
    extend(cache, "b", [1, 2, 3, 4])
    it = cache.iteration_stats()
    assert (it.alloc_total_blocks, it.alloc_new_blocks) == (4, 1)
    assert (it.full_reused_blocks, it.missed_blocks) == (3, 1)
    assert it.cache_hit_rate == 0.75
    assert (it.cache_tokens, it.input_tokens) == (12, 1)
    assert it.token_hit_rate == 12 / 13
    assert it.gen_alloc_blocks == 1
    assert (it.primary_used_num_blocks, it.primary_free_num_blocks) == (5, 3)

    it = cache.iteration_stats()
    assert it.alloc_total_blocks == 0 and it.gen_alloc_blocks == 0 and it.prompt_tokens == 0
    assert it.cache_hit_rate == 0.0 and it.token_hit_rate == 0.0
    assert it.primary_used_num_blocks == 5, "gauges are not reset"

    s = cache.stats()
    assert (s.alloc_total_blocks, s.alloc_new_blocks) == (7, 4)
    assert (s.full_reused_blocks, s.missed_blocks, s.reused_blocks) == (3, 4, 3)
    assert s.cache_hit_rate == 3 / 7
    assert (s.input_tokens, s.cache_tokens, s.prompt_tokens) == (13, 12, 25)
    assert s.token_hit_rate == 12 / 25
    assert s.gen_alloc_blocks == 1
    d = s.to_dict()
    for key in ("usage", "cache_hit_rate", "token_hit_rate", "prompt_tokens", "reused_blocks"):
        assert key in d
    assert d["device"]["used_blocks"] == 5
    assert cache.stats() == s, "stats() does not reset anything"


# ----------------------------------------------------------------------------- residency


def test_residency_events_on_a_manual_clock() -> None:
    cache = ferrumkv.KvCache(make_config(residency_sample_rate=1.0), clock_start=0.0)
    alloc(cache, "a", [1, 2, 3, 4, 5])  # block 0 created at t=0
    cache.set_time(1.0)
    dealloc(cache, "a")
    cache.set_time(3.0)
    alloc(cache, "b", [1, 2, 3, 4, 9])  # hit at 3
    cache.set_time(4.0)
    dealloc(cache, "b")
    cache.set_time(10.0)
    alloc(cache, "c", [1, 2, 3, 4, 7])  # hit at 10
    cache.set_time(11.0)
    dealloc(cache, "c")
    assert cache.drain_eviction_events() == []
    cache.set_time(20.0)
    assert gc(cache, target_free_ratio=1.0).evicted_blocks == 1
    (ev,) = cache.drain_eviction_events()
    assert isinstance(ev, EvictionEvent)
    assert ev.lifetime_seconds == 20.0
    assert ev.idle_seconds == 10.0
    assert ev.reuse_gaps_seconds == (3.0, 7.0)
    assert ev.to_dict() == {
        "lifetime_seconds": 20.0,
        "idle_seconds": 10.0,
        "reuse_gaps_seconds": (3.0, 7.0),
    }
    assert cache.drain_eviction_events() == []


def test_residency_keeps_the_last_three_gaps_and_allocation_evicts() -> None:
    cache = ferrumkv.KvCache(
        make_config(residency_sample_rate=1.0, num_blocks=2), clock_start=100.0
    )
    alloc(cache, "a", [1, 2, 3, 4, 5])
    dealloc(cache, "a")
    for i, t in enumerate([101.0, 103.0, 106.0, 110.0, 115.0]):
        cache.set_time(t)
        alloc(cache, f"r{i}", [1, 2, 3, 4, 50 + i])
        dealloc(cache, f"r{i}")
    cache.set_time(130.0)
    # a prompt of 2 new blocks must evict cached block 0
    h = alloc(cache, "big", list(range(200, 208)))
    assert sorted(h.block_ids) == [0, 1]
    (ev,) = cache.drain_eviction_events()
    assert ev.lifetime_seconds == 30.0
    assert ev.idle_seconds == 15.0
    assert ev.reuse_gaps_seconds == (3.0, 4.0, 5.0)


def test_never_reused_block_has_no_gaps() -> None:
    cache = ferrumkv.KvCache(make_config(residency_sample_rate=1.0), clock_start=5.0)
    alloc(cache, "a", [1, 2, 3, 4])
    cache.set_time(6.5)
    dealloc(cache, "a")
    cache.set_time(9.0)
    gc(cache, target_free_ratio=1.0)
    assert cache.drain_eviction_events() == [EvictionEvent(4.0, 4.0, ())]
    # reset drops cached blocks without eviction events
    alloc(cache, "b", [7, 7, 7, 7])
    dealloc(cache, "b")
    assert cache.reset_prefix_cache()
    assert cache.drain_eviction_events() == []


def test_set_time_needs_a_manual_clock() -> None:
    cache = new_cache()
    with pytest.raises(ValueError):
        cache.set_time(3.0)
