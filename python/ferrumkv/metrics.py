"""Prometheus export of a `KvCache`'s stats (needs ``prometheus_client``).

    from ferrumkv.metrics import register
    from prometheus_client import start_http_server

    register(cache)                  # on prometheus_client.REGISTRY
    start_http_server(9400)          # GET :9400/metrics

`KvCacheCollector` reads the engine when it is scraped, so there is no background thread
and no figure older than the scrape: each `collect()` takes one `cache.stats()` snapshot
(gauges and cumulative counters, all consistent with each other) and turns it into metric
families. It never calls `iteration_stats()`, whose deltas belong to the serving loop.

Residency histograms (block lifetime, idle time before eviction, reuse gaps) come from the
sampled eviction events. A scrape drains them with `cache.drain_eviction_events()` and adds
them to buckets kept in the collector, so the histograms are cumulative like any Prometheus
histogram. The collector therefore *consumes* the eviction events: do not drain them
elsewhere too. An application that needs the events itself passes
``drain_eviction_events=False`` and hands what it drained to `observe_eviction_events`.

A closed cache exports only the residency histograms (its stats are gone).
Every metric name starts with ``<namespace>_`` (default ``ferrumkv_``); the README's
"Metrics" section lists them. ``naming="vllm"`` exports vLLM's names and meanings instead where
vLLM has the metric (`VLLM_NAMES`: usage, prefix-cache queries and hits in tokens, offload
bytes, the residency histograms), so dashboards built for vLLM work unchanged; the rest keep
their ``<namespace>_`` names.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "ferrumkv.metrics needs the prometheus_client package: "
        "pip install prometheus_client (or pip install 'ferrumkv[metrics]')",
        name="prometheus_client",
    ) from exc

from .errors import CacheClosedError
from .types import CacheStats, EvictionEvent, PressureLevel

if TYPE_CHECKING:
    from .cache import KvCache

__all__ = ["DEFAULT_BUCKETS", "KvCacheCollector", "register"]

#: Histogram bounds in seconds (vLLM's KV residency buckets, then 1 h).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip

TIERS = ("device", "host", "disk")
_LEVELS = tuple(level.name.lower() for level in PressureLevel)
_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RESERVED_LABELS = frozenset(
    {"le", "state", "tier", "kind", "phase", "direction", "op", "level", "result"}
)

# A getter returns a value (no labels) or [(label values, value), ...].
_Samples = float | Sequence[tuple[tuple[str, ...], float]]


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str  # without the namespace; counters without "_total"
    kind: str  # "counter" | "gauge"
    doc: str
    labels: tuple[str, ...]
    get: Callable[[CacheStats], _Samples]


def _tier_blocks(s: CacheStats) -> list[tuple[tuple[str, ...], float]]:
    out: list[tuple[tuple[str, ...], float]] = []
    for tier in TIERS:
        t = getattr(s, tier)
        for state in ("total", "free", "used", "evictable"):
            out.append(((tier, state), getattr(t, f"{state}_blocks")))
    return out


def _tier_bytes(s: CacheStats) -> list[tuple[tuple[str, ...], float]]:
    out: list[tuple[tuple[str, ...], float]] = []
    for tier in TIERS:
        t = getattr(s, tier)
        out += [((tier, "total"), t.total_bytes), ((tier, "used"), t.used_bytes)]
    return out


def _by(label_values_and_fields: Sequence[tuple[str, str]]) -> Callable[[CacheStats], _Samples]:
    """A getter for one label whose values read one stats field each."""
    pairs = tuple(label_values_and_fields)
    return lambda s: [((value,), getattr(s, field)) for value, field in pairs]


def _field(name: str) -> Callable[[CacheStats], _Samples]:
    return lambda s: getattr(s, name)


_DIRECTIONS = ("onboard", "offload", "intra_device_copy")

#: ``naming="vllm"``: ferrumkv metric -> vLLM's (name, documentation, labels, getter). The
#: device tier is vLLM's "GPU" (also on ``device="cpu"``), the host tier its "CPU".
VLLM_NAMES: dict[str, tuple[str, str, tuple[str, ...], Callable[[CacheStats], _Samples]]] = {
    "usage_ratio": (
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        (),
        _field("usage"),
    ),
    "prefix_cache_queries_tokens": (
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        (),
        _field("prompt_tokens"),
    ),
    "prefix_cache_hits_tokens": (
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        (),
        _field("cache_tokens"),
    ),
    "preemptions": (
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        (),
        lambda s: s.swap_out_count + s.preempted_requests,
    ),
    "transfer_bytes": (
        "vllm:kv_offload_total_bytes",
        "Bytes moved between the GPU (device) and CPU (host) tiers, by transfer_type "
        "(GPU_to_CPU: offload; CPU_to_GPU: onboard, disk read-backs included).",
        ("transfer_type",),
        _by((("GPU_to_CPU", "offload_bytes"), ("CPU_to_GPU", "onboard_bytes"))),
    ),
}

#: ``naming="vllm"``: the residency histograms' vLLM names.
VLLM_HISTOGRAMS = {
    "block_lifetime_seconds": "vllm:kv_block_lifetime_seconds",
    "block_idle_before_evict_seconds": "vllm:kv_block_idle_before_evict_seconds",
    "block_reuse_gap_seconds": "vllm:kv_block_reuse_gap_seconds",
}

# The exported metrics, in exposition order. The README's "Metrics" table mirrors this list
# (tests/test_metrics.py checks that every name is there).
SPECS: tuple[_Spec, ...] = (
    # ----- occupancy and pressure (gauges) -----
    _Spec(
        "usage_ratio",
        "gauge",
        "Share of the device tier's token capacity owned by live sequences (0..1).",
        (),
        _field("usage"),
    ),
    _Spec(
        "tokens",
        "gauge",
        "Token capacity of the device tier: total, used by live sequences, free (used + free "
        "== total; free includes evictable cached blocks).",
        ("state",),
        _by((("total", "total_tokens"), ("used", "used_tokens"), ("free", "free_tokens"))),
    ),
    _Spec(
        "blocks",
        "gauge",
        "Blocks per tier: total, free (no owner, evictable included), used (owned by a live "
        "sequence; used + free == total), evictable (free blocks still holding cached data).",
        ("tier", "state"),
        _tier_blocks,
    ),
    _Spec(
        "memory_bytes",
        "gauge",
        "Bytes per tier: total capacity and bytes of the used blocks.",
        ("tier", "state"),
        _tier_bytes,
    ),
    _Spec(
        "pressure_level",
        "gauge",
        "Device-tier memory pressure: 0 LOW, 1 HIGH, 2 CRITICAL.",
        (),
        lambda s: int(s.pressure_level),
    ),
    _Spec(
        "pressure_state",
        "gauge",
        "1 for the current pressure level, 0 for the others.",
        ("level",),
        lambda s: [((name,), float(s.pressure_level == i)) for i, name in enumerate(_LEVELS)],
    ),
    _Spec(
        "sequences",
        "gauge",
        "Live sequences (allocated and not deallocated), swapped-out ones included.",
        (),
        _field("num_sequences"),
    ),
    _Spec(
        "sequences_swapped",
        "gauge",
        "Live sequences whose blocks are on the host tier.",
        (),
        _field("num_swapped"),
    ),
    _Spec(
        "calls_waiting_for_blocks",
        "gauge",
        "Engine calls (allocate, extend, swap_in) queued now until blocks free up: calls, "
        "not requests (a request waits in at most one call at a time).",
        (),
        _field("num_waiting"),
    ),
    _Spec(
        "disk_inflight_ops",
        "gauge",
        "Disk-tier reads and writes handed to the I/O workers and not finished yet.",
        (),
        _field("inflight_disk_ops"),
    ),
    # ----- prefix cache (counters) -----
    _Spec(
        "prefix_cache_queries_tokens",
        "counter",
        "Prompt tokens looked up in the prefix cache (input_tokens + cache_tokens).",
        (),
        _field("prompt_tokens"),
    ),
    _Spec(
        "prefix_cache_hits_tokens",
        "counter",
        "Prompt tokens served from the prefix cache (cache_tokens).",
        (),
        _field("cache_tokens"),
    ),
    _Spec(
        "prefix_cache_reused_blocks",
        "counter",
        "Prompt blocks reused from the prefix cache: kind=full (shared) or partial (copied).",
        ("kind",),
        _by((("full", "full_reused_blocks"), ("partial", "partial_reused_blocks"))),
    ),
    _Spec(
        "prefix_cache_missed_blocks",
        "counter",
        "Prompt blocks not found in the prefix cache (missed_blocks).",
        (),
        _field("missed_blocks"),
    ),
    _Spec(
        "prefix_cache_preempted_requests",
        "counter",
        "Requests resumed after preemption by recompute (allocate(preempted=True)); their "
        "lookups are kept out of the other prefix_cache_* counters.",
        (),
        _field("preempted_requests"),
    ),
    _Spec(
        "prefix_cache_preempted_tokens",
        "counter",
        "Prompt tokens of resumed requests: kind=queries (preempted_prompt_tokens) or hits "
        "(preempted_cache_tokens, served from the prefix cache).",
        ("kind",),
        _by((("queries", "preempted_prompt_tokens"), ("hits", "preempted_cache_tokens"))),
    ),
    # ----- allocation and eviction (counters) -----
    _Spec(
        "allocated_blocks",
        "counter",
        "Blocks given to sequences: phase=prompt (alloc_total_blocks, reused ones included) "
        "or generation (gen_alloc_blocks).",
        ("phase",),
        _by((("prompt", "alloc_total_blocks"), ("generation", "gen_alloc_blocks"))),
    ),
    _Spec(
        "allocated_new_blocks",
        "counter",
        "Prompt blocks taken from the free pool, not shared from the cache (alloc_new_blocks).",
        (),
        _field("alloc_new_blocks"),
    ),
    _Spec(
        "evicted_blocks",
        "counter",
        "Cached blocks evicted from the device tier's prefix cache.",
        (),
        _field("evicted_blocks"),
    ),
    _Spec(
        "truncated_blocks",
        "counter",
        "Blocks freed by truncate() past a sequence's new end (rejected speculative tokens).",
        (),
        _field("truncated_blocks"),
    ),
    _Spec(
        "block_waits",
        "counter",
        "allocate/extend calls that had to wait for blocks (preempted_waits).",
        (),
        _field("preempted_waits"),
    ),
    _Spec(
        "preemptions",
        "counter",
        "Requests preempted: kind=swap (swapped out to the host tier, swap_out_count) or "
        "recompute (resumed by allocate(preempted=True), preempted_requests).",
        ("kind",),
        _by((("swap", "swap_out_count"), ("recompute", "preempted_requests"))),
    ),
    _Spec(
        "swaps",
        "counter",
        "Sequences swapped out to / in from the host tier (direction=out|in).",
        ("direction",),
        _by((("out", "swap_out_count"), ("in", "swap_in_count"))),
    ),
    # ----- transfers (counters) -----
    _Spec(
        "transfer_blocks",
        "counter",
        "Blocks moved: onboard (into the device tier), offload (out of it), "
        "intra_device_copy (copy-on-write and partial-reuse copies).",
        ("direction",),
        _by(tuple((d, f"{d}_blocks") for d in _DIRECTIONS)),
    ),
    _Spec(
        "transfer_bytes",
        "counter",
        "Bytes moved, by the same directions as transfer_blocks.",
        ("direction",),
        _by(tuple((d, f"{d}_bytes") for d in _DIRECTIONS)),
    ),
    _Spec(
        "copied_blocks",
        "counter",
        "Blocks copied between host memory and the device: h2d or d2h.",
        ("direction",),
        _by((("h2d", "h2d_blocks_copied"), ("d2h", "d2h_blocks_copied"))),
    ),
    _Spec(
        "disk_io_blocks",
        "counter",
        "Blocks written to / read from the disk tier (op=write|read).",
        ("op",),
        _by((("write", "disk_blocks_written"), ("read", "disk_blocks_read"))),
    ),
    _Spec(
        "disk_checksum_failures",
        "counter",
        "Disk-tier blocks whose checksum did not match when read back.",
        (),
        _field("disk_checksum_failures"),
    ),
    _Spec(
        "disk_errors",
        "counter",
        "Disk-tier reads / writes that failed with an I/O error (op=read|write; logged).",
        ("op",),
        _by((("read", "disk_read_errors"), ("write", "disk_write_errors"))),
    ),
    _Spec(
        "swap_transfers",
        "counter",
        "Batched copies of swaps: direction=d2h (swap-outs) or h2d (swap-ins).",
        ("direction",),
        _by((("d2h", "d2h_transfers"), ("h2d", "h2d_transfers"))),
    ),
    _Spec(
        "swap_transfer_seconds",
        "counter",
        "Seconds spent in the copies of swaps, by the same directions as swap_transfers.",
        ("direction",),
        _by((("d2h", "d2h_transfer_seconds_total"), ("h2d", "h2d_transfer_seconds_total"))),
    ),
    # ----- the remote tier (counters) -----
    _Spec(
        "remote_lookup_blocks",
        "counter",
        "Blocks remote lookups asked the store for: hit (imported, checksum verified) or "
        "miss (absent, refused or failed).",
        ("result",),
        _by((("hit", "remote_hit_blocks"), ("miss", "remote_miss_blocks"))),
    ),
    _Spec(
        "remote_corrupt_blocks",
        "counter",
        "Values the store returned that were refused: truncated, corrupted, or another "
        "key's or shape's (each also a miss).",
        (),
        _field("remote_corrupt_blocks"),
    ),
    _Spec(
        "remote_written_blocks",
        "counter",
        "Blocks written to the store.",
        (),
        _field("remote_write_blocks"),
    ),
    _Spec(
        "remote_bytes",
        "counter",
        "Block bytes read from (imported) and written to the store (op=read|write).",
        ("op",),
        _by((("read", "remote_read_bytes"), ("write", "remote_write_bytes"))),
    ),
    _Spec(
        "remote_dropped_writes",
        "counter",
        "Writes that never reached the store: the write queue was full, the store was full, "
        "or it was unreachable.",
        (),
        _field("remote_dropped_writes"),
    ),
    _Spec(
        "remote_errors",
        "counter",
        "Remote calls that failed or timed out (the cache ran local-only meanwhile).",
        (),
        _field("remote_errors"),
    ),
    _Spec(
        "remote_seconds",
        "counter",
        "Seconds spent in remote lookups and writes (op=read|write).",
        ("op",),
        _by((("read", "remote_read_seconds_total"), ("write", "remote_write_seconds_total"))),
    ),
    # ----- health (counters) -----
    _Spec(
        "callback_errors",
        "counter",
        "Pressure callbacks that raised (logged; the engine carries on).",
        (),
        _field("callback_errors"),
    ),
    _Spec(
        "dropped_events",
        "counter",
        "KV cache events dropped because drain_events() fell behind (bounded queue).",
        (),
        _field("dropped_events"),
    ),
    _Spec(
        "dropped_eviction_events",
        "counter",
        "Sampled eviction events dropped because nothing drained them (bounded queue): the "
        "residency histograms miss that many samples.",
        (),
        _field("dropped_eviction_events"),
    ),
)

# name, documentation, value(s) of one eviction event
HISTOGRAMS: tuple[tuple[str, str, Callable[[EvictionEvent], Iterable[float]]], ...] = (
    (
        "block_lifetime_seconds",
        "Lifetime of sampled blocks from allocation to eviction (residency_sample_rate).",
        lambda e: (e.lifetime_seconds,),
    ),
    (
        "block_idle_before_evict_seconds",
        "Idle time of sampled blocks between their last access and their eviction.",
        lambda e: (e.idle_seconds,),
    ),
    (
        "block_reuse_gap_seconds",
        "Gaps between the last accesses (at most 3 per block) of sampled blocks, observed "
        "at eviction.",
        lambda e: e.reuse_gaps_seconds,
    ),
)


class _Histogram:
    """Bucket counts (not cumulative) and the sum of observations; guarded by the
    collector's lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # `le` buckets: the first bound >= value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            # prometheus_client's own rendering of a bucket bound (untyped there).
            out.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        return out


class KvCacheCollector(Collector):
    """A Prometheus collector over one `KvCache`, read at scrape time.

    `namespace` prefixes every name (``<namespace>_usage_ratio``...). `labels` are constant
    labels added to every sample (for example ``{"model": "llama-3-8b"}``).
    `drain_eviction_events`: drain the cache's eviction events at each scrape into the
    residency histograms (default); with False, feed them with `observe_eviction_events`.
    `buckets`: histogram bounds in seconds (increasing; +Inf is implied).
    `naming`: ``"ferrumkv"`` (every name under `namespace`) or ``"vllm"`` (vLLM's names
    where vLLM has the metric, `VLLM_NAMES`; vLLM's own labels are ``model_name`` and
    ``engine``: pass them in `labels`).

    Register one collector per cache and namespace: two collectors with the same names on
    one registry clash (`registry.register` raises), because a Prometheus metric family
    cannot be split between collectors. Remove it with ``registry.unregister(collector)``.
    """

    def __init__(
        self,
        cache: KvCache,
        *,
        namespace: str = "ferrumkv",
        labels: Mapping[str, str] | None = None,
        drain_eviction_events: bool = True,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        naming: str = "ferrumkv",
    ) -> None:
        if naming not in ("ferrumkv", "vllm"):
            raise ValueError(f'naming must be "ferrumkv" or "vllm", not {naming!r}')
        if not isinstance(namespace, str) or not _NAME_RE.fullmatch(namespace):
            raise ValueError(f"namespace must match [a-zA-Z_][a-zA-Z0-9_]*, got {namespace!r}")
        labels = dict(labels or {})
        for key, value in labels.items():
            if not isinstance(key, str) or not _NAME_RE.fullmatch(key) or key.startswith("__"):
                raise ValueError(f"invalid label name {key!r}")
            if key in _RESERVED_LABELS:
                raise ValueError(
                    f"label name {key!r} is used by the collector's own metrics "
                    f"(reserved: {', '.join(sorted(_RESERVED_LABELS))})"
                )
            if not isinstance(value, str):
                raise TypeError(f"label {key!r} must have a str value, not {type(value).__name__}")
        bounds = tuple(float(b) for b in buckets)
        if bounds and bounds[-1] == math.inf:
            bounds = bounds[:-1]
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError("buckets must be finite numbers (+Inf is added)")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError("buckets must be strictly increasing")
        self.cache = cache
        self.namespace = namespace
        self.labels: dict[str, str] = labels
        self.drain_eviction_events = bool(drain_eviction_events)
        self.buckets = bounds
        self.naming = naming
        self._label_names = tuple(labels)
        self._label_values = tuple(labels.values())
        self._lock = threading.Lock()
        self._histograms = {name: _Histogram(bounds) for name, _, _ in HISTOGRAMS}

    def _name(self, name: str) -> str:
        if name.startswith("vllm:"):
            return name
        return f"{self.namespace}_{name}"

    def observe_eviction_events(self, events: Iterable[EvictionEvent]) -> None:
        """Adds eviction events (from `cache.drain_eviction_events()`) to the histograms."""
        events = list(events)
        with self._lock:
            self._observe(events)

    def _observe(self, events: list[EvictionEvent]) -> None:
        for name, _, values in HISTOGRAMS:
            hist = self._histograms[name]
            for event in events:
                for value in values(event):
                    hist.observe(float(value))

    def _family(self, kind: str, name: str, doc: str, labels: tuple[str, ...]) -> Any:
        cls = {
            "counter": CounterMetricFamily,
            "gauge": GaugeMetricFamily,
            "histogram": HistogramMetricFamily,
        }[kind]
        return cls(self._name(name), doc, labels=[*self._label_names, *labels])

    def _specs(self) -> Iterator[_Spec]:
        """The exported metrics under this collector's naming."""
        for spec in SPECS:
            if self.naming == "vllm" and spec.name in VLLM_NAMES:
                name, doc, labels, get = VLLM_NAMES[spec.name]
                yield _Spec(name, spec.kind, doc, labels, get)
            else:
                yield spec

    def _histogram_name(self, name: str) -> str:
        return VLLM_HISTOGRAMS[name] if self.naming == "vllm" else name

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets a registry check names without a scrape
        (so registering never drains eviction events)."""
        for spec in self._specs():
            yield self._family(spec.kind, spec.name, spec.doc, spec.labels)
        for name, doc, _ in HISTOGRAMS:
            yield self._family("histogram", self._histogram_name(name), doc, ())

    def collect(self) -> Iterator[Metric]:
        """One scrape: a `stats()` snapshot, then the residency histograms (after draining
        the eviction events when `drain_eviction_events` is set)."""
        try:
            stats: CacheStats | None = self.cache.stats()
        except CacheClosedError:
            stats = None
        with self._lock:
            if self.drain_eviction_events and stats is not None:
                with contextlib.suppress(CacheClosedError):  # closed since stats()
                    self._observe(self.cache.drain_eviction_events())
            snapshots = [
                (name, doc, self._histograms[name].cumulative(), self._histograms[name].sum)
                for name, doc, _ in HISTOGRAMS
            ]
        if stats is not None:
            const = self._label_values
            for spec in self._specs():
                family = self._family(spec.kind, spec.name, spec.doc, spec.labels)
                samples = spec.get(stats)
                if isinstance(samples, int | float):
                    family.add_metric(list(const), float(samples))
                else:
                    for values, value in samples:
                        family.add_metric([*const, *values], float(value))
                yield family
        for name, doc, buckets, total in snapshots:
            family = self._family("histogram", self._histogram_name(name), doc, ())
            family.add_metric(list(self._label_values), buckets, total)
            yield family


def register(
    cache: KvCache, registry: CollectorRegistry | None = None, **kw: Any
) -> KvCacheCollector:
    """Creates a `KvCacheCollector(cache, **kw)` and registers it on `registry`
    (default: ``prometheus_client.REGISTRY``); returns the collector."""
    collector = KvCacheCollector(cache, **kw)
    (REGISTRY if registry is None else registry).register(collector)
    return collector
