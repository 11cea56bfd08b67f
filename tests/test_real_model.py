"""A real transformer served from ferrumkv: a tiny `transformers` Llama (random weights from a
seeded config, float32) whose K/V live only in the cache (`examples/tiny_llama.py`), checked
against transformers' own full-context forward.

Each test runs one engine feature on the model and requires, for every sequence, that each
greedy token is transformers' argmax and that every logit the paged model computed is within
`ATOL` of the full-context forward's at the same position. A prefix hit, a partial copy, a
copy-on-write, a swap, an offload / onboard or a recompute that served one wrong byte moves
the logits by far more than that (they are O(1)); the error the paged path itself adds (the
attention over gathered blocks instead of one matrix) measures about 2e-6.

Chunked prefill, `truncate` and `batch_layout` (README, "A scheduler step, end to end") are tested
here on the model too; the model's layout is the engine's `batch_layout`.

Cost: one model per device, a few dozen steps of 2 layers per test: each test takes under a
second on 2 cores; the file takes 20 to 30 s, most of it importing transformers (here and in
the subprocess that runs the example script).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ferrumkv
from helpers import check_invariants

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import serve_tiny_llama  # noqa: E402
import tiny_llama  # noqa: E402
from tiny_llama import PagedLlama, build_model, cache_config, reference_logits  # noqa: E402

ATOL = 1e-4
BS = 4  # block_size of every cache here

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module", params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


_MODELS: dict[str, Any] = {}


@pytest.fixture
def model(device: str) -> Any:
    if device not in _MODELS:
        _MODELS[device] = build_model(device)
    return _MODELS[device]


def new_cache(model: Any, device: str, **kw: Any) -> ferrumkv.KvCache:
    cache_device = "cuda:0" if device == "cuda" else "cpu"
    return ferrumkv.KvCache(cache_config(model, device=cache_device, block_size=BS, **kw))


def prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 128, size=n)]


# ----- the driver: sequences, steps and the check against transformers ---------------------


@dataclass
class Seq:
    tokens: list[int]  # every known token: prompt + generated (the last one may have no K/V)
    num_prompt: int
    computed: int = 0  # leading tokens whose K/V are in the cache
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> row
    forced: set[int] = field(default_factory=set)  # positions not chosen by argmax

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]


class Driver:
    """Runs sequences through `PagedLlama` step by step; every step is one batched forward of
    each listed sequence's tokens that have slots but no K/V yet."""

    def __init__(self, model: Any, cache: ferrumkv.KvCache) -> None:
        self.model, self.cache = model, cache
        self.paged = PagedLlama(model, cache)
        self.seqs: dict[Any, Seq] = {}

    async def admit(self, rid: Any, tokens: list[int], **kw: Any) -> ferrumkv.SequenceHandle:
        h = await self.cache.allocate(rid, tokens, timeout=0, **kw)
        old = self.seqs.get(rid)
        seq = Seq(list(tokens), old.num_prompt if old else len(tokens), h.num_cached_tokens)
        if old is not None:  # resumed after preemption by recompute: keep what was checked
            seq.logits, seq.forced = old.logits, old.forced
        self.seqs[rid] = seq
        return h

    def step(self, rids: list[Any]) -> None:
        """One forward of every listed sequence's tokens with slots and no K/V; a sequence
        whose every token is then computed samples its next token (greedy)."""
        news = []
        for r in rids:
            s, n = self.seqs[r], self.cache.get(r).num_tokens
            assert n > s.computed, f"{r!r}: nothing to compute"
            news.append((s, n))
        out = self.paged.forward(rids, [s.tokens[s.computed : n] for s, n in news])
        for (s, n), rows in zip(news, out, strict=True):
            for p, row in zip(range(s.computed, n), rows, strict=True):
                s.logits[p] = row
            s.computed = n
            if n == len(s.tokens):
                s.tokens.append(int(rows[-1].argmax()))

    async def extend(self, rids: list[Any]) -> None:
        """A decode step's bookkeeping: each sequence appends its last sampled token."""
        for r in rids:
            s = self.seqs[r]
            assert s.computed == len(s.tokens) - 1
            await self.cache.extend(r, [s.tokens[-1]], timeout=0)

    async def decode(self, rids: list[Any], steps: int) -> None:
        for _ in range(steps):
            await self.extend(rids)
            self.step(rids)
            check_invariants(self.cache)

    def check(self, rid: Any) -> float:
        """Every greedy token is transformers' argmax and every logit is within ATOL of its
        full-context forward; returns the largest difference."""
        s = self.seqs[rid]
        ref = reference_logits(self.model, s.tokens)
        for p in range(s.num_prompt, len(s.tokens)):
            if p not in s.forced:
                assert s.tokens[p] == int(ref[p - 1].argmax()), f"{rid!r}: token {p} differs"
        assert s.logits, f"{rid!r}: nothing computed"
        worst = max(float((row - ref[p]).abs().max()) for p, row in s.logits.items())
        assert worst < ATOL, f"{rid!r}: logits off by {worst:.3g}"
        return worst

    def check_all(self) -> float:
        return max(self.check(r) for r in self.seqs)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ----- 0. the paged model is transformers' model -------------------------------------------


def test_batched_prefill_and_decode_match_transformers(model: Any, device: str) -> None:
    """Three prompts prefilled in one forward, decoded together, then a fourth admitted while
    they decode (a prefill and three decode steps in one forward); every token equals
    transformers' greedy `generate`."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=32) as cache:
            d = Driver(model, cache)
            lens = {"a": 11, "b": 7, "c": 5}
            for i, (r, n) in enumerate(lens.items()):
                await d.admit(r, prompt(i, n))
            d.step(["a", "b", "c"])
            await d.decode(["a", "b", "c"], 3)
            await d.admit("d", prompt(3, 9))
            await d.extend(["a", "b", "c"])
            d.step(["a", "b", "c", "d"])
            assert d.paged.num_forwards == 5
            await d.decode(["a", "b", "c", "d"], 4)
            assert d.check_all() < ATOL
            for r in ("a", "b", "c", "d"):
                s = d.seqs[r]
                ids = torch.as_tensor([s.tokens[: s.num_prompt]], device=model.device)
                g = model.generate(ids, max_new_tokens=len(s.generated), do_sample=False)
                assert g[0].tolist() == s.tokens, r

    run(main())


# ----- 1. prefix reuse --------------------------------------------------------------------


def test_prefix_reuse_skips_cached_tokens_with_identical_results(model: Any, device: str) -> None:
    """b shares a's first 10 tokens (2 full blocks shared, a third block partly matching and
    copied): only its last 4 tokens are computed. c is a's prompt again: 13 of 14 tokens
    come from the cache (3 full blocks and a partial copy of a block a filled decoding)."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=32) as cache:
            d = Driver(model, cache)
            a_prompt = prompt(10, 14)
            a = await d.admit("a", a_prompt)
            d.step(["a"])
            await d.decode(["a"], 3)
            cache.iteration_stats()
            b = await d.admit("b", [*a_prompt[:10], 90, 91, 92, 93])
            c = await d.admit("c", a_prompt)
            assert (b.num_cached_tokens, c.num_cached_tokens) == (10, 13)
            assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
            assert c.block_ids[:3] == a.block_ids[:3]
            it = cache.iteration_stats()
            assert (it.full_reused_blocks, it.partial_reused_blocks) == (2 + 3, 1 + 1)
            assert (it.input_tokens, it.cache_tokens) == (4 + 1, 10 + 13)
            d.step(["b", "c"])
            assert [len(d.seqs[r].logits) for r in ("b", "c")] == [4, 1]
            await d.decode(["a", "b", "c"], 4)
            assert d.seqs["c"].generated == d.seqs["a"].generated[: len(d.seqs["c"].generated)]
            d.check_all()

    run(main())


# ----- 2. fork for n = 2 ------------------------------------------------------------------


def test_fork_gives_two_continuations_of_one_prompt(model: Any, device: str) -> None:
    """n = 2 sampling: after the prefill the child forks from the parent and takes the
    second-best token; both decode in one batch. The child shares the parent's full blocks;
    its first append copies the shared partial block (copy-on-write)."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=32) as cache:
            d = Driver(model, cache)
            p = await d.admit("p", prompt(20, 10))
            d.step(["p"])
            child = await cache.fork("p", "p/1")
            assert child.block_ids == p.block_ids
            parent = d.seqs["p"]
            second = int(parent.logits[9].topk(2).indices[1])
            d.seqs["p/1"] = Seq(
                [*parent.tokens[:-1], second],
                parent.num_prompt,
                parent.computed,
                dict(parent.logits),
                {10},
            )
            await d.decode(["p", "p/1"], 5)
            a, b = cache.get("p"), cache.get("p/1")
            assert a.block_ids[:2] == b.block_ids[:2] and a.block_ids[2] != b.block_ids[2]
            assert d.seqs["p"].generated[0] != d.seqs["p/1"].generated[0]
            assert cache.stats().intra_device_copy_blocks == 1
            d.check_all()

    run(main())


# ----- 3. preemption ----------------------------------------------------------------------


def test_preemption_by_swap_mid_generation(model: Any, device: str) -> None:
    """b is swapped out to the host tier mid-generation while a and c go on decoding, then
    swapped back in (on other block ids) and finishes: all three are transformers'."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=16, host_blocks=16) as cache:
            d = Driver(model, cache)
            for i, r in enumerate("abc"):
                await d.admit(r, prompt(30 + i, 9 - i))
            d.step(list("abc"))
            await d.decode(list("abc"), 2)
            before = cache.get("b")
            out = await cache.swap_out("b")
            assert out.tier == "host" and len(out.block_ids) == len(before.block_ids) == 3
            await d.decode(["a", "c"], 2)
            await d.admit("x", prompt(39, 16))  # takes b's old blocks
            d.step(["x"])
            back = await cache.swap_in("b")
            assert back.tier == "device" and back.block_ids != before.block_ids
            s = cache.stats()
            assert (s.d2h_blocks_copied, s.h2d_blocks_copied) == (3, 3)
            await d.decode(list("abc"), 3)
            d.check_all()

    run(main())


def test_preemption_by_recompute_mid_generation(model: Any, device: str) -> None:
    """a is deallocated mid-generation and re-admitted with its prompt and generated tokens:
    its full blocks are prefix hits, only the tail is recomputed, and it goes on exactly."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=32) as cache:
            d = Driver(model, cache)
            await d.admit("a", prompt(40, 10))
            await d.admit("b", prompt(41, 6))
            d.step(["a", "b"])
            await d.decode(["a", "b"], 3)
            await cache.deallocate("a")
            await d.decode(["b"], 2)
            tokens = d.seqs["a"].tokens  # 10 prompt + 4 generated; 13 had K/V
            assert len(tokens) == 14
            h = await d.admit("a", tokens, preempted=True)
            assert h.num_cached_tokens == 12  # the 3 full blocks
            d.step(["a"])
            assert d.seqs["a"].computed == 14
            await d.decode(["a", "b"], 3)
            d.check_all()

    run(main())


# ----- 4. host tier: offload on eviction, onboard on a hit ---------------------------------


def test_host_tier_offload_and_onboard(model: Any, device: str) -> None:
    """A device tier of 8 blocks: a's 3 cached full blocks are evicted (offloaded to the
    host tier) by b's prompt, then c = a's prompt finds them there and onboards them."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=8, host_blocks=16) as cache:
            d = Driver(model, cache)
            a_prompt = prompt(50, 13)
            await d.admit("a", a_prompt)
            d.step(["a"])
            await d.decode(["a"], 2)
            await cache.deallocate("a")
            await d.admit("b", prompt(51, 30))  # 8 blocks: evicts a's 3
            d.step(["b"])
            s = cache.stats()
            assert (s.evicted_blocks, s.offload_blocks, s.host.evictable_blocks) == (3, 3, 3)
            await cache.deallocate("b")
            c = await d.admit("c", a_prompt)
            assert c.num_cached_tokens == 12
            assert cache.stats().onboard_blocks == 3
            d.step(["c"])
            await d.decode(["c"], 3)
            assert d.seqs["c"].generated[:3] == d.seqs["a"].generated[:3]
            d.check_all()

    run(main())


# ----- 5. chunked prefill and speculative decoding (second-round API) ----------------------


def test_chunked_prefill_mixed_with_decode(model: Any, device: str) -> None:
    """a's 13-token prompt runs in chunks of 5, 5 and 3, each in one forward with b's decode
    steps; its first token comes from the last chunk."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=32) as cache:
            d = Driver(model, cache)
            await d.admit("b", prompt(61, 6))
            d.step(["b"])
            h = await d.admit("a", prompt(60, 13), num_new_tokens=5)
            assert (h.num_tokens, h.num_prompt_tokens) == (5, 13)
            for chunk in (5, 3):
                await d.extend(["b"])
                d.step(["a", "b"])
                assert len(d.seqs["a"].tokens) == 13  # no token sampled mid-prompt
                h = await cache.extend("a", num_new_tokens=chunk)
            assert h.num_tokens == 13
            await d.extend(["b"])
            d.step(["a", "b"])
            assert len(d.seqs["a"].tokens) == 14
            await d.decode(["a", "b"], 3)
            d.check_all()

    run(main())


def test_speculative_step_with_truncate(model: Any, device: str) -> None:
    """Speculative decoding: three draft tokens (the true next one, then two wrong ones) are
    verified in one forward; the rejected two are truncated away and decoding goes on, with
    the same tokens as plain greedy decoding."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=32) as cache:
            d = Driver(model, cache)
            p = prompt(70, 10)
            await d.admit("a", p)
            d.step(["a"])
            await d.decode(["a"], 2)  # 13 tokens, 12 computed
            s = d.seqs["a"]
            greedy = reference_logits(model, s.tokens).argmax(-1)[-1].item()
            drafts = [int(greedy), (int(greedy) + 1) % 128, (int(greedy) + 2) % 128]
            base = len(s.tokens)
            await cache.extend("a", [s.tokens[-1], *drafts], timeout=0)
            s.tokens += drafts
            d.step(["a"])  # verifies: logits at base-1 .. base+2
            s.tokens.pop()  # step() sampled past the drafts: not part of this check
            accepted = 0
            for i, t in enumerate(drafts):
                if int(s.logits[base - 1 + i].argmax()) != t:
                    break
                accepted += 1
            assert accepted == 1
            keep = base + accepted  # tokens whose K/V stay
            h = await cache.truncate("a", keep)
            assert h.num_tokens == keep
            del s.tokens[keep:]
            for pos in range(keep, base + len(drafts)):
                s.logits.pop(pos, None)
            s.computed = keep
            s.tokens.append(int(s.logits[keep - 1].argmax()))  # the bonus token
            check_invariants(cache)
            await d.decode(["a"], 3)
            d.check("a")

    run(main())


def _reference_layout(
    cache: ferrumkv.KvCache, request_ids: list[Any], num_new_tokens: list[int]
) -> dict[str, np.ndarray]:
    """The layout of one step built in numpy from `block_table` and the handles'
    `num_tokens` (what tiny_llama used before the engine had `batch_layout`)."""
    bs = cache.config.block_size
    new = np.asarray(num_new_tokens, dtype=np.int64)
    seq_lens = np.array([cache.get(r).num_tokens for r in request_ids], dtype=np.int32)
    table = cache.block_table(request_ids, pad=0)
    qsl = np.zeros(len(request_ids) + 1, dtype=np.int32)
    np.cumsum(new, out=qsl[1:])
    pos = np.concatenate([np.arange(n - k, n) for n, k in zip(seq_lens, new, strict=True)])
    row = np.repeat(np.arange(len(request_ids)), new)
    slots = table[row, pos // bs].astype(np.int64) * bs + pos % bs
    return {
        "block_table": table,
        "seq_lens": seq_lens,
        "query_start_loc": qsl,
        "slot_mapping": slots,
    }


def test_model_layout_is_the_engines_and_matches_one_built_from_block_tables(
    model: Any, device: str
) -> None:
    """tiny_llama.batch_layout is the engine's `batch_layout`, and equals (dtypes included)
    a layout built from `block_table` and the handles, on a batch of a prefill, a prefix hit
    and decode steps; `.to_torch` carries the same values."""

    async def main() -> None:
        with new_cache(model, device, num_blocks=32) as cache:
            d = Driver(model, cache)
            await d.admit("a", prompt(80, 9))
            d.step(["a"])
            await d.extend(["a"])
            await d.admit("b", [*prompt(80, 9)[:8], 5, 6])
            await d.admit("c", prompt(81, 3))
            ids, new = ["a", "b", "c"], [1, 2, 3]
            ours = tiny_llama.batch_layout(cache, ids, new)
            assert isinstance(ours, ferrumkv.BatchLayout)
            want = _reference_layout(cache, ids, new)
            assert want["block_table"].shape[1] > 1 and len(want["slot_mapping"]) == 6
            on = ours.to_torch(device)
            for name, b in want.items():
                a = getattr(ours, name)
                assert a.dtype == b.dtype and np.array_equal(a, b), name
                t = getattr(on, name)
                assert t.device.type == device and np.array_equal(t.cpu().numpy(), b), name

    run(main())


# ----- 6. everything together: the example's serving loop ---------------------------------


def test_serving_loop_runs_every_feature_and_matches_transformers(model: Any, device: str) -> None:
    """The example's continuous-batching loop under memory pressure: prefix reuse, n = 2
    forks, swaps and recomputes, offload and onboard (and chunked prefill / speculative
    steps when the engine has them) all happen, and every output is transformers' greedy."""
    report = serve_tiny_llama.run_demo(model, device="cuda:0" if device == "cuda" else "cpu")
    r = report
    assert r.num_finished == r.num_requests and r.mismatches == 0
    assert r.max_abs_logit_diff < ATOL
    s = r.stats
    assert r.num_forks >= 1 and r.num_swapped >= 1 and r.num_recomputed >= 1
    assert s.full_reused_blocks > 0 and s.partial_reused_blocks > 0
    assert s.offload_blocks > 0 and s.onboard_blocks > 0
    assert s.swap_out_count == s.swap_in_count == r.num_swapped
    assert r.num_chunked >= 1 and r.num_spec_steps >= 1


@pytest.mark.slow
def test_example_script_runs() -> None:
    """`python examples/serve_tiny_llama.py` runs on its own and verifies its outputs."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_tiny_llama.py"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "outputs identical to transformers" in p.stdout, p.stdout
