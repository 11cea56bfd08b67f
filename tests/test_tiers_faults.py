"""Bad inputs and faults of the tiers: a full host tier, disk I/O errors and corruption, closed
caches, cancellations; every failed call gives back what it took.

Shared setup: `tiers_helpers` (what goes where, the helpers).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

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
    alloc,
    assert_stats_unchanged,
    check_invariants,
    dealloc,
    drive,
    make_config,
    stats_dict,
    wait_until,
)
from tiers_helpers import (
    BPB,
    HEAD_DIM,
    HEADS,
    LAYERS,
    alloc_from_disk,
    assert_all_unused,
    assert_reads,
    assert_tiers_consistent,
    big_cache,
    checkpoints_until,
    delta,
    disk_cache,
    disk_config,
    fill,
    flipped,
    random_kv,
    same_bits,
    spill_chain,
)


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
