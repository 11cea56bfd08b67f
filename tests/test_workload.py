"""Workloads for ``ferrumkv replay``: trace parsing, token runs, infinite-cache hits,
synthetic chats. Pure Python; no engine involved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ferrumkv.workload import (
    TRACE_BLOCK_TOKENS,
    Request,
    Segment,
    Stream,
    TraceError,
    Workload,
    infinite_cache_hits,
    load_trace,
    segments_tokens,
    synthetic_workload,
)

VOCAB = 32_000


def record(timestamp=0, input_length=512, output_length=4, hash_ids=(0,)) -> dict:
    return {
        "timestamp": timestamp,
        "input_length": input_length,
        "output_length": output_length,
        "hash_ids": list(hash_ids),
    }


def write_trace(tmp_path: Path, lines: list[object]) -> Path:
    """A trace file; dicts are written as JSON, strings verbatim."""
    path = tmp_path / "trace.jsonl"
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text)
    return path


def load(path: Path, limit: int | None = None) -> Workload:
    return load_trace(path, vocab_size=VOCAB, limit=limit)


# ---------------------------------------------------------------------- trace parsing


def test_trace_fields_become_requests(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path,
        [
            record(timestamp=0, input_length=1000, output_length=7, hash_ids=[4, 5]),
            record(timestamp=1500, input_length=512, output_length=0, hash_ids=[4]),
        ],
    )
    workload = load(path)
    first, second = workload.requests
    assert len(workload) == 2 and workload.vocab_size == VOCAB and workload.clamped == 0
    assert (first.arrival_s, first.prompt_len, first.output_len) == (0.0, 1000, 7)
    assert (second.arrival_s, second.prompt_len, second.output_len) == (1.5, 512, 0)
    assert [(s.key, s.length) for s in first.prompt] == [(4, 512), (5, 488)]
    assert first.after is None and first.request_id != second.request_id


def test_limit_reads_only_the_first_requests(tmp_path: Path) -> None:
    path = write_trace(tmp_path, [record(), record(timestamp=5), "{not json"])
    assert len(load(path, limit=2)) == 2
    with pytest.raises(TraceError, match=":3: invalid JSON"):
        load(path)


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = write_trace(tmp_path, [record(), "", "   ", record(input_length=-1)])
    with pytest.raises(TraceError) as error:
        load(path)
    assert str(error.value) == (f"{path}:4: 'input_length' must be a non-negative integer, got -1")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"timestamp": 0,', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (
            json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1}),
            "missing field(s) hash_ids",
        ),
        (
            json.dumps(record(input_length=-5)),
            "'input_length' must be a non-negative integer, got -5",
        ),
        (
            json.dumps(record(output_length=-1)),
            "'output_length' must be a non-negative integer, got -1",
        ),
        (
            json.dumps(record(output_length=2.5)),
            "'output_length' must be a non-negative integer, got 2.5",
        ),
        (
            json.dumps(record(input_length=True)),
            "'input_length' must be a non-negative integer, got True",
        ),
        (json.dumps(record(timestamp=-3)), "'timestamp' must be a non-negative number, got -3"),
        (json.dumps(record(timestamp="0")), "'timestamp' must be a non-negative number, got '0'"),
        (
            json.dumps({**record(), "hash_ids": 7}),
            "'hash_ids' must be a list of integers in [0, 2**64)",
        ),
        (
            json.dumps(record(hash_ids=[1, "2"])),
            "'hash_ids' must be a list of integers in [0, 2**64)",
        ),
        (
            json.dumps(record(hash_ids=[1, 2.0])),
            "'hash_ids' must be a list of integers in [0, 2**64)",
        ),
        (json.dumps(record(hash_ids=[-1])), "'hash_ids' must be a list of integers in [0, 2**64)"),
        (
            json.dumps(record(hash_ids=[2**64])),
            "'hash_ids' must be a list of integers in [0, 2**64)",
        ),
        (json.dumps(record(input_length=0)), "the request has no prompt tokens"),
        (json.dumps(record(hash_ids=[])), "the request has no prompt tokens"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_trace(tmp_path, [record(), line])
    with pytest.raises(TraceError) as error:
        load(path)
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(TraceError, match=r"missing\.jsonl: cannot read trace"):
        load(missing)
    with pytest.raises(TraceError, match="cannot read trace"):
        load(tmp_path)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(TraceError, match="not UTF-8"):
        load(binary)
    empty = write_trace(tmp_path, [""])
    with pytest.raises(TraceError, match="holds no requests"):
        load(empty)


def test_inconsistent_lengths_are_clamped(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path,
        [
            record(input_length=2000, hash_ids=[1, 2]),  # more tokens than ids cover
            record(input_length=600, hash_ids=[1, 2, 3, 4]),  # ids beyond the prompt
            record(input_length=1024, hash_ids=[1, 2]),  # consistent
        ],
    )
    workload = load(path)
    too_long, too_many_ids, consistent = workload.requests
    assert workload.clamped == 2
    assert too_long.prompt_len == 2 * TRACE_BLOCK_TOKENS
    assert [(s.key, s.length) for s in too_many_ids.prompt] == [(1, 512), (2, 88)]
    assert consistent.prompt_len == 1024


def test_requests_are_ordered_by_arrival(tmp_path: Path) -> None:
    path = write_trace(tmp_path, [record(timestamp=30), record(timestamp=10)])
    arrivals = [request.arrival_s for request in load(path).requests]
    assert arrivals == [0.01, 0.03]


def test_shared_trace_loads() -> None:
    path = Path(__file__).resolve().parent / "data" / "mooncake_first100.jsonl"
    workload = load(path, limit=100)
    assert len(workload) == 100 and workload.clamped == 0
    assert all(request.prompt_len > 0 for request in workload.requests)


# ---------------------------------------------------------------------- token runs


def test_equal_hash_ids_give_equal_runs(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path,
        [
            record(input_length=1024 + 100, hash_ids=[7, 8, 9]),
            record(input_length=1024 + 300, hash_ids=[7, 8, 10]),
            record(input_length=512, hash_ids=[8]),
        ],
    )
    first, second, third = (r.prompt_tokens(VOCAB) for r in load(path).requests)
    assert first.dtype == np.int32 and len(first) == 1124
    np.testing.assert_array_equal(first[:1024], second[:1024])
    assert not np.array_equal(first[1024:1124], second[1024:1124])
    np.testing.assert_array_equal(third, first[512:1024])  # id 8 wherever it appears
    assert not np.array_equal(first[:512], first[512:1024])


def test_cut_run_is_a_prefix_of_the_full_run() -> None:
    full = segments_tokens((Segment(Stream.TRACE_BLOCK, 42, 512),), VOCAB)
    for length in (1, 100, 511):
        cut = segments_tokens((Segment(Stream.TRACE_BLOCK, 42, length),), VOCAB)
        np.testing.assert_array_equal(cut, full[:length])


def test_runs_differ_across_streams_and_stay_in_vocabulary() -> None:
    runs = [segments_tokens((Segment(stream, 3, 512),), VOCAB) for stream in Stream]
    for i, run in enumerate(runs):
        assert run.min() >= 0 and run.max() < VOCAB
        for other in runs[i + 1 :]:
            assert np.count_nonzero(run == other) < 5
    small = segments_tokens((Segment(Stream.USER, 1, 10_000),), 7)
    assert set(np.unique(small)) == set(range(7))


# ---------------------------------------------------------------------- infinite cache


def test_infinite_cache_hits_on_a_handmade_trace(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path,
        [
            record(input_length=1024, output_length=0, hash_ids=[1, 2]),
            record(input_length=1300, output_length=0, hash_ids=[1, 2, 3]),
            record(input_length=1024, output_length=0, hash_ids=[1, 2]),
            record(input_length=600, output_length=0, hash_ids=[9, 2]),
            record(input_length=100, output_length=0, hash_ids=[1]),
        ],
    )
    hits = infinite_cache_hits(load(path), block_size=256)
    # Lookups are ceil(len / 256) blocks: 4 + 6 + 4 + 3 + 1. Full hits: request 2 matches
    # the 4 blocks of ids [1, 2]; request 3 repeats request 1 but keeps its last block to
    # compute (3 full, then a partial copy of that block's first 255 tokens); [9, 2] shares
    # id 2 but not its prefix (0); 100 tokens hold no full block, but their first 99 are the
    # start of request 1's first block (a partial hit).
    assert (hits.lookup_blocks, hits.hit_blocks, hits.partial_blocks) == (18, 9, 2)
    assert (hits.prompt_tokens, hits.hit_tokens) == (4048, 7 * 256 + 255 + 99)
    assert hits.block_hit_rate == pytest.approx(9 / 18)
    assert hits.token_hit_rate == pytest.approx(2146 / 4048)


def test_infinite_cache_counts_generated_blocks() -> None:
    system = Segment(Stream.SYSTEM, 0, 512)
    answer = Segment(Stream.OUTPUT, 0, 256)
    follow_up = Segment(Stream.USER, 1, 100)
    first = Request("a", 0.0, (system,), answer)
    second = Request("b", 1.0, (system, answer, follow_up), Segment(Stream.OUTPUT, 1, 5), "a")
    hits = infinite_cache_hits(Workload((first, second), VOCAB, "chat"), block_size=256)
    assert (hits.lookup_blocks, hits.hit_blocks) == (2 + 4, 3)


def test_infinite_cache_of_nothing_shared() -> None:
    requests = tuple(
        Request(f"r{i}", float(i), (Segment(Stream.USER, i, 300),), Segment(Stream.OUTPUT, i, 0))
        for i in range(3)
    )
    hits = infinite_cache_hits(Workload(requests, VOCAB, "distinct"), block_size=16)
    assert hits.hit_blocks == 0 and hits.block_hit_rate == 0.0
    assert hits.lookup_blocks == 3 * 19


# ---------------------------------------------------------------------- synthetic


def test_synthetic_workload_is_deterministic() -> None:
    first = synthetic_workload(60, seed=3, vocab_size=VOCAB)
    again = synthetic_workload(60, seed=3, vocab_size=VOCAB)
    other = synthetic_workload(60, seed=4, vocab_size=VOCAB)
    assert first == again and first != other
    assert len(first) == 60
    for a, b in zip(first.requests, again.requests, strict=True):
        np.testing.assert_array_equal(a.prompt_tokens(VOCAB), b.prompt_tokens(VOCAB))


def test_synthetic_turns_resend_their_history() -> None:
    workload = synthetic_workload(200, seed=1, vocab_size=VOCAB)
    by_id = {request.request_id: request for request in workload.requests}
    followers = [request for request in workload.requests if request.after is not None]
    assert followers, "the default spec has multi-turn chats"
    arrivals = [request.arrival_s for request in workload.requests]
    assert arrivals == sorted(arrivals)
    for request in followers:
        parent = by_id[request.after]
        history = np.concatenate([parent.prompt_tokens(VOCAB), parent.output_tokens(VOCAB)])
        prompt = request.prompt_tokens(VOCAB)
        assert len(prompt) > len(history)
        np.testing.assert_array_equal(prompt[: len(history)], history)
        assert parent.arrival_s <= request.arrival_s
    systems = {request.prompt[0] for request in workload.requests}
    assert 1 < len(systems) <= 4


def test_synthetic_workload_reuses_prefixes() -> None:
    hits = infinite_cache_hits(synthetic_workload(100, seed=0, vocab_size=VOCAB), 16)
    assert 0.5 < hits.block_hit_rate < 1.0
