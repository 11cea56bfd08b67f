"""KV events on the wire (`ferrumkv.kv_events`): real ZMQ sockets on 127.0.0.1, and every
payload decoded with msgspec structs written from vLLM's `vllm/distributed/kv_events.py`
(`KVEventBatch`, `BlockStored`, `BlockRemoved`, `AllBlocksCleared`: field names and order,
tagged, `array_like` for the array form), strictly, as a vLLM consumer would."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

import ferrumkv

# ----- vLLM's schema, as a router decodes it -------------------------------------------------


class _Stored(msgspec.Struct, omit_defaults=True):
    """BlockStored's fields, in vLLM's order; each wire form below adds its tagging."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[object, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _Removed(msgspec.Struct, omit_defaults=True):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


# The array form: tagged arrays (the tag is the class name), the batch an array too.
class BlockStored(_Stored, array_like=True, tag=True):
    pass


class BlockRemoved(_Removed, array_like=True, tag=True):
    pass


class AllBlocksCleared(msgspec.Struct, array_like=True, tag=True):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


# The tagged-map form: {"type": "BlockStored", ...}.
class MapBlockStored(_Stored, tag="BlockStored", tag_field="type", forbid_unknown_fields=True):
    pass


class MapBlockRemoved(_Removed, tag="BlockRemoved", tag_field="type", forbid_unknown_fields=True):
    pass


class MapKVEventBatch(msgspec.Struct, forbid_unknown_fields=True):
    ts: float
    events: list[MapBlockStored | MapBlockRemoved]
    data_parallel_rank: int | None = None


ARRAY = msgspec.msgpack.Decoder(KVEventBatch)
MAP = msgspec.msgpack.Decoder(MapKVEventBatch)

# ----- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(**kw: object) -> ferrumkv.CacheConfig:
    base: dict[str, object] = dict(
        num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, num_blocks=8
    )
    base.update(kw)
    return ferrumkv.CacheConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def sub() -> Iterator[tuple[zmq.Socket, str]]:
    """A SUB socket bound on a free loopback port (the cache's PUB connects to it)."""
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    s.bind(endpoint)
    yield s, endpoint
    s.close()


def recv(s: zmq.Socket, timeout_s: float = 5.0) -> list[bytes]:
    assert s.poll(int(timeout_s * 1000)), "no message within the timeout"
    return s.recv_multipart()


def join(cache: ferrumkv.KvCache, s: zmq.Socket) -> int:
    """Allocates throwaway prompts until the subscriber gets a batch (ZMQ's slow joiner:
    a PUB drops what it sends before the subscription reached it). Returns the last seq."""
    for i in range(100):
        rid = f"join-{i}"
        cache.try_allocate(rid, [10_000 + 8 * i + t for t in range(4)])
        if s.poll(100):
            frames = s.recv_multipart()
            while s.poll(200):
                frames = s.recv_multipart()
            return int.from_bytes(frames[1], "big")
    raise AssertionError("the subscriber never joined")


def replay(endpoint: str, start: int) -> list[tuple[int, bytes]]:
    """What the replay socket sends back for `start`, up to its end marker."""
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(endpoint)
    try:
        d.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            assert d.poll(5000), "the replay socket did not answer"
            empty, seq, payload = d.recv_multipart()
            assert empty == b""
            if seq == (-1).to_bytes(8, "big", signed=True):
                assert payload == b""
                return out
            out.append((int.from_bytes(seq, "big"), payload))
    finally:
        d.close()


# ----- tests ----------------------------------------------------------------------------------


def test_a_batch_is_on_the_wire_within_a_second_in_vllms_array_form(sub) -> None:
    s, endpoint = sub
    with ferrumkv.KvCache(config(kv_events_endpoint=endpoint)) as cache:
        last = join(cache, s)
        t0 = time.monotonic()
        cache.try_allocate("a", list(range(9)))  # two full blocks of 4, one partial
        topic, seq, payload = recv(s, 1.0)
        assert time.monotonic() - t0 < 1.0
        assert topic == b"kv-events"
        assert len(seq) == 8 and int.from_bytes(seq, "big") == last + 1
        batch = ARRAY.decode(payload)
        assert batch.data_parallel_rank == 0 and batch.ts == pytest.approx(time.time(), abs=5)
        (stored,) = batch.events
        assert isinstance(stored, BlockStored)
        assert stored.token_ids == list(range(8)) and stored.block_size == 4
        assert stored.parent_block_hash is None and stored.medium == "GPU"
        assert stored.lora_id is None and stored.lora_name is None
        assert len(stored.block_hashes) == 2
        assert all(0 <= h < 2**64 for h in stored.block_hashes)
        # A prompt extending "a" chains from a's last block.
        cache.try_allocate("b", [*range(8), 50, 51, 52, 53])
        (ext,) = ARRAY.decode(recv(s)[2]).events
        assert isinstance(ext, BlockStored)
        assert ext.parent_block_hash == stored.block_hashes[-1]
        assert ext.token_ids == [50, 51, 52, 53]


def test_every_tier_publishes_and_the_replay_socket_sends_it_all_again(sub) -> None:
    _, endpoint = sub
    rep = f"tcp://127.0.0.1:{free_port()}"
    cfg = config(num_blocks=3, host_blocks=4, kv_events_endpoint=endpoint,
                 kv_events_replay_endpoint=rep)  # fmt: skip
    with ferrumkv.KvCache(cfg) as cache:
        cache.try_allocate("a", list(range(9)))  # blocks A0, A1 + a partial
        cache._core.deallocate("a")
        cache.try_allocate("b", list(range(100, 109)))  # evicts A0, A1 to the host tier
        cache._core.deallocate("b")
        cache.reset_prefix_cache()
        deadline = time.monotonic() + 5
        batches: list[tuple[int, bytes]] = []
        while time.monotonic() < deadline:
            batches = replay(rep, 0)
            events = [e for _, p in batches for e in ARRAY.decode(p).events]
            if any(isinstance(e, AllBlocksCleared) for e in events):
                break
            time.sleep(0.05)
        assert [seq for seq, _ in batches] == list(range(len(batches)))
        events = [e for _, p in batches for e in ARRAY.decode(p).events]
        kinds = [(type(e).__name__, getattr(e, "medium", None)) for e in events]
        assert ("BlockStored", "GPU") in kinds and ("BlockStored", "CPU") in kinds
        assert ("BlockRemoved", "GPU") in kinds and kinds[-1] == ("AllBlocksCleared", None)
        a_hashes = next(e.block_hashes for e in events if isinstance(e, BlockStored))
        offloaded = [e for e in events if isinstance(e, BlockStored) and e.medium == "CPU"]
        assert sorted(h for e in offloaded for h in e.block_hashes) == sorted(a_hashes)
        # A later start sends only the batches from there on.
        assert [seq for seq, _ in replay(rep, 2)] == list(range(2, len(batches)))


def test_the_map_form_decodes_with_the_tagged_map_schema(sub) -> None:
    s, endpoint = sub
    cfg = config(kv_events_endpoint=endpoint, kv_events_format="map", kv_events_topic="t1")
    with ferrumkv.KvCache(cfg) as cache:
        join(cache, s)
        cache.try_allocate("a", list(range(4)))
        topic, _, payload = recv(s)
        assert topic == b"t1"
        (stored,) = MAP.decode(payload).events
        assert isinstance(stored, MapBlockStored) and stored.token_ids == [0, 1, 2, 3]


def test_close_publishes_what_is_pending(sub) -> None:
    s, endpoint = sub
    cache = ferrumkv.KvCache(config(kv_events_endpoint=endpoint))
    join(cache, s)
    cache.try_allocate("last", [7, 7, 7, 7])
    cache.close()  # before the publisher's next poll
    (stored,) = ARRAY.decode(recv(s)[2]).events
    assert isinstance(stored, BlockStored) and stored.token_ids == [7, 7, 7, 7]


def test_no_subscriber_never_blocks_the_engine() -> None:
    # Bound PUB, nobody listening: every batch is dropped by ZMQ, none waits.
    endpoint = f"inproc://ferrumkv-{free_port()}"
    with ferrumkv.KvCache(config(num_blocks=64, kv_events_endpoint=endpoint)) as cache:
        t0 = time.monotonic()
        for i in range(2000):
            cache.try_allocate(i, [i * 4 + t for t in range(8)])
            cache._core.deallocate(i)
        assert time.monotonic() - t0 < 30
        assert cache._publisher is not None
    assert cache._publisher.published >= 1


def test_the_publisher_is_the_events_consumer(sub) -> None:
    _, endpoint = sub
    with (
        ferrumkv.KvCache(config(kv_events_endpoint=endpoint)) as cache,
        pytest.raises(ferrumkv.InvalidStateError, match=r"published on tcp://127\.0\.0\.1"),
    ):
        cache.drain_events()
    with ferrumkv.KvCache(config()) as cache:
        cache.try_allocate("a", [1, 2, 3, 4])
        assert len(cache.drain_events()) == 1  # without an endpoint, as before


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"kv_events_endpoint": "127.0.0.1:5557"}, "kv_events_endpoint"),
        ({"kv_events_endpoint": "tcp://127.0.0.1"}, "kv_events_endpoint"),
        ({"kv_events_endpoint": "tcp://:5557"}, "kv_events_endpoint"),
        ({"kv_events_endpoint": "tcp://h:99999"}, "kv_events_endpoint"),
        ({"kv_events_endpoint": "ipc://"}, "kv_events_endpoint"),
        ({"kv_events_replay_endpoint": "tcp://127.0.0.1:5558"}, "kv_events_replay_endpoint"),
        ({"kv_events_endpoint": "inproc://x", "enable_kv_events": False}, "kv_events_endpoint"),
        ({"kv_events_format": "json"}, "kv_events_format"),
    ],
)
def test_bad_event_settings_are_value_errors_naming_the_field(
    kw: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        config(**kw)


def test_an_endpoint_zmq_refuses_is_a_value_error_and_leaves_nothing_open() -> None:
    taken = f"tcp://127.0.0.1:{free_port()}"
    holder = zmq.Context.instance().socket(zmq.ROUTER)
    holder.bind(taken)
    try:
        cfg = config(kv_events_endpoint="inproc://ok", kv_events_replay_endpoint=taken)
        with pytest.raises(ValueError, match="invalid kv_events endpoint"):
            ferrumkv.KvCache(cfg)
    finally:
        holder.close(linger=0)
    # The same endpoints work once free: nothing the failed cache opened keeps them bound
    # (ZMQ unbinds a closed socket on its I/O thread, so allow it a moment).
    deadline = time.monotonic() + 5
    while True:
        try:
            with ferrumkv.KvCache(cfg) as cache:
                assert cache._publisher is not None
            break
        except ValueError:
            assert time.monotonic() < deadline, "the endpoints stayed bound"
            time.sleep(0.05)


def test_blocks_written_to_the_store_are_published_as_remote(sub) -> None:
    from servers import redis_server

    _, endpoint = sub
    rep = f"tcp://127.0.0.1:{free_port()}"
    with redis_server() as store:
        cfg = config(
            kv_events_endpoint=endpoint,
            kv_events_replay_endpoint=rep,
            remote_url=store.url,
            remote_write="on_store",
        )
        with ferrumkv.KvCache(cfg) as cache:
            cache.try_allocate("a", list(range(9)))  # 2 full blocks
            cache._core.deallocate("a")  # written to the store
            deadline = time.monotonic() + 5
            stored: list[BlockStored] = []
            while time.monotonic() < deadline and len(stored) < 4:
                events = [e for _, p in replay(rep, 0) for e in ARRAY.decode(p).events]
                stored = [e for e in events if isinstance(e, BlockStored)]
                time.sleep(0.05)
    by_medium = {m: [e for e in stored if e.medium == m] for m in ("GPU", "REMOTE")}
    gpu = sorted(h for e in by_medium["GPU"] for h in e.block_hashes)
    remote = sorted(h for e in by_medium["REMOTE"] for h in e.block_hashes)
    assert len(gpu) == 2 and remote == gpu
    assert all(len(e.token_ids) == 4 * len(e.block_hashes) for e in by_medium["REMOTE"])
