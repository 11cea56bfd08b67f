"""PyTorch glue: the two operations a model needs to keep its K/V in ferrumkv.

`import ferrumkv.torch` imports torch; `import ferrumkv` never does (numpy is its only
dependency). Everything here runs on the device of the tensors it is given (CPU or CUDA) with
plain torch operations: a reference implementation that is exact, not a fast kernel.

- `layer_kv(cache, layer) -> (k_cache, v_cache)`: one layer of the device tier as two torch
  views `[num_blocks, block_size, num_kv_heads, head_dim]` (zero-copy, through DLPack; both
  `block_major` and `layer_major` layouts, any strides).
- `write_kv_slots(k_cache, v_cache, slot_mapping, k, v)`: writes a step's new K/V
  (`[num_tokens, num_kv_heads, head_dim]`) into their slots (vLLM's
  `reshape_and_cache_flash`: slot = block_id * block_size + offset, a negative slot is a
  padding token and is skipped).
- `paged_attention(q, k_cache, v_cache, layout, scale=None)`: causal attention of each
  sequence's new tokens over its whole context, gathered through the block table, computed by
  `torch.nn.functional.scaled_dot_product_attention`. Mixed batches (prefill chunks and
  decode steps together) and grouped-query attention (`num_kv_heads` dividing `num_heads`).

`layout` is what `KvCache.batch_layout(request_ids, num_new_tokens)` returns (README, "A
decode step"): numpy or torch `block_table` int32 `[B, max_blocks]`, `seq_lens` int32 `[B]`,
`query_start_loc` int32 `[B + 1]`, `slot_mapping` int64 `[num_tokens]`; the new tokens of
sequence i are its last `query_start_loc[i + 1] - query_start_loc[i]` tokens, rows
`query_start_loc[i] ..` of `q` / `k` / `v`.

Ordering on a GPU. The engine's own copies (swap, offload, onboard, copy-on-write, a partial
prefix copy) run on its copy stream, ordered against one compute stream of yours: call
`cache.set_compute_stream(torch.cuda.current_stream())` once (the default is the legacy
default stream, torch's default). Each copy then waits, on the GPU, for the kernels enqueued
there before the engine call that asked for it, and kernels enqueued after that call wait for
the copy; nobody synchronizes. Kernels on another stream are not ordered: `layer_kv` makes
torch's current stream wait for the engine's pending copies, so take the views again after
engine calls when you run on several streams (it is cheap: no data moves).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.dlpack import from_dlpack

__all__ = ["layer_kv", "paged_attention", "write_kv_slots"]


class _Layout(Protocol):
    block_table: Any
    seq_lens: Any
    query_start_loc: Any


def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer of `cache`'s device tier, `[num_blocks, block_size, num_kv_heads,
    head_dim]` each: zero-copy torch views of `cache.kv_view(layer)` (strided; the last two
    dimensions are contiguous). On a GPU, torch's current stream first waits for the copies
    the engine enqueued, so a block just onboarded or swapped in reads its bytes."""
    t = from_dlpack(cache.kv_view(layer))
    return t[:, 0], t[:, 1]


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if not isinstance(k_cache, torch.Tensor) or not isinstance(v_cache, torch.Tensor):
        raise TypeError("k_cache and v_cache must be torch tensors (see layer_kv)")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {list(k_cache.shape)} and {list(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.device != v_cache.device:
        raise TypeError("k_cache and v_cache must have one dtype and one device")


def _as_index(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 array, not {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def write_kv_slots(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: Any,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Writes `k[i]`, `v[i]` (`[num_tokens, num_kv_heads, head_dim]`) into slot
    `slot_mapping[i]` = block_id * block_size + offset of `k_cache` / `v_cache`, in place.

    A negative slot is a padding token and is skipped (as in vLLM's `reshape_and_cache`).
    K/V of a floating dtype other than the cache's are cast to it; a `uint8` (fp8 storage)
    cache needs a quantizing kernel and is refused (TypeError). On a GPU, vLLM's
    `reshape_and_cache_flash` and FlashInfer's `append_paged_kv_cache` are the fused kernels
    for this same operation and take the same slot mapping (FlashInfer through its paged
    indices, see `paged_attention`)."""
    _check_cache_pair(k_cache, v_cache)
    num_blocks, block_size, heads, head_dim = k_cache.shape
    if k.dim() != 3 or k.shape != v.shape or tuple(k.shape[1:]) != (heads, head_dim):
        raise ValueError(
            f"k and v must both be [num_tokens, {heads}, {head_dim}], "
            f"got {list(k.shape)} and {list(v.shape)}"
        )
    if k_cache.dtype == torch.uint8:
        raise TypeError("a uint8 (fp8 storage) cache needs a quantizing kernel")
    slots = _as_index(slot_mapping, "slot_mapping", k_cache.device)
    if slots.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must have {k.shape[0]} entries, got {list(slots.shape)}")
    k = k.to(device=k_cache.device, dtype=k_cache.dtype)
    v = v.to(device=k_cache.device, dtype=k_cache.dtype)
    if slots.numel():
        # NOTE: one device-to-host read on a GPU (a slot past the cache would otherwise be a
        # device-side assert); a batch without padding skips the masking.
        lo, hi = torch.stack([slots.min(), slots.max()]).tolist()
        if hi >= num_blocks * block_size:
            raise ValueError(f"slot {hi} is past the cache's {num_blocks} blocks")
        if lo < 0:
            keep = slots >= 0
            slots, k, v = slots[keep], k[keep], v[keep]
    block, offset = slots // block_size, slots % block_size
    # index_put_ on the strided views writes through into the cache's memory.
    k_cache.index_put_((block, offset), k)
    v_cache.index_put_((block, offset), v)


def _host_ints(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: _Layout,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of a batch's new tokens over their sequences' K/V in the cache.

    `q`: `[num_tokens, num_heads, head_dim]` in batch order (`layout.query_start_loc`);
    `k_cache` / `v_cache`: `[num_blocks, block_size, num_kv_heads, head_dim]` (`layer_kv`),
    already holding this step's K/V (`write_kv_slots` first). Sequence i has
    `L = seq_lens[i]` tokens, of which the last `n = query_start_loc[i+1] - query_start_loc[i]`
    are its queries: query j (position `L - n + j`) attends positions `0 .. L - n + j`. So one
    call serves a prompt (n = L), a prefill chunk or a prefix hit (n < L), a decode step
    (n = 1) and a speculative verification (n = k + 1) in the same batch. Returns
    `[num_tokens, num_heads, head_dim]`. `scale` defaults to `1 / sqrt(head_dim)`.
    `num_heads` must be a multiple of `num_kv_heads` (grouped-query attention: query head h
    reads K/V head `h // (num_heads // num_kv_heads)`, as Llama does).

    How: K/V of every sequence are gathered through the block table into
    `[B, max_blocks * block_size, ...]`, the queries padded into `[B, max_n, ...]`, and one
    `scaled_dot_product_attention` runs with a boolean mask (causal within the new tokens, all
    of the context before them, nothing past `L`). The gather costs a copy of the batch's
    context per layer: this is the exact reference, not the fast path.

    On a GPU the paged kernels take the same metadata without the gather:
    FlashAttention's `flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=
    query_start_loc, seqused_k=seq_lens, max_seqlen_q=..., max_seqlen_k=..., causal=True,
    block_table=block_table)` (vLLM's FlashAttention backend; the views of `layer_kv` are its
    `[num_blocks, block_size, num_kv_heads, head_dim]` caches, with `causal=True` aligning the
    queries to the end of each sequence exactly as here; upstream FlashAttention 2 wants a
    block_size that is a multiple of 256, vLLM's build takes 16), and FlashInfer's
    `BatchPrefillWithPagedKVCacheWrapper` / `BatchDecodeWithPagedKVCacheWrapper` with
    `qo_indptr = query_start_loc`, `paged_kv_indptr` = the running sum of each row's
    `ceil(seq_lens / block_size)`, `paged_kv_indices` = those leading entries of each
    `block_table` row, `paged_kv_last_page_len = (seq_lens - 1) % block_size + 1`, over the
    whole `cache.kv_view(layer)` tensor (`[num_blocks, 2, block_size, heads, head_dim]`,
    FlashInfer's NHD paged layout; with `layout="layer_major"` it is contiguous per layer).
    """
    _check_cache_pair(k_cache, v_cache)
    _, block_size, kv_heads, head_dim = k_cache.shape
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_tokens, num_heads, {head_dim}], got {list(q.shape)}")
    num_tokens, heads = q.shape[0], q.shape[1]
    if heads % kv_heads:
        raise ValueError(f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})")
    qsl, seq_lens = _host_ints(layout.query_start_loc), _host_ints(layout.seq_lens)
    batch = len(seq_lens)
    n_new = np.diff(qsl)
    if len(qsl) != batch + 1 or qsl[0] != 0 or qsl[-1] != num_tokens:
        raise ValueError(
            f"query_start_loc must be [0, ..., {num_tokens}] with {batch + 1} entries, got {qsl}"
        )
    if batch and (np.any(n_new < 1) or np.any(n_new > seq_lens)):
        raise ValueError(f"each sequence needs 1 <= new tokens <= seq_len, got {n_new}, {seq_lens}")
    dev = k_cache.device
    table = _as_index(layout.block_table, "block_table", dev)
    if table.dim() != 2 or table.shape[0] != batch:
        raise ValueError(f"block_table must be [{batch}, max_blocks], got {list(table.shape)}")
    need = -(-seq_lens // block_size) if batch else seq_lens
    if batch and int(need.max()) > table.shape[1]:
        raise ValueError("block_table has fewer blocks than seq_lens need")
    if batch == 0:
        return q.new_empty((0, heads, head_dim))
    max_n, max_len = int(n_new.max()), int(seq_lens.max())
    width = -(-max_len // block_size)
    # [B, width * block_size, kv_heads, head_dim]: each sequence's context, in order.
    ctx_k = k_cache[table[:, :width]].flatten(1, 2)[:, :max_len]
    ctx_v = v_cache[table[:, :width]].flatten(1, 2)[:, :max_len]
    # Row t of q is query j of sequence i: where it goes in the padded [B, max_n] batch.
    seq_of = torch.as_tensor(np.repeat(np.arange(batch), n_new), device=dev)
    col_of = torch.as_tensor(np.arange(num_tokens) - np.repeat(qsl[:-1], n_new), device=dev)
    q_pad = q.new_zeros((batch, max_n, heads, head_dim))
    q_pad[seq_of, col_of] = q.to(q_pad.dtype)
    # mask[i, j, p]: query j of sequence i (position L_i - n_i + j) sees position p <= it.
    # Padding rows (j >= n_i) see position 0 so that no row is fully masked (NaN); they are
    # dropped below.
    j = torch.arange(max_n, device=dev)[None, :]
    first = torch.as_tensor(seq_lens - n_new, device=dev)[:, None]
    pos = torch.where(j < torch.as_tensor(n_new, device=dev)[:, None], first + j, 0)
    mask = torch.arange(max_len, device=dev)[None, None, :] <= pos[:, :, None]
    qt = q_pad.transpose(1, 2)  # [B, heads, max_n, head_dim]
    kt = ctx_k.to(q.dtype).transpose(1, 2)  # [B, kv_heads, max_len, head_dim]
    vt = ctx_v.to(q.dtype).transpose(1, 2)
    if heads != kv_heads:
        kt = kt.repeat_interleave(heads // kv_heads, dim=1)
        vt = vt.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(
        qt,
        kt,
        vt,
        attn_mask=mask[:, None],
        scale=scale if scale is not None else 1.0 / math.sqrt(head_dim),
    )
    return out.transpose(1, 2)[seq_of, col_of]
