"""K/V data: write_kv / read_kv round trips, and the zero-copy DLPack views of a layer.

Position p of a sequence lives in block `block_ids[p // block_size]`, slot
`p % block_size`; in a view `[num_blocks, 2, block_size, heads, head_dim]` index 0 on dim 1
is K and index 1 is V.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import ferrumkv
from helpers import drive, make_config

LAYOUTS = ["block_major", "layer_major"]
# dtype -> (numpy dtype of the cache's arrays, unsigned int of the same width)
DTYPES = {
    "float16": (np.float16, np.uint16),
    "float32": (np.float32, np.uint32),
    "uint8": (np.uint8, np.uint8),
    "bfloat16": (np.uint16, np.uint16),  # raw bf16 bit patterns
}
TORCH_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "bfloat16": torch.bfloat16,
}
HEADS, HEAD_DIM, BS, LAYERS = 2, 4, 4, 2


def random_kv(rng: np.random.Generator, n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Random bit patterns (NaNs and infinities included) of the cache's dtype."""
    np_dtype, bits = DTYPES[dtype]
    info = np.iinfo(bits)
    shape = (n, HEADS, HEAD_DIM)
    k = rng.integers(0, info.max, size=shape, dtype=bits, endpoint=True).view(np_dtype)
    v = rng.integers(0, info.max, size=shape, dtype=bits, endpoint=True).view(np_dtype)
    return k, v


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def cache_for(dtype: str = "float16", layout: str = "block_major", **kw) -> ferrumkv.KvCache:
    return ferrumkv.KvCache(make_config(dtype=dtype, layout=layout, **kw))


def alloc(cache, rid, tokens):
    return drive(cache.allocate(rid, tokens))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_is_exact(dtype: str, layout: str) -> None:
    rng = np.random.default_rng(7)
    cache = cache_for(dtype, layout)
    alloc(cache, "other", list(range(1000, 1006)))  # blocks 0, 1: our blocks are not 0..
    h = alloc(cache, "a", list(range(11)))  # 3 blocks
    assert h.block_ids == (2, 3, 4)
    written = {}
    for layer in range(LAYERS):
        k, v = random_kv(rng, 11, dtype)
        cache.write_kv("a", layer, 0, k, v)
        written[layer] = (k, v)
    ok, ov = random_kv(rng, 6, dtype)
    cache.write_kv("other", 1, 0, ok, ov)
    for layer in range(LAYERS):
        k, v = cache.read_kv("a", layer, 0, 11)
        assert k.dtype == DTYPES[dtype][0] and k.shape == (11, HEADS, HEAD_DIM)
        assert same_bits(k, written[layer][0]), f"K of layer {layer}"
        assert same_bits(v, written[layer][1]), f"V of layer {layer}"
        for start, n in [(0, 1), (3, 2), (4, 4), (5, 6), (10, 1), (0, 0)]:
            k, v = cache.read_kv("a", layer, start, n)
            assert same_bits(k, written[layer][0][start : start + n])
            assert same_bits(v, written[layer][1][start : start + n])
    k, v = cache.read_kv("other", 1, 0, 6)
    assert same_bits(k, ok) and same_bits(v, ov)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_writes_across_block_boundaries(layout: str) -> None:
    rng = np.random.default_rng(1)
    cache = cache_for("float32", layout)
    alloc(cache, "a", list(range(13)))  # 4 blocks: 0..3
    base_k, base_v = random_kv(rng, 13, "float32")
    cache.write_kv("a", 0, 0, base_k, base_v)
    # positions 2..10 span blocks 0, 1 and 2
    k, v = random_kv(rng, 9, "float32")
    cache.write_kv("a", 0, 2, k, v)
    want_k, want_v = base_k.copy(), base_v.copy()
    want_k[2:11], want_v[2:11] = k, v
    got_k, got_v = cache.read_kv("a", 0, 0, 13)
    assert same_bits(got_k, want_k) and same_bits(got_v, want_v)
    # layer 1 was never touched by the layer-0 writes
    k1, v1 = random_kv(rng, 13, "float32")
    cache.write_kv("a", 1, 0, k1, v1)
    got_k, got_v = cache.read_kv("a", 0, 0, 13)
    assert same_bits(got_k, want_k) and same_bits(got_v, want_v)
    # one-token writes at each boundary
    for p in (3, 4, 7, 8, 12):
        k, v = random_kv(rng, 1, "float32")
        cache.write_kv("a", 0, p, k, v)
        want_k[p], want_v[p] = k[0], v[0]
    got_k, got_v = cache.read_kv("a", 0, 0, 13)
    assert same_bits(got_k, want_k) and same_bits(got_v, want_v)


def test_write_kv_accepts_non_contiguous_arrays() -> None:
    cache = cache_for("float16")
    alloc(cache, "a", list(range(4)))
    big = np.arange(4 * 2 * 8, dtype=np.float16).reshape(4, 2, 8)
    k = big[:, :, ::2]  # a strided view
    v = big[:, :, 1::2]
    assert not k.flags.c_contiguous
    cache.write_kv("a", 0, 0, k, v)
    got_k, got_v = cache.read_kv("a", 0, 0, 4)
    assert same_bits(got_k, np.ascontiguousarray(k)) and same_bits(got_v, np.ascontiguousarray(v))


def test_write_kv_grows_with_extend() -> None:
    cache = cache_for("uint8")
    alloc(cache, "a", [1, 2, 3])
    k = np.full((1, HEADS, HEAD_DIM), 9, np.uint8)
    with pytest.raises(ValueError):
        cache.write_kv("a", 0, 3, k, k)
    drive(cache.extend("a", [4, 5]))
    cache.write_kv("a", 0, 4, k, k + 1)
    got_k, got_v = cache.read_kv("a", 0, 4, 1)
    assert (got_k == 9).all() and (got_v == 10).all()


# ----------------------------------------------------------------------------- views


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
def test_numpy_view_matches_read_kv(dtype: str, layout: str) -> None:
    rng = np.random.default_rng(3)
    cache = cache_for(dtype, layout)
    alloc(cache, "x", [900, 901])
    h = alloc(cache, "a", list(range(10)))
    assert h.block_ids == (1, 2, 3)
    data = {layer: random_kv(rng, 10, dtype) for layer in range(LAYERS)}
    for layer, (k, v) in data.items():
        cache.write_kv("a", layer, 0, k, v)
    for layer, (k, v) in data.items():
        view = cache.kv_view(layer)
        assert view.shape == (8, 2, BS, HEADS, HEAD_DIM)
        arr = np.from_dlpack(view)
        assert arr.shape == (8, 2, BS, HEADS, HEAD_DIM)
        assert arr.dtype == DTYPES[dtype][0]
        for p in range(10):
            b, slot = h.block_ids[p // BS], p % BS
            assert same_bits(arr[b, 0, slot], k[p]), (layer, p)
            assert same_bits(arr[b, 1, slot], v[p]), (layer, p)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_torch_write_is_visible_through_read_kv(dtype: str, layout: str) -> None:
    cache = cache_for(dtype, layout)
    alloc(cache, "x", [900, 901, 902, 903, 904])  # blocks 0, 1
    h = alloc(cache, "a", list(range(7)))
    assert h.block_ids == (2, 3)
    for layer in range(LAYERS):
        t = torch.from_dlpack(cache.kv_view(layer))
        assert tuple(t.shape) == (8, 2, BS, HEADS, HEAD_DIM)
        assert t.dtype == TORCH_DTYPES[dtype]
        assert t.device.type == "cpu"
        p = 5  # block_ids[1] = 3, slot 1
        t[3, 0, 1] = 10 + layer  # K
        t[3, 1, 1] = 20 + layer  # V
        t[2, 1, 3] = 30 + layer  # V of position 3
    np_dtype = DTYPES[dtype][0]
    for layer in range(LAYERS):
        k, v = cache.read_kv("a", layer, 0, 7)
        if dtype == "bfloat16":  # bf16 of small integers: the high half of their float32
            k = (k.astype(np.uint32) << 16).view(np.float32)
            v = (v.astype(np.uint32) << 16).view(np.float32)
        assert (k[p] == 10 + layer).all() and (v[p] == 20 + layer).all()
        assert (v[3] == 30 + layer).all()
        others = [i for i in range(7) if i != p]
        assert not (k[others] == 10 + layer).any()
        assert k.dtype == np_dtype or dtype == "bfloat16"
        # the other sequence's blocks were not touched
        xk, xv = cache.read_kv("x", layer, 0, 5)
        assert not (xk == 10 + layer).any() and not (xv == 20 + layer).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_kv_write_is_visible_through_torch(layout: str) -> None:
    rng = np.random.default_rng(5)
    cache = cache_for("bfloat16", layout)
    h = alloc(cache, "a", list(range(6)))
    k, v = random_kv(rng, 6, "bfloat16")
    cache.write_kv("a", 1, 0, k, v)
    t = torch.from_dlpack(cache.kv_view(1)).view(torch.int16)
    for p in range(6):
        b, slot = h.block_ids[p // BS], p % BS
        assert t[b, 0, slot].numpy().tobytes() == k[p].tobytes()
        assert t[b, 1, slot].numpy().tobytes() == v[p].tobytes()


def test_view_strides_describe_the_layout() -> None:
    bm = cache_for("float16", "block_major").kv_view(1)
    # block_major: a block is layers x 2 x bs x heads x hd elements
    assert bm.strides == (LAYERS * 2 * BS * HEADS * HEAD_DIM, BS * HEADS * HEAD_DIM, 8, 4, 1)
    lm = cache_for("float16", "layer_major").kv_view(1)
    assert lm.strides == (2 * BS * HEADS * HEAD_DIM, BS * HEADS * HEAD_DIM, 8, 4, 1)
    assert bm.__dlpack_device__() == (1, 0)
    assert bm.dtype == "float16"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layers_do_not_alias(layout: str) -> None:
    cache = cache_for("float32", layout)
    alloc(cache, "a", [1, 2, 3, 4])
    a0 = np.from_dlpack(cache.kv_view(0))
    a1 = np.from_dlpack(cache.kv_view(1))
    a0[...] = 1.0
    a1[...] = 2.0
    assert (np.from_dlpack(cache.kv_view(0)) == 1.0).all()
    k, v = cache.read_kv("a", 0, 0, 4)
    assert (k == 1.0).all() and (v == 1.0).all()
    k, v = cache.read_kv("a", 1, 0, 4)
    assert (k == 2.0).all() and (v == 2.0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_view_data_ptr_is_the_exported_address(layout: str) -> None:
    # `data_ptr` and the DLPack export compute the address apart (integer vs pointer
    # arithmetic); both must name element [0, 0, 0, 0, 0] of the layer.
    cache = cache_for("float16", layout)
    block = BS * HEADS * HEAD_DIM * 2 * 2  # bytes of one layer of one block (K and V)
    views = [cache.kv_view(layer) for layer in range(LAYERS)]
    for view in views:
        assert torch.from_dlpack(view).data_ptr() == view.data_ptr
        assert np.from_dlpack(view).ctypes.data == view.data_ptr
    step = block if layout == "block_major" else block * cache.config.num_blocks
    assert views[1].data_ptr - views[0].data_ptr == step


def test_kv_view_bad_layer() -> None:
    cache = cache_for()
    with pytest.raises(ValueError):
        cache.kv_view(LAYERS)
    with pytest.raises(TypeError):
        cache.kv_view(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.kv_view(-1)


@pytest.mark.parametrize("how", ["close", "del"])
def test_view_keeps_memory_alive(how: str) -> None:
    cache = cache_for("float32")
    alloc(cache, "a", [1, 2, 3, 4, 5])
    k = np.full((5, HEADS, HEAD_DIM), 1.5, np.float32)
    cache.write_kv("a", 0, 0, k, -k)
    view = cache.kv_view(0)
    t = torch.from_dlpack(view)
    arr = np.from_dlpack(cache.kv_view(0))
    if how == "close":
        cache.close()
        with pytest.raises(ferrumkv.CacheClosedError):
            cache.kv_view(0)
    del cache
    gc.collect()
    assert float(t[0, 0, 0, 0, 0]) == 1.5
    assert float(t[1, 1, 0, 1, 3]) == -1.5
    t[7, 1, 3] = 4.25  # write then read through the tensor after the cache is gone
    assert (arr[7, 1, 3] == 4.25).all()
    del view
    gc.collect()
    t[6, 0, 0] += 1.0
    assert (arr[6, 0, 0] == 1.0).all()
    del t
    gc.collect()
    arr[5] = 3.0
    assert (arr[5] == 3.0).all() and arr[0, 0, 0, 0, 0] == 1.5


# write_kv / read_kv stage K and V in buffers of their own. With 200 MiB per array and too
# little address space left for a staging buffer, the call must raise MemoryError and leave
# the cache as it was, not abort the process (hence the subprocess).
STAGING_CHILD = textwrap.dedent(
    """
    import resource
    import numpy as np
    import ferrumkv

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

    def limit(headroom):
        soft = resource.RLIM_INFINITY if headroom is None else vm_bytes() + headroom
        resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))

    MiB = 1 << 20
    # A token's K is 64 KiB (64 heads x 1024 uint8): 3200 tokens are 200 MiB per array.
    cfg = ferrumkv.CacheConfig(
        num_layers=1, num_kv_heads=64, head_dim=1024, block_size=16, dtype="uint8",
        num_blocks=200,
    )
    cache = ferrumkv.KvCache(cfg)
    assert cache.try_allocate("r", list(range(3200))) is not None
    small = np.full((4, 64, 1024), 7, np.uint8)
    cache.write_kv("r", 0, 0, small, small + 1)
    k = np.ones((3200, 64, 1024), np.uint8)
    for call, headroom in [("write_kv", 100 * MiB), ("read_kv", 500 * MiB)]:
        limit(headroom)  # read_kv's own 2 x 200 MiB arrays fit; its staging buffer does not
        try:
            if call == "write_kv":
                cache.write_kv("r", 0, 0, k, k)
            else:
                cache.read_kv("r", 0, 0, 3200)
        except MemoryError as e:
            print(f"{call}: MemoryError: {e}")
        limit(None)
    got_k, got_v = cache.read_kv("r", 0, 0, 4)
    assert (got_k == 7).all() and (got_v == 8).all(), "the failed write changed nothing"
    print("healthy")
    """
)


def test_kv_copies_too_large_for_memory_are_memory_errors() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STAGING_CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    out = done.stdout.splitlines()
    assert out[-1] == "healthy", done.stdout
    assert out[0].startswith("write_kv: MemoryError: out of memory: "), done.stdout
    assert "cannot allocate 209715200 bytes for the k buffer" in out[0], out[0]
    assert out[1].startswith("read_kv: MemoryError: out of memory: "), done.stdout
    assert "cannot allocate 209715200 bytes for the k_out buffer" in out[1], out[1]


def torch_bits(a: np.ndarray, dtype: str, fp8: bool = False) -> torch.Tensor:
    """A CPU tensor of the cache's dtype holding exactly the bits of `a`."""
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    t = torch.from_numpy(a)
    return t.view(torch.float8_e4m3fn) if fp8 else t


@pytest.mark.parametrize(
    ("dtype", "fp8"),
    [
        ("float16", False),
        ("float32", False),
        ("bfloat16", False),
        ("uint8", False),
        ("uint8", True),
    ],
)
def test_write_kv_and_read_kv_take_cpu_tensors(dtype: str, fp8: bool) -> None:
    cache = cache_for(dtype)
    alloc(cache, "a", list(range(6)))
    k, v = random_kv(np.random.default_rng(3), 6, dtype)
    cache.write_kv("a", 1, 0, torch_bits(k, dtype, fp8), torch_bits(v, dtype, fp8))
    rk, rv = cache.read_kv("a", 1, 0, 6)
    assert same_bits(rk, k) and same_bits(rv, v)
    # read into tensors the caller owns
    out_k = torch_bits(np.zeros_like(k), dtype, fp8)
    out_v = torch_bits(np.zeros_like(v), dtype, fp8)
    got = cache.read_kv("a", 1, 2, 4, out=(out_k[2:], out_v[2:]))
    assert got[0] is not None and got[0].data_ptr() == out_k[2:].data_ptr()
    as_bits = DTYPES[dtype][1]
    assert (out_k[2:].view(torch.uint8).numpy().view(as_bits) == k[2:].view(as_bits)).all()
    assert (out_v[2:].view(torch.uint8).numpy().view(as_bits) == v[2:].view(as_bits)).all()
    assert not out_k[:2].view(torch.uint8).numpy().any()  # nothing written outside `out`


def test_tensor_checks() -> None:
    cache = cache_for("float16")
    alloc(cache, "a", list(range(6)))
    good = torch.ones((6, HEADS, HEAD_DIM), dtype=torch.float16, requires_grad=True)
    cache.write_kv("a", 0, 0, good, good)  # a tensor that requires grad is read, not traced
    assert (cache.read_kv("a", 0, 0, 6)[0] == 1).all()
    # a non-contiguous tensor is copied in order, as a numpy array is
    t = torch.arange(6 * HEADS * HEAD_DIM, dtype=torch.float16).reshape(HEAD_DIM, HEADS, 6)
    cache.write_kv("a", 0, 0, t.permute(2, 1, 0), t.permute(2, 1, 0))
    assert (cache.read_kv("a", 0, 0, 6)[0] == t.permute(2, 1, 0).numpy()).all()
    with pytest.raises(TypeError, match="dtype float16"):
        cache.write_kv("a", 0, 0, good.float(), good.float())
    with pytest.raises(ValueError, match="shape"):
        cache.write_kv("a", 0, 0, good[:, :1], good[:, :1])
    with pytest.raises(TypeError, match="numpy array or a CPU tensor"):
        cache.write_kv("a", 0, 0, [1, 2], [1, 2])
    out = torch.zeros((HEAD_DIM, HEADS, 6), dtype=torch.float16).permute(2, 1, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        cache.read_kv("a", 0, 0, 6, out=(out, out))
    if torch.cuda.is_available():
        gpu = good.detach().cuda()
        with pytest.raises(TypeError, match="CPU tensor"):
            cache.write_kv("a", 0, 0, gpu, gpu)
