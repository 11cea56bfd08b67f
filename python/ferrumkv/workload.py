"""Workloads for ``python -m ferrumkv replay``: Mooncake traces and a synthetic chat mix.

Pure Python and numpy; nothing here touches the engine. A workload is an ordered tuple of
:class:`Request` objects whose token ids are described by :class:`Segment` runs and only
materialised when asked for, so a 4,000-request trace of 15k-token prompts stays small.

A segment is a deterministic run of token ids drawn from a generator seeded by
``(stream, key)``: the same segment always yields the same tokens, and any two different
segments yield unrelated ones. Mooncake ``hash_ids`` become segments of the trace-block
stream, so equal ids give equal 512-token runs wherever they repeat.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

TRACE_BLOCK_TOKENS = 512
"""Tokens behind one Mooncake ``hash_id``."""

DEFAULT_VOCAB_SIZE = 128_256
"""Vocabulary of the Llama-3 tokenizer: token ids are drawn from ``[0, vocab_size)``."""

TOKEN_DTYPE = np.int32

_TRACE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


class Stream(IntEnum):
    """Independent families of segments; non-zero so every seed pair is distinct."""

    TRACE_BLOCK = 1
    OUTPUT = 2
    SYSTEM = 3
    USER = 4


class Segment(NamedTuple):
    """``length`` tokens of the deterministic run named by ``(stream, key)``."""

    stream: int
    key: int
    length: int


class TraceError(ValueError):
    """A trace file that cannot be read or parsed; the message names the file and line."""


@dataclass(frozen=True)
class Request:
    """One request of a workload.

    ``arrival_s`` is the arrival time in seconds from the start of the workload; ``after``
    names the request that must finish before this one may start (the previous turn of a
    chat), or is ``None``.
    """

    request_id: str
    arrival_s: float
    prompt: tuple[Segment, ...]
    output: Segment
    after: str | None = None

    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens."""
        return sum(segment.length for segment in self.prompt)

    @property
    def output_len(self) -> int:
        """Number of tokens to generate."""
        return self.output.length

    def prompt_tokens(self, vocab_size: int) -> np.ndarray:
        """The prompt's token ids as a new 1-D array."""
        return segments_tokens(self.prompt, vocab_size)

    def output_tokens(self, vocab_size: int) -> np.ndarray:
        """The token ids the replay generates for this request, in order."""
        return segments_tokens((self.output,), vocab_size)


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order, the vocabulary their tokens come from, and a description.

    ``clamped`` counts trace lines whose ``input_length`` disagreed with their ``hash_ids``.
    """

    requests: tuple[Request, ...]
    vocab_size: int
    description: str
    clamped: int = 0

    def __len__(self) -> int:
        return len(self.requests)


_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on a uint64 array (modified in place)."""
    with np.errstate(over="ignore"):
        values ^= values >> np.uint64(30)
        values *= np.uint64(0xBF58476D1CE4E5B9)
        values ^= values >> np.uint64(27)
        values *= np.uint64(0x94D049BB133111EB)
        values ^= values >> np.uint64(31)
    return values


def _mix64_int(value: int) -> int:
    """:func:`_mix64` of one Python int (cheaper than a numpy round trip)."""
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & _MASK64
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _segment_seed(segment: Segment) -> int:
    """A 64-bit seed unique (with overwhelming probability) to ``(stream, key)``."""
    return _mix64_int((_mix64_int(segment.stream) + segment.key) & _MASK64)


def segments_tokens(segments: tuple[Segment, ...], vocab_size: int) -> np.ndarray:
    """Token ids of consecutive segments, concatenated into a new 1-D array.

    Token ``i`` of a segment is ``splitmix64(seed + (i + 1) * gamma) % vocab_size`` (the
    splitmix64 generator seeded by the segment), so a segment's tokens depend only on its
    stream, key and position: a shorter segment is a prefix of a longer one with the same key.
    """
    lengths = np.array([segment.length for segment in segments], dtype=np.int64)
    seeds = np.array([_segment_seed(segment) for segment in segments], dtype=np.uint64)
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = (np.arange(total, dtype=np.int64) - starts + 1).astype(np.uint64)
    with np.errstate(over="ignore"):
        states = np.repeat(seeds, lengths) + positions * np.uint64(_GOLDEN_GAMMA)
    return (_mix64(states) % np.uint64(vocab_size)).astype(TOKEN_DTYPE)


# --------------------------------------------------------------------------- traces


def load_trace(path: str | Path, *, vocab_size: int, limit: int | None = None) -> Workload:
    """Read a Mooncake JSONL trace into a workload of its first ``limit`` requests.

    Each line is an object with ``timestamp`` (ms), ``input_length``, ``output_length`` and
    ``hash_ids``. Blank lines are skipped. Raises :class:`TraceError` naming the file, and the
    line number for a bad line.
    """
    path = Path(path)
    requests: list[Request] = []
    clamped = 0
    for line_no, record in _trace_records(path):
        request, was_clamped = _trace_request(record, len(requests), f"{path}:{line_no}")
        requests.append(request)
        clamped += was_clamped
        if len(requests) == limit:
            break
    if not requests:
        raise TraceError(f"{path}: the trace holds no requests")
    ordered = tuple(sorted(requests, key=lambda request: request.arrival_s))
    return Workload(ordered, vocab_size, f"trace {path.name}", clamped)


def _trace_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, decoded JSON value)`` for every non-blank line of ``path``."""
    try:
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}:{line_no}: invalid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace: {exc.strerror or exc}") from None


def _trace_request(record: Any, index: int, where: str) -> tuple[Request, bool]:
    """Validate one trace record and turn it into a request.

    Returns the request and whether its prompt was clamped because ``input_length`` and
    ``hash_ids`` disagree: the prompt is ``min(input_length, 512 * len(hash_ids))`` tokens
    and uses only the ids that those tokens reach.
    """
    if not isinstance(record, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [field for field in _TRACE_FIELDS if field not in record]
    if missing:
        raise TraceError(f"{where}: missing field(s) {', '.join(missing)}")
    timestamp = _number(record["timestamp"], "timestamp", where)
    input_length = _count(record["input_length"], "input_length", where)
    output_length = _count(record["output_length"], "output_length", where)
    hash_ids = _hash_ids(record["hash_ids"], where)
    prompt_len = min(input_length, TRACE_BLOCK_TOKENS * len(hash_ids))
    if prompt_len == 0:
        raise TraceError(f"{where}: the request has no prompt tokens")
    request = Request(
        request_id=f"trace-{index}",
        arrival_s=timestamp / 1000.0,
        prompt=_trace_segments(hash_ids, prompt_len),
        output=Segment(Stream.OUTPUT, index, output_length),
    )
    expected_ids = math.ceil(input_length / TRACE_BLOCK_TOKENS)
    return request, expected_ids != len(hash_ids)


def _trace_segments(hash_ids: list[int], prompt_len: int) -> tuple[Segment, ...]:
    """One 512-token segment per hash id, the last cut so the total is ``prompt_len``."""
    used = math.ceil(prompt_len / TRACE_BLOCK_TOKENS)
    last = prompt_len - TRACE_BLOCK_TOKENS * (used - 1)
    lengths = [TRACE_BLOCK_TOKENS] * (used - 1) + [last]
    return tuple(
        Segment(Stream.TRACE_BLOCK, hash_id, length)
        for hash_id, length in zip(hash_ids[:used], lengths, strict=True)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, field: str, where: str) -> float:
    """A finite, non-negative JSON number."""
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value < 0:
        raise TraceError(f"{where}: '{field}' must be a non-negative number, got {value!r}")
    return float(value)


def _count(value: Any, field: str, where: str) -> int:
    """A non-negative JSON integer."""
    if not _is_int(value) or value < 0:
        raise TraceError(f"{where}: '{field}' must be a non-negative integer, got {value!r}")
    return int(value)


def _hash_ids(value: Any, where: str) -> list[int]:
    """A JSON list of integers in ``[0, 2**64)``."""
    if not isinstance(value, list) or not all(
        _is_int(item) and 0 <= item <= _MASK64 for item in value
    ):
        raise TraceError(f"{where}: 'hash_ids' must be a list of integers in [0, 2**64)")
    return value


# --------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic workload: shared system prompts and multi-turn chats.

    Ranges are inclusive ``(low, high)`` token counts. Chats start as a Poisson process of
    ``chat_rate_per_s``; within a chat each turn waits for the previous one to finish plus an
    exponential think time, and resends the whole history with a new user turn.
    """

    system_prompts: int = 4
    system_tokens: tuple[int, int] = (128, 768)
    turns_per_chat: tuple[int, int] = (1, 5)
    user_tokens: tuple[int, int] = (16, 192)
    output_tokens: tuple[int, int] = (16, 256)
    chat_rate_per_s: float = 4.0
    think_time_s: float = 2.0


def synthetic_workload(
    num_requests: int, *, seed: int, vocab_size: int, spec: SyntheticSpec | None = None
) -> Workload:
    """A deterministic chat workload of exactly ``num_requests`` requests for ``seed``."""
    spec = spec or SyntheticSpec()
    rng = np.random.default_rng(seed)
    system_lengths = [_uniform(rng, spec.system_tokens) for _ in range(spec.system_prompts)]
    requests: list[Request] = []
    chat_start = 0.0
    while len(requests) < num_requests:
        chat_start += float(rng.exponential(1.0 / spec.chat_rate_per_s))
        system = int(rng.integers(spec.system_prompts))
        system_segment = Segment(Stream.SYSTEM, system, system_lengths[system])
        turns = min(_uniform(rng, spec.turns_per_chat), num_requests - len(requests))
        requests.extend(_chat(rng, spec, system_segment, chat_start, turns, len(requests)))
    ordered = tuple(sorted(requests, key=lambda request: request.arrival_s))
    return Workload(ordered, vocab_size, f"synthetic chats (seed {seed})")


def _chat(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    system: Segment,
    start_s: float,
    turns: int,
    first_index: int,
) -> list[Request]:
    """The turns of one chat; request ``i`` of the workload generates segment ``OUTPUT, i``."""
    history: tuple[Segment, ...] = (system,)
    arrival = start_s
    previous: str | None = None
    chat: list[Request] = []
    for index in range(first_index, first_index + turns):
        user = Segment(Stream.USER, index, _uniform(rng, spec.user_tokens))
        output = Segment(Stream.OUTPUT, index, _uniform(rng, spec.output_tokens))
        request = Request(f"chat-{index}", arrival, (*history, user), output, previous)
        chat.append(request)
        history = (*history, user, output)
        arrival += float(rng.exponential(spec.think_time_s))
        previous = request.request_id
    return chat


def _uniform(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return int(rng.integers(low, high + 1))


# --------------------------------------------------------------------------- infinite cache


@dataclass(frozen=True)
class InfiniteCacheHits:
    """Prefix-cache hits the workload would get if no cached block were ever evicted.

    Lookups are the blocks every prompt occupies (``ceil(prompt_len / block_size)``); hits are
    counted as the engine counts them: whole blocks whose chained hash an earlier request
    registered, at most ``(prompt_len - 1) // block_size`` per request since one token is
    always computed, then at most one partial hit, the block after them, served by copying the
    leading tokens it shares with a block some earlier request registered under the same
    prefix (``partial_blocks`` of ``hit_blocks``; its shared tokens count in ``hit_tokens``).
    """

    lookup_blocks: int
    hit_blocks: int
    prompt_tokens: int
    hit_tokens: int
    partial_blocks: int = 0

    @property
    def block_hit_rate(self) -> float:
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def infinite_cache_hits(workload: Workload, block_size: int) -> InfiniteCacheHits:
    """Walk the requests in order and count prompt blocks seen before.

    A request registers every full block of its prompt plus its generated tokens (what the
    engine caches as they fill). Blocks are named by chained hashes, so a block only matches
    when its whole prefix matches. Cost: one sort of all registered hashes, plus a Python
    loop over the few registered blocks that share a partial window's prefix.
    """
    weights = _content_weights(block_size)
    tokens: list[np.ndarray] = []
    registered: list[np.ndarray] = []
    lookup_counts: list[int] = []
    for request in workload.requests:
        tokens.append(segments_tokens((*request.prompt, request.output), workload.vocab_size))
        registered.append(_chained_hashes(tokens[-1], block_size, weights))
        lookup_counts.append((request.prompt_len - 1) // block_size)
    prompt_lens = [request.prompt_len for request in workload.requests]
    full_hits = _count_seen_before(registered, lookup_counts)
    partial = _partial_hits(tokens, registered, prompt_lens, full_hits, block_size)
    hit_blocks = int(full_hits.sum()) + int(np.count_nonzero(partial))
    return InfiniteCacheHits(
        lookup_blocks=sum(math.ceil(n / block_size) for n in prompt_lens),
        hit_blocks=hit_blocks,
        prompt_tokens=sum(prompt_lens),
        hit_tokens=int(full_hits.sum()) * block_size + int(partial.sum()),
        partial_blocks=int(np.count_nonzero(partial)),
    )


_ROOT = np.uint64(0)
"""The parent of every first block (a chained hash of 0 is as unlikely as any collision)."""


def _partial_hits(
    tokens: list[np.ndarray],
    registered: list[np.ndarray],
    prompt_lens: list[int],
    full_hits: np.ndarray,
    block_size: int,
) -> np.ndarray:
    """Tokens each request serves by a partial copy: after its ``k`` full hits, the window
    ``tokens[k*bs : min(n - 1, (k + 1)*bs)]`` against the blocks earlier requests registered
    under the same parent (its block ``k - 1``), longest shared leading run (the engine's
    ``best_partial``)."""
    # The sibling key of a block: its parent's chained hash and its first token.
    windows: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    rows = zip(tokens, registered, prompt_lens, full_hits.tolist(), strict=True)
    for r, (toks, chain, n, k) in enumerate(rows):
        window = toks[k * block_size : min(n - 1, (k + 1) * block_size)]
        if len(window):
            parent = int(chain[k - 1]) if k else int(_ROOT)
            windows.setdefault((parent, int(window[0])), []).append((r, window))
    best = np.zeros(len(tokens), dtype=np.int64)
    if not windows:
        return best
    wanted = np.array([parent for parent, _ in windows], dtype=np.uint64)
    # Every registered block's parent (the hash before it in its own chain), flat.
    lengths = np.array([len(chain) for chain in registered], dtype=np.int64)
    if not lengths.sum():
        return best
    parents = np.concatenate([np.concatenate([[_ROOT], c[:-1]]) for c in registered if len(c)])
    owners = np.repeat(np.arange(len(registered)), lengths)
    starts = np.cumsum(lengths) - lengths
    for i in np.flatnonzero(np.isin(parents, wanted)):
        q = int(owners[i])
        j = int(i - starts[q])
        block = tokens[q][j * block_size : (j + 1) * block_size]
        for r, window in windows.get((int(parents[i]), int(block[0])), ()):
            if q < r:
                shared = block[: len(window)] == window
                run = len(window) if shared.all() else int(np.argmin(shared))
                best[r] = max(best[r], run)
    return best


def prompt_block_hashes(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """The chained uint64 hash of each full block of ``tokens`` (this module's hash, not the
    engine's: equal exactly when the block and every block before it are equal)."""
    return _chained_hashes(tokens, block_size, _content_weights(block_size))


@lru_cache(maxsize=8)
def _content_weights(block_size: int) -> np.ndarray:
    """Fixed random odd multipliers that hash one block's token ids into a uint64."""
    rng = np.random.default_rng(block_size)
    return rng.integers(0, 2**63, size=block_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


_CHAIN_BASE = np.uint64(0x9E3779B97F4A7C15)
_CHAIN_BASE_INVERSE = np.uint64(pow(int(_CHAIN_BASE), -1, 2**64))


def _chained_hashes(tokens: np.ndarray, block_size: int, weights: np.ndarray) -> np.ndarray:
    """uint64 hash of every full block *together with all blocks before it*.

    Block contents hash to ``c_k`` (a random linear form); the chain is the polynomial
    ``h_k = sum_{j <= k} c_j * B**(k - j)`` (mod 2**64), computed at once as
    ``B**k * cumsum(c_j * B**-j)`` since the odd base ``B`` is invertible mod 2**64.
    """
    full = len(tokens) // block_size
    blocks = tokens[: full * block_size].reshape(full, block_size).astype(np.uint64)
    with np.errstate(over="ignore"):
        contents = blocks @ weights
        prefix_sums = np.cumsum(contents * _powers(_CHAIN_BASE_INVERSE, full))
        chained: np.ndarray = _powers(_CHAIN_BASE, full) * prefix_sums
        return chained


def _powers(base: np.uint64, count: int) -> np.ndarray:
    """``base**0 .. base**(count - 1)`` mod 2**64."""
    powers = np.full(count, base, dtype=np.uint64)
    if count:
        powers[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(powers, dtype=np.uint64)


def _count_seen_before(registered: list[np.ndarray], lookup_counts: list[int]) -> np.ndarray:
    """Hits per request: the first ``lookup_counts[r]`` hashes of ``registered[r]`` that
    some earlier request ``q < r`` registered too (a prefix run, the hashes being chained)."""
    lengths = np.array([len(chain) for chain in registered], dtype=np.int64)
    if not lengths.sum():
        return np.zeros(len(registered), dtype=np.int64)
    hashes = np.concatenate(registered)
    owner = np.repeat(np.arange(len(registered)), lengths)
    position = np.arange(len(hashes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    is_lookup = position < np.repeat(np.array(lookup_counts, dtype=np.int64), lengths)
    _, first, group = np.unique(hashes, return_index=True, return_inverse=True)
    seen_before = owner[first][group] < owner
    return np.bincount(owner[seen_before & is_lookup], minlength=len(registered))
