"""Prometheus export (ferrumkv.metrics): real scrapes over HTTP, parsed back, checked exactly
against `cache.stats()` and the residency events.

The scenario runs on a manual clock with every block sampled (residency_sample_rate=1.0), so
it is deterministic: a twin cache that runs the same steps yields the same stats and the same
eviction events, which the test drains itself to know what the scraped histograms must hold.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

import ferrumkv
from ferrumkv import CacheStats, EvictionEvent, PressureLevel
from ferrumkv.metrics import DEFAULT_BUCKETS, KvCacheCollector, register

BS = 4  # block_size
SYS = list(range(16))  # a 4-block shared system prompt

GAUGES = {
    "usage_ratio",
    "tokens",
    "blocks",
    "memory_bytes",
    "pressure_level",
    "pressure_state",
    "sequences",
    "sequences_swapped",
    "calls_waiting_for_blocks",
    "disk_inflight_ops",
}
COUNTERS = {
    "prefix_cache_queries_tokens",
    "prefix_cache_hits_tokens",
    "prefix_cache_reused_blocks",
    "prefix_cache_missed_blocks",
    "prefix_cache_preempted_requests",
    "prefix_cache_preempted_tokens",
    "allocated_blocks",
    "allocated_new_blocks",
    "evicted_blocks",
    "truncated_blocks",
    "block_waits",
    "preemptions",
    "swaps",
    "transfer_blocks",
    "transfer_bytes",
    "copied_blocks",
    "disk_io_blocks",
    "disk_checksum_failures",
    "disk_errors",
    "swap_transfers",
    "swap_transfer_seconds",
    "remote_lookup_blocks",
    "remote_corrupt_blocks",
    "remote_written_blocks",
    "remote_bytes",
    "remote_dropped_writes",
    "remote_errors",
    "remote_seconds",
    "callback_errors",
    "dropped_events",
    "dropped_eviction_events",
}
HISTOGRAMS = {
    "block_lifetime_seconds": lambda e: [e.lifetime_seconds],
    "block_idle_before_evict_seconds": lambda e: [e.idle_seconds],
    "block_reuse_gap_seconds": lambda e: list(e.reuse_gaps_seconds),
}


def new_cache() -> ferrumkv.KvCache:
    cfg = ferrumkv.CacheConfig(
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        block_size=BS,
        num_blocks=32,
        residency_sample_rate=1.0,
    )
    return ferrumkv.KvCache(cfg, clock_start=0.0)


def boom(event: ferrumkv.PressureEvent) -> None:
    raise RuntimeError("a failing pressure callback")


async def phase1(cache: ferrumkv.KvCache) -> None:
    """Prefix hits (full and partial), a decode step, one eviction forced by an allocation;
    ends at HIGH pressure with two live sequences."""
    cache.on_pressure(boom)
    await cache.allocate("a", [*SYS, 1001, 1002, 1003])  # 5 blocks
    cache.set_time(1.0)
    await cache.allocate("b", [*SYS, 2001, 2002])  # reuses 4 full blocks
    await cache.extend("b", [5, 6])
    await cache.extend("b", [7])  # a generation block
    cache.set_time(2.0)
    await cache.allocate("d", list(range(500, 516)))  # 4 full blocks
    cache.set_time(3.0)
    await cache.deallocate("d")
    cache.set_time(4.0)
    await cache.allocate("e", [*range(500, 510), 9, 9, 9])  # 2 full + 1 partial reuse
    cache.set_time(5.0)
    await cache.deallocate("a")
    await cache.deallocate("e")
    cache.set_time(6.0)
    await cache.allocate("f", list(range(3000, 3084)))  # takes every blank block
    cache.set_time(7.0)
    await cache.extend("f", [1])  # evicts the least recently released cached block
    with anyio.fail_after(5):  # the callback runs on the loop, soon after the change
        while cache.stats().callback_errors == 0:
            await anyio.sleep(0.001)


async def phase2(cache: ferrumkv.KvCache) -> None:
    """More hits, then everything released and evicted by gc."""
    cache.set_time(10.0)
    await cache.deallocate("f")
    await cache.allocate("g", [*SYS, 4000])
    cache.set_time(12.0)
    await cache.deallocate("b")
    await cache.deallocate("g")
    await cache.gc(target_free_ratio=1.0)


# ----- expectations, written from the stats independently of ferrumkv.metrics -----------


def expected_samples(
    s: CacheStats, events: list[EvictionEvent], const: dict[str, str] | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    const = const or {}
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    def put(name: str, value: float, **labels: str) -> None:
        out[("ferrumkv_" + name, frozenset({**const, **labels}.items()))] = float(value)

    put("usage_ratio", s.usage)
    for state in ("total", "used", "free"):
        put("tokens", getattr(s, f"{state}_tokens"), state=state)
    for tier in ("device", "host", "disk"):
        t = getattr(s, tier)
        for state in ("total", "free", "used", "evictable"):
            put("blocks", getattr(t, f"{state}_blocks"), tier=tier, state=state)
        put("memory_bytes", t.total_bytes, tier=tier, state="total")
        put("memory_bytes", t.used_bytes, tier=tier, state="used")
    put("pressure_level", int(s.pressure_level))
    for level in PressureLevel:
        put("pressure_state", s.pressure_level == level, level=level.name.lower())
    put("sequences", s.num_sequences)
    put("sequences_swapped", s.num_swapped)
    put("calls_waiting_for_blocks", s.num_waiting)
    put("disk_inflight_ops", s.inflight_disk_ops)
    put("prefix_cache_queries_tokens_total", s.input_tokens + s.cache_tokens)
    put("prefix_cache_hits_tokens_total", s.cache_tokens)
    put("prefix_cache_reused_blocks_total", s.full_reused_blocks, kind="full")
    put("prefix_cache_reused_blocks_total", s.partial_reused_blocks, kind="partial")
    put("prefix_cache_missed_blocks_total", s.missed_blocks)
    put("prefix_cache_preempted_requests_total", s.preempted_requests)
    put("prefix_cache_preempted_tokens_total", s.preempted_prompt_tokens, kind="queries")
    put("prefix_cache_preempted_tokens_total", s.preempted_cache_tokens, kind="hits")
    put("allocated_blocks_total", s.alloc_total_blocks, phase="prompt")
    put("allocated_blocks_total", s.gen_alloc_blocks, phase="generation")
    put("allocated_new_blocks_total", s.alloc_new_blocks)
    put("evicted_blocks_total", s.evicted_blocks)
    put("truncated_blocks_total", s.truncated_blocks)
    put("block_waits_total", s.preempted_waits)
    put("preemptions_total", s.swap_out_count, kind="swap")
    put("preemptions_total", s.preempted_requests, kind="recompute")
    put("swaps_total", s.swap_out_count, direction="out")
    put("swaps_total", s.swap_in_count, direction="in")
    for d in ("onboard", "offload", "intra_device_copy"):
        put("transfer_blocks_total", getattr(s, f"{d}_blocks"), direction=d)
        put("transfer_bytes_total", getattr(s, f"{d}_bytes"), direction=d)
    put("copied_blocks_total", s.h2d_blocks_copied, direction="h2d")
    put("copied_blocks_total", s.d2h_blocks_copied, direction="d2h")
    put("disk_io_blocks_total", s.disk_blocks_written, op="write")
    put("disk_io_blocks_total", s.disk_blocks_read, op="read")
    put("disk_checksum_failures_total", s.disk_checksum_failures)
    put("disk_errors_total", s.disk_read_errors, op="read")
    put("disk_errors_total", s.disk_write_errors, op="write")
    put("swap_transfers_total", s.d2h_transfers, direction="d2h")
    put("swap_transfers_total", s.h2d_transfers, direction="h2d")
    put("swap_transfer_seconds_total", s.d2h_transfer_seconds_total, direction="d2h")
    put("swap_transfer_seconds_total", s.h2d_transfer_seconds_total, direction="h2d")
    put("remote_lookup_blocks_total", s.remote_hit_blocks, result="hit")
    put("remote_lookup_blocks_total", s.remote_miss_blocks, result="miss")
    put("remote_corrupt_blocks_total", s.remote_corrupt_blocks)
    put("remote_written_blocks_total", s.remote_write_blocks)
    put("remote_bytes_total", s.remote_read_bytes, op="read")
    put("remote_bytes_total", s.remote_write_bytes, op="write")
    put("remote_dropped_writes_total", s.remote_dropped_writes)
    put("remote_errors_total", s.remote_errors)
    put("remote_seconds_total", s.remote_read_seconds_total, op="read")
    put("remote_seconds_total", s.remote_write_seconds_total, op="write")
    put("callback_errors_total", s.callback_errors)
    put("dropped_events_total", s.dropped_events)
    put("dropped_eviction_events_total", s.dropped_eviction_events)
    out.update(expected_histograms(events, const))
    return out


def expected_histograms(
    events: list[EvictionEvent], const: dict[str, str] | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    const = const or {}
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for name, values_of in HISTOGRAMS.items():
        values = [v for e in events for v in values_of(e)]
        full = "ferrumkv_" + name
        for bound in (*DEFAULT_BUCKETS, float("inf")):
            le = frozenset({**const, "le": floatToGoString(bound)}.items())
            out[(full + "_bucket", le)] = float(sum(v <= bound for v in values))
        total = 0.0
        for v in values:  # the order the collector adds them in
            total += v
        out[(full + "_count", frozenset(const.items()))] = float(len(values))
        out[(full + "_sum", frozenset(const.items()))] = total
    return out


def exported(s: CacheStats) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The exported figures of a snapshot (not the timings, which vary between runs)."""
    return expected_samples(s, [])


# ----- scraping ----------------------------------------------------------------------------


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[Any]], float]]:
    """(family name -> type, (sample name, labels) -> value); no sample may repeat."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[Any]], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} exposed twice"
        assert family.documentation, f"{family.name} has no HELP text"
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"sample {key} exposed twice"
            samples[key] = sample.value
    return types, samples


def expected_types(prefix: str = "ferrumkv_") -> dict[str, str]:
    # The parser names a counter family without its "_total" suffix.
    return {
        **{prefix + n: "gauge" for n in GAUGES},
        **{prefix + n: "counter" for n in COUNTERS},
        **{prefix + n: "histogram" for n in HISTOGRAMS},
    }


class Server:
    """prometheus_client's HTTP exporter on an ephemeral port of 127.0.0.1."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Recent prometheus_client (0.26 here) returns (server, thread).
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return resp.read().decode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# ----- tests -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_scrape_matches_stats_exactly(caplog: pytest.LogCaptureFixture) -> None:
    cache, twin = new_cache(), new_cache()
    reg, twin_reg = CollectorRegistry(), CollectorRegistry()
    collector = register(cache, reg)
    assert isinstance(collector, KvCacheCollector)
    # The twin's events are drained by the test, then handed to its collector.
    twin_collector = register(twin, twin_reg, drain_eviction_events=False)
    server = Server(reg)
    try:
        await phase1(cache)
        await phase1(twin)
        stats1 = cache.stats()
        assert exported(stats1) == exported(twin.stats())  # the scenario is deterministic
        events1 = twin.drain_eviction_events()
        # The scenario exercises what the metrics report.
        assert stats1.pressure_level is PressureLevel.HIGH
        assert stats1.num_sequences == 2 and stats1.used_tokens > 0
        assert stats1.callback_errors == 1
        assert stats1.cache_tokens > 0 and stats1.partial_reused_blocks == 1
        assert stats1.gen_alloc_blocks > 0 and stats1.intra_device_copy_blocks == 1
        # The evicted block: d's tail, allocated at t=2 and never reused, evicted at t=7.
        assert stats1.evicted_blocks == 1
        assert events1 == [EvictionEvent(5.0, 5.0, ())]

        types1, samples1 = parse(server.scrape())
        assert types1 == expected_types()
        assert samples1 == expected_samples(stats1, events1)
        assert cache.drain_eviction_events() == []  # the scrape consumed them

        # Second scrape after more activity: counters and histograms are cumulative.
        await phase2(cache)
        await phase2(twin)
        stats2 = cache.stats()
        assert exported(stats2) == exported(twin.stats())
        events2 = twin.drain_eviction_events()
        # gc(1.0) evicted every cached block, and every evicted block was sampled.
        assert stats2.device.evictable_blocks == 0 and stats2.used_tokens == 0
        assert stats2.evicted_blocks == 31 and len(events1) + len(events2) == 31
        assert any(len(e.reuse_gaps_seconds) == 2 for e in events2)
        types2, samples2 = parse(server.scrape())
        assert types2 == expected_types()
        assert samples2 == expected_samples(stats2, events1 + events2)
        for key, value in samples1.items():
            if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert samples2[key] >= value, key
        assert samples2[("ferrumkv_evicted_blocks_total", frozenset())] == 31
        assert samples2[("ferrumkv_block_lifetime_seconds_count", frozenset())] == 31
        assert samples2[("ferrumkv_prefix_cache_hits_tokens_total", frozenset())] == (
            stats1.cache_tokens + 16
        )
        assert samples2[("ferrumkv_sequences", frozenset())] == 0

        # The twin's collector, fed by hand, exports the same histograms.
        twin_collector.observe_eviction_events(events1 + events2)
        _, twin_samples = parse(generate_latest(twin_reg).decode())
        assert twin_samples == samples2
        # A third scrape with nothing new changes nothing.
        assert parse(server.scrape())[1] == samples2
    finally:
        server.close()
        cache.close()
        twin.close()
    assert collector.cache is cache
    assert "a failing pressure callback" in caplog.text


@pytest.mark.anyio
async def test_host_tier_transfers_and_swaps() -> None:
    """Swaps, offload on eviction and onboard on a prefix hit, each direction with its own
    count, so a label mapped to the wrong field would show."""
    cfg = ferrumkv.CacheConfig(
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        block_size=BS,
        num_blocks=16,
        host_blocks=8,
        residency_sample_rate=1.0,
    )
    cache = ferrumkv.KvCache(cfg, clock_start=0.0)
    reg = CollectorRegistry()
    collector = register(cache, reg, drain_eviction_events=False)
    try:
        await cache.allocate("a", list(range(13)))  # 4 blocks, 3 full
        await cache.swap_out("a")
        await cache.swap_in("a")
        await cache.deallocate("a")
        cache.set_time(1.0)
        await cache.gc(target_free_ratio=1.0)  # evicts the 3 cached blocks to the host tier
        await cache.allocate("b", [*range(8), 99, 99, 99, 99, 99])  # onboards 2 of them
        await cache.allocate("c", [7, 7, 7, 7, 7])
        await cache.swap_out("c")
        s = cache.stats()
        assert (s.swap_out_count, s.swap_in_count) == (2, 1)
        assert (s.offload_blocks, s.onboard_blocks) == (3, 2)
        assert (s.d2h_blocks_copied, s.h2d_blocks_copied) == (9, 6)
        assert s.num_swapped == 1 and s.host.used_blocks == 2 and s.host.evictable_blocks > 0
        events = cache.drain_eviction_events()
        assert events == [EvictionEvent(1.0, 1.0, ())] * 3
        collector.observe_eviction_events(events)
        types, samples = parse(generate_latest(reg).decode())
        assert types == expected_types()
        assert samples == expected_samples(s, events)
    finally:
        cache.close()


def run_phase1() -> tuple[ferrumkv.KvCache, list[EvictionEvent]]:
    """A cache after phase 1 (under asyncio) and the eviction events a twin produced."""
    cache, twin = new_cache(), new_cache()
    asyncio.run(phase1(cache))
    asyncio.run(phase1(twin))
    events = twin.drain_eviction_events()
    twin.close()
    assert len(events) == 1
    return cache, events


def test_constant_labels_and_namespace() -> None:
    cache, events = run_phase1()
    try:
        reg = CollectorRegistry()
        const = {"model": "llama-3-8b", "engine": "0"}
        register(cache, reg, labels=const)
        # A second collector with the same names cannot join the registry...
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            register(cache, reg)
        # ...one with its own namespace can.
        reg.register(KvCacheCollector(cache, namespace="kv", drain_eviction_events=False))
        types, samples = parse(generate_latest(reg).decode())
        assert types == {
            **expected_types(),
            **{"kv_" + k.removeprefix("ferrumkv_"): t for k, t in expected_types().items()},
        }
        stats = cache.stats()
        ours = {k: v for k, v in samples.items() if k[0].startswith("ferrumkv_")}
        assert ours == expected_samples(stats, events, const)
        kv = {
            ("ferrumkv_" + k[0].removeprefix("kv_"), k[1]): v
            for k, v in samples.items()
            if k[0].startswith("kv_")
        }
        assert kv == expected_samples(stats, [])  # it does not drain: empty histograms
    finally:
        cache.close()


def test_register_on_default_registry_does_not_drain() -> None:
    cache, _ = run_phase1()
    try:
        collector = register(cache)  # REGISTRY describes a collector when registering it
        try:
            assert len(cache.drain_eviction_events()) == 1  # still there: nothing scraped
            text = generate_latest(REGISTRY).decode()
            assert "\nferrumkv_usage_ratio 0.875\n" in text
        finally:
            REGISTRY.unregister(collector)
        assert "ferrumkv_usage_ratio" not in generate_latest(REGISTRY).decode()
    finally:
        cache.close()


def test_closed_cache_exports_only_histograms() -> None:
    cache, _ = run_phase1()
    reg = CollectorRegistry()
    register(cache, reg)
    _, before = parse(generate_latest(reg).decode())
    cache.close()
    types, samples = parse(generate_latest(reg).decode())
    assert types == {"ferrumkv_" + n: "histogram" for n in HISTOGRAMS}
    assert samples == {k: v for k, v in before.items() if k in samples}
    assert samples[("ferrumkv_block_lifetime_seconds_count", frozenset())] == 1


def test_custom_buckets_and_validation() -> None:
    cache = new_cache()
    try:
        c = KvCacheCollector(cache, buckets=[1, 5, float("inf")], drain_eviction_events=False)
        assert c.buckets == (1.0, 5.0)
        c.observe_eviction_events(
            [EvictionEvent(0.5, 0.5, ()), EvictionEvent(5.0, 1.0, (2.0, 3.0, 9.0))]
        )
        reg = CollectorRegistry()
        reg.register(c)
        _, samples = parse(generate_latest(reg).decode())
        life = "ferrumkv_block_lifetime_seconds"
        gap = "ferrumkv_block_reuse_gap_seconds"
        assert [samples[(life + "_bucket", frozenset({("le", le)}))] for le in ("1.0", "5.0")] == [
            1,
            2,  # le is inclusive: 5.0 falls in the 5.0 bucket
        ]
        assert samples[(life + "_bucket", frozenset({("le", "+Inf")}))] == 2
        assert samples[(life + "_sum", frozenset())] == 5.5
        assert samples[(gap + "_count", frozenset())] == 3
        assert samples[(gap + "_bucket", frozenset({("le", "5.0")}))] == 2
        assert samples[(gap + "_sum", frozenset())] == 14.0

        for kw, match in [
            ({"namespace": "bad-name"}, "namespace"),
            ({"namespace": ""}, "namespace"),
            ({"labels": {"tier": "x"}}, "reserved"),
            ({"labels": {"le": "x"}}, "reserved"),
            ({"labels": {"__x": "x"}}, "invalid label"),
            ({"labels": {"a b": "x"}}, "invalid label"),
            ({"buckets": []}, "buckets"),
            ({"buckets": [2, 1]}, "increasing"),
            ({"buckets": [1, float("nan")]}, "buckets"),
        ]:
            with pytest.raises(ValueError, match=match):
                KvCacheCollector(cache, **kw)
        with pytest.raises(TypeError, match="str value"):
            KvCacheCollector(cache, labels={"model": 3})  # type: ignore[dict-item]
    finally:
        cache.close()


def test_missing_prometheus_client_raises_a_helpful_import_error() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import ferrumkv\n"  # the package itself does not need it
        "try:\n"
        "    import ferrumkv.metrics\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.startswith("ImportError: ferrumkv.metrics needs the prometheus_client package")
    assert "pip install prometheus_client" in out
    assert "ferrumkv[metrics]" in out


def test_readme_lists_every_metric() -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = re.search(r"\n## Metrics\n(.*?)\n## ", text, re.S)
    assert section, "the README has a Metrics section"
    listed = set(re.findall(r"`(ferrumkv_[a-z_]+)`", section.group(1)))
    exported = {
        name + "_total" if kind == "counter" else name for name, kind in expected_types().items()
    }
    assert listed == exported


def vllm_renamed(
    expected: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`expected` as `naming="vllm"` exports it: vLLM's names where vLLM has the metric."""
    simple = {
        "ferrumkv_usage_ratio": "vllm:kv_cache_usage_perc",
        "ferrumkv_prefix_cache_queries_tokens_total": "vllm:prefix_cache_queries_total",
        "ferrumkv_prefix_cache_hits_tokens_total": "vllm:prefix_cache_hits_total",
    }
    transfer_type = {"offload": "GPU_to_CPU", "onboard": "CPU_to_GPU"}
    out = {}
    for (name, labels), value in expected.items():
        if name in simple:
            name = simple[name]
        elif name == "ferrumkv_transfer_bytes_total":
            direction = dict(labels)["direction"]
            if direction not in transfer_type:
                continue  # copy-on-write bytes: vLLM has no such counter
            name = "vllm:kv_offload_total_bytes_total"
            kept = {k: v for k, v in labels if k != "direction"}
            labels = frozenset({**kept, "transfer_type": transfer_type[direction]}.items())
        elif name == "ferrumkv_preemptions_total":  # vLLM counts both kinds as one
            key = (
                "vllm:num_preemptions_total",
                frozenset((k, v) for k, v in labels if k != "kind"),
            )
            out[key] = out.get(key, 0.0) + value
            continue
        elif any(name.startswith("ferrumkv_" + h) for h in HISTOGRAMS):
            name = "vllm:kv_" + name.removeprefix("ferrumkv_")
        out[(name, labels)] = value
    return out


def test_vllm_naming_exports_vllms_names_and_meanings() -> None:
    cache, events = run_phase1()
    try:
        reg = CollectorRegistry()
        const = {"model_name": "llama-3-8b", "engine": "0"}
        register(cache, reg, labels=const, naming="vllm")
        types, samples = parse(generate_latest(reg).decode())
        assert samples == vllm_renamed(expected_samples(cache.stats(), events, const))
        assert types["vllm:kv_cache_usage_perc"] == "gauge"
        assert types["vllm:prefix_cache_queries"] == "counter"
        assert types["vllm:kv_offload_total_bytes"] == "counter"
        assert types["vllm:num_preemptions"] == "counter"
        assert types["vllm:kv_block_idle_before_evict_seconds"] == "histogram"
        assert "ferrumkv_usage_ratio" not in types  # renamed, not doubled
        assert types["ferrumkv_evicted_blocks"] == "counter"  # no vLLM name: kept
        # The offload counters moved real bytes in this scenario.
        assert samples[
            ("vllm:kv_offload_total_bytes_total",
             frozenset({**const, "transfer_type": "GPU_to_CPU"}.items()))
        ] == cache.stats().offload_bytes  # fmt: skip
    finally:
        cache.close()
    with pytest.raises(ValueError, match="naming"):
        KvCacheCollector(cache, naming="sglang")


DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "ferrumkv.json"


def test_every_dashboard_query_names_an_exported_metric(tmp_path: Path) -> None:
    """docs/grafana/ferrumkv.json: each metric a query reads is in a real scrape (with every
    tier configured), and each label matcher matches an exported sample."""
    import json

    cfg = ferrumkv.CacheConfig(
        num_layers=1, num_kv_heads=1, head_dim=8, block_size=BS, num_blocks=8,
        host_blocks=4, disk_blocks=4, disk_path=str(tmp_path / "kv"),
    )  # fmt: skip
    with ferrumkv.KvCache(cfg) as cache:
        reg = CollectorRegistry()
        register(cache, reg)
        _, samples = parse(generate_latest(reg).decode())
    exported: dict[str, list[dict[str, str]]] = {}
    for name, labels in samples:
        exported.setdefault(name, []).append(dict(labels))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    seen = set()
    for expr in exprs:
        for name, matchers in re.findall(r"(ferrumkv_[a-z0-9_]+)(\{[^}]*\})?", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"
            seen.add(name)
            for key, value in re.findall(r'(\w+)="([^"]*)"', matchers):
                assert any(s.get(key) == value for s in exported[name]), (
                    f'{name}{{{key}="{value}"}} matches no exported sample'
                )
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label == "le" or any(
                    label in s
                    for n in re.findall(r"ferrumkv_[a-z0-9_]+", expr)
                    for s in exported[n]
                ), f"{expr!r} groups by {label!r}, which its metrics do not carry"
    # The board covers occupancy, hits, transfers, disk, preemptions, waits, the remote tier
    # and residency at least.
    for must in ("ferrumkv_usage_ratio", "ferrumkv_prefix_cache_hits_tokens_total",
                 "ferrumkv_transfer_bytes_total", "ferrumkv_disk_io_blocks_total",
                 "ferrumkv_block_idle_before_evict_seconds_bucket",
                 "ferrumkv_preemptions_total", "ferrumkv_disk_errors_total",
                 "ferrumkv_calls_waiting_for_blocks", "ferrumkv_swap_transfer_seconds_total",
                 "ferrumkv_remote_lookup_blocks_total"):  # fmt: skip
        assert must in seen, must
