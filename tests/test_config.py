"""CacheConfig: validation (every bad value names its field), types, sizing, CUDA errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ferrumkv
from ferrumkv import _core
from helpers import SMALL, SMALL_BYTES_PER_BLOCK, make_config

# (overrides, the field the error must name)
BAD_VALUES = [
    ({"num_layers": 0}, "num_layers"),
    ({"num_layers": -1}, "num_layers"),
    ({"num_kv_heads": 0}, "num_kv_heads"),
    ({"num_kv_heads": -2}, "num_kv_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": -64}, "head_dim"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": -16}, "block_size"),
    ({"num_blocks": 0}, "num_blocks"),
    ({"num_blocks": -3}, "num_blocks"),
    ({"num_blocks": None}, "num_blocks"),  # neither num_blocks nor memory_bytes
    ({"num_blocks": 8, "memory_bytes": 4096}, "num_blocks"),  # both
    ({"num_blocks": None, "memory_bytes": 0}, "memory_bytes"),
    ({"num_blocks": None, "memory_bytes": -256}, "memory_bytes"),
    ({"num_blocks": None, "memory_bytes": SMALL_BYTES_PER_BLOCK - 1}, "memory_bytes"),
    ({"host_blocks": -1}, "host_blocks"),
    ({"disk_blocks": -1}, "disk_blocks"),
    ({"disk_blocks": 4}, "disk_path"),
    ({"disk_blocks": 4, "disk_path": ""}, "disk_path"),
    ({"high_watermark": 0.3}, "high_watermark"),  # == low_watermark
    ({"high_watermark": 0.5}, "high_watermark"),
    ({"low_watermark": 0.05}, "high_watermark"),  # below the default high_watermark 0.1
    ({"low_watermark": 1.5}, "low_watermark"),
    ({"low_watermark": -0.1}, "low_watermark"),
    ({"low_watermark": float("nan")}, "low_watermark"),
    ({"high_watermark": -0.1}, "high_watermark"),
    ({"dtype": "int4"}, "dtype"),
    ({"dtype": "Float16"}, "dtype"),
    ({"dtype": ""}, "dtype"),
    ({"layout": "row_major"}, "layout"),
    ({"hash_algo": "md5"}, "hash_algo"),
    ({"eviction_policy": "mru"}, "eviction_policy"),
    ({"device": "gpu"}, "device"),
    ({"device": "cuda:"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"device": "cuda:-1"}, "device"),
    ({"device": "CPU"}, "device"),
    ({"device": ""}, "device"),
    ({"residency_sample_rate": 0}, "residency_sample_rate"),
    ({"residency_sample_rate": 0.0}, "residency_sample_rate"),
    ({"residency_sample_rate": 1.5}, "residency_sample_rate"),
    ({"residency_sample_rate": -0.5}, "residency_sample_rate"),
    ({"residency_sample_rate": float("nan")}, "residency_sample_rate"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_VALUES, ids=lambda v: repr(v))
def test_bad_value_raises_value_error_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as err:
        make_config(**overrides)
    assert not isinstance(err.value, ferrumkv.FerrumKVError)


def test_both_or_neither_sizing_message_names_both_fields() -> None:
    for overrides in ({"num_blocks": None}, {"num_blocks": 8, "memory_bytes": 1 << 20}):
        with pytest.raises(ValueError) as err:
            make_config(**overrides)
        assert "num_blocks" in str(err.value) and "memory_bytes" in str(err.value)


def test_range_is_stated_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"num_layers: 0 is outside 1\.\.=4096"):
        make_config(num_layers=0)
    with pytest.raises(ValueError, match=r"low_watermark: 1\.5 is outside \[0, 1\]"):
        make_config(low_watermark=1.5)
    with pytest.raises(ValueError, match=r"residency_sample_rate: 0(\.0)? is outside \(0, 1\]"):
        make_config(residency_sample_rate=0.0)


HUGE_INTS = [
    {"num_layers": 2**70},
    {"num_blocks": 2**64},
    {"num_blocks": None, "memory_bytes": 2**80},
    {"block_size": -(2**70)},
    {"host_blocks": 2**64},
]


def test_out_of_range_huge_int_is_a_value_error_naming_the_field() -> None:
    # Any invalid value raises ValueError naming the field, also past 64 bits.
    wrong = []
    for overrides in HUGE_INTS:
        field = next(k for k, v in overrides.items() if v is not None)
        try:
            make_config(**overrides)
        except ValueError as e:
            if field not in str(e):
                wrong.append((overrides, f"ValueError without the field: {e}"))
        except Exception as e:
            wrong.append((overrides, f"{type(e).__name__}: {e}"))
        else:
            wrong.append((overrides, "accepted"))
    assert not wrong, wrong


# Every size field within its range, float32: one block is 2^59 bytes, so a tier of 8 of them
# (2^62 bytes) is over the largest tier and one of 2^32 - 2 overflows 64 bits.
HUGE_BLOCK = {
    "num_layers": 4096,
    "num_kv_heads": 4096,
    "head_dim": 65536,
    "block_size": 65536,
    "dtype": "float32",
}
TIER_OVERFLOWS = [
    ({"num_blocks": 8}, "num_blocks"),
    ({"num_blocks": 2**32 - 2}, "num_blocks"),
    ({"num_blocks": None, "memory_bytes": 2**63 - 1}, "memory_bytes"),
    ({"num_blocks": 1, "host_blocks": 8}, "host_blocks"),
    ({"num_blocks": 1, "host_blocks": 2**32 - 2}, "host_blocks"),
    (
        {"num_blocks": 1, "host_blocks": 1, "disk_path": "/none/kv", "disk_blocks": 2**32 - 2},
        "disk_blocks",
    ),
]


@pytest.mark.parametrize(("overrides", "field"), TIER_OVERFLOWS, ids=lambda v: repr(v))
def test_tier_bytes_overflow_is_a_value_error_naming_the_field(overrides: dict, field: str) -> None:
    # Checked at validation: no PanicException (a BaseException) from the layout later.
    with pytest.raises(ValueError, match=rf"invalid {field}: .* x bytes_per_block = ") as err:
        make_config(**{**HUGE_BLOCK, **overrides})
    assert str(2**59) in str(err.value)


def test_largest_tier_under_the_limit_is_accepted() -> None:
    cfg = make_config(**HUGE_BLOCK, num_blocks=7)  # 7 x 2^59 bytes < 2^62 (validated only)
    assert cfg.bytes_per_block == 2**59


def test_disk_tier_without_host_tier_is_rejected(tmp_path: Path) -> None:
    # The disk tier only holds blocks spilled from the host tier: without one it would never
    # be written, so the config says so instead of accepting a dead tier.
    disk = {"disk_path": str(tmp_path / "kv.bin"), "disk_blocks": 4}
    with pytest.raises(ValueError, match=r"invalid disk_blocks: .*needs host_blocks > 0"):
        make_config(**disk)
    assert not (tmp_path / "kv.bin").exists()
    assert make_config(**disk, host_blocks=1).disk_blocks == 4


# A child with 1 GiB of address space left builds a cache of 2-byte blocks (uint8, one layer,
# head and slot): a slab or bookkeeping array that does not fit must raise MemoryError, leave
# the process healthy (a small cache still works) and never abort. It runs in a subprocess
# so that a regression (SIGABRT from a failed `vec!`) cannot take pytest down with it.
OOM_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import ferrumkv

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

    tiny = dict(num_layers=1, num_kv_heads=1, head_dim=1, block_size=1, dtype="uint8")
    cfg = ferrumkv.CacheConfig(**tiny, **json.loads(sys.argv[1]))
    limit = vm_bytes() + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        ferrumkv.KvCache(cfg)
    except BaseException as e:
        print(f"{type(e).__name__}: {e}")
    else:
        print("built")
    with ferrumkv.KvCache(ferrumkv.CacheConfig(**tiny, num_blocks=8)) as cache:
        assert cache.try_allocate("r", [1, 2, 3]) is not None
    print("healthy")
    """
)

# (overrides, what the MemoryError names); 2^31 blocks: a 4 GiB slab; 2^28 host blocks: a
# 512 MiB slab that fits, then 1 GiB of pool links that do not.
OOM_CASES = [
    ({"num_blocks": 2**31}, "cannot allocate 4294967296 bytes of host memory"),
    ({"num_blocks": 8, "host_blocks": 2**31}, "host tier (host_blocks=2147483648): cannot"),
    ({"num_blocks": 8, "host_blocks": 2**28}, "host tier (host_blocks=268435456): cannot"),
    ({"num_blocks": 2**28}, "for the block pool"),
]


@pytest.mark.parametrize(("overrides", "named"), OOM_CASES, ids=lambda v: repr(v))
def test_tier_too_large_for_memory_is_a_memory_error(overrides: dict, named: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", OOM_CHILD, json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout.splitlines()
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert out[-1] == "healthy", done.stdout
    assert out[0].startswith("MemoryError: out of memory: "), done.stdout
    assert named in out[0], out[0]


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_layers": "2"},
        {"num_layers": 2.0},
        {"num_layers": None},
        {"num_kv_heads": 2.5},
        {"head_dim": [4]},
        {"block_size": "4"},
        {"num_blocks": 8.0},
        {"num_blocks": None, "memory_bytes": 4096.0},
        {"host_blocks": "0"},
        {"disk_blocks": 1.0},
        {"dtype": 16},
        {"dtype": None},
        {"device": 0},
        {"device": None},
        {"layout": 1},
        {"hash_algo": b"xxh3_128"},
        {"low_watermark": "0.3"},
        {"high_watermark": None},
        {"residency_sample_rate": "1"},
        {"enable_prefix_cache": "yes"},
        {"disk_path": 3},
    ],
    ids=lambda v: repr(v),
)
def test_wrong_type_raises_type_error(overrides: dict) -> None:
    with pytest.raises(TypeError):
        make_config(**overrides)


def test_bool_is_not_an_int_size() -> None:
    # bool is rejected as an int everywhere else in the API (request ids, token ids, salts).
    accepted = []
    for field in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_blocks"):
        try:
            make_config(**{field: True})
        except TypeError:
            continue
        accepted.append(field)
    assert not accepted, f"CacheConfig accepted True for {accepted}"


def test_positional_and_unknown_arguments_are_type_errors() -> None:
    with pytest.raises(TypeError):
        ferrumkv.CacheConfig(2, 2, 4)  # type: ignore[misc]
    with pytest.raises(TypeError, match="bogus"):
        ferrumkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=8, bogus=1)
    with pytest.raises(TypeError):
        ferrumkv.CacheConfig(num_kv_heads=2, head_dim=4, num_blocks=8)  # num_layers missing
    with pytest.raises(TypeError, match="CacheConfig"):
        ferrumkv.KvCache(dict(SMALL))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "itemsize"),
    [("float16", 2), ("bfloat16", 2), ("float32", 4), ("uint8", 1)],
)
def test_bytes_per_block_formula(dtype: str, itemsize: int) -> None:
    cfg = ferrumkv.CacheConfig(
        num_layers=3, num_kv_heads=5, head_dim=8, block_size=16, dtype=dtype, num_blocks=2
    )
    assert cfg.dtype == dtype
    assert cfg.bytes_per_block == 16 * 3 * 2 * 5 * 8 * itemsize
    small = make_config(dtype=dtype)
    assert small.bytes_per_block == 4 * 2 * 2 * 2 * 4 * itemsize
    with pytest.raises(AttributeError):
        small.bytes_per_block = 1  # type: ignore[misc]


def test_defaults() -> None:
    cfg = ferrumkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=128)
    assert cfg.block_size == 16
    assert cfg.dtype == "float16"
    assert cfg.device == "cpu"
    assert cfg.num_blocks == 128
    assert cfg.memory_bytes is None
    assert (cfg.host_blocks, cfg.disk_path, cfg.disk_blocks) == (0, None, 0)
    assert cfg.enable_prefix_cache is True
    assert cfg.hash_algo == "xxh3_128"
    assert (cfg.low_watermark, cfg.high_watermark) == (0.3, 0.1)
    assert cfg.residency_sample_rate == 0.01
    assert cfg.layout == "block_major"
    assert cfg.eviction_policy == "lru"
    assert cfg.bytes_per_block == 16 * 2 * 2 * 2 * 64 * 2


def test_eviction_policies_are_listed_and_accepted() -> None:
    assert ferrumkv.EVICTION_POLICIES == ("lru", "lfu", "lecar", "adaptive", "lru2")
    for name in ferrumkv.EVICTION_POLICIES:
        assert make_config(eviction_policy=name).eviction_policy == name


@pytest.mark.parametrize(
    ("memory_bytes", "num_blocks"),
    [
        (SMALL_BYTES_PER_BLOCK, 1),
        (SMALL_BYTES_PER_BLOCK * 10, 10),
        (SMALL_BYTES_PER_BLOCK * 10 + SMALL_BYTES_PER_BLOCK - 1, 10),
        (SMALL_BYTES_PER_BLOCK * 2 - 1, 1),
    ],
)
def test_memory_bytes_sizes_the_device_tier(memory_bytes: int, num_blocks: int) -> None:
    cfg = make_config(num_blocks=None, memory_bytes=memory_bytes)
    assert cfg.num_blocks == num_blocks
    assert cfg.memory_bytes == memory_bytes
    with ferrumkv.KvCache(cfg) as cache:
        d = cache.stats().device
        assert d.total_blocks == num_blocks
        assert d.total_bytes == num_blocks * SMALL_BYTES_PER_BLOCK
        assert cache.stats().total_tokens == num_blocks * 4


def test_memory_bytes_depends_on_dtype() -> None:
    assert make_config(num_blocks=None, memory_bytes=1024, dtype="float32").num_blocks == 2
    assert make_config(num_blocks=None, memory_bytes=1024, dtype="bfloat16").num_blocks == 4
    assert make_config(num_blocks=None, memory_bytes=1024, dtype="uint8").num_blocks == 8


@pytest.mark.parametrize("device", ["cuda:0", "cuda", "cuda:3"])
def test_cuda_device_without_driver_raises_cuda_unavailable(device: str) -> None:
    cfg = make_config(device=device)
    assert cfg.device == ("cuda:0" if device == "cuda" else device)
    with pytest.raises(ferrumkv.CudaUnavailableError) as err:
        ferrumkv.KvCache(cfg)
    assert isinstance(err.value, ferrumkv.FerrumKVError)
    ordinal = "cuda:0" if device == "cuda" else device
    assert ordinal in str(err.value)
    if _core.cuda_driver_present:
        assert "driver is present" in str(err.value)
    else:
        assert "libcuda" in str(err.value) and "no NVIDIA driver" in str(err.value)


def test_to_dict_repr_eq() -> None:
    cfg = make_config(layout="layer_major", hash_algo="sha256", seed=7)
    d = cfg.to_dict()
    assert d == {
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 4,
        "block_size": 4,
        "dtype": "float16",
        "device": "cpu",
        "num_blocks": 8,
        "memory_bytes": None,
        "host_blocks": 0,
        "disk_path": None,
        "disk_blocks": 0,
        "enable_prefix_cache": True,
        "hash_algo": "sha256",
        "low_watermark": 0.3,
        "high_watermark": 0.1,
        "residency_sample_rate": 0.01,
        "layout": "layer_major",
        "enable_kv_events": True,
        "seed": 7,
        "eviction_policy": "lru",
        "kv_events_endpoint": None,
        "kv_events_replay_endpoint": None,
        "kv_events_topic": "kv-events",
        "kv_events_format": "array",
        "remote_url": None,
        "remote_namespace": "default",
        "remote_write": "on_evict",
        "remote_required": True,
        "remote_timeout_s": 5.0,
    }
    r = repr(cfg)
    assert r.startswith("CacheConfig(") and r.endswith(")")
    for key, value in d.items():
        assert f"{key}={value!r}" in r
    assert cfg == make_config(layout="layer_major", hash_algo="sha256", seed=7)
    assert cfg != make_config(layout="layer_major", hash_algo="sha256", seed=8)
    assert cfg != make_config()
    assert cfg != d
    assert make_config(dtype="half") == make_config(dtype="float16")


def test_config_is_frozen() -> None:
    cfg = make_config()
    for name in ("num_blocks", "dtype", "block_size", "low_watermark"):
        with pytest.raises(AttributeError):
            setattr(cfg, name, getattr(cfg, name))
