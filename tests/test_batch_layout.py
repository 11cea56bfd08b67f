"""`batch_layout` (the metadata paged-attention kernels take for one forward step) and
`extend_batch` by token ids: exact block tables, lengths, query offsets and slot mappings for
a mixed prefill + decode + prefix-hit batch, `to_torch`, and bad input that changes nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ferrumkv
from ferrumkv import InvalidStateError, UnknownRequestError
from helpers import (
    alloc,
    assert_stats_unchanged,
    check_invariants,
    drive,
    make_config,
    new_cache,
    stats_dict,
)


def mixed() -> ferrumkv.KvCache:
    """block_size 4. "d": 5 tokens (blocks 0, 1), then one decode token; "p": a 10-token
    prompt (blocks 2, 3, 4); "c": p's first 8 tokens and 3 more (blocks 2, 3 shared, 5 new)."""
    cache = new_cache(num_blocks=16)
    alloc(cache, "d", [100, 101, 102, 103, 104])
    assert alloc(cache, "p", list(range(10))).block_ids == (2, 3, 4)
    drive(cache.extend_batch(["d"], [7]))
    c = alloc(cache, "c", [*range(8), 50, 51, 52])
    assert (c.block_ids, c.num_cached_tokens) == ((2, 3, 5), 8)
    return cache


def as_lists(layout: Any) -> dict[str, Any]:
    return {
        "block_table": layout.block_table.tolist(),
        "seq_lens": layout.seq_lens.tolist(),
        "query_start_loc": layout.query_start_loc.tolist(),
        "slot_mapping": layout.slot_mapping.tolist(),
    }


MIXED = {
    "block_table": [[2, 3, 4], [0, 1, 0], [2, 3, 5]],
    "seq_lens": [10, 6, 11],
    "query_start_loc": [0, 10, 11, 14],
    # p: positions 0..10 over blocks 2, 3, 4; d: position 5 in block 1; c: 8..11 in block 5
    "slot_mapping": [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 5, 20, 21, 22],
}


def test_mixed_prefill_decode_and_prefix_hit_batch() -> None:
    cache = mixed()
    layout = cache.batch_layout(["p", "d", "c"], [10, 1, 3])
    assert isinstance(layout, ferrumkv.BatchLayout)
    assert as_lists(layout) == MIXED
    assert [a.dtype for a in (layout.block_table, layout.seq_lens, layout.query_start_loc)] == [
        np.int32
    ] * 3
    assert layout.slot_mapping.dtype == np.int64
    assert layout.block_table.shape == (3, 3)
    assert (layout.num_seqs, layout.max_blocks, layout.num_tokens) == (3, 3, 14)
    assert (layout.max_query_len, layout.max_seq_len) == (10, 11)
    assert repr(layout) == (
        "BatchLayout(num_seqs=3, max_blocks=3, num_tokens=14, max_query_len=10, max_seq_len=11)"
    )
    assert set(layout.to_dict()) == {*MIXED, "max_query_len", "max_seq_len"}
    # the same counts as an array; the padding as -1
    again = cache.batch_layout(("p", "d", "c"), np.array([10, 1, 3], dtype=np.int32), pad=-1)
    assert again.block_table.tolist() == [[2, 3, 4], [0, 1, -1], [2, 3, 5]]
    assert again.slot_mapping.tolist() == MIXED["slot_mapping"]
    check_invariants(cache)


def test_a_chunk_and_decode_steps() -> None:
    cache = mixed()
    # the last 2 tokens of p's prompt (a prefill chunk) beside one decode token of d
    layout = cache.batch_layout(["d", "p"], [1, 2])
    assert as_lists(layout) == {
        "block_table": [[0, 1, 0], [2, 3, 4]],
        "seq_lens": [6, 10],
        "query_start_loc": [0, 1, 3],
        "slot_mapping": [5, 16, 17],
    }
    # three decode steps: the third takes a new block for each, in batch order (6, then 7)
    slots = []
    for step in range(3):
        drive(cache.extend_batch(["d", "p"], np.array([40 + step, 60 + step])))
        layout = cache.batch_layout(["d", "p"], 1)
        slots.append(layout.slot_mapping.tolist())
    assert slots == [[6, 18], [7, 19], [24, 28]]
    assert layout.block_table.tolist() == [[0, 1, 6, 0], [2, 3, 4, 7]]
    assert layout.seq_lens.tolist() == [9, 13]
    assert cache.block_table(["d", "p"]).tolist() == layout.block_table.tolist()
    check_invariants(cache)


def test_empty_batch_and_zero_new_tokens() -> None:
    cache = mixed()
    empty = cache.batch_layout([], 1)
    assert empty.block_table.shape == (0, 0) and empty.seq_lens.shape == (0,)
    assert empty.query_start_loc.tolist() == [0] and empty.slot_mapping.tolist() == []
    none_new = cache.batch_layout(["d"], 0)
    assert none_new.query_start_loc.tolist() == [0, 0]
    assert none_new.slot_mapping.tolist() == [] and none_new.seq_lens.tolist() == [6]


def test_arrays_are_the_callers_own() -> None:
    cache = mixed()
    layout = cache.batch_layout(["p"], 1)
    layout.block_table[0, 0] = 99  # writable, and a copy: the engine is untouched
    assert cache.batch_layout(["p"], 1).block_table.tolist() == [[2, 3, 4]]


def test_to_torch_gives_the_same_values() -> None:
    import torch

    cache = mixed()
    layout = cache.batch_layout(["p", "d", "c"], [10, 1, 3])
    for t in (layout.to_torch(), layout.to_torch("cpu")):
        assert isinstance(t, ferrumkv.BatchLayout)
        got = {
            "block_table": t.block_table,
            "seq_lens": t.seq_lens,
            "query_start_loc": t.query_start_loc,
            "slot_mapping": t.slot_mapping,
        }
        for name, tensor in got.items():
            assert isinstance(tensor, torch.Tensor), name
            assert tensor.tolist() == MIXED[name], name
        assert t.block_table.dtype == torch.int32 and t.slot_mapping.dtype == torch.int64
        assert (t.num_tokens, t.max_query_len, t.max_seq_len) == (14, 10, 11)
    # without a device the tensors share the arrays' memory
    shared = layout.to_torch()
    shared.seq_lens[0] = 77
    assert layout.seq_lens[0] == 77


@pytest.mark.parametrize(
    ("rids", "num_new", "error"),
    [
        (["p", "zz"], 1, UnknownRequestError),
        (["p", "zz"], 1, KeyError),
        (["p", "s"], 1, InvalidStateError),
        (["p"], 11, ValueError),
        (["p", "d"], [1, 7], ValueError),
        (["p"], -1, ValueError),
        (["p"], 2**70, ValueError),
        (["p", "d"], [1, -1], ValueError),
        (["p", "d"], [1], ValueError),
        (["p", "d"], [1, 1, 1], ValueError),
        (["p", "p"], 1, ValueError),
        (["p"], 1.0, TypeError),
        (["p"], True, TypeError),
        (["p"], [1.5], TypeError),
        ("p", 1, TypeError),
        ([1.5], 1, TypeError),
    ],
)
def test_bad_layouts_raise_and_change_nothing(rids: Any, num_new: Any, error: type) -> None:
    cache = ferrumkv.KvCache(make_config(num_blocks=16, host_blocks=4))
    alloc(cache, "p", list(range(10)))
    alloc(cache, "d", [1, 2, 3, 4, 5, 6])
    alloc(cache, "s", [9, 9])
    drive(cache.swap_out("s"))
    before = stats_dict(cache)
    with pytest.raises(error):
        cache.batch_layout(rids, num_new)
    assert_stats_unchanged(cache, before)
    assert cache.batch_layout(["p"], 2).slot_mapping.tolist() == [8, 9]
    check_invariants(cache)


# ----------------------------------------------------------------------------- extend_batch


def test_extend_batch_ints_are_one_token_id_each() -> None:
    cache = new_cache(num_blocks=16)
    alloc(cache, "a", [1, 2, 3])
    alloc(cache, "b", [5, 6, 7])
    drive(cache.extend_batch(["a", "b"], [4, 8]))  # ids, not counts: each grows by one
    assert [cache.get(r).num_tokens for r in "ab"] == [4, 4]
    # the ids were recorded: the blocks they completed are prefix hits for exactly them
    assert cache.lookup_prefix([1, 2, 3, 4, 9]).num_cached_tokens == 4
    assert cache.lookup_prefix([5, 6, 7, 8, 9]).num_cached_tokens == 4
    # a partial match of the same block
    assert cache.lookup_prefix([1, 2, 3, 5, 9]).num_cached_tokens == 3
    check_invariants(cache)


@pytest.mark.parametrize(
    "tokens",
    [
        [4, 8],
        (4, 8),
        np.array([4, 8], dtype=np.int64),
        np.array([4, 8], dtype=np.uint32),
        [np.int64(4), np.int32(8)],
        [[4], [8]],
        [4, np.array([8])],
    ],
    ids=["list", "tuple", "int64", "uint32", "numpy-scalars", "lists", "mixed"],
)
def test_extend_batch_token_forms(tokens: Any) -> None:
    cache = new_cache(num_blocks=16)
    alloc(cache, "a", [1, 2, 3])
    alloc(cache, "b", [5, 6, 7])
    drive(cache.extend_batch(["a", "b"], tokens))
    assert cache.lookup_prefix([1, 2, 3, 4, 0]).num_cached_tokens == 4
    assert cache.lookup_prefix([5, 6, 7, 8, 0]).num_cached_tokens == 4


def test_extend_batch_torch_tokens() -> None:
    import torch

    cache = new_cache(num_blocks=16)
    alloc(cache, "a", torch.tensor([1, 2, 3]))
    alloc(cache, "b", [5, 6, 7])
    drive(cache.extend_batch(["a", "b"], torch.tensor([4, 8], dtype=torch.int32)))
    assert cache.lookup_prefix(torch.tensor([1, 2, 3, 4, 0])).num_cached_tokens == 4
    assert cache.lookup_prefix([5, 6, 7, 8, 0]).num_cached_tokens == 4
    drive(cache.extend("a", torch.arange(10, 12)))
    assert cache.get("a").num_tokens == 6


def test_extend_batch_lists_append_and_counts_stay_unknown() -> None:
    cache = new_cache(num_blocks=16)
    alloc(cache, "a", [1])
    alloc(cache, "b", [5, 6])
    drive(cache.extend_batch(["a", "b"], [[2, 3, 4, 9], [7, 8]]))
    assert [cache.get(r).num_tokens for r in "ab"] == [5, 4]
    assert cache.lookup_prefix([1, 2, 3, 4, 0]).num_cached_tokens == 4
    drive(cache.extend_batch(["a", "b"], counts=[3, 1]))  # ids unknown: never cached
    assert [cache.get(r).num_tokens for r in "ab"] == [8, 5]
    assert cache.block_table(["a", "b"]).tolist() == [[0, 2], [1, 3]]
    drive(cache.extend_batch(["a", "b"], counts=np.array([1, 1])))
    assert cache.lookup_prefix([1, 2, 3, 4, 9, 0, 0, 0, 0, 0]).num_cached_tokens == 4
    check_invariants(cache)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((["a", "b"], [1, 2]), {"counts": [1, 1]}, TypeError),
        ((["a", "b"],), {}, TypeError),
        ((["a", "b"],), {"counts": [1, 0]}, ValueError),
        ((["a", "b"],), {"counts": [1, -2]}, ValueError),
        ((["a", "b"],), {"counts": [1]}, ValueError),
        ((["a", "b"], [1]), {}, ValueError),
        ((["a", "b"], np.array([1, 2, 3])), {}, ValueError),
        ((["a", "b"], [1, []]), {}, ValueError),
        ((["a", "b"], [1, -1]), {}, ValueError),
        ((["a", "b"], [1, 2**32]), {}, ValueError),
        ((["a", "b"], [1, True]), {}, TypeError),
        ((["a", "b"], [1, "x"]), {}, TypeError),
        ((["a", "b"], np.array([1.0, 2.0])), {}, TypeError),
        ((["a", "a"], [1, 2]), {}, ValueError),
        ((["a", "zz"], [1, 2]), {}, UnknownRequestError),
    ],
)
def test_bad_extend_batches_change_nothing(args: Any, kwargs: Any, error: type) -> None:
    cache = new_cache(num_blocks=16)
    alloc(cache, "a", [1, 2, 3])
    alloc(cache, "b", [5, 6, 7])
    before = stats_dict(cache)
    with pytest.raises(error):
        drive(cache.extend_batch(*args, **kwargs))
    assert_stats_unchanged(cache, before)
    assert [cache.get(r).num_tokens for r in "ab"] == [3, 3]
    check_invariants(cache)


def test_a_request_id_list_may_change_between_calls() -> None:
    # The extension reuses the last batch's converted ids while the list holds the very same
    # objects; any change of an item (or the length) converts again.
    cache = mixed()
    ids: list[Any] = ["p", "d"]
    assert cache.batch_layout(ids, 1).seq_lens.tolist() == [10, 6]
    assert cache.batch_layout(ids, 1).seq_lens.tolist() == [10, 6]
    ids[0] = "c"
    assert cache.batch_layout(ids, 1).seq_lens.tolist() == [11, 6]
    ids.append("p")
    assert cache.batch_layout(ids, 1).seq_lens.tolist() == [11, 6, 10]
    drive(cache.extend_batch(ids, [1, 2, 3]))
    assert cache.batch_layout(ids, 1).seq_lens.tolist() == [12, 7, 11]
    ids.pop()
    assert cache.block_table(ids).tolist() == [[2, 3, 5], [0, 1, 0]]

    class Rid(str):
        pass

    assert cache.batch_layout([Rid("p")], 1).seq_lens.tolist() == [11]
    with pytest.raises(UnknownRequestError):
        cache.batch_layout(["p", "zz"], 1)
    assert cache.batch_layout(["p"], 1).seq_lens.tolist() == [11]
