"""Frozen value types: stats, pressure, events. Each has `to_dict()` and a readable repr.

Derived figures (`usage`, `reused_blocks`, hit rates, `prompt_tokens`) are properties
computed from the stored counters, never stored themselves, so they cannot disagree.

NOTE: the stats types (`TierStats`, `CacheStats`, `IterationStats`) keep their fields in the
instance `__dict__` (no `__slots__`), so an instance can be filled without running the frozen
`__init__` (43 `object.__setattr__` calls): the extension fills a `CacheStats`' dict directly
(`rust/py/src/stats.rs`), `IterationStats._from_core` with one `dict.update`; `stats()` costs
a few microseconds. The engine's keys are exactly the fields (tested).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

__all__ = [
    "COUNTER_FIELDS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CacheStats",
    "EvictionEvent",
    "GcStats",
    "IterationStats",
    "PrefixMatch",
    "PressureEvent",
    "PressureLevel",
    "TierStats",
]


class PressureLevel(enum.IntEnum):
    """Device-tier memory pressure, from the watermarks (see `CacheConfig`)."""

    LOW = 0
    HIGH = 1
    CRITICAL = 2


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


class _ToDict:
    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        for name in getattr(type(self), "_DERIVED", ()):
            d[name] = getattr(self, name)
        return d


@dataclass(frozen=True, slots=True)
class PressureEvent(_ToDict):
    """A change of the device tier's pressure level, delivered to `on_pressure` callbacks:
    the new `level` and the `previous` one, and at that moment the tier's `free_blocks`
    (blank and evictable), `evictable_blocks`, `total_blocks`, and the `needed_blocks` that
    waiting calls ask for."""

    level: PressureLevel
    previous: PressureLevel
    free_blocks: int
    evictable_blocks: int
    total_blocks: int
    needed_blocks: int


@dataclass(frozen=True)
class TierStats(_ToDict):
    """Blocks of one tier: `used_blocks` (owned by a live sequence) + `free_blocks` ==
    `total_blocks`; `evictable_blocks` are free blocks that still hold cached data;
    `total_bytes` and `used_bytes` are the same in bytes."""

    total_blocks: int
    free_blocks: int
    used_blocks: int
    evictable_blocks: int
    total_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class _Counters(_ToDict):
    """Counters shared by `CacheStats` (totals since start) and `IterationStats` (deltas)."""

    alloc_total_blocks: int
    alloc_new_blocks: int
    full_reused_blocks: int
    partial_reused_blocks: int
    missed_blocks: int
    gen_alloc_blocks: int
    onboard_blocks: int
    onboard_bytes: int
    offload_blocks: int
    offload_bytes: int
    intra_device_copy_blocks: int
    intra_device_copy_bytes: int
    h2d_blocks_copied: int
    d2h_blocks_copied: int
    disk_blocks_written: int
    disk_blocks_read: int
    disk_checksum_failures: int
    disk_read_errors: int
    disk_write_errors: int
    evicted_blocks: int
    input_tokens: int
    cache_tokens: int
    preempted_requests: int
    preempted_prompt_tokens: int
    preempted_cache_tokens: int
    truncated_blocks: int
    swap_out_count: int
    d2h_transfers: int
    d2h_transfer_ns: int
    h2d_transfers: int
    h2d_transfer_ns: int
    dropped_eviction_events: int
    swap_in_count: int
    preempted_waits: int
    dropped_events: int
    remote_hit_blocks: int
    remote_miss_blocks: int
    remote_corrupt_blocks: int
    remote_read_bytes: int
    remote_write_blocks: int
    remote_write_bytes: int
    remote_dropped_writes: int
    remote_errors: int
    remote_read_ns: int
    remote_write_ns: int

    _DERIVED: ClassVar[tuple[str, ...]] = (
        "reused_blocks",
        "cache_hit_rate",
        "prompt_tokens",
        "token_hit_rate",
        "d2h_transfer_seconds_total",
        "h2d_transfer_seconds_total",
        "remote_read_seconds_total",
        "remote_write_seconds_total",
    )

    @property
    def remote_read_seconds_total(self) -> float:
        """Seconds spent in remote lookups (existence checks and gets)."""
        return self.remote_read_ns / 1e9

    @property
    def remote_write_seconds_total(self) -> float:
        """Seconds spent writing blocks to the remote store."""
        return self.remote_write_ns / 1e9

    @property
    def d2h_transfer_seconds_total(self) -> float:
        """Seconds spent copying swap-outs (device -> host)."""
        return self.d2h_transfer_ns / 1e9

    @property
    def h2d_transfer_seconds_total(self) -> float:
        """Seconds spent copying swap-ins (host -> device)."""
        return self.h2d_transfer_ns / 1e9

    @property
    def reused_blocks(self) -> int:
        return self.full_reused_blocks + self.partial_reused_blocks

    @property
    def cache_hit_rate(self) -> float:
        """reused / (reused + missed) prompt blocks."""
        return _ratio(self.reused_blocks, self.reused_blocks + self.missed_blocks)

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_tokens

    @property
    def token_hit_rate(self) -> float:
        """Share of prompt tokens served from the cache."""
        return _ratio(self.cache_tokens, self.prompt_tokens)


COUNTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(_Counters))


def _counters(raw: dict[str, Any]) -> dict[str, int]:
    return {name: raw[name] for name in COUNTER_FIELDS}


@dataclass(frozen=True)
class CacheStats(_Counters):
    """Gauges now and every counter as a cumulative total since start."""

    device: TierStats
    host: TierStats
    disk: TierStats
    total_tokens: int
    used_tokens: int
    free_tokens: int
    num_sequences: int
    num_swapped: int
    num_waiting: int
    inflight_disk_ops: int
    pressure_level: PressureLevel
    callback_errors: int

    _DERIVED: ClassVar[tuple[str, ...]] = (*_Counters._DERIVED, "usage")

    @property
    def usage(self) -> float:
        """Share of device token capacity owned by live sequences (0..1)."""
        return _ratio(self.used_tokens, self.total_tokens)


@dataclass(frozen=True)
class IterationStats(_Counters):
    """Counters since the previous `iteration_stats()` call, plus gauges now."""

    primary_max_num_blocks: int
    primary_free_num_blocks: int
    primary_used_num_blocks: int
    secondary_max_num_blocks: int
    secondary_free_num_blocks: int
    secondary_used_num_blocks: int
    inflight_disk_ops: int

    @classmethod
    def _from_core(cls, raw: dict[str, Any]) -> IterationStats:
        dev, host = raw["device"], raw["host"]
        s = object.__new__(cls)
        d = s.__dict__
        d.update(_counters(raw))
        d["primary_max_num_blocks"] = dev["total_blocks"]
        d["primary_free_num_blocks"] = dev["free_blocks"]
        d["primary_used_num_blocks"] = dev["used_blocks"]
        d["secondary_max_num_blocks"] = host["total_blocks"]
        d["secondary_free_num_blocks"] = host["free_blocks"]
        d["secondary_used_num_blocks"] = host["used_blocks"]
        d["inflight_disk_ops"] = raw["inflight_disk_ops"]
        return s


@dataclass(frozen=True, slots=True, repr=False)
class PrefixMatch(_ToDict):
    """What `allocate` would reuse of a prompt now (`lookup_prefix`), per tier:
    `device_tokens` (full hits shared whole, plus a partly matching block's tokens, copied),
    `host_tokens` and `disk_tokens` (onboarded). Local tiers only."""

    device_tokens: int
    host_tokens: int
    disk_tokens: int

    _DERIVED: ClassVar[tuple[str, ...]] = ("num_cached_tokens",)

    @property
    def num_cached_tokens(self) -> int:
        """Tokens the prompt would get from the cache (the sum over the tiers)."""
        return self.device_tokens + self.host_tokens + self.disk_tokens

    def __repr__(self) -> str:
        return (
            f"PrefixMatch(num_cached_tokens={self.num_cached_tokens}, "
            f"device_tokens={self.device_tokens}, host_tokens={self.host_tokens}, "
            f"disk_tokens={self.disk_tokens})"
        )

    @classmethod
    def _from_core(cls, raw: dict[str, int]) -> PrefixMatch:
        return cls(raw["device_tokens"], raw["host_tokens"], raw["disk_tokens"])


@dataclass(frozen=True, slots=True)
class GcStats(_ToDict):
    """What `gc()` did: cached blocks it evicted (`evicted_blocks`), of which it offloaded
    `offloaded_blocks` to the host tier, the bytes it made blank (`freed_bytes`), and how
    long it took (`duration_s`)."""

    evicted_blocks: int
    offloaded_blocks: int
    freed_bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class EvictionEvent(_ToDict):
    """Residency of a sampled block at its eviction (`residency_sample_rate`): seconds from
    allocation to eviction (`lifetime_seconds`), from its last access to eviction
    (`idle_seconds`), and between its last accesses (`reuse_gaps_seconds`, at most 3)."""

    lifetime_seconds: float
    idle_seconds: float
    reuse_gaps_seconds: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class BlockStored(_ToDict):
    """Blocks became cached in a tier (`tier`: "device", "host", "disk" or "remote"):
    `block_hashes` in chain order (the engine's 128-bit chained hashes), the hash of the
    first one's parent (`parent_block_hash`, None for a chain's first block), their
    `token_ids` end to end, and `block_size`."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    tier: str


@dataclass(frozen=True, slots=True)
class BlockRemoved(_ToDict):
    """Blocks (`block_hashes`) left a tier's prefix cache (`tier`)."""

    block_hashes: tuple[int, ...]
    tier: str


@dataclass(frozen=True, slots=True)
class AllBlocksCleared(_ToDict):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared

"""What `KvCache.drain_events` returns (the extension makes them: `rust/py/src/types.rs`)."""
