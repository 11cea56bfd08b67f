"""`ferrumkv.torch`: writing K/V into slots of the cache's layer views and paged attention
through the block table, against plain references (both layouts; CPU, and CUDA under the
`cuda` marker). `import ferrumkv` itself never imports torch."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ferrumkv
from ferrumkv.torch import layer_kv, paged_attention, write_kv_slots
from helpers import alloc

HEADS, KV_HEADS, HEAD_DIM, BS = 4, 2, 8, 4
DEVICES = ["cpu", pytest.param("cuda:0", marks=pytest.mark.cuda)]


def cache_of(device: str = "cpu", **kw: object) -> ferrumkv.KvCache:
    cfg: dict[str, object] = {"num_layers": 2, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM}
    cfg.update(block_size=BS, dtype="float32", num_blocks=16, device=device)
    cfg.update(kw)
    return ferrumkv.KvCache(ferrumkv.CacheConfig(**cfg))


def slots_of(h: ferrumkv.SequenceHandle, positions: range) -> np.ndarray:
    return np.array([h.block_ids[p // BS] * BS + p % BS for p in positions], dtype=np.int64)


def test_import_ferrumkv_does_not_import_torch() -> None:
    code = "import sys, ferrumkv; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["block_major", "layer_major"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_write_kv_slots_lands_where_read_kv_reads(device: str, layout: str, dtype: str) -> None:
    """K/V written through the slot mapping (one slot -1: padding, skipped) read back through
    `read_kv` at the same positions; nothing else of the tier changes. A float16 cache takes
    float32 K/V cast to it."""
    g = torch.Generator().manual_seed(1)
    with cache_of(device, layout=layout, dtype=dtype) as cache:
        a = alloc(cache, "a", list(range(10)))
        b = alloc(cache, "b", list(range(100, 107)))
        slots = np.concatenate([slots_of(a, range(3, 10)), [-1], slots_of(b, range(7))])
        k = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=g).to(device)
        v = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=g).to(device)
        kc, vc = layer_kv(cache, 1)
        assert tuple(kc.shape) == (16, BS, KV_HEADS, HEAD_DIM) and kc.dtype == getattr(torch, dtype)
        before = [t.clone() for t in layer_kv(cache, 0)]
        write_kv_slots(kc, vc, torch.as_tensor(slots), k, v)
        if device != "cpu":
            torch.cuda.synchronize()
        want_k, want_v = k.cpu().to(kc.dtype).numpy(), v.cpu().to(kc.dtype).numpy()
        ka, va = cache.read_kv("a", 1, 3, 7)
        kb, vb = cache.read_kv("b", 1, 0, 7)
        assert np.array_equal(ka, want_k[:7]) and np.array_equal(va, want_v[:7])
        assert np.array_equal(kb, want_k[8:]) and np.array_equal(vb, want_v[8:])
        ka0, _ = cache.read_kv("a", 1, 0, 3)
        assert not ka0.any()  # positions 0..2 of a were not in the mapping
        for old, new in zip(before, layer_kv(cache, 0), strict=True):
            assert torch.equal(old, new)  # the other layer is untouched


def test_write_kv_slots_refuses_bad_arguments() -> None:
    with cache_of() as cache:
        kc, vc = layer_kv(cache, 0)
        k = torch.zeros(2, KV_HEADS, HEAD_DIM)
        ok = np.array([0, 1], dtype=np.int64)
        with pytest.raises(ValueError, match="k and v must both be"):
            write_kv_slots(kc, vc, ok, k, torch.zeros(2, KV_HEADS, HEAD_DIM + 1))
        with pytest.raises(ValueError, match="slot_mapping must have 2 entries"):
            write_kv_slots(kc, vc, np.array([0], dtype=np.int64), k, k)
        with pytest.raises(TypeError, match="int32 or int64"):
            write_kv_slots(kc, vc, np.array([0.0, 1.0]), k, k)
        with pytest.raises(ValueError, match="past the cache's 16 blocks"):
            write_kv_slots(kc, vc, np.array([0, 16 * BS], dtype=np.int64), k, k)
        with pytest.raises(ValueError, match="k_cache and v_cache must both be"):
            write_kv_slots(kc, vc[:2], ok, k, k)
        assert not kc.any() and not vc.any()  # nothing written by a refused call
    with cache_of(dtype="uint8") as cache:
        kc, vc = layer_kv(cache, 0)
        with pytest.raises(TypeError, match="quantizing kernel"):
            write_kv_slots(kc, vc, ok, k, k)


def naive_attention(q: np.ndarray, ks: np.ndarray, vs: np.ndarray, scale: float) -> np.ndarray:
    """float64 attention of queries that are the last len(q) of len(ks) positions."""
    n, length = q.shape[0], ks.shape[0]
    group = q.shape[1] // ks.shape[1]
    ks, vs = np.repeat(ks, group, axis=1), np.repeat(vs, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, ks) * scale
    allowed = np.arange(length)[None, :] <= (length - n + np.arange(n))[:, None]
    scores = np.where(allowed[None], scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", w, vs)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_matches_dense_attention(device: str) -> None:
    """A mixed batch over scattered blocks: a whole prompt (7 of 7), a prefix hit or chunk
    (3 new of 10), a decode step (1 of 5) and a speculative verification (3 of 13); grouped
    query heads (4 query heads over 2 KV heads). Within 1e-5 of float64 dense attention, with
    the layout as numpy arrays or as torch tensors on the device."""
    rng = np.random.default_rng(3)
    with cache_of(device, num_blocks=24) as cache:
        kc, vc = layer_kv(cache, 0)
        kc.copy_(torch.as_tensor(rng.standard_normal(tuple(kc.shape)), dtype=torch.float32))
        vc.copy_(torch.as_tensor(rng.standard_normal(tuple(vc.shape)), dtype=torch.float32))
        lens, news = [7, 10, 5, 13], [7, 3, 1, 3]
        perm = rng.permutation(24)
        tables, at = [], 0
        for n in lens:
            nb = -(-n // BS)
            tables.append(perm[at : at + nb])
            at += nb
        width = max(len(t) for t in tables)
        table = np.zeros((len(lens), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        qsl = np.concatenate([[0], np.cumsum(news)]).astype(np.int32)
        layout = SimpleNamespace(
            block_table=table, seq_lens=np.array(lens, np.int32), query_start_loc=qsl
        )
        q = torch.as_tensor(rng.standard_normal((sum(news), HEADS, HEAD_DIM)), dtype=torch.float32)
        q = q.to(device)
        scale = 0.3
        out = paged_attention(q, kc, vc, layout, scale)
        on_device = {k: torch.as_tensor(a, device=device) for k, a in vars(layout).items()}
        as_torch = SimpleNamespace(**on_device)
        assert torch.equal(out, paged_attention(q, kc, vc, as_torch, scale))
        k64 = kc.double().cpu().numpy()
        v64 = vc.double().cpu().numpy()
        for i, n in enumerate(lens):
            ks = k64[tables[i]].reshape(-1, KV_HEADS, HEAD_DIM)[:n]
            vs = v64[tables[i]].reshape(-1, KV_HEADS, HEAD_DIM)[:n]
            want = naive_attention(q[qsl[i] : qsl[i + 1]].double().cpu().numpy(), ks, vs, scale)
            got = out[qsl[i] : qsl[i + 1]].double().cpu().numpy()
            assert np.abs(got - want).max() < 1e-5, i
        # Default scale: 1 / sqrt(head_dim).
        assert torch.allclose(
            paged_attention(q, kc, vc, layout), paged_attention(q, kc, vc, layout, HEAD_DIM**-0.5)
        )


def test_paged_attention_refuses_inconsistent_layouts() -> None:
    with cache_of() as cache:
        kc, vc = layer_kv(cache, 0)
        q = torch.zeros(3, HEADS, HEAD_DIM)

        def lay(table: list[list[int]], lens: list[int], qsl: list[int]) -> SimpleNamespace:
            return SimpleNamespace(
                block_table=np.array(table, np.int32),
                seq_lens=np.array(lens, np.int32),
                query_start_loc=np.array(qsl, np.int32),
            )

        with pytest.raises(ValueError, match="multiple of num_kv_heads"):
            paged_attention(torch.zeros(3, 3, HEAD_DIM), kc, vc, lay([[0]], [3], [0, 3]))
        with pytest.raises(ValueError, match="query_start_loc must be"):
            paged_attention(q, kc, vc, lay([[0]], [3], [0, 2]))
        with pytest.raises(ValueError, match="1 <= new tokens <= seq_len"):
            paged_attention(q, kc, vc, lay([[0]], [2], [0, 3]))
        with pytest.raises(ValueError, match="fewer blocks than seq_lens need"):
            paged_attention(q, kc, vc, lay([[0]], [5], [0, 3]))
        with pytest.raises(ValueError, match="q must be"):
            paged_attention(torch.zeros(3, HEADS, 3), kc, vc, lay([[0]], [3], [0, 3]))
