"""The remote tier against real stores on 127.0.0.1: Redis, a 3-node Redis cluster and
Mooncake Store (tests/servers.py starts them; a missing one fails the run).

Each test has its own namespace, so tests sharing a module's store never see each other's
blocks. Bytes are checked exactly: what one cache (or process) wrote is what another reads.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import redis

import ferrumkv
from servers import STORES, Store, free_port, redis_server

HEADS, DIM, BS = 2, 4, 4
BPB = BS * 2 * 2 * HEADS * DIM * 2  # 256 bytes a block


@pytest.fixture(scope="module", params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    with STORES[request.param]() as s:
        yield s


@pytest.fixture(scope="module")
def redis_store() -> Iterator[Store]:
    with redis_server() as s:
        yield s


def config(url: str, ns: str, **kw: Any) -> ferrumkv.CacheConfig:
    base: dict[str, Any] = {
        "num_layers": 2,
        "num_kv_heads": HEADS,
        "head_dim": DIM,
        "block_size": BS,
        "num_blocks": 4,
        "remote_url": url,
        "remote_namespace": ns,
        "remote_timeout_s": 2.0,
    }
    return ferrumkv.CacheConfig(**{**base, **kw})


def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


def kv(n: int, seed: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, layer])
    k = rng.standard_normal((n, HEADS, DIM)).astype(np.float16)
    return k, (k * 3).astype(np.float16)


def write(cache: ferrumkv.KvCache, rid: str, n: int, seed: int) -> None:
    for layer in range(2):
        cache.write_kv(rid, layer, 0, *kv(n, seed, layer))


def assert_bytes(cache: ferrumkv.KvCache, rid: str, n: int, seed: int) -> None:
    for layer in range(2):
        k, v = cache.read_kv(rid, layer, 0, n)
        want_k, want_v = kv(n, seed, layer)
        assert k.tobytes() == want_k[:n].tobytes() and v.tobytes() == want_v[:n].tobytes()


PROMPT = list(range(1, 10))  # 2 full blocks and 1 token
OTHER = list(range(100, 116))  # 4 blocks: evicts everything of PROMPT


async def publish(cache: ferrumkv.KvCache, mode: str, seed: int = 7) -> None:
    """Computes PROMPT's K/V and makes it leave for the store (by eviction or release)."""
    await cache.allocate("p", PROMPT)
    write(cache, "p", len(PROMPT), seed)
    await cache.deallocate("p")
    if mode == "on_evict":
        await cache.allocate("other", OTHER)
        await cache.deallocate("other")
    await cache.flush(timeout=10)


# ----- sharing ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["on_evict", "on_store"])
async def test_two_caches_share_blocks_byte_for_byte(store: Store, mode: str) -> None:
    ns = namespace()
    with (
        ferrumkv.KvCache(config(store.url, ns, remote_write=mode)) as a,
        ferrumkv.KvCache(config(store.url, ns, remote_write=mode)) as b,
    ):
        await publish(a, mode)
        sa = a.stats()
        assert (sa.remote_write_blocks, sa.remote_write_bytes) == (2, 2 * BPB)
        assert (sa.remote_dropped_writes, sa.remote_errors) == (0, 0)
        h = await b.allocate("p", PROMPT)
        assert h.num_cached_tokens == 8
        assert_bytes(b, "p", 8, seed=7)
        sb = b.stats()
        assert (sb.remote_hit_blocks, sb.remote_miss_blocks) == (2, 0)
        assert sb.remote_read_bytes == 2 * BPB and sb.remote_read_seconds_total > 0
        assert sb.cache_tokens == 8  # served from the cache, like any prefix hit
        ferrumkv_check(b)


def ferrumkv_check(cache: ferrumkv.KvCache) -> None:
    cache._core.check_invariants()


@pytest.mark.anyio
async def test_a_host_tier_takes_the_imported_blocks(store: Store) -> None:
    ns = namespace()
    with (
        ferrumkv.KvCache(config(store.url, ns, host_blocks=4)) as a,
        ferrumkv.KvCache(config(store.url, ns, host_blocks=4)) as b,
    ):
        await a.allocate("p", PROMPT)
        write(a, "p", 9, seed=3)
        await a.deallocate("p")
        for i in range(3):  # push PROMPT's blocks through the host tier and out of it
            await a.allocate(f"o{i}", [1000 * (i + 1) + t for t in range(16)])
            await a.deallocate(f"o{i}")
        await a.flush(timeout=10)
        assert a.stats().remote_write_blocks >= 2
        h = await b.allocate("p", PROMPT)
        assert h.num_cached_tokens == 8
        s = b.stats()
        assert s.onboard_blocks == 2, "store -> host -> device"
        assert_bytes(b, "p", 8, seed=3)


def test_two_processes_share_one_store(store: Store) -> None:
    ns = namespace()
    writer = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import anyio, ferrumkv, test_remote as t
        async def main():
            with ferrumkv.KvCache(t.config({store.url!r}, {ns!r}, remote_write="on_store")) as c:
                await t.publish(c, "on_store", seed=11)
                print(c.stats().remote_write_blocks)
        anyio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", writer], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "2"

    async def read() -> None:
        with ferrumkv.KvCache(config(store.url, ns)) as c:
            h = await c.allocate("p", PROMPT)
            assert h.num_cached_tokens == 8
            assert_bytes(c, "p", 8, seed=11)

    anyio.run(read)


@pytest.mark.anyio
async def test_another_namespace_or_shape_misses(store: Store) -> None:
    ns = namespace()
    with ferrumkv.KvCache(config(store.url, ns, remote_write="on_store")) as a:
        await publish(a, "on_store")
    for cfg in (
        config(store.url, namespace()),
        config(store.url, ns, head_dim=8),
        config(store.url, ns, block_size=8),
    ):
        with ferrumkv.KvCache(cfg) as b:
            h = await b.allocate("p", PROMPT)
            assert h.num_cached_tokens == 0
            s = b.stats()
            assert s.remote_hit_blocks == 0 and s.remote_miss_blocks > 0


@pytest.mark.anyio
async def test_try_allocate_never_touches_the_store(store: Store) -> None:
    ns = namespace()
    with ferrumkv.KvCache(config(store.url, ns, remote_write="on_store")) as a:
        await publish(a, "on_store")
    with ferrumkv.KvCache(config(store.url, ns)) as b:
        h = b.try_allocate("p", PROMPT)
        assert h is not None and h.num_cached_tokens == 0
        s = b.stats()
        assert (s.remote_hit_blocks, s.remote_miss_blocks, s.remote_read_ns) == (0, 0, 0)


def store_keys(url: str, ns: str) -> list[str]:
    """The store keys of PROMPT's 2 full blocks (asked of an empty cache: all after it)."""
    with ferrumkv.KvCache(config(url, ns)) as c:
        start, keys = c._core.remote_plan(PROMPT)
    assert start == 0 and len(keys) == 2
    return list(keys)


# ----- Redis specifics ----------------------------------------------------------------------


def test_keys_spread_over_the_cluster_nodes() -> None:
    from servers import redis_cluster

    async def main(url: str) -> None:
        with ferrumkv.KvCache(
            config(url, namespace(), num_blocks=64, remote_write="on_store")
        ) as c:
            for i in range(8):
                await c.allocate(f"r{i}", [i * 1000 + t for t in range(33)])
                await c.deallocate(f"r{i}")
            await c.flush(timeout=10)
            assert c.stats().remote_write_blocks == 64

    with redis_cluster() as cl:
        anyio.run(main, cl.url)
        sizes = [redis.Redis(port=p).dbsize() for p in cl.ports]
        assert sum(sizes) == 64 and sum(1 for n in sizes if n > 0) >= 2


@pytest.mark.anyio
async def test_a_corrupt_truncated_or_moved_value_is_a_miss(redis_store: Store) -> None:
    ns = namespace()
    r = redis.Redis(port=redis_store.ports[0])
    with ferrumkv.KvCache(config(redis_store.url, ns, remote_write="on_store")) as a:
        await publish(a, "on_store")
    keys = store_keys(redis_store.url, ns)
    good = [r.get(k) for k in keys]
    assert all(v is not None and len(v) == 12 + BPB for v in good)
    cases = {
        "flipped": lambda v: v[:-1] + bytes([v[-1] ^ 1]),
        "truncated": lambda v: v[:-1],
        "empty": lambda v: b"",
    }
    for what, damage in cases.items():
        r.set(keys[0], damage(good[0]))
        with ferrumkv.KvCache(config(redis_store.url, ns)) as b:
            h = await b.allocate("p", PROMPT)
            assert h.num_cached_tokens == 0, what
            s = b.stats()
            assert (s.remote_hit_blocks, s.remote_corrupt_blocks) == (0, 1), what
    # Block 1's intact value under block 0's key: another key's value, refused.
    r.set(keys[0], good[1])
    with ferrumkv.KvCache(config(redis_store.url, ns)) as b:
        assert (await b.allocate("p", PROMPT)).num_cached_tokens == 0
        assert b.stats().remote_corrupt_blocks == 1
    # Repaired: block 0 serves again; then block 1 damaged: the chain stops after block 0.
    r.set(keys[0], good[0])
    r.set(keys[1], good[1][:-5])
    with ferrumkv.KvCache(config(redis_store.url, ns)) as b:
        assert (await b.allocate("p", PROMPT)).num_cached_tokens == 4
        assert_bytes(b, "p", 4, seed=7)


@pytest.mark.anyio
async def test_values_get_the_urls_ttl(redis_store: Store) -> None:
    ns = namespace()
    url = redis_store.url + "?ttl_s=300"
    with ferrumkv.KvCache(config(url, ns, remote_write="on_store")) as a:
        await publish(a, "on_store")
    keys = store_keys(url, ns)
    r = redis.Redis(port=redis_store.ports[0])
    assert all(0 < r.ttl(k) <= 300 for k in keys)


@pytest.mark.anyio
async def test_a_full_store_drops_and_counts_writes() -> None:
    with redis_server() as full:
        r = redis.Redis(port=full.ports[0])
        r.set("filler", b"x" * 2_000_000)
        r.config_set("maxmemory", "1mb")  # now past it: every new write is refused
        r.config_set("maxmemory-policy", "noeviction")
        cfg = config(full.url, namespace(), num_blocks=64, remote_write="on_store")
        with ferrumkv.KvCache(cfg) as c:
            await c.allocate("p", list(range(33)))
            await c.deallocate("p")
            await c.flush(timeout=10)
            s = c.stats()
            assert (s.remote_write_blocks, s.remote_dropped_writes, s.remote_errors) == (0, 8, 0)


@pytest.mark.anyio
async def test_an_evicting_store_makes_room_without_errors() -> None:
    with redis_server(maxmemory="2mb", policy="allkeys-lru") as lru:
        cfg = config(lru.url, namespace(), num_blocks=64, head_dim=64, remote_write="on_store")
        with ferrumkv.KvCache(cfg) as c:
            for i in range(60):  # 960 blocks of 4 KiB: more than fits
                await c.allocate(f"r{i}", [i * 1000 + t for t in range(65)])
                await c.deallocate(f"r{i}")
            await c.flush(timeout=20)
            s = c.stats()
            assert s.remote_write_blocks == 960
            assert (s.remote_dropped_writes, s.remote_errors) == (0, 0)
        assert redis.Redis(port=lru.ports[0]).dbsize() < 960


# ----- faults -------------------------------------------------------------------------------


def test_an_unreachable_store_at_start() -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ferrumkv.RemoteUnavailableError, match="unreachable"):
        ferrumkv.KvCache(config(url, "ns"))
    assert time.monotonic() - t0 < 10
    with pytest.raises(ferrumkv.RemoteUnavailableError):
        ferrumkv.KvCache(config("mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/m", "ns"))
    assert issubclass(ferrumkv.RemoteUnavailableError, ferrumkv.FerrumKVError)


@pytest.mark.anyio
async def test_local_only_until_the_store_comes_up() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    ns = namespace()
    with ferrumkv.KvCache(config(url, ns, remote_required=False, remote_write="on_store")) as c:
        await c.allocate("p", PROMPT)
        await c.deallocate("p")  # the store is away: the writes are dropped, counted
        await c.flush(timeout=10)
        assert c.stats().remote_dropped_writes == 2
        assert (await c.allocate("q", PROMPT)).num_cached_tokens == 8  # local cache works
        await c.deallocate("q")
        from servers import _redis

        with tempfile.TemporaryDirectory() as d:
            server = _redis(port, Path(d))
            try:
                deadline = time.monotonic() + 15
                written = 0
                while written == 0 and time.monotonic() < deadline:
                    await anyio.sleep(0.2)  # the backoff passes; the next write reconnects
                    rid = f"x{time.monotonic_ns()}"
                    await c.allocate(rid, [7, 7, 7, 7, 8])
                    await c.deallocate(rid)
                    await c.flush(timeout=10)
                    written = c.stats().remote_write_blocks
                assert written >= 1
            finally:
                server.kill()
                server.wait()


@pytest.mark.anyio
async def test_a_store_killed_mid_run_degrades_to_local_and_reconnects() -> None:
    with redis_server() as srv:
        ns = namespace()
        cfg = config(srv.url, ns, remote_write="on_store", remote_timeout_s=1.0)
        with ferrumkv.KvCache(cfg) as c:
            await publish(c, "on_store")
            srv.kill()
            t0 = time.monotonic()
            with anyio.fail_after(10):  # no await hangs
                for i in range(5):
                    h = await c.allocate(f"k{i}", [i * 100 + t for t in range(9)])
                    assert h.num_cached_tokens == 0
                    await c.deallocate(f"k{i}")
                await c.flush(timeout=10)
            assert time.monotonic() - t0 < 10
            s = c.stats()
            assert s.remote_errors >= 1 and s.remote_dropped_writes >= 1
            srv.restart()  # empty, same port
            deadline = time.monotonic() + 15
            while c.stats().remote_write_blocks == 2 and time.monotonic() < deadline:
                await anyio.sleep(0.3)
                rid = f"y{time.monotonic_ns()}"
                await c.allocate(rid, [9, 9, 9, 9, 1])
                await c.deallocate(rid)
                await c.flush(timeout=10)
            assert c.stats().remote_write_blocks > 2, "writes land again after a reconnect"


@pytest.mark.anyio
async def test_a_paused_store_times_out_into_misses(store: Store) -> None:
    ns = namespace()
    with ferrumkv.KvCache(config(store.url, ns, remote_write="on_store")) as a:
        await publish(a, "on_store")
    cfg = config(store.url, ns, remote_timeout_s=1.0)
    with ferrumkv.KvCache(cfg) as b:
        store.pause()
        try:
            t0 = time.monotonic()
            h = await b.allocate("p", PROMPT)
            assert time.monotonic() - t0 < 4
            assert h.num_cached_tokens == 0
            s = b.stats()
            assert s.remote_errors == 1 and s.remote_miss_blocks == 2
            # Marked down: the next lookups skip the store until the backoff passed.
            await b.deallocate("p")
        finally:
            store.resume()


@pytest.mark.anyio
async def test_lookups_keep_timing_out_into_misses_while_the_store_stays_paused(
    store: Store,
) -> None:
    # Calls to a paused store hold the worker threads (a Mooncake call for 30 s): later
    # lookups must still end within the timeout, as misses, never as an error.
    ns = namespace()
    with ferrumkv.KvCache(config(store.url, ns, remote_write="on_store")) as a:
        await publish(a, "on_store")
    with ferrumkv.KvCache(config(store.url, ns, remote_timeout_s=0.5)) as b:
        store.pause()
        try:
            for i in range(5):
                t0 = time.monotonic()
                h = await b.allocate(f"p{i}", PROMPT)
                assert h.num_cached_tokens == 0 and time.monotonic() - t0 < 3
                await b.deallocate(f"p{i}")
                b.reset_prefix_cache()
                await anyio.sleep(0.8)  # past the backoff: the next lookup tries again
            assert b.stats().remote_errors >= 2
        finally:
            store.resume()


@pytest.mark.anyio
async def test_cancelling_an_allocate_during_its_lookup_holds_nothing(store: Store) -> None:
    ns = namespace()
    with ferrumkv.KvCache(config(store.url, ns, remote_write="on_store")) as a:
        await publish(a, "on_store")
    with ferrumkv.KvCache(config(store.url, ns, remote_timeout_s=5.0)) as b:
        store.pause()
        try:
            with anyio.move_on_after(0.3) as scope:
                await b.allocate("p", PROMPT)
            assert scope.cancelled_caught
            assert "p" not in b and b.num_used_blocks == 0
            ferrumkv_check(b)
        finally:
            store.resume()
        h = await b.allocate("p", PROMPT)  # a later lookup (after the backoff) finds them
        assert h.num_cached_tokens in (0, 8)
        ferrumkv_check(b)


def test_remote_counters_reach_iteration_stats_and_prometheus(redis_store: Store) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from ferrumkv.metrics import register

    async def main() -> None:
        ns = namespace()
        with ferrumkv.KvCache(config(redis_store.url, ns, remote_write="on_store")) as a:
            await publish(a, "on_store")
        with ferrumkv.KvCache(config(redis_store.url, ns)) as b:
            b.iteration_stats()
            await b.allocate("p", PROMPT)
            it = b.iteration_stats()
            assert (it.remote_hit_blocks, it.remote_read_bytes) == (2, 2 * BPB)
            reg = CollectorRegistry()
            register(b, registry=reg)
            text = generate_latest(reg).decode()
            assert 'ferrumkv_remote_lookup_blocks_total{result="hit"} 2.0' in text
            assert f'ferrumkv_remote_bytes_total{{op="read"}} {float(2 * BPB)}' in text

    anyio.run(main)


def test_remote_config_is_validated() -> None:
    for bad, field in [
        ({"remote_url": "memcached://h:1"}, "remote_url"),
        ({"remote_url": "redis://h"}, "remote_url"),
        ({"remote_url": "redis://h:1", "enable_prefix_cache": False}, "remote_url"),
        ({"remote_url": "redis://h:1", "remote_write": "always"}, "remote_write"),
        ({"remote_url": "redis://h:1", "remote_namespace": "a b"}, "remote_namespace"),
        ({"remote_url": "redis://h:1", "remote_timeout_s": 0}, "remote_timeout_s"),
    ]:
        with pytest.raises(ValueError, match=field):
            ferrumkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=4, **bad)


# ----- the replay ---------------------------------------------------------------------------


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ferrumkv", "replay", "--num-layers", "1", "--num-kv-heads"]
    cmd += ["1", "--head-dim", "8", "--num-blocks", "400", "--requests", "64", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_replicas_share_a_store_in_the_replay(redis_store: Store) -> None:
    import json

    out = _replay("--replicas", "2", "--remote-url", redis_store.url, "--json", "-")
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout[out.stdout.index("{") :])
    assert doc["remote_hit_blocks"] > 0 and doc["remote_write_bytes"] > 0
    per = doc["per_replica"]
    assert sum(p["remote_hit_blocks"] for p in per) == doc["remote_hit_blocks"]
    table = _replay("--replicas", "2", "--remote-url", redis_store.url)
    assert table.returncode == 0 and "remote hit" in table.stdout
    # Replicas as OS processes share it the same way.
    procs = _replay("--replicas", "2", "--processes", "--remote-url", redis_store.url)
    assert procs.returncode == 0, procs.stderr[-2000:]
    total = next(line for line in procs.stdout.splitlines() if line.strip().startswith("total"))
    assert int(total.split()[7].replace(",", "")) > 0  # the total's remote hits


def test_the_replay_refuses_an_unreachable_store_in_one_line() -> None:
    out = _replay("--remote-url", f"redis://127.0.0.1:{free_port()}")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unreachable" in out.stderr


@pytest.mark.anyio
async def test_blocks_that_landed_in_the_store_are_announced(redis_store: Store) -> None:
    ns = namespace()
    with ferrumkv.KvCache(config(redis_store.url, ns, remote_write="on_store")) as a:
        await a.allocate("p", PROMPT)
        await a.deallocate("p")
        local = [e for e in a.drain_events() if isinstance(e, ferrumkv.BlockStored)]
        await a.flush(timeout=10)
        remote = [e for e in a.drain_events() if isinstance(e, ferrumkv.BlockStored)]
    assert [e.tier for e in local] == ["device"]
    assert all(e.tier == "remote" for e in remote)
    # The same blocks, hashes, parents and tokens as the device tier announced.
    flat = lambda evs: [  # noqa: E731
        (h, t) for e in evs for h, t in zip(e.block_hashes, _blocks(e.token_ids), strict=True)
    ]
    assert sorted(flat(remote)) == sorted(flat(local))
    assert {e.parent_block_hash for e in remote} <= {None, *local[0].block_hashes}


def _blocks(tokens: Any) -> list[tuple[int, ...]]:
    t = list(tokens)
    return [tuple(t[i : i + BS]) for i in range(0, len(t), BS)]
