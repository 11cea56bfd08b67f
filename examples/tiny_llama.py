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


# The engine's layout (numpy arrays; `.to_torch(device)` gives tensors), re-exported.
BatchLayout = ferrumkv.BatchLayout


def batch_layout(
    cache: ferrumkv.KvCache, request_ids: Sequence[Any], num_new_tokens: int | Sequence[int]
) -> BatchLayout:
    """The layout of one step in which each sequence computes its last `num_new_tokens`:
    `KvCache.batch_layout` (README, "A decode step"), in one engine call.
    tests/test_real_model.py checks it against a layout built from `block_table` and the
    handles' `num_tokens`."""
    return cache.batch_layout(list(request_ids), num_new_tokens)


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
        if self.device.type == "cuda":
            # The engine's copies (swap, offload, onboard, copy-on-write) are ordered against
            # the stream these kernels run on: no synchronize between steps.
            cache.set_compute_stream(torch.cuda.current_stream(self.device))
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
        self.num_forwards += 1
        return list(torch.split(logits, counts))


@torch.no_grad()
def reference_logits(model: Any, tokens: Sequence[int]) -> torch.Tensor:
    """`[len(tokens), vocab]` logits of one full-context forward of transformers' own model."""
    dev = next(model.parameters()).device
    ids = torch.as_tensor([list(tokens)], device=dev)
    return model(input_ids=ids, use_cache=False).logits[0]
