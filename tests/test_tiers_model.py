"""The tiers against a model: a hypothesis state machine of allocations (new prompts and
prefixes asked for again), swaps, extends, rewrites, deallocations and gc over all three
tiers, every live sequence checked byte for byte against `TierModel` after each rule.

Shared setup: `tiers_helpers` (what goes where, the helpers).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ferrumkv
from ferrumkv import InvalidStateError, OutOfBlocksError
from helpers import BS, assert_stats_unchanged, dealloc, drive, make_config, stats_dict
from tiers_helpers import (
    HEAD_DIM,
    HEADS,
    LAYERS,
    TIERS,
    TOKEN_BYTES,
    assert_all_unused,
    assert_tiers_consistent,
)

P_DEVICE, P_HOST, P_DISK = 8, 4, 8


# Prompts are made of a few fixed blocks (two agree on their first 3 tokens) and a tail, so
# they share whole blocks and partial blocks often; "again" repeats an earlier prompt (or
# its first blocks), so a prefix evicted to the host or the disk is asked for again.
P_CHUNKS = [[1, 2, 3, 4], [1, 2, 3, 5], [6, 6, 6, 6]]


p_prompts = st.builds(
    lambda chunks, tail: [t for c in chunks for t in P_CHUNKS[c]] + tail,
    st.lists(st.integers(0, len(P_CHUNKS) - 1), min_size=1, max_size=4),
    st.lists(st.integers(0, 9), max_size=3),
)


p_pick = st.integers(0, 50)


_ROWS: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray]] = {}


def kv_row(prefix: tuple[int, ...], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of the last position of `prefix`: a function of the tokens up to it."""
    key = (prefix, layer)
    row = _ROWS.get(key)
    if row is None:
        h = hashlib.blake2b(repr(key).encode(), digest_size=2 * TOKEN_BYTES).digest()
        raw = np.frombuffer(h, dtype=np.uint16).view(np.float16).reshape(2, HEADS, HEAD_DIM)
        row = _ROWS[key] = (raw[0], raw[1])
    return row


class TierModel:
    """Each live sequence's token ids (-1 for tokens extended by count) and tier."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.swapped: set[int] = set()
        self.next_id = 0
        self.prompts: list[list[int]] = []

    def pick(self, i: int, swapped_first: bool = False) -> int | None:
        """The i-th live sequence (a swapped-out one if any and `swapped_first`)."""
        rids = sorted(self.swapped) if swapped_first and self.swapped else sorted(self.tokens)
        return rids[i % len(rids)] if rids else None

    def expected(self, rid: int, start: int, stop: int, layer: int) -> tuple[bytes, bytes]:
        toks = tuple(self.tokens[rid])
        rows = [kv_row(toks[: p + 1], layer) for p in range(start, stop)]
        return b"".join(r[0].tobytes() for r in rows), b"".join(r[1].tobytes() for r in rows)


def write_model(cache: ferrumkv.KvCache, model: TierModel, rid: int, start: int) -> None:
    n = len(model.tokens[rid])
    if start >= n:
        return
    for layer in range(LAYERS):
        kb, vb = model.expected(rid, start, n, layer)
        shape = (n - start, HEADS, HEAD_DIM)
        k = np.frombuffer(kb, dtype=np.float16).reshape(shape)
        v = np.frombuffer(vb, dtype=np.float16).reshape(shape)
        cache.write_kv(rid, layer, start, k, v)


def check_model(cache: ferrumkv.KvCache, model: TierModel) -> None:
    s = cache.stats()
    assert s.num_sequences == len(model.tokens) == len(cache)
    assert s.num_swapped == len(model.swapped)
    device_owned: set[int] = set()
    host_owned = 0
    for rid, toks in model.tokens.items():
        h = cache.get(rid)
        assert h is not None and h.num_tokens == len(toks)
        if rid in model.swapped:
            assert h.tier == "host"
            host_owned += len(h.block_ids)
            with pytest.raises(InvalidStateError):
                cache.read_kv(rid, 0, 0, 1)
            continue
        assert h.tier == "device"
        device_owned.update(h.block_ids)
        for layer in range(LAYERS):
            k, v = cache.read_kv(rid, layer, 0, len(toks))
            want_k, want_v = model.expected(rid, 0, len(toks), layer)
            assert k.tobytes() == want_k, f"K of request {rid}, layer {layer}"
            assert v.tobytes() == want_v, f"V of request {rid}, layer {layer}"
    assert s.device.used_blocks == len(device_owned)
    assert s.host.used_blocks == host_owned
    assert_tiers_consistent(cache)


class TierMachine(RuleBasedStateMachine):
    """One cache with all three tiers, driven by rules; `TierModel` holds what every live
    sequence's K/V must be, and `check_model` reads every one of them back after each rule.
    Before each rule the disk writes have landed (deterministic spills)."""

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        cfg = make_config(
            num_blocks=P_DEVICE,
            host_blocks=P_HOST,
            disk_path=os.path.join(self._dir.name, "kv.bin"),
            disk_blocks=P_DISK,
        )
        self.cache = ferrumkv.KvCache(cfg)
        self.model = TierModel()

    def _settled(self) -> dict[str, Any]:
        self.cache._core.wait_disk_idle()
        return stats_dict(self.cache)

    def _allocate(self, prompt: list[int]) -> None:
        before = self._settled()
        model, cache = self.model, self.cache
        model.prompts.append(prompt)
        rid = model.next_id
        model.next_id += 1
        looked_up = cache.lookup_prefix(prompt).num_cached_tokens
        try:
            h = drive(cache.allocate(rid, prompt, timeout=0))
        except OutOfBlocksError:
            assert_stats_unchanged(cache, before)
        else:
            assert h.num_cached_tokens <= min(looked_up, len(prompt) - 1)
            model.tokens[rid] = list(prompt)
            write_model(cache, model, rid, h.num_cached_tokens)

    @rule(prompt=p_prompts)
    def alloc(self, prompt: list[int]) -> None:
        self._allocate(prompt)

    @precondition(lambda self: self.model.prompts)
    @rule(pick=p_pick, blocks=st.integers(1, 4))
    def again(self, pick: int, blocks: int) -> None:
        """An earlier prompt's first blocks and a token: a prefix that may have been evicted
        to the host or the disk tier is asked for again."""
        prompt = self.model.prompts[pick % len(self.model.prompts)]
        self._allocate(prompt[: blocks * BS + 1])

    # The rules' weights (the number of rules of each kind): alloc 2, again 3, swap_out 2,
    # swap_in 2, deallocate 2, gc 2, extend 1, rewrite 1; so prefixes go through every tier
    # and are asked for again, and swapped sequences come back, often.
    @rule(prompt=p_prompts)
    def alloc_2(self, prompt: list[int]) -> None:
        self._allocate(prompt)

    @precondition(lambda self: self.model.prompts)
    @rule(pick=p_pick, blocks=st.integers(1, 4))
    def again_2(self, pick: int, blocks: int) -> None:
        self.again(pick, blocks)

    @precondition(lambda self: self.model.prompts)
    @rule(pick=p_pick, blocks=st.integers(1, 4))
    def again_3(self, pick: int, blocks: int) -> None:
        self.again(pick, blocks)

    @rule(pick=p_pick)
    def swap_out(self, pick: int) -> None:
        rid = self.model.pick(pick, swapped_first=False)
        if rid is None:
            return
        before = self._settled()
        cache = self.cache
        if rid in self.model.swapped:
            with pytest.raises(InvalidStateError):
                drive(cache.swap_out(rid))
            assert_stats_unchanged(cache, before)
        elif len(cache.get(rid).block_ids) > cache.stats().host.free_blocks:
            with pytest.raises(OutOfBlocksError):
                drive(cache.swap_out(rid))
            assert_stats_unchanged(cache, before)
        else:
            assert drive(cache.swap_out(rid)).tier == "host"
            self.model.swapped.add(rid)

    @rule(pick=p_pick)
    def swap_in(self, pick: int) -> None:
        rid = self.model.pick(pick, swapped_first=True)
        if rid is None:
            return
        before = self._settled()
        cache = self.cache
        if rid not in self.model.swapped:
            with pytest.raises(InvalidStateError):
                drive(cache.swap_in(rid))
            assert_stats_unchanged(cache, before)
        elif len(cache.get(rid).block_ids) > cache.stats().device.free_blocks:
            with pytest.raises(OutOfBlocksError):
                drive(cache.swap_in(rid))
            assert_stats_unchanged(cache, before)
        else:
            assert drive(cache.swap_in(rid)).tier == "device"
            self.model.swapped.discard(rid)

    @rule(pick=p_pick)
    def deallocate(self, pick: int) -> None:
        rid = self.model.pick(pick, swapped_first=False)
        if rid is None:
            return
        self._settled()
        dealloc(self.cache, rid)
        del self.model.tokens[rid]
        self.model.swapped.discard(rid)

    @rule(
        pick=p_pick,
        new=st.one_of(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(1, 4)),
    )
    def extend(self, pick: int, new: list[int] | int) -> None:
        rid = self.model.pick(pick, swapped_first=False)
        if rid is None:
            return
        before = self._settled()
        cache, model = self.cache, self.model
        if rid in model.swapped:
            with pytest.raises(InvalidStateError):
                drive(cache.extend(rid, new, timeout=0))
            assert_stats_unchanged(cache, before)
            return
        try:
            drive(cache.extend(rid, new, timeout=0))
        except OutOfBlocksError:
            assert_stats_unchanged(cache, before)
        else:
            start = len(model.tokens[rid])
            model.tokens[rid] += [-1] * new if isinstance(new, int) else new
            write_model(cache, model, rid, start)

    @rule(pick=p_pick)
    def rewrite(self, pick: int) -> None:
        """The same bytes again: shared blocks are copied first (copy-on-write)."""
        rid = self.model.pick(pick, swapped_first=False)
        if rid is None or rid in self.model.swapped:
            return
        before = self._settled()
        try:
            write_model(self.cache, self.model, rid, 0)
        except OutOfBlocksError:
            assert_stats_unchanged(self.cache, before)

    @rule(target_free=st.sampled_from([0.5, 1.0]))
    def gc(self, target_free: float) -> None:
        self._settled()
        drive(self.cache.gc(target_free_ratio=target_free))

    @rule(pick=p_pick)
    def swap_out_2(self, pick: int) -> None:
        self.swap_out(pick)

    @rule(pick=p_pick)
    def swap_in_2(self, pick: int) -> None:
        self.swap_in(pick)

    @rule(pick=p_pick)
    def deallocate_2(self, pick: int) -> None:
        self.deallocate(pick)

    @rule()
    def gc_all(self) -> None:
        self.gc(1.0)

    @invariant()
    def every_sequence_reads_back_exact(self) -> None:
        self.cache._core.wait_disk_idle()
        check_model(self.cache, self.model)

    def teardown(self) -> None:
        cache = self.cache
        try:
            s = cache.stats()
            event(f"swaps out/in > 0: {s.swap_out_count > 0}/{s.swap_in_count > 0}")
            event(f"host onboards > 0: {s.onboard_blocks - s.disk_blocks_read > 0}")
            event(f"disk reads > 0: {s.disk_blocks_read > 0}")
            event(f"partial reuse > 0: {s.partial_reused_blocks > 0}")
            for rid in list(self.model.tokens):
                dealloc(cache, rid)
            assert_all_unused(cache)
            assert cache.reset_prefix_cache()
            cache._core.wait_disk_idle()
            s = cache.stats()
            assert [getattr(s, t).evictable_blocks for t in TIERS] == [0, 0, 0]
        finally:
            cache.close()
            self._dir.cleanup()


TestTiersAgainstTheModel = TierMachine.TestCase
TestTiersAgainstTheModel.settings = settings(
    max_examples=40,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
