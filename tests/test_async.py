"""The async layer under asyncio and trio (through anyio): immediate completion, waiting
(FIFO, timeouts, cancellation), pressure callbacks, close while waiting, and a stress run."""

from __future__ import annotations

import random
import threading
import time

import anyio
import pytest

import ferrumkv
from ferrumkv import CacheClosedError, OutOfBlocksError, PressureEvent, PressureLevel
from helpers import check_invariants, drive, gauges, make_config, stats_dict, wait_until

pytestmark = pytest.mark.anyio

LOW, HIGH, CRITICAL = PressureLevel.LOW, PressureLevel.HIGH, PressureLevel.CRITICAL


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def new_cache(**overrides) -> ferrumkv.KvCache:
    return ferrumkv.KvCache(make_config(**overrides))


async def fill_one_block_each(cache: ferrumkv.KvCache, n: int, prefix: str = "h") -> None:
    for i in range(n):
        await cache.allocate(f"{prefix}{i}", toks(10_000 + 100 * i, 4))


def assert_idle(cache: ferrumkv.KvCache) -> None:
    s = cache.stats()
    assert s.device.used_blocks + s.device.free_blocks == s.device.total_blocks
    assert s.num_waiting == 0
    check_invariants(cache)


# ----------------------------------------------------------------------------- immediate


async def test_allocate_finishes_without_suspending_when_blocks_are_free() -> None:
    cache = new_cache()
    got: list[PressureEvent] = []
    cache.on_pressure(got.append)  # a subscriber must not make calls suspend either
    h = drive(cache.allocate("a", toks(0, 5)))
    assert h.block_ids == (0, 1)
    assert drive(cache.extend("a", [7, 8, 9])).block_ids == (0, 1)
    assert drive(cache.extend("a", 1)).block_ids == (0, 1, 2)
    assert drive(cache.fork("a", "b")).block_ids == (0, 1, 2)
    drive(cache.deallocate("b"))
    assert drive(cache.gc()).evicted_blocks == 0
    # blocks short with timeout=0: fails at once, still without suspending
    with pytest.raises(OutOfBlocksError):
        drive(cache.allocate("big", toks(100, 24), timeout=0))
    assert_idle(cache)


async def test_evictable_blocks_serve_an_allocate_without_waiting() -> None:
    cache = new_cache()
    await cache.allocate("a", toks(0, 32))
    await cache.deallocate("a")  # all 8 blocks evictable
    with anyio.fail_after(1):
        h = await cache.allocate("b", toks(100, 32))
    assert sorted(h.block_ids) == list(range(8))
    assert cache.stats().evicted_blocks == 8


# ----------------------------------------------------------------------------- waiting


async def test_waiters_are_served_first_come_first_served() -> None:
    cache = new_cache(enable_prefix_cache=False)
    await fill_one_block_each(cache, 8)
    order: list[str] = []
    handles = {}

    async def waiter(rid: str, n_tokens: int) -> None:
        handles[rid] = await cache.allocate(rid, toks(0, n_tokens))
        order.append(rid)

    async with anyio.create_task_group() as tg:
        for i, (rid, n) in enumerate([("w1", 8), ("w2", 4), ("w3", 1)]):
            tg.start_soon(waiter, rid, n)
            await wait_until(lambda i=i: cache.stats().num_waiting == i + 1)
        assert cache.pressure_level == CRITICAL
        await cache.deallocate("h0")  # 1 free: w1 needs 2, nobody may overtake it
        await anyio.sleep(0.02)
        assert order == [] and cache.stats().num_waiting == 3
        assert cache.try_allocate("late", [1]) is None
        assert cache.can_allocate(1) is False
        with pytest.raises(OutOfBlocksError):
            await cache.allocate("late", [1], timeout=0)
        await cache.deallocate("h1")
        await wait_until(lambda: order == ["w1"])
        assert handles["w1"].block_ids == (0, 1)
        await cache.deallocate("h2")
        await wait_until(lambda: order == ["w1", "w2"])
        await cache.deallocate("h3")
        await wait_until(lambda: order == ["w1", "w2", "w3"])
    assert handles["w2"].block_ids == (2,) and handles["w3"].block_ids == (3,)
    assert cache.stats().num_waiting == 0
    assert cache.stats().preempted_waits == 3
    assert_idle(cache)


async def test_waiting_extend_proceeds_when_blocks_free() -> None:
    cache = new_cache()
    await cache.allocate("a", toks(0, 4))
    await fill_one_block_each(cache, 7)
    result = {}

    async def grow() -> None:
        result["h"] = await cache.extend("a", [4, 5])

    async with anyio.create_task_group() as tg:
        tg.start_soon(grow)
        await wait_until(lambda: cache.stats().num_waiting == 1)
        with pytest.raises(ferrumkv.InvalidStateError):
            await cache.extend("a", [6])  # one extend per sequence may wait
        await cache.deallocate("h3")
    assert result["h"].num_tokens == 6 and len(result["h"].block_ids) == 2
    assert_idle(cache)


async def test_duplicate_id_of_a_waiting_allocate() -> None:
    cache = new_cache()
    await fill_one_block_each(cache, 8)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.allocate, "w", [1, 2])
        await wait_until(lambda: cache.stats().num_waiting == 1)
        before = stats_dict(cache)
        with pytest.raises(ferrumkv.DuplicateRequestError):
            await cache.allocate("w", [3])
        assert stats_dict(cache) == before
        await cache.deallocate("h0")
    assert "w" in cache
    assert_idle(cache)


async def test_deallocate_withdraws_a_waiting_allocate() -> None:
    cache = new_cache()
    await fill_one_block_each(cache, 8)
    before = gauges(cache)
    errors: list[BaseException] = []

    async def admit() -> None:
        try:
            await cache.allocate("w", [1, 2])
        except ferrumkv.InvalidStateError as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(admit)
        await wait_until(lambda: cache.stats().num_waiting == 1)
        await cache.deallocate("w")  # the scheduler aborts a request still waiting
    assert len(errors) == 1 and "deallocated while waiting" in str(errors[0])
    assert "w" not in cache and cache.stats().num_waiting == 0
    assert gauges(cache) == before
    with pytest.raises(ferrumkv.UnknownRequestError):
        await cache.deallocate("w")


async def test_timeout_raises_out_of_blocks_and_gives_everything_back() -> None:
    cache = new_cache()
    await fill_one_block_each(cache, 6)
    before = gauges(cache)
    t0 = time.monotonic()
    with pytest.raises(OutOfBlocksError, match=r"0\.05"):
        await cache.allocate("w", toks(0, 12), timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    assert gauges(cache) == before
    assert "w" not in cache
    with pytest.raises(OutOfBlocksError):
        await cache.extend("h0", toks(0, 20), timeout=0.02)
    assert gauges(cache) == before
    assert cache.get("h0").num_tokens == 4
    assert_idle(cache)
    # the id is free again and blocks still work
    await cache.deallocate("h5")
    assert (await cache.allocate("w", toks(0, 12), timeout=1)).num_blocks == 3


async def test_timeout_zero_fails_immediately() -> None:
    cache = new_cache()
    await fill_one_block_each(cache, 8)
    before = stats_dict(cache)
    t0 = time.monotonic()
    with pytest.raises(OutOfBlocksError):
        await cache.allocate("w", [1], timeout=0)
    with pytest.raises(OutOfBlocksError):
        await cache.extend("h0", [1], timeout=0)
    assert time.monotonic() - t0 < 0.5
    assert stats_dict(cache) == before


async def test_cancelled_waiter_gives_everything_back() -> None:
    cache = new_cache()
    await fill_one_block_each(cache, 7)
    before = gauges(cache)
    cancelled = []

    async def waiter() -> None:
        try:
            await cache.allocate("w", toks(0, 12))
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_until(lambda: cache.stats().num_waiting == 1)
        assert cache.pressure_level == CRITICAL
        tg.cancel_scope.cancel()
    assert cancelled == [True]
    assert gauges(cache) == before
    assert "w" not in cache
    assert_idle(cache)
    # the queue is really empty: a fitting allocate proceeds
    assert (await cache.allocate("x", [1], timeout=0)).num_blocks == 1


async def test_cancelling_a_waiter_lets_the_next_one_through() -> None:
    cache = new_cache(enable_prefix_cache=False)
    await fill_one_block_each(cache, 8)
    got = {}

    async def waiter(rid: str, n: int) -> None:
        got[rid] = await cache.allocate(rid, toks(0, n))

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as head:
            head.start_soon(waiter, "big", 32)
            await wait_until(lambda: cache.stats().num_waiting == 1)
            outer.start_soon(waiter, "small", 1)
            await wait_until(lambda: cache.stats().num_waiting == 2)
            await cache.deallocate("h0")
            await anyio.sleep(0.01)
            assert "small" not in got  # behind "big"
            head.cancel_scope.cancel()
        await wait_until(lambda: "small" in got)
    assert "big" not in cache and got["small"].block_ids == (0,)
    assert_idle(cache)


async def test_cancel_after_the_grant_gives_the_blocks_back() -> None:
    cache = new_cache()
    await fill_one_block_each(cache, 7)
    before = gauges(cache)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.allocate, "w", toks(0, 6))
        await wait_until(lambda: cache.stats().num_waiting == 1)
        await cache.deallocate("h0")  # the engine grants the ticket at once ...
        # a grant is invisible until its waiter takes it
        assert cache.stats().num_waiting == 0 and "w" not in cache
        assert cache.stats().device.used_blocks == before["device"]["used_blocks"] + 1  # held
        tg.cancel_scope.cancel()  # ... but the waiter is cancelled before it takes it
    assert "w" not in cache
    g = gauges(cache)
    assert g["num_sequences"] == before["num_sequences"] - 1
    assert g["device"]["used_blocks"] == before["device"]["used_blocks"] - 1
    assert_idle(cache)


async def test_cancel_after_a_grant_with_partial_reuse_leaves_no_cached_block() -> None:
    """A granted-then-cancelled allocate must not leave blocks it registered in the prefix
    cache: here the block it filled by a partial copy (positions 6, 7 never computed)."""
    cache = new_cache()
    await cache.allocate("src", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # blocks 0, 1 cached
    await cache.deallocate("src")  # 2 blank; LRU 1, 0
    assert (await cache.allocate("fill", toks(100, 24))).block_ids == (3, 4, 5, 6, 7, 2)
    cache.drain_events()
    async with anyio.create_task_group() as tg:
        # hit block 0, partial copy of block 1 (2 tokens), 2 new blocks: must wait
        tg.start_soon(cache.allocate, "w", [1, 2, 3, 4, 5, 6, 70, 80, 90])
        await wait_until(lambda: cache.stats().num_waiting == 1)
        await cache.deallocate("fill")  # granted: evicts fill's blocks 2 and 7
        assert "w" not in cache  # not published before it is taken
        tg.cancel_scope.cancel()
    assert "w" not in cache
    s = cache.stats()
    assert s.device.used_blocks == 0
    # cached: 0, 1 (src) and fill's 3, 4, 5, 6; blocks 2 and 7 hold nothing
    assert s.device.evictable_blocks == 6
    events = cache.drain_events()
    stored = [h for e in events if isinstance(e, ferrumkv.BlockStored) for h in e.block_hashes]
    removed = [h for e in events if isinstance(e, ferrumkv.BlockRemoved) for h in e.block_hashes]
    assert not set(stored) - set(removed), "a block registered by the cancelled call stays"
    h = await cache.allocate("x", [1, 2, 3, 4, 5, 6, 70, 80, 91])
    assert h.num_cached_tokens == 6
    check_invariants(cache)


# ----------------------------------------------------------------------------- pressure


async def test_pressure_callbacks_fire_once_per_level_change() -> None:
    cache = new_cache(num_blocks=10)
    plain: list[tuple[PressureEvent, int]] = []
    from_async: list[PressureEvent] = []

    def on_plain(ev: PressureEvent) -> None:
        plain.append((ev, threading.get_ident()))

    async def on_async(ev: PressureEvent) -> None:
        await anyio.sleep(0)
        from_async.append(ev)

    cache.on_pressure(on_plain)
    cache.on_pressure(on_async)
    assert cache.pressure_level == LOW
    await cache.allocate("big", toks(1000, 28))  # 7 used, 3/10 free: still LOW
    await anyio.sleep(0.02)
    assert plain == [] and cache.pressure_level == LOW
    await cache.allocate("s0", toks(0, 4))  # 2/10 free: HIGH
    await cache.allocate("s1", toks(10, 4))  # 1/10 free: not below 0.1, still HIGH
    assert cache.pressure_level == HIGH
    await cache.allocate("s2", toks(20, 4))  # 0 free: CRITICAL
    assert cache.pressure_level == CRITICAL
    await cache.deallocate("s2")  # 1 free (evictable): HIGH
    await cache.deallocate("s1")  # 2 free: HIGH
    await cache.deallocate("big")  # 9 free: LOW
    assert cache.pressure_level == LOW
    await wait_until(lambda: len(plain) >= 4 and len(from_async) >= 4)
    await anyio.sleep(0.02)
    want = [
        PressureEvent(HIGH, LOW, 2, 0, 10, 0),
        PressureEvent(CRITICAL, HIGH, 0, 0, 10, 0),
        PressureEvent(HIGH, CRITICAL, 1, 1, 10, 0),
        PressureEvent(LOW, HIGH, 9, 9, 10, 0),
    ]
    assert [ev for ev, _ in plain] == want
    assert from_async == want
    assert {tid for _, tid in plain} == {threading.get_ident()}
    assert cache.stats().callback_errors == 0


async def test_waiting_makes_pressure_critical() -> None:
    cache = new_cache(num_blocks=10)
    got: list[PressureEvent] = []
    cache.on_pressure(got.append)
    await cache.allocate("a", toks(0, 20))  # 5 of 10 used: LOW
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.allocate, "w", toks(100, 24))  # 6 blocks: waits
        await wait_until(lambda: len(got) == 1)
        assert got[0] == PressureEvent(CRITICAL, LOW, 5, 0, 10, 6)
        assert cache.pressure_level == CRITICAL
        await cache.deallocate("a")
    await wait_until(lambda: len(got) == 2)
    # w holds 6 of 10 blocks; a's 5 blocks were cached, 1 of them evicted: 4/10 free
    assert got[1] == PressureEvent(LOW, CRITICAL, 4, 4, 10, 0)


async def test_raising_callback_is_counted_and_the_engine_carries_on(caplog) -> None:
    cache = new_cache(num_blocks=10)
    good: list[PressureEvent] = []

    def bad(ev: PressureEvent) -> None:
        raise RuntimeError("callback failure")

    async def bad_async(ev: PressureEvent) -> None:
        raise RuntimeError("async callback failure")

    cache.on_pressure(bad)
    cache.on_pressure(bad_async)
    cache.on_pressure(good.append)
    await cache.allocate("a", toks(0, 32))  # 8/10 used: HIGH
    await wait_until(lambda: cache.stats().callback_errors == 2)
    assert [ev.level for ev in good] == [HIGH]
    await cache.deallocate("a")  # LOW again
    await wait_until(lambda: cache.stats().callback_errors == 4)
    assert [ev.level for ev in good] == [HIGH, LOW]
    h = await cache.allocate("b", toks(100, 8))
    assert h.num_blocks == 2
    assert "callback failure" in caplog.text
    assert_idle(cache)


async def test_subscription_cancel_stops_delivery() -> None:
    cache = new_cache(num_blocks=10)
    a: list[PressureEvent] = []
    b: list[PressureEvent] = []
    sub_a = cache.on_pressure(a.append)
    cache.on_pressure(b.append)
    await cache.allocate("x", toks(0, 32))
    await wait_until(lambda: len(a) == 1 and len(b) == 1)
    assert sub_a.active
    sub_a.cancel()
    sub_a.cancel()  # idempotent
    assert not sub_a.active
    await cache.deallocate("x")
    await wait_until(lambda: len(b) == 2)
    await anyio.sleep(0.02)
    assert len(a) == 1


async def test_critical_callback_that_frees_blocks_unblocks_a_waiter() -> None:
    cache = new_cache(num_blocks=10)
    await cache.allocate("victim", toks(0, 16))  # 4 blocks
    await cache.allocate("keep", toks(100, 16))  # 4 blocks
    fired: list[PressureLevel] = []

    async def shed(ev: PressureEvent) -> None:
        fired.append(ev.level)
        if ev.level == CRITICAL and "victim" in cache:
            await cache.deallocate("victim")

    cache.on_pressure(shed)
    with anyio.fail_after(5):
        h = await cache.allocate("w", toks(200, 16))  # 4 blocks, 2 free: waits
    assert h.num_blocks == 4
    assert "victim" not in cache and CRITICAL in fired
    assert_idle(cache)


async def test_close_while_waiting_raises_cache_closed() -> None:
    cache = new_cache()
    await fill_one_block_each(cache, 8)
    errors: list[BaseException] = []

    async def waiter(rid: str) -> None:
        try:
            await cache.allocate(rid, [1, 2, 3])
        except CacheClosedError as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "w1")
        tg.start_soon(waiter, "w2")
        await wait_until(lambda: cache.stats().num_waiting == 2)
        cache.close()
    assert len(errors) == 2
    with pytest.raises(CacheClosedError):
        await cache.allocate("w3", [1])


# ----------------------------------------------------------------------------- stress


@pytest.mark.slow
async def test_stress_many_tasks_compete_for_few_blocks() -> None:
    rng = random.Random(1234)
    cache = new_cache(num_blocks=100, enable_prefix_cache=True)
    total = 100
    scopes: dict[int, anyio.CancelScope] = {}
    outcome = {"ok": 0, "timeout": 0, "extended": 0, "cancelled": 0}

    async def use_blocks(rid: str, tokens: list[int], timeout: float | None, hold: float):
        try:
            await cache.allocate(rid, tokens, timeout=timeout)
        except OutOfBlocksError:
            outcome["timeout"] += 1
            return
        try:
            outcome["ok"] += 1
            await anyio.sleep(hold)
            if rng.random() < 0.3:
                try:
                    await cache.extend(rid, rng.randint(1, 12), timeout=0.01)
                    outcome["extended"] += 1
                except OutOfBlocksError:
                    pass
                await anyio.sleep(hold)
        finally:
            await cache.deallocate(rid)  # never suspends, so it runs even when cancelled

    async def worker(i: int) -> None:
        n = rng.randint(1, 40)
        # a few shared prefixes so the prefix cache and eviction take part
        base = (i % 7) * 1000 if rng.random() < 0.5 else 100_000 + i * 50
        timeout = rng.choice([None, 0, 0.001, 0.01, 0.05, 0.2])
        hold = rng.random() * 0.01
        await anyio.sleep(rng.random() * 0.05)
        with anyio.CancelScope() as scope:
            scopes[i] = scope
            try:
                await use_blocks(f"r{i}", toks(base, n), timeout, hold)
            finally:
                del scopes[i]
        if scope.cancelled_caught:
            outcome["cancelled"] += 1

    async def canceller() -> None:
        for _ in range(300):
            await anyio.sleep(rng.random() * 0.002)
            if scopes:
                scopes[rng.choice(list(scopes))].cancel()

    t0 = time.monotonic()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(worker, i)
            tg.start_soon(canceller)
    s = cache.stats()
    assert s.device.free_blocks == total
    assert s.device.used_blocks == 0
    assert s.num_sequences == 0 and s.num_waiting == 0 and len(cache) == 0
    assert s.pressure_level == LOW
    check_invariants(cache)
    assert outcome["ok"] > 100 and outcome["timeout"] > 50 and outcome["cancelled"] > 20, outcome
    assert s.preempted_waits > 100 and s.evicted_blocks > 0 and s.full_reused_blocks > 0
    assert time.monotonic() - t0 < 30
