"""Replicas behind a router (`ferrumkv.replicas`): the prefix index a KV-aware router builds
from the replicas' KV events over real ZMQ sockets, and `replay --replicas N --router ...`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ferrumkv
from ferrumkv.replicas import close_replicas, open_replicas

BS = 4


def config(**kw: object) -> ferrumkv.CacheConfig:
    base: dict[str, object] = dict(
        num_layers=1, num_kv_heads=1, head_dim=8, block_size=BS, num_blocks=16
    )
    base.update(kw)
    return ferrumkv.CacheConfig(**base)  # type: ignore[arg-type]


def settle(replicas, expect: list[int], prompt: list[int]) -> list[int]:
    """The router's index once every batch the replicas published is in (the publishers
    sync, the index catches up): what it matches for `prompt`."""
    assert replicas.index is not None
    replicas._sync()
    return replicas.index.matched_blocks(prompt)


def test_the_index_follows_each_replicas_blocks_through_their_events() -> None:
    replicas = open_replicas(config(), 2, "prefix-aware")
    try:
        a, b = replicas.caches
        prompt = list(range(13))  # 3 full blocks and a partial one
        # Replica 1 caches the first 3 blocks; nothing anywhere else.
        b.try_allocate("p", prompt)
        assert settle(replicas, [0, 3], prompt) == [0, 3]
        # A longer prompt with the same start matches those 3 blocks; another start none.
        assert replicas.index.matched_blocks([*prompt[:12], 99, 98, 97, 96]) == [0, 3]
        assert replicas.index.matched_blocks(list(range(100, 113))) == [0, 0]
        # The router sends the prompt to replica 1 (its prefix), another to the idle one.
        assert replicas.pick(prompt, max_concurrency=8) == 1
        assert replicas.pick(list(range(100, 113)), max_concurrency=8) == 0
        # A full replica is passed over while another has room.
        replicas.in_service[1] = 8
        assert replicas.pick(prompt, max_concurrency=8) == 0
        replicas.in_service[1] = 0
        # Replica 0 caches the first 2 blocks: replica 1 still holds the longer prefix.
        a.try_allocate("q", prompt[:9])
        assert settle(replicas, [2, 3], prompt) == [2, 3]
        # Evicted blocks leave the index (BlockRemoved), a reset clears it (AllBlocksCleared).
        b._core.deallocate("p")
        b.try_allocate("big", list(range(1000, 1064)))  # all 16 blocks: evicts p's
        assert settle(replicas, [2, 0], prompt) == [2, 0]
        a._core.deallocate("q")
        assert a.reset_prefix_cache()
        assert settle(replicas, [0, 0], prompt) == [0, 0]
        assert replicas.index.batches >= 4
    finally:
        close_replicas(replicas)


def test_round_robin_takes_turns() -> None:
    replicas = open_replicas(config(), 3, "round-robin")
    try:
        assert replicas.index is None
        assert [replicas.pick([1, 2, 3, 4], 8) for _ in range(5)] == [0, 1, 2, 0, 1]
    finally:
        close_replicas(replicas)


def test_a_bad_router_is_refused() -> None:
    with pytest.raises(ValueError, match="router must be one of"):
        open_replicas(config(), 2, "random")


def ferrumkv_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferrumkv", "replay", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


SMALL = ["--num-layers", "1", "--num-kv-heads", "1", "--head-dim", "8", "--num-blocks", "2000"]


@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "processes"])
@pytest.mark.parametrize("router", ["round-robin", "prefix-aware"])
def test_replay_with_replicas_prints_each_replica_and_the_total(
    router: str, processes: bool, tmp_path: Path
) -> None:
    out = tmp_path / "fleet.json"
    run = ferrumkv_cli(
        "--requests", "48", *SMALL, "--replicas", "3", "--router", router, "--json", str(out),
        *(["--processes"] if processes else []),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"3 replicas, router {router}" in run.stdout and "total" in run.stdout
    fleet = json.loads(out.read_text())
    per = fleet["per_replica"]
    assert [p["replica"] for p in per] == [0, 1, 2]
    assert sum(p["requests"] for p in per) == 48
    assert fleet["requests_done"] + fleet["requests_rejected"] == 48
    reused = sum(p["reused_blocks"] for p in per)
    looked_up = reused + sum(p["missed_blocks"] for p in per)
    assert fleet["block_hit_rate"] == pytest.approx(reused / looked_up)
    if router == "round-robin":
        assert [p["requests"] for p in per] == [16, 16, 16]
        assert fleet["prefix_routed"] == 0
    else:
        # The synthetic chats' later turns extend earlier ones: some go to a held prefix.
        assert fleet["prefix_routed"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "--replicas"),
        (["--replicas", "2", "--router", "random"], "--router"),
        (["--replicas", "2", "--plot", "x.png"], "--plot"),
    ],
)
def test_bad_replica_flags_are_usage_errors(args: list[str], message: str) -> None:
    run = ferrumkv_cli("--requests", "2", *SMALL, *args)
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert message in run.stderr and "Traceback" not in run.stderr


def test_the_index_fills_a_gap_from_the_replay_socket() -> None:
    """Batches a replica published before the router subscribed (ZMQ's slow joiner drops
    them) come from its replay socket: the index misses none."""
    from ferrumkv.replicas import PrefixIndex

    pub, rep = "inproc://gap-events", "inproc://gap-replay"
    cfg = config(kv_events_endpoint=pub, kv_events_replay_endpoint=rep)
    with ferrumkv.KvCache(cfg) as cache:
        prompt = list(range(13))
        cache.try_allocate("p", prompt)  # published with nobody subscribed: lost on PUB
        assert cache._publisher is not None
        first = cache._publisher.sync()
        index = PrefixIndex([pub], BS, [rep])
        try:
            cache.try_allocate("q", list(range(100, 109)))  # a later batch, after the gap
            last = cache._publisher.sync()
            assert last == first + 1
            index.catch_up(0, last)
            assert index.seen == [last]
            assert index.replayed >= 1  # batch `first` came from the replay socket
            assert index.matched_blocks(prompt) == [3]
            assert index.matched_blocks(list(range(100, 109))) == [2]
        finally:
            index.close()
