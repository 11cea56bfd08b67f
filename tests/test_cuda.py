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
