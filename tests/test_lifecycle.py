"""A `KvCache` dropped without `close()` is closed by garbage collection, under asyncio and
trio, even after a waiting call made the event loop watch its eventfd: the loop holds the
cache only weakly, and the collected cache's engine is closed (its threads joined, its
eventfd closed, its disk file's lock released), with a warning that close() was skipped.
A cache closed explicitly warns about nothing."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import warnings
import weakref
from pathlib import Path

import anyio
import pytest

import ferrumkv
from helpers import make_config, wait_until


def num_threads() -> int:
    """This process's threads that Python did not start (the engine's among them; trio and
    asyncio start Python threads of their own as they please)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def disk_config(tmp_path: Path) -> ferrumkv.CacheConfig:
    return make_config(
        num_blocks=4, host_blocks=2, disk_path=str(tmp_path / "kv.bin"), disk_blocks=8
    )


def ours(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> list[logging.LogRecord]:
    """The records logged about the test's cache (caches other tests dropped may be
    collected meanwhile, and warn too)."""
    return [r for r in caplog.records if r.name == "ferrumkv" and str(tmp_path) in r.getMessage()]


async def wait_for_blocks(cache: ferrumkv.KvCache) -> None:
    await cache.allocate("waiter", list(range(100, 104)))


async def use_and_drop(
    tmp_path: Path, threads_before: int
) -> tuple[weakref.ref[ferrumkv.KvCache], int]:
    """Makes a cache, waits for blocks on it (so the loop watches its eventfd), and drops it
    without close(). Returns a weak reference to it and its eventfd's number."""
    cache = ferrumkv.KvCache(disk_config(tmp_path))
    for i in range(4):
        assert cache.try_allocate(f"fill{i}", list(range(4 * i, 4 * i + 4))) is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_blocks, cache)
        await wait_until(lambda: cache.stats().num_waiting == 1)
        await cache.deallocate("fill0")
    assert "waiter" in cache
    assert num_threads() > threads_before  # copier, disk writers, disk reader
    ref, fd = weakref.ref(cache), cache._core.notify_fd
    os.fstat(fd)  # open
    return ref, fd


@pytest.mark.anyio
async def test_a_dropped_cache_is_collected_and_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gc.collect()
    threads_before = num_threads()
    caplog.set_level(logging.WARNING, logger="ferrumkv")
    with pytest.warns(ResourceWarning, match="without close"):
        ref, fd = await use_and_drop(tmp_path, threads_before)
        gc.collect()
        assert ref() is None, "the loop let the cache go"
    # The loop lets go of the fd (a trio watcher wakes, sees it closing and ends).
    for _ in range(10):
        await anyio.sleep(0)
    with pytest.raises(OSError):
        os.fstat(fd)
    assert num_threads() == threads_before, "the engine's threads were joined"
    dropped = [r for r in ours(caplog, tmp_path) if "without close" in r.getMessage()]
    assert len(dropped) == 1, caplog.records
    assert dropped[0].levelno == logging.WARNING
    # The disk file's lock is free again: a new cache takes the file over.
    with ferrumkv.KvCache(disk_config(tmp_path)) as again:
        assert again.try_allocate("a", [1, 2, 3, 4, 5]) is not None


@pytest.mark.anyio
async def test_a_closed_cache_warns_about_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ferrumkv")
    cache = ferrumkv.KvCache(disk_config(tmp_path))
    cache.try_allocate("a", [1, 2, 3, 4])
    with pytest.raises(ferrumkv.OutOfBlocksError, match="within"):  # waited, timed out
        await cache.allocate("b", list(range(100, 116)), timeout=0.01)
    cache.close()
    ref = weakref.ref(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del cache
        gc.collect()
    assert ref() is None
    assert not ours(caplog, tmp_path)


def test_a_dropped_cache_that_never_saw_a_loop_is_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ferrumkv")
    cache = ferrumkv.KvCache(disk_config(tmp_path))
    fd = cache._core.notify_fd
    with pytest.warns(ResourceWarning, match="without close"):
        del cache  # no cycle: reference counting alone collects it
    with pytest.raises(OSError):
        os.fstat(fd)
    assert len(ours(caplog, tmp_path)) == 1, "the warning says which cache"
    ferrumkv.KvCache(disk_config(tmp_path)).close()


async def attached_cache(tmp_path: Path) -> tuple[ferrumkv.KvCache, int]:
    """A cache whose eventfd the running loop watches (after a wait that timed out)."""
    cache = ferrumkv.KvCache(disk_config(tmp_path))
    for i in range(4):
        cache.try_allocate(f"fill{i}", list(range(4 * i, 4 * i + 4)))
    with pytest.raises(ferrumkv.OutOfBlocksError, match="within"):
        await cache.allocate("w", [7, 7, 7, 7], timeout=0.01)
    return cache, cache._core.notify_fd


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cache_dropped_off_its_loops_thread_is_detached_by_that_loop(
    tmp_path: Path, backend: str
) -> None:
    """The loop runs in another thread; the last reference goes in this one. The loop's
    thread lets go of the fd (asyncio: removes its reader; trio: the watcher wakes and
    ends) before the fd is closed, and keeps running."""
    handed: list[tuple[ferrumkv.KvCache, int]] = []
    ready, done = threading.Event(), threading.Event()
    still_running: list[bool] = []

    async def loop_side() -> None:
        handed.append(await attached_cache(tmp_path))
        ready.set()
        while not done.is_set():
            await anyio.sleep(0.001)
        still_running.append(True)

    t = threading.Thread(target=anyio.run, args=(loop_side,), kwargs={"backend": backend})
    t.start()
    try:
        assert ready.wait(10)
        cache, fd = handed.pop()
        ref = weakref.ref(cache)
        with pytest.warns(ResourceWarning, match="without close"):
            del cache
            gc.collect()
        assert ref() is None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.fstat(fd)
            except OSError:
                break
            time.sleep(0.001)
        else:
            pytest.fail("the fd was never closed")
        ferrumkv.KvCache(disk_config(tmp_path)).close()  # the lock is free
    finally:
        done.set()
        t.join(10)
    assert still_running == [True]
