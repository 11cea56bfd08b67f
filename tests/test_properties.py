"""Property tests: random sequences of allocate / extend / deallocate / fork / write_kv /
gc against a model of the K/V bytes each live sequence wrote (a write into a block the
writer computes lands in place, seen by the requests that share it as a prefix hit; any other
write into a shared block is copied first), with the prefix cache on and off. After every
step each live sequence reads back exactly what it wrote, the block figures add up and the
engine's invariant check passes."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ferrumkv
from ferrumkv import OutOfBlocksError
from helpers import check_invariants, drive, gauges, make_config

BS = 4
NUM_BLOCKS = 12
LAYERS = 2

small_ids = st.integers(0, 3)
# Prompts are made of a few fixed blocks (two of them agree on their first 2 tokens) and a
# tail, so they share whole blocks and partial blocks often.
CHUNKS = [[0, 0, 0, 0], [0, 0, 1, 1], [2, 3, 2, 3]]
token_lists = st.builds(
    lambda chunks, tail: [t for c in chunks for t in CHUNKS[c]] + tail,
    st.lists(st.integers(0, len(CHUNKS) - 1), max_size=3),
    st.lists(small_ids, max_size=5),
).filter(bool)

alloc_op = st.tuples(st.just("alloc"), token_lists, st.sampled_from([None, None, "s"]))
extend_op = st.tuples(
    st.just("extend"),
    st.integers(0, 50),
    st.one_of(st.lists(small_ids, min_size=1, max_size=6), st.integers(1, 6)),
)
dealloc_op = st.tuples(st.just("dealloc"), st.integers(0, 50))
fork_op = st.tuples(st.just("fork"), st.integers(0, 50))
write_op = st.tuples(
    st.just("write"),
    st.integers(0, 50),
    st.integers(0, LAYERS - 1),
    st.integers(0, 1000),
    st.integers(1, 9),
)
gc_op = st.tuples(st.just("gc"), st.sampled_from([0.0, 0.5, 1.0]))
# one_of picks a branch uniformly: allocs and writes come more often than gc
ops = st.one_of(
    alloc_op, alloc_op, alloc_op, extend_op, extend_op, dealloc_op, dealloc_op, fork_op,
    write_op, write_op, gc_op,
)  # fmt: skip


class Model:
    """What each live sequence must hold: its length and the K/V bytes it wrote."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.data: dict[str, dict[tuple[int, int], tuple[bytes, bytes]]] = {}
        self.counter = 0

    def pick(self, i: int) -> str | None:
        rids = sorted(self.n)
        return rids[i % len(rids)] if rids else None


def kv_for(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 2**16, size=(n, 2, 4), dtype=np.uint16).view(np.float16)
    v = rng.integers(0, 2**16, size=(n, 2, 4), dtype=np.uint16).view(np.float16)
    return k, v


def check(cache: ferrumkv.KvCache, model: Model) -> None:
    s = cache.stats()
    d = s.device
    assert d.used_blocks + d.free_blocks == d.total_blocks == NUM_BLOCKS
    assert s.num_sequences == len(model.n) == len(cache)
    owned: set[int] = set()
    for rid, n in model.n.items():
        h = cache.get(rid)
        assert h is not None and h.num_tokens == n
        assert len(h.block_ids) == -(-n // BS)
        assert len(set(h.block_ids)) == len(h.block_ids)
        owned.update(h.block_ids)
        written = model.data[rid]
        for layer in range(LAYERS):
            k, v = cache.read_kv(rid, layer, 0, n)
            for (lay, pos), (kb, vb) in written.items():
                if lay == layer:
                    assert k[pos].tobytes() == kb, (rid, layer, pos, "K")
                    assert v[pos].tobytes() == vb, (rid, layer, pos, "V")
    assert d.used_blocks == len(owned)
    check_invariants(cache)


def step(cache: ferrumkv.KvCache, model: Model, op: tuple, prefix_cache: bool) -> None:
    kind = op[0]
    model.counter += 1
    rid = f"r{model.counter}"
    before = gauges(cache)
    if kind == "alloc":
        tokens, salt = op[1], op[2]
        try:
            h = drive(cache.allocate(rid, tokens, salt=salt, timeout=0))
        except OutOfBlocksError:
            assert gauges(cache) == before
            return
        assert h.num_tokens == len(tokens)
        assert h.num_cached_tokens <= len(tokens) - 1
        if not prefix_cache:
            assert h.num_cached_tokens == 0
        model.n[rid] = len(tokens)
        model.data[rid] = {}
        return
    if kind == "gc":
        g = drive(cache.gc(target_free_ratio=op[1]))
        assert g.freed_bytes == g.evicted_blocks * cache.config.bytes_per_block
        if op[1] == 1.0:
            assert cache.stats().device.evictable_blocks == 0
        return
    target = model.pick(op[1])
    if target is None:
        return
    if kind == "extend":
        tokens = op[2]
        try:
            h = drive(cache.extend(target, tokens, timeout=0))
        except OutOfBlocksError:
            assert gauges(cache) == before
            return
        added = tokens if isinstance(tokens, int) else len(tokens)
        model.n[target] += added
        assert h.num_tokens == model.n[target]
    elif kind == "dealloc":
        drive(cache.deallocate(target))
        del model.n[target], model.data[target]
        assert target not in cache
    elif kind == "fork":
        h = drive(cache.fork(target, rid))
        assert h.block_ids == cache.get(target).block_ids
        model.n[rid] = model.n[target]
        model.data[rid] = dict(model.data[target])
    elif kind == "write":
        layer, start, n = op[2], op[3] % model.n[target], op[4]
        n = min(n, model.n[target] - start)
        k, v = kv_for(model.counter, n)
        held = {r: cache.get(r).block_ids for r in model.n}
        try:
            cache.write_kv(target, layer, start, k, v)
        except OutOfBlocksError:  # no free block for a copy-on-write
            assert gauges(cache) == before
            return
        after = cache.get(target).block_ids
        for i in range(n):
            pos = start + i
            b = pos // BS
            kv = (k[i].tobytes(), v[i].tobytes())
            model.data[target][(layer, pos)] = kv
            if after[b] == held[target][b]:
                # written in place (a block the target computes): every sharer reads it too
                for r, ids in held.items():
                    if r != target and b < len(ids) and ids[b] == after[b]:
                        model.data[r][(layer, pos)] = kv


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(program=st.lists(ops, min_size=20, max_size=60), prefix_cache=st.booleans())
def test_random_programs_keep_data_and_bookkeeping(program, prefix_cache) -> None:
    cache = ferrumkv.KvCache(make_config(num_blocks=NUM_BLOCKS, enable_prefix_cache=prefix_cache))
    model = Model()
    for op in program:
        step(cache, model, op, prefix_cache)
        check(cache, model)
    s = cache.stats()
    event(f"copies: {min(s.intra_device_copy_blocks, 3)}")
    event(f"evicted: {min(s.evicted_blocks, 3)}")
    event(f"reused: {min(s.full_reused_blocks + s.partial_reused_blocks, 3)}")
    for rid in list(model.n):
        drive(cache.deallocate(rid))
    s = cache.stats()
    assert s.device.used_blocks == 0
    assert s.device.free_blocks == NUM_BLOCKS
    assert s.num_sequences == 0
    if not prefix_cache:
        assert s.device.evictable_blocks == 0
    check_invariants(cache)
    assert drive(cache.gc(target_free_ratio=1.0)).evicted_blocks == s.device.evictable_blocks
    cache.close()


@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.lists(small_ids, min_size=1, max_size=20), min_size=1, max_size=12))
def test_cached_prefix_is_a_real_prefix(prompts) -> None:
    """num_cached_tokens <= len - 1, and the cached positions hold what the earlier
    sequence with the same leading tokens wrote there."""
    cache = ferrumkv.KvCache(make_config(num_blocks=64))
    # every position's K is a function of the token ids up to it (as a model would make)
    written: dict[tuple[int, ...], bytes] = {}
    for i, tokens in enumerate(prompts):
        h = drive(cache.allocate(f"p{i}", tokens, timeout=0))
        assert 0 <= h.num_cached_tokens <= len(tokens) - 1
        if h.num_cached_tokens:
            k, _ = cache.read_kv(f"p{i}", 0, 0, h.num_cached_tokens)
            for pos in range(h.num_cached_tokens):
                want = written.get(tuple(tokens[: pos + 1]))
                assert want is not None and k[pos].tobytes() == want, (i, pos)
        # compute the rest: K at pos encodes the prefix that produced it
        n = len(tokens)
        k = np.empty((n, 2, 4), np.float16)
        for pos in range(n):
            key = tuple(tokens[: pos + 1])
            seed = hash(key) & 0xFFFF_FFFF
            k[pos] = np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float16)
            written.setdefault(key, k[pos].tobytes())
        start = h.num_cached_tokens
        cache.write_kv(f"p{i}", 0, start, k[start:], k[start:])
        if i % 3 == 2:
            drive(cache.deallocate(f"p{i - 1}"))
    check_invariants(cache)
    cache.close()
