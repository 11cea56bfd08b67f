"""The CUDA device tier (marker `cuda`: runs only where an NVIDIA driver is present).

Run on a GPU machine with `python -m pytest -m cuda`.
"""

from __future__ import annotations

import numpy as np
import pytest

import ferrumkv

pytestmark = pytest.mark.cuda


def cuda_cache(**overrides) -> ferrumkv.KvCache:
    kw = dict(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, num_blocks=64)
    kw.update(overrides)
    return ferrumkv.KvCache(ferrumkv.CacheConfig(device="cuda:0", **kw))


def rand_kv(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 64)).astype(np.float16)


def test_allocation_and_kv_round_trip_on_the_gpu() -> None:
    with cuda_cache() as cache:
        h = cache.try_allocate("a", list(range(40)))
        assert h.block_ids == (0, 1, 2)
        k, v = rand_kv(40, 1), rand_kv(40, 2)
        cache.write_kv("a", 1, 0, k, v)
        k2, v2 = cache.read_kv("a", 1, 0, 40)
        assert np.array_equal(k, k2) and np.array_equal(v, v2)


def test_kv_view_in_torch_is_on_the_gpu_and_shares_memory() -> None:
    import torch

    with cuda_cache() as cache:
        h = cache.try_allocate("a", list(range(20)))
        view = cache.kv_view(0)
        assert view.__dlpack_device__() == (2, 0)
        t = torch.from_dlpack(view)
        assert t.is_cuda and tuple(t.shape) == (64, 2, 16, 4, 64)
        block, slot = h.block_ids[17 // 16], 17 % 16
        t[block, 1, slot] = 3.0  # V of token 17, written by a CUDA kernel
        torch.cuda.synchronize()
        _, v = cache.read_kv("a", 0, 17, 1)
        assert np.all(v == 3.0)


def test_swap_round_trip_through_pinned_memory() -> None:
    with cuda_cache(host_blocks=64) as cache:
        cache.try_allocate("a", list(range(100)))
        k = rand_kv(100, 3)
        cache.write_kv("a", 0, 0, k, k)

        async def swap() -> None:
            out = await cache.swap_out("a")
            assert out.tier == "host"
            back = await cache.swap_in("a")
            assert back.tier == "device"

        import asyncio

        asyncio.run(swap())
        k2, _ = cache.read_kv("a", 0, 0, 100)
        assert np.array_equal(k, k2)
        s = cache.stats()
        assert (s.d2h_blocks_copied, s.h2d_blocks_copied) == (7, 7)


def test_offload_and_onboard_between_gpu_and_pinned_host() -> None:
    with cuda_cache(num_blocks=3, host_blocks=8) as cache:
        cache.try_allocate("a", list(range(33)))
        k = rand_kv(33, 4)
        cache.write_kv("a", 0, 0, k, k)
        cache._core.deallocate("a")
        cache.try_allocate("b", list(range(500, 548)))  # evicts a's 2 cached blocks
        cache._core.deallocate("b")
        assert cache.stats().offload_blocks == 2
        h = cache.try_allocate("a2", list(range(33)))
        assert h.num_cached_tokens == 32
        assert cache.stats().onboard_blocks == 2
        k2, _ = cache.read_kv("a2", 0, 0, 32)
        assert np.array_equal(k[:32], k2)


# ----- stream ordering (README "Ordering on a GPU") ----------------------------------------
# Each test keeps the compute stream busy (`torch.cuda._sleep` spins the GPU for a number of
# cycles: 200M is about 100 ms on a 2 GHz GPU) before the kernel that writes K/V, then asks
# for a copy at once. Without the protocol's fences the copy stream would run the copy while
# the compute stream still sleeps, and the bytes would be wrong; nothing synchronizes here.

SLEEP_CYCLES = 200_000_000


def test_a_swap_copies_the_kv_a_queued_kernel_writes() -> None:
    import asyncio

    import torch

    with cuda_cache(host_blocks=64) as cache:
        s = torch.cuda.Stream()
        cache.set_compute_stream(s)
        assert cache.compute_stream == s.cuda_stream
        h = cache.try_allocate("a", list(range(100)))
        t = torch.from_dlpack(cache.kv_view(0))
        with torch.cuda.stream(s):
            blocks = torch.as_tensor(h.block_ids, device="cuda")
            torch.cuda._sleep(SLEEP_CYCLES)
            t[blocks] = 7.0  # K and V of layer 0, written after the sleep

        async def swap() -> None:
            assert (await cache.swap_out("a")).tier == "host"
            assert (await cache.swap_in("a")).tier == "device"

        asyncio.run(swap())
        k, v = cache.read_kv("a", 0, 0, 100)
        assert np.all(k == 7.0) and np.all(v == 7.0)


def test_kernels_after_an_onboard_read_the_onboarded_bytes() -> None:
    import torch

    # 128 KiB blocks; 256 of them onboarded at once (32 MiB), then read by a kernel enqueued
    # right after the allocation returns.
    n = 256
    kw = dict(num_layers=2, num_kv_heads=8, head_dim=128, block_size=16)
    with cuda_cache(num_blocks=n + 8, host_blocks=2 * n + 8, **kw) as cache:
        s = torch.cuda.Stream()
        cache.set_compute_stream(s)
        prompt = list(range(n * 16))
        h = cache.try_allocate("a", prompt)
        t = torch.from_dlpack(cache.kv_view(1))
        with torch.cuda.stream(s):
            data = torch.randn((n, 2, 16, 8, 128), device="cuda", dtype=torch.float16)
            t[torch.as_tensor(h.block_ids, device="cuda")] = data
        cache._core.deallocate("a")
        cache.try_allocate("b", list(range(10**6, 10**6 + n * 16)))  # offloads a's blocks
        cache._core.deallocate("b")
        with torch.cuda.stream(s):
            torch.cuda._sleep(SLEEP_CYCLES)
        h2 = cache.try_allocate("a2", prompt)  # offloads b's, onboards a's: 62 MiB queued
        # 255 full blocks hit (the last one is computed again): 8 stayed on the device (b
        # took the 8 free blocks first), 247 come back from the host tier.
        assert h2.num_cached_tokens == (n - 1) * 16
        assert cache.stats().onboard_blocks == n - 9
        with torch.cuda.stream(s):
            got = t[torch.as_tensor(h2.block_ids, device="cuda")].clone()
        s.synchronize()
        full = h2.num_cached_tokens // 16
        assert torch.equal(got[:full], data[:full])


def test_copy_on_write_copies_what_a_queued_kernel_wrote() -> None:
    import asyncio

    import torch

    with cuda_cache() as cache:
        s = torch.cuda.Stream()
        cache.set_compute_stream(s)
        h = cache.try_allocate("p", list(range(20)))  # block 1 holds tokens 16..19
        t = torch.from_dlpack(cache.kv_view(0))
        with torch.cuda.stream(s):
            torch.cuda._sleep(SLEEP_CYCLES)
            t[h.block_ids[1]] = 5.0

        async def fork_and_append() -> None:
            await cache.fork("p", "c")
            c = await cache.extend("c", [99])  # copy-on-write of the shared partial block
            assert c.block_ids[1] != h.block_ids[1]

        asyncio.run(fork_and_append())
        k, v = cache.read_kv("c", 0, 16, 4)
        assert np.all(k == 5.0) and np.all(v == 5.0)
        assert cache.stats().intra_device_copy_blocks >= 1


def test_a_failed_swap_copy_on_the_gpu_undoes_the_swap() -> None:
    import asyncio

    with cuda_cache(host_blocks=64) as cache:
        cache.try_allocate("a", list(range(40)))
        k = rand_kv(40, 5)
        cache.write_kv("a", 0, 0, k, k)
        cache._core.inject_copy_faults(1)

        async def swap() -> None:
            with pytest.raises(ferrumkv.CopyError):
                await cache.swap_out("a")

        asyncio.run(swap())
        assert cache.get("a").tier == "device"
        k2, _ = cache.read_kv("a", 0, 0, 40)
        assert np.array_equal(k, k2)
