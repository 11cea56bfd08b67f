"""A tiny `transformers` Llama whose K/V live only in ferrumkv.

`PagedLlama.forward` runs the model's own modules (embedding, per-layer input_layernorm,
q/k/v_proj, rotary embedding at each token's true position, o_proj, post_attention_layernorm,
MLP, final norm, lm_head) and replaces only the attention: each layer writes the step's new
K/V into their slots of the cache (`ferrumkv.torch.write_kv_slots`) and attends through the
block table (`ferrumkv.torch.paged_attention`). No K/V is kept anywhere else, so whatever
the engine does between steps (prefix reuse, fork, swap, offload and onboard, recompute) shows
up in the logits if it served a wrong byte.

Shared by `examples/serve_tiny_llama.py` and `tests/test_real_model.py`; it is not part of the
ferrumkv package (which needs neither torch nor transformers). The model has random weights
from a seeded `LlamaConfig` (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import ferrumkv
from ferrumkv.torch import layer_kv, paged_attention, write_kv_slots

__all__ = [
    "BatchLayout",
    "PagedLlama",
    "batch_layout",
    "build_model",
    "cache_config",
    "reference_logits",
    "tiny_llama_config",
]


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """2 layers, hidden 64, 4 query heads and 2 KV heads of 16, vocab 128, float32."""
    kw: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Wider than the default 0.02, so greedy choices are not near-ties.
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_model(device: str | torch.device = "cpu", seed: int = 0, **overrides: Any) -> Any:
    """The tiny Llama with weights drawn from `seed`, in eval mode, float32, on `device`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.to(device=device, dtype=torch.float32).eval()


def cache_config(model: Any, *, device: str = "cpu", **kw: Any) -> ferrumkv.CacheConfig:
    """A ferrumkv config of the model's KV shape (float32, block_size 4 unless given)."""
    c = model.config
    kw.setdefault("block_size", 4)
    return ferrumkv.CacheConfig(
        num_layers=c.num_hidden_layers,
        num_kv_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        dtype="float32",
        device=device,
        **kw,
    )


# ----- the batch layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLayout:
    """What paged attention takes for one step (API.md, `KvCache.batch_layout`)."""

    block_table: Any  # int32 [B, max_blocks]
    seq_lens: Any  # int32 [B]
    query_start_loc: Any  # int32 [B + 1]
    slot_mapping: Any  # int64 [num_tokens]: block_id * block_size + offset, batch order

    def to_torch(self, device: str | torch.device) -> BatchLayout:
        return BatchLayout(
            *(
                torch.as_tensor(a, device=device)
                for a in (self.block_table, self.seq_lens, self.query_start_loc, self.slot_mapping)
            )
        )


def batch_layout(
    cache: ferrumkv.KvCache, request_ids: Sequence[Any], num_new_tokens: int | Sequence[int]
) -> BatchLayout:
    """The layout of one step in which each sequence computes its last `num_new_tokens`.

    TEMPORARY stand-in for `KvCache.batch_layout` (API.md, "Additions (second round)"), which
    is being added in parallel: computed here from `cache.block_table` and the handles'
    `num_tokens`, with the same names, shapes and dtypes. Once the engine has it, this body
    becomes `return cache.batch_layout(request_ids, num_new_tokens)`
    (tests/test_real_model.py checks the two agree as soon as it exists).
    """
    ids = list(request_ids)
    bs = cache.config.block_size
    new = np.broadcast_to(np.asarray(num_new_tokens, dtype=np.int64), (len(ids),))
    seq_lens = np.array([_handle(cache, r).num_tokens for r in ids], dtype=np.int32)
    if np.any(new < 1) or np.any(new > seq_lens):
        raise ValueError(f"num_new_tokens must be 1..num_tokens, got {new} for {seq_lens}")
    table = cache.block_table(ids, pad=0)
    qsl = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(new, out=qsl[1:])
    spans = [np.arange(n - k, n) for n, k in zip(seq_lens, new, strict=True)]
    pos = np.concatenate(spans) if spans else np.zeros(0, np.int64)
    row = np.repeat(np.arange(len(ids)), new)
    slots = table[row, pos // bs].astype(np.int64) * bs + pos % bs
    return BatchLayout(table, seq_lens, qsl, slots.astype(np.int64))


def _handle(cache: ferrumkv.KvCache, request_id: Any) -> ferrumkv.SequenceHandle:
    h = cache.get(request_id)
    if h is None:
        raise ferrumkv.UnknownRequestError(request_id)
    return h


# ----- the model ---------------------------------------------------------------------------------


class PagedLlama:
    """A `LlamaForCausalLM` whose attention reads and writes K/V in a `KvCache`."""

    def __init__(self, model: Any, cache: ferrumkv.KvCache) -> None:
        self.model = model
        self.cache = cache
        c = model.config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.device = next(model.parameters()).device
        self.num_forwards = 0

    @torch.no_grad()
    def forward(
        self, request_ids: Sequence[Any], new_tokens: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """One step: `new_tokens[i]` are the last tokens of sequence `request_ids[i]` (their
        slots already reserved by allocate / extend), computed now. Writes their K/V into the
        cache and returns, per sequence, the logits `[len(new_tokens[i]), vocab]` at those
        positions (the last row predicts the next token)."""
        ids = list(request_ids)
        counts = [len(t) for t in new_tokens]
        layout = batch_layout(self.cache, ids, counts)
        dev = self.device
        flat = torch.as_tensor(np.concatenate([np.asarray(t, np.int64) for t in new_tokens]))
        seq_lens = layout.seq_lens.astype(np.int64)
        positions = np.concatenate(
            [np.arange(n - k, n) for n, k in zip(seq_lens, counts, strict=True)]
        )
        lm = self.model.model
        x = lm.embed_tokens(flat.to(dev))[None]  # [1, T, hidden]
        pos_ids = torch.as_tensor(positions, device=dev)[None]
        cos, sin = lm.rotary_emb(x, pos_ids)
        slot_mapping = torch.as_tensor(layout.slot_mapping, device=dev)
        t = flat.shape[0]
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, t, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, t, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache, v_cache = layer_kv(self.cache, i)
            write_kv_slots(k_cache, v_cache, slot_mapping, k[0].transpose(0, 1), v[0])
            o = paged_attention(q[0].transpose(0, 1), k_cache, v_cache, layout, attn.scaling)
            x = x + attn.o_proj(o.reshape(1, t, self.num_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(lm.norm(x))[0]
        if dev.type == "cuda":
            # The engine's next copies (swap, offload, copy-on-write) must see these writes.
            torch.cuda.synchronize(dev)
        self.num_forwards += 1
        return list(torch.split(logits, counts))


@torch.no_grad()
def reference_logits(model: Any, tokens: Sequence[int]) -> torch.Tensor:
    """`[len(tokens), vocab]` logits of one full-context forward of transformers' own model."""
    dev = next(model.parameters()).device
    ids = torch.as_tensor([list(tokens)], device=dev)
    return model(input_ids=ids, use_cache=False).logits[0]
