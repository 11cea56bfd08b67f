"""`set_compute_stream` on the CPU: what it accepts, what it refuses (and that a refusal
changes nothing). The GPU side, copies ordered against a busy stream, is in test_cuda.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import ferrumkv


def cpu_cache() -> ferrumkv.KvCache:
    return ferrumkv.KvCache(
        ferrumkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, num_blocks=8)
    )


def test_a_cpu_cache_takes_only_the_default_stream() -> None:
    with cpu_cache() as cache:
        assert cache.compute_stream == 0
        cache.set_compute_stream(None)
        cache.set_compute_stream(0)
        assert cache.compute_stream == 0
        with pytest.raises(ValueError, match="no CUDA streams"):
            cache.set_compute_stream(0x5A5A)
        assert cache.compute_stream == 0


@pytest.mark.parametrize(
    ("stream", "error", "match"),
    [
        (-1, ValueError, "handle >= 0"),
        ("stream", TypeError, "torch.cuda.Stream"),
        (1.5, TypeError, "not float"),
        (True, TypeError, "not bool"),
        # A stream object of another device than the cache's is refused before its handle
        # is used (this cache is on the CPU).
        (
            SimpleNamespace(cuda_stream=7, device=SimpleNamespace(type="cuda", index=0)),
            ValueError,
            "cache's device is cpu",
        ),
    ],
)
def test_bad_streams_are_refused(stream: object, error: type[Exception], match: str) -> None:
    with cpu_cache() as cache:
        with pytest.raises(error, match=match):
            cache.set_compute_stream(stream)
        assert cache.compute_stream == 0


def test_a_closed_cache_refuses_a_stream() -> None:
    cache = cpu_cache()
    cache.close()
    with pytest.raises(ferrumkv.CacheClosedError):
        cache.set_compute_stream(None)


def test_a_gpu_failure_is_a_copy_error() -> None:
    # Callers that catch CopyError (a failed copy undoes its call) also catch a GPU fault.
    assert issubclass(ferrumkv.CudaError, ferrumkv.CopyError)
    assert issubclass(ferrumkv.CudaError, ferrumkv.FerrumKVError)
