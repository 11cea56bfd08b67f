"""Chunked prefill, speculative-decoding truncation, recompute-preemption accounting,
`lookup_prefix` per tier and `can_allocate` of a prompt, through the public API (block_size
4, 8 device blocks; blank blocks are taken in id order, released ones go to the back).
Waiting calls run under asyncio and trio."""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest

import ferrumkv
from ferrumkv import InvalidStateError, OutOfBlocksError, PrefixMatch, UnknownRequestError
from helpers import (
    alloc,
    assert_stats_unchanged,
    check_invariants,
    dealloc,
    drive,
    extend,
    new_cache,
    stats_dict,
    wait_until,
)


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def chunk(cache: ferrumkv.KvCache, rid: str, n: int) -> Any:
    return drive(cache.extend(rid, num_new_tokens=n))


def truncate(cache: ferrumkv.KvCache, rid: str, n: Any) -> Any:
    return drive(cache.truncate(rid, n))


def kv(n: int, seed: int) -> np.ndarray:
    """Distinct K/V values for `n` positions ([n, 2 heads, 4 dims] float16)."""
    return (np.arange(n * 8, dtype=np.float16).reshape(n, 2, 4) + seed).astype(np.float16)


def write(cache: ferrumkv.KvCache, rid: str, start: int, data: np.ndarray) -> None:
    for layer in range(2):
        cache.write_kv(rid, layer, start, data, data)


def assert_reads(cache: ferrumkv.KvCache, rid: str, start: int, data: np.ndarray) -> None:
    for layer in range(2):
        k, v = cache.read_kv(rid, layer, start, len(data))
        np.testing.assert_array_equal(k, data)
        np.testing.assert_array_equal(v, data)


# ----- chunked prefill ----------------------------------------------------------------------


def test_a_chunked_prompt_is_reserved_chunk_by_chunk() -> None:
    cache = new_cache()
    h = alloc(cache, "a", toks(0, 14), num_new_tokens=5)
    assert (h.block_ids, h.num_tokens, h.num_prompt_tokens, h.num_cached_tokens) == (
        (0, 1),
        5,
        14,
        0,
    )
    assert cache.get("a") == h
    s = cache.stats()
    assert (s.alloc_total_blocks, s.missed_blocks, s.input_tokens) == (2, 4, 14)
    assert cache.block_table(["a"]).tolist() == [[0, 1]]
    h = chunk(cache, "a", 6)
    assert (h.block_ids, h.num_tokens) == ((0, 1, 2), 11)
    h = chunk(cache, "a", 3)
    assert (h.block_ids, h.num_tokens, h.num_prompt_tokens) == ((0, 1, 2, 3), 14, 14)
    h = extend(cache, "a", [14, 15, 16])
    assert (h.block_ids, h.num_tokens) == ((0, 1, 2, 3, 4), 17)
    s = cache.stats()
    assert (s.alloc_total_blocks, s.alloc_new_blocks, s.gen_alloc_blocks) == (4, 4, 1)
    assert (s.missed_blocks, s.input_tokens, s.cache_tokens) == (4, 14, 0)
    # The blocks the chunks completed are prefix hits, under the prompt's hashes.
    b = alloc(cache, "b", toks(0, 13))
    assert (b.block_ids, b.num_cached_tokens) == ((0, 1, 2, 5), 12)
    check_invariants(cache)


def test_a_chunked_prompt_has_the_hit_rate_of_the_same_prompt_whole() -> None:
    def run(chunks: list[int] | None) -> ferrumkv.CacheStats:
        cache = new_cache()
        alloc(cache, "warm", toks(0, 9))
        dealloc(cache, "warm")
        prompt = [*toks(0, 8), *toks(100, 12)]  # 2 cached blocks, then 12 new tokens
        if chunks is None:
            h = alloc(cache, "a", prompt)
        else:
            h = alloc(cache, "a", prompt, num_new_tokens=chunks[0])
            for n in chunks[1:]:
                h = chunk(cache, "a", n)
        assert (h.num_tokens, h.num_cached_tokens) == (20, 8)
        check_invariants(cache)
        return cache.stats()

    whole, chunked = run(None), run([3, 4, 5])
    assert chunked.token_hit_rate == whole.token_hit_rate == 8 / (9 + 20)
    assert chunked.cache_hit_rate == whole.cache_hit_rate
    fields = ("alloc_total_blocks", "alloc_new_blocks", "full_reused_blocks", "missed_blocks")
    assert [getattr(chunked, f) for f in fields] == [getattr(whole, f) for f in fields]


def test_num_new_tokens_past_the_uncached_tokens_reserves_them_all() -> None:
    cache = new_cache()
    alloc(cache, "a", toks(0, 9))
    h = alloc(cache, "b", toks(0, 10), num_new_tokens=100)
    assert (h.num_tokens, h.num_cached_tokens, h.block_ids) == (10, 8, (0, 1, 3))
    with pytest.raises(ValueError, match="past the end"):
        chunk(cache, "b", 1)
    h = cache.try_allocate("c", toks(0, 10), num_new_tokens=1)
    assert h is not None and (h.num_tokens, h.num_cached_tokens) == (9, 8)
    check_invariants(cache)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.extend("a", [1], num_new_tokens=1), TypeError),
        (lambda c: c.extend("a"), TypeError),
        (lambda c: c.extend("a", num_new_tokens=0), ValueError),
        (lambda c: c.extend("a", num_new_tokens=-2), ValueError),
        (lambda c: c.extend("a", num_new_tokens=True), TypeError),
        (lambda c: c.extend("a", num_new_tokens=1.0), TypeError),
        (lambda c: c.extend("a", num_new_tokens=2**70), ValueError),
        (lambda c: c.extend("a", num_new_tokens=10), ValueError),  # 5 + 10 > 14
        (lambda c: c.extend("a", [7]), InvalidStateError),  # prompt tokens left
        (lambda c: c.extend("a", 2), InvalidStateError),
        (lambda c: c.extend("nobody", num_new_tokens=1), UnknownRequestError),
        (lambda c: c.allocate("z", [1, 2], num_new_tokens=0), ValueError),
        (lambda c: c.allocate("z", [1, 2], num_new_tokens="1"), TypeError),
        (lambda c: c.allocate("z", [1, 2], preempted=1), TypeError),
        (lambda c: c.allocate("a", [1, 2], num_new_tokens=1), ferrumkv.DuplicateRequestError),
    ],
)
def test_bad_chunk_calls_change_nothing(call: Any, error: type[BaseException]) -> None:
    cache = new_cache()
    h = alloc(cache, "a", toks(0, 14), num_new_tokens=5)
    before = stats_dict(cache)
    with pytest.raises(error):
        drive(call(cache))
    assert_stats_unchanged(cache, before)
    assert cache.get("a") == h and "z" not in cache
    check_invariants(cache)
    with pytest.raises(ValueError):
        cache.try_allocate("z", [1, 2], num_new_tokens=0)
    with pytest.raises(InvalidStateError):
        cache.try_extend("a", [1])
    assert cache.try_extend("a", num_new_tokens=9) is not None


@pytest.mark.anyio
async def test_a_waiting_chunk_goes_before_a_waiting_prompt_and_a_cancel_gives_back() -> None:
    cache = new_cache()
    await cache.allocate("a", toks(0, 16), num_new_tokens=4)  # block 0
    await cache.allocate("x", toks(100, 28))  # blocks 1..=7, 7 full, registered
    done: dict[str, Any] = {}

    async def grow(scope_box: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_box.append(scope)
            done["a"] = await cache.extend("a", num_new_tokens=4)

    async def prompt() -> None:
        done["y"] = await cache.allocate("y", toks(200, 4))

    async with anyio.create_task_group() as tg:
        box: list[anyio.CancelScope] = []
        tg.start_soon(grow, box)
        await wait_until(lambda: cache.stats().num_waiting == 1)
        tg.start_soon(prompt)
        await wait_until(lambda: cache.stats().num_waiting == 2)
        with pytest.raises(InvalidStateError):
            await cache.extend("a", num_new_tokens=1)  # one waiting call a request
        assert cache.can_allocate(1) is False
        # Cancelled while pending: nothing was taken.
        before = stats_dict(cache)
        box[0].cancel()
        await wait_until(lambda: cache.stats().num_waiting == 1)
        assert_stats_unchanged(cache, {**before, "num_waiting": 1})
        # Again; x's release grants the chunk (an extend) first, then the prompt. The chunk
        # is cancelled once granted, before its waiter ran: its block goes back.
        box.clear()
        tg.start_soon(grow, box)
        await wait_until(lambda: cache.stats().num_waiting == 2)

        async def free_then_cancel() -> None:
            await cache.deallocate("x")
            box[0].cancel()

        await free_then_cancel()
    assert "a" not in done
    # x released 7 first (its tail): the chunk, served first, was granted 7, the prompt 6.
    assert done["y"].block_ids == (6,)
    h = cache.get("a")
    assert (h.num_tokens, h.block_ids) == (4, (0,))
    assert cache.stats().device.used_blocks == 2
    # The same chunk, taken: block 7 (blank again), counted as a prompt block.
    s0 = cache.stats()
    h = await cache.extend("a", num_new_tokens=4)
    assert (h.num_tokens, h.block_ids) == (8, (0, 7))
    s1 = cache.stats()
    assert (s1.alloc_total_blocks - s0.alloc_total_blocks, s1.gen_alloc_blocks) == (1, 0)
    check_invariants(cache)


@pytest.mark.anyio
async def test_a_chunk_that_times_out_gives_back_everything() -> None:
    cache = new_cache()
    await cache.allocate("a", toks(0, 16), num_new_tokens=4)
    await cache.allocate("x", toks(100, 28))
    before = stats_dict(cache)
    with pytest.raises(OutOfBlocksError):
        await cache.extend("a", num_new_tokens=4, timeout=0.01)
    after = stats_dict(cache)
    assert after["num_waiting"] == 0 and after["device"] == before["device"]
    assert after["preempted_waits"] == before["preempted_waits"] + 1
    assert cache.get("a").num_tokens == 4
    check_invariants(cache)


@pytest.mark.anyio
async def test_a_waiting_chunked_allocate_is_granted_its_hits_and_one_chunk() -> None:
    cache = new_cache()
    await cache.allocate("p", toks(0, 9))  # blocks 0, 1 registered, 2
    await cache.allocate("x", toks(100, 20))  # blocks 3..=7
    prompt = [*toks(0, 8), *toks(50, 8)]
    assert cache.can_allocate(prompt, num_new_tokens=2) is False
    async with anyio.create_task_group() as tg:
        got: dict[str, Any] = {}

        async def go() -> None:
            got["a"] = await cache.allocate("a", prompt, num_new_tokens=2)

        tg.start_soon(go)
        await wait_until(lambda: cache.stats().num_waiting == 1)
        await cache.deallocate("x")
    h = got["a"]
    # 8 cached + 2 new = 3 blocks: the hits 0, 1 and x's LRU block 7.
    assert (h.block_ids, h.num_tokens, h.num_cached_tokens, h.num_prompt_tokens) == (
        (0, 1, 7),
        10,
        8,
        16,
    )
    h = chunk(cache, "a", 6)
    assert (h.num_tokens, h.block_ids) == (16, (0, 1, 7, 6))
    check_invariants(cache)


# ----- truncate -----------------------------------------------------------------------------


def test_truncate_frees_past_the_end_and_re_extends_in_place() -> None:
    cache = new_cache()
    alloc(cache, "a", toks(0, 10))  # blocks 0, 1 registered, 2
    cache.drain_events()
    s0 = cache.iteration_stats()
    h = truncate(cache, "a", 6)
    assert (h.block_ids, h.num_tokens) == ((0, 1), 6)
    assert cache.iteration_stats().truncated_blocks - s0.truncated_blocks == 1
    assert cache.stats().truncated_blocks == 1
    [removed] = cache.drain_events()
    assert isinstance(removed, ferrumkv.BlockRemoved)  # block 1 no longer holds 4..8
    assert cache.lookup_prefix(toks(0, 9)) == PrefixMatch(4, 0, 0)
    h = extend(cache, "a", [60, 61, 62])
    assert (h.block_ids, h.num_tokens) == ((0, 1, 3), 9)
    assert cache.stats().intra_device_copy_blocks == 0
    check_invariants(cache)


def test_truncate_into_a_shared_block_then_re_extend_keeps_every_owner_s_bytes() -> None:
    cache = new_cache()
    alloc(cache, "a", toks(0, 9))  # blocks 0, 1 registered, 2
    a_kv = kv(9, 1)
    write(cache, "a", 0, a_kv)
    alloc(cache, "b", toks(0, 10))  # shares 0, 1; block 3
    write(cache, "b", 8, kv(2, 50))
    h = truncate(cache, "b", 6)  # rejected tokens 6..10
    assert h.block_ids == (0, 1)
    events = cache.drain_events()
    assert not any(isinstance(e, ferrumkv.BlockRemoved) for e in events), "a holds block 1"
    h = extend(cache, "b", [70, 71, 72])  # copies block 1 (to blank 4) first
    assert h.block_ids == (0, 4, 5)
    assert cache.stats().intra_device_copy_blocks == 1
    b_kv = kv(3, 90)
    write(cache, "b", 6, b_kv)
    assert_reads(cache, "b", 0, np.concatenate([a_kv[:6], b_kv]))
    assert_reads(cache, "a", 0, a_kv)
    # A prompt of a's tokens still gets a's bytes; one of b's new tokens gets b's.
    c = alloc(cache, "c", toks(0, 9))
    assert (c.block_ids[:2], c.num_cached_tokens) == ((0, 1), 8)
    assert_reads(cache, "c", 0, a_kv[:8])
    d = alloc(cache, "d", [0, 1, 2, 3, 4, 5, 70, 71, 72, 9])
    assert (d.block_ids[:2], d.num_cached_tokens) == ((0, 4), 8)
    assert_reads(cache, "d", 0, np.concatenate([a_kv[:6], b_kv[:2]]))
    check_invariants(cache)


def test_truncate_then_re_extend_a_chunked_prefill() -> None:
    cache = new_cache()
    alloc(cache, "a", toks(0, 14), num_new_tokens=10)
    h = truncate(cache, "a", 6)
    assert (h.num_tokens, h.num_prompt_tokens, h.block_ids) == (6, 14, (0, 1))
    with pytest.raises(InvalidStateError):
        extend(cache, "a", [1])
    h = chunk(cache, "a", 8)
    assert (h.num_tokens, h.block_ids) == (14, (0, 1, 3, 4))
    assert cache.lookup_prefix(toks(0, 13)).num_cached_tokens == 12
    check_invariants(cache)


@pytest.mark.parametrize(
    ("n", "error"),
    [(0, ValueError), (7, ValueError), (-1, ValueError), ("3", TypeError), (True, TypeError)],
)
def test_bad_truncates_change_nothing(n: Any, error: type[BaseException]) -> None:
    cache = new_cache()
    h = alloc(cache, "a", toks(0, 6))
    before = stats_dict(cache)
    with pytest.raises(error):
        truncate(cache, "a", n)
    assert_stats_unchanged(cache, before)
    assert cache.get("a") == h
    with pytest.raises(UnknownRequestError):
        truncate(cache, "nobody", 1)
    assert truncate(cache, "a", np.int64(6)) == h, "the whole sequence: nothing changes"


@pytest.mark.anyio
async def test_truncate_is_refused_while_a_call_waits_or_the_sequence_is_swapped() -> None:
    cache = new_cache(host_blocks=4)
    await cache.allocate("a", toks(0, 6))  # blocks 0, 1
    await cache.allocate("x", toks(100, 24))  # the other 6
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.extend, "a", toks(6, 4))
        await wait_until(lambda: cache.stats().num_waiting == 1)
        before = stats_dict(cache)
        with pytest.raises(InvalidStateError):
            await cache.truncate("a", 2)
        assert_stats_unchanged(cache, before)
        await cache.deallocate("x")
    assert cache.get("a").num_tokens == 10
    await cache.swap_out("a")
    with pytest.raises(InvalidStateError):
        await cache.truncate("a", 2)
    await cache.swap_in("a")
    assert (await cache.truncate("a", 2)).num_tokens == 2
    check_invariants(cache)


# ----- preempted requests -------------------------------------------------------------------


def test_a_resumed_request_is_kept_out_of_the_hit_rates() -> None:
    cache = new_cache()
    alloc(cache, "a", toks(0, 9))
    dealloc(cache, "a")
    before = cache.stats()
    cache.iteration_stats()
    h = alloc(cache, "a", toks(0, 9), preempted=True)
    assert (h.block_ids, h.num_cached_tokens) == ((0, 1, 3), 8)
    s, it = cache.stats(), cache.iteration_stats()
    for stats in (s, it):
        assert (
            stats.preempted_requests,
            stats.preempted_prompt_tokens,
            stats.preempted_cache_tokens,
        ) == (1, 9, 8)
    for f in ("full_reused_blocks", "partial_reused_blocks", "missed_blocks"):
        assert getattr(s, f) == getattr(before, f), f
    assert (s.input_tokens, s.cache_tokens) == (before.input_tokens, before.cache_tokens)
    assert (s.cache_hit_rate, s.token_hit_rate) == (0.0, 0.0)
    assert (it.prompt_tokens, it.alloc_total_blocks, it.alloc_new_blocks) == (0, 3, 1)
    assert s.to_dict()["preempted_requests"] == 1
    # A chunked resume counts its whole prompt once, too.
    dealloc(cache, "a")
    alloc(cache, "a", toks(0, 14), preempted=True, num_new_tokens=1)
    assert cache.stats().preempted_prompt_tokens == 9 + 14
    assert cache.stats().preempted_cache_tokens == 8 + 8


# ----- lookup_prefix and can_allocate -------------------------------------------------------


def test_lookup_prefix_is_a_frozen_prefix_match_per_tier() -> None:
    cache = new_cache(num_blocks=3, host_blocks=4)
    alloc(cache, "a", toks(0, 9))
    m = cache.lookup_prefix([0, 1, 2, 3, 4, 5, 9, 9, 9])  # block 0, then 2 of block 1
    assert m == PrefixMatch(device_tokens=6, host_tokens=0, disk_tokens=0)
    assert m.num_cached_tokens == 6
    assert m.to_dict() == {
        "device_tokens": 6,
        "host_tokens": 0,
        "disk_tokens": 0,
        "num_cached_tokens": 6,
    }
    assert repr(m) == (
        "PrefixMatch(num_cached_tokens=6, device_tokens=6, host_tokens=0, disk_tokens=0)"
    )
    with pytest.raises(AttributeError):
        m.device_tokens = 1  # type: ignore[misc]
    dealloc(cache, "a")
    alloc(cache, "b", toks(500, 12))  # evicts blocks 1, 0 to the host
    assert cache.lookup_prefix(toks(0, 9)) == PrefixMatch(0, 8, 0)
    assert cache.lookup_prefix(toks(0, 9), salt="t") == PrefixMatch(0, 0, 0)
    assert cache.lookup_prefix(np.arange(9)).num_cached_tokens == 8
    assert cache.can_allocate(toks(0, 9)) is False, "host hits need device blocks: none free"


def test_can_allocate_takes_a_count_or_a_prompt() -> None:
    cache = new_cache(num_blocks=4)
    alloc(cache, "a", toks(0, 12))  # 3 registered blocks; 1 free
    assert cache.can_allocate(4) is True and cache.can_allocate(5) is False
    assert cache.can_allocate(np.int64(4)) is True
    assert cache.can_allocate(toks(0, 13)) is True, "3 hits + 1 new block"
    assert cache.can_allocate(np.array(toks(0, 13))) is True
    assert cache.can_allocate(toks(0, 13), salt="other") is False
    assert cache.can_allocate(toks(0, 17)) is False, "5 blocks in a 4-block tier"
    assert cache.can_allocate(toks(100, 20), num_new_tokens=4) is True
    assert cache.can_allocate(toks(100, 20), num_new_tokens=5) is False
    before = stats_dict(cache)
    for bad, error in [
        (lambda: cache.can_allocate([]), ValueError),
        (lambda: cache.can_allocate(4, salt="x"), ValueError),
        (lambda: cache.can_allocate(4, num_new_tokens=1), ValueError),
        (lambda: cache.can_allocate([1], num_new_tokens=0), ValueError),
        (lambda: cache.can_allocate("abc"), TypeError),
        (lambda: cache.can_allocate(1.5), TypeError),
        (lambda: cache.can_allocate(True), TypeError),
        (lambda: cache.can_allocate(-1), ValueError),
    ]:
        with pytest.raises(error):
            bad()
    assert_stats_unchanged(cache, before)
    # What it answered is what allocate does.
    assert alloc(cache, "b", toks(0, 13), timeout=0).block_ids == (0, 1, 2, 3)


@pytest.mark.anyio
async def test_can_allocate_a_prompt_is_false_while_a_call_waits() -> None:
    cache = new_cache(num_blocks=4)
    await cache.allocate("a", toks(0, 12))
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.allocate, "w", toks(100, 8))
        await wait_until(lambda: cache.stats().num_waiting == 1)
        assert cache.can_allocate(toks(0, 13)) is False
        await cache.deallocate("a")
    # w took blank 3 and evicted 2; blocks 0, 1 are cached: 0 is a hit, 1 the new block.
    assert cache.can_allocate(toks(0, 5)) is True
    assert cache.can_allocate(toks(0, 9)) is False, "hits 0, 1 leave no block for the rest"
