"""Interpreter exit with calls still waiting for blocks must be clean: 50 interpreters
(half asyncio, half trio) fill a cache, leave waiters that are never served, and end the
loop normally or by SystemExit. None may abort, crash or be killed by a signal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

COMMON = """
import sys
import ferrumkv

cfg = ferrumkv.CacheConfig(
    num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, num_blocks=16
)
WAITERS = {waiters}
HOW = {how!r}


def fill(cache):
    i = 0
    while cache.try_allocate(f"fill{{i}}", [i * 4 + 1, i * 4 + 2, i * 4 + 3, i * 4 + 4]):
        i += 1
    assert cache.stats().device.free_blocks == 0


def report(cache):
    print("waiting", cache.stats().num_waiting, flush=True)
"""

ASYNCIO = """
import asyncio


async def main():
    cache = ferrumkv.KvCache(cfg)
    if HOW.endswith("+pressure"):
        cache.on_pressure(lambda ev: None)
    fill(cache)
    tasks = [
        asyncio.ensure_future(cache.allocate(f"w{{i}}", [7] * 9, timeout=None if i % 2 else 3600))
        for i in range(WAITERS)
    ]
    while cache.stats().num_waiting < WAITERS:
        await asyncio.sleep(0.001)
    report(cache)
    if HOW.startswith("exit"):
        raise SystemExit(0)
    if HOW.startswith("return"):
        return tasks  # asyncio.run cancels the pending tasks
    if HOW.startswith("close"):
        cache.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        return None
    return None


if HOW.startswith("abandon"):
    # run the loop until main is done and leave it (and the tasks) pending at exit
    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
else:
    asyncio.run(main())
"""

TRIO = """
import trio


async def waiter(cache, rid):
    try:
        await cache.allocate(rid, [7] * 9)
    except ferrumkv.CacheClosedError:
        return
    raise AssertionError("a waiter was served")


async def main():
    cache = ferrumkv.KvCache(cfg)
    if HOW.endswith("+pressure"):
        cache.on_pressure(lambda ev: None)
    fill(cache)
    if HOW.startswith(("exit", "abandon")):
        # waiters as system tasks: trio cancels them when main ends
        for i in range(WAITERS):
            trio.lowlevel.spawn_system_task(waiter, cache, f"w{{i}}")
        while cache.stats().num_waiting < WAITERS:
            await trio.sleep(0.001)
        report(cache)
        if HOW.startswith("exit"):
            raise SystemExit(0)
        return
    async with trio.open_nursery() as nursery:
        for i in range(WAITERS):
            nursery.start_soon(waiter, cache, f"w{{i}}")
        while cache.stats().num_waiting < WAITERS:
            await trio.sleep(0.001)
        report(cache)
        if HOW.startswith("close"):
            cache.close()  # the waiters fail with CacheClosedError
        else:
            nursery.cancel_scope.cancel()


trio.run(main)
"""

VARIANTS = ["exit", "return", "close", "abandon", "exit+pressure", "return+pressure"]


def script(backend: str, how: str, waiters: int) -> str:
    body = ASYNCIO if backend == "asyncio" else TRIO
    return textwrap.dedent(COMMON + body).format(waiters=waiters, how=how)


def run_one(args: tuple[str, str, int]) -> tuple[tuple[str, str, int], int, str, str]:
    backend, how, waiters = args
    proc = subprocess.run(
        [sys.executable, "-c", script(backend, how, waiters)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return args, proc.returncode, proc.stdout, proc.stderr


def test_exit_with_pending_waiters_is_clean() -> None:
    cases = [
        ("asyncio" if i % 2 == 0 else "trio", VARIANTS[(i // 2) % len(VARIANTS)], 1 + i % 5)
        for i in range(50)
    ]
    assert sum(b == "trio" for b, _, _ in cases) == 25
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run_one, cases))
    bad = []
    for (backend, how, waiters), rc, out, err in results:
        if (
            rc != 0
            or f"waiting {waiters}" not in out
            or "panicked" in err
            or "Fatal Python error" in err
        ):
            bad.append(f"{backend}/{how}/{waiters}: rc={rc} out={out!r} err={err[-800:]!r}")
    assert not bad, "\n".join(bad)
