"""Pressure callbacks on time: a plain callback has run before the call that changed the
level returns to its caller (in the caller's task, on the loop's thread, not under the
engine lock); `async def` callbacks are scheduled at once, each subscriber's in level
order, and a slow subscriber never delays another. Each test observes the exact sequence of
transitions right after each call, without yielding to the event loop first."""

from __future__ import annotations

import threading

import anyio
import pytest

from ferrumkv import PressureEvent, PressureLevel
from helpers import drive, new_cache, wait_until

pytestmark = pytest.mark.anyio

LOW, HIGH, CRITICAL = PressureLevel.LOW, PressureLevel.HIGH, PressureLevel.CRITICAL


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


async def test_plain_callbacks_have_run_when_each_call_returns() -> None:
    cache = new_cache(num_blocks=10)
    got: list[PressureEvent] = []
    tasks: list[object] = []

    def on(ev: PressureEvent) -> None:
        got.append(ev)
        tasks.append(anyio.get_current_task().id)

    cache.on_pressure(on)
    await cache.allocate("big", toks(1000, 28))  # 7 of 10 blocks: 3/10 free, LOW
    assert got == []
    await cache.allocate("s0", toks(0, 4))  # 2/10 free: HIGH
    assert got == [PressureEvent(HIGH, LOW, 2, 0, 10, 0)]
    assert cache.try_allocate("s1", toks(10, 4)) is not None  # 1/10: still HIGH
    assert len(got) == 1
    await cache.extend_batch(["s1"], [99])  # s1's block 1 of 2 tokens: 0 free, CRITICAL
    assert got[1:] == [PressureEvent(CRITICAL, HIGH, 0, 0, 10, 0)]
    await cache.deallocate("s1")  # 2 free (its full block stays cached): HIGH
    assert got[2:] == [PressureEvent(HIGH, CRITICAL, 2, 1, 10, 0)]
    await cache.deallocate("big")  # 9 free, 8 of them evictable: LOW
    assert got[3:] == [PressureEvent(LOW, HIGH, 9, 8, 10, 0)]
    # every one ran in this very task (not later, from the loop's fd reader)
    assert tasks == [anyio.get_current_task().id] * 4


async def test_chunks_and_truncate_deliver_before_they_return() -> None:
    cache = new_cache(num_blocks=10)
    got: list[PressureEvent] = []
    cache.on_pressure(got.append)
    await cache.allocate("big", toks(1000, 28))  # 7 of 10 blocks: LOW
    await cache.allocate("c", toks(0, 12), num_new_tokens=4)  # its first chunk: 2 free, HIGH
    assert got == [PressureEvent(HIGH, LOW, 2, 0, 10, 0)]
    await cache.extend("c", num_new_tokens=8)  # the rest of its prompt: 0 free, CRITICAL
    assert got[1:] == [PressureEvent(CRITICAL, HIGH, 0, 0, 10, 0)]
    h = await cache.truncate("c", 4)  # its two full blocks past the end stay cached: HIGH
    assert h.num_tokens == 4
    assert got[2:] == [PressureEvent(HIGH, CRITICAL, 2, 2, 10, 0)]


async def test_a_call_that_waits_reports_critical_before_it_suspends() -> None:
    cache = new_cache(num_blocks=10)
    got: list[tuple[PressureEvent, int]] = []
    cache.on_pressure(lambda ev: got.append((ev, cache.num_waiting)))
    await cache.allocate("a", toks(0, 20))  # 5 of 10 used: LOW
    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            await cache.allocate("w", toks(100, 24))  # 6 blocks: waits

        tg.start_soon(waiter)
        await wait_until(lambda: cache.num_waiting == 1)
        assert got == [(PressureEvent(CRITICAL, LOW, 5, 0, 10, 6), 1)]
        await cache.deallocate("a")  # the waiter is granted: its blocks are reserved now
        # w holds 6 of 10 blocks; a's 5 blocks were cached, 1 of them evicted: 4/10 free
        assert got[1:] == [(PressureEvent(LOW, CRITICAL, 4, 4, 10, 0), 0)]
    assert cache.get("w").num_blocks == 6
    assert len(got) == 2


async def test_a_callback_that_frees_blocks_keeps_every_subscriber_in_order() -> None:
    cache = new_cache(num_blocks=10)
    first: list[PressureEvent] = []
    second: list[PressureEvent] = []

    def shed(ev: PressureEvent) -> None:
        first.append(ev)
        if ev.level == CRITICAL and "victim" in cache:
            drive(cache.deallocate("victim"))  # a nested level change

    cache.on_pressure(shed)
    cache.on_pressure(second.append)
    await cache.allocate("victim", toks(0, 16))  # 4 blocks: 6/10 free, LOW
    await cache.allocate("keep", toks(100, 16))  # 2/10 free: HIGH
    await cache.allocate("x", toks(200, 8))  # 0 free: CRITICAL; shed frees 4: LOW
    want = [
        PressureEvent(HIGH, LOW, 2, 0, 10, 0),
        PressureEvent(CRITICAL, HIGH, 0, 0, 10, 0),
        PressureEvent(LOW, CRITICAL, 4, 4, 10, 0),
    ]
    assert first == want
    assert second == want


async def test_async_callbacks_run_in_order_and_a_slow_one_delays_no_other() -> None:
    cache = new_cache(num_blocks=10)
    gate = anyio.Event()
    slow: list[PressureLevel] = []
    fast: list[PressureLevel] = []
    plain: list[PressureLevel] = []

    async def on_slow(ev: PressureEvent) -> None:
        slow.append(ev.level)
        await gate.wait()  # stuck on its first transition until the gate opens

    async def on_fast(ev: PressureEvent) -> None:
        await anyio.sleep(0)
        fast.append(ev.level)

    cache.on_pressure(on_slow)
    cache.on_pressure(on_fast)
    cache.on_pressure(lambda ev: plain.append(ev.level))
    await cache.allocate("a", toks(0, 32))  # 8 of 10: HIGH
    await cache.allocate("b", toks(100, 8))  # 10 of 10: CRITICAL
    await cache.deallocate("b")  # 2 free: HIGH
    await cache.deallocate("a")  # LOW
    order = [HIGH, CRITICAL, HIGH, LOW]
    assert plain == order  # the plain subscriber, at once
    await wait_until(lambda: len(fast) == 4)
    assert fast == order  # the fast one, while the slow one is stuck on its first
    assert slow == [HIGH]
    gate.set()
    await wait_until(lambda: len(slow) == 4)
    assert slow == order
    assert cache.stats().callback_errors == 0


async def test_async_callbacks_start_without_waiting_for_the_loop_to_poll() -> None:
    cache = new_cache(num_blocks=10)
    started: list[PressureLevel] = []

    async def on(ev: PressureEvent) -> None:
        started.append(ev.level)

    cache.on_pressure(on)
    await cache.allocate("a", toks(0, 32))  # HIGH
    # Queued on its subscriber's task at once: a few scheduler turns run it, without the
    # event loop polling the engine's fd.
    for _ in range(20):
        if started:
            break
        await anyio.lowlevel.checkpoint()
    assert started == [HIGH]


async def test_calls_from_another_thread_deliver_on_the_loop_thread() -> None:
    cache = new_cache(num_blocks=10)
    threads: list[int] = []
    cache.on_pressure(lambda ev: threads.append(threading.get_ident()))
    h = await anyio.to_thread.run_sync(lambda: cache.try_allocate("t", toks(0, 32)))
    assert h is not None  # 8 of 10 blocks: HIGH, delivered through the fd
    await wait_until(lambda: len(threads) == 1)
    assert threads == [threading.get_ident()]


async def test_a_callback_may_call_the_cache() -> None:
    cache = new_cache(num_blocks=10)
    seen: list[tuple[PressureLevel, int, int]] = []
    cache.on_pressure(
        lambda ev: seen.append((ev.level, cache.num_free_blocks, cache.stats().num_sequences))
    )
    with anyio.fail_after(5):  # under the engine lock this would deadlock
        await cache.allocate("a", toks(0, 32))
    assert seen == [(HIGH, 2, 1)]


def test_without_a_loop_plain_callbacks_run_and_async_ones_are_counted() -> None:
    cache = new_cache(num_blocks=10)
    got: list[PressureLevel] = []

    async def on_async(ev: PressureEvent) -> None:  # pragma: no cover - never awaited
        got.append(ev.level)

    cache.on_pressure(lambda ev: got.append(ev.level))
    cache.on_pressure(on_async)
    assert cache.try_allocate("a", toks(0, 32)) is not None  # HIGH
    assert got == [HIGH]
    # no loop can run the coroutine: it is closed (no 'never awaited' warning) and counted
    assert cache.stats().callback_errors == 1
