"""KV events on the wire: a ZMQ publisher in vLLM's KV-event format, for KV-aware routers.

With ``CacheConfig(kv_events_endpoint=...)`` a cache publishes every KV event it records
(blocks stored and removed in every tier, the prefix cache cleared) the way vLLM's
``ZmqEventPublisher`` does, so routers that index vLLM replicas (llm-d's kv-cache indexer,
NVIDIA Dynamo's router) index ferrumkv replicas unchanged:

- PUB messages of three frames: the topic (``kv_events_topic``), the batch's sequence number
  (8 bytes, big-endian, from 0), and the msgpack batch.
- A batch is ``KVEventBatch``: ``[ts, events, data_parallel_rank]`` (``kv_events_format=
  "array"``, vLLM's ``array_like`` structs) or ``{"ts": ..., "events": [...],
  "data_parallel_rank": ...}`` (``"map"``). Each event is tagged with its struct name:
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name]``, ``["BlockRemoved", block_hashes, medium]``, ``["AllBlocksCleared"]`` (or maps
  with ``"type"`` and those field names). Block hashes are unsigned 64-bit ints (the low 64
  bits of the engine's 128-bit chained hash; a block's Stored and Removed carry the same);
  ``medium`` is ``"GPU"`` for the device tier, ``"CPU"`` for the host tier, ``"DISK"`` for the
  disk tier, ``"REMOTE"`` for a block written to the shared store (``remote_url``; stored
  only: the store's own evictions are not seen); ``token_ids`` are the stored blocks'
  tokens, so a router can compute its own hashes; ``lora_id`` and ``lora_name`` are null.
- An optional ROUTER socket (``kv_events_replay_endpoint``): a client (DEALER) sends
  ``[b"", start_seq as 8 bytes big-endian]`` and receives ``[b"", seq, payload]`` for every
  buffered batch from ``start_seq`` on (the last ``REPLAY_BATCHES``), then ``[b"", -1 as 8
  signed bytes, b""]``.
- Endpoints follow vLLM's convention: a wildcard (``tcp://*:P``), ``ipc://`` or
  ``inproc://`` endpoint is bound, any other ``tcp://HOST:PORT`` is connected to (the
  subscriber binds). The replay socket is always bound.

Design: one daemon thread per cache owns both sockets (ZMQ sockets are not thread safe). It
takes the engine's pending events every ``POLL_S`` (so an event is on the wire well within a
second of its call), encodes them as one batch and sends it without blocking: with no
subscriber, or a slow one past the high-water mark, PUB drops the message (ZMQ's PUB
semantics, as in vLLM; the replay socket can send it again), and the engine call that caused
the events never waits for the network. While
the publisher runs it is the events' one consumer: ``KvCache.drain_events`` raises
``InvalidStateError``. ``close()`` publishes what is pending before the sockets close.
Needs ``pyzmq`` and ``msgpack`` (``pip install ferrumkv[events]``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .types import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

__all__ = ["MEDIUM", "REPLAY_BATCHES", "KvEventPublisher", "encode_batch"]

MEDIUM = {"device": "GPU", "host": "CPU", "disk": "DISK", "remote": "REMOTE"}
"""The ``medium`` of each tier's events."""

REPLAY_BATCHES = 10_000
"""Batches the replay socket can send again (vLLM's default ``buffer_steps``)."""

POLL_S = 0.02
"""How often the publisher takes the engine's pending events."""

HIGH_WATER_MARK = 100_000
"""Messages PUB queues for a subscriber before it drops (vLLM's default ``hwm``)."""

CLOSE_LINGER_MS = 500
"""How long closing waits for batches still queued to a subscriber."""

_MASK64 = (1 << 64) - 1
_END = (-1).to_bytes(8, "big", signed=True)


def _hash64(h: int) -> int:
    return h & _MASK64


def _event(event: KvEvent, fmt: str) -> list[Any] | dict[str, Any]:
    """One engine event in vLLM's struct layout."""
    fields: dict[str, Any]
    if isinstance(event, BlockStored):
        parent = event.parent_block_hash
        fields = {
            "block_hashes": [_hash64(h) for h in event.block_hashes],
            "parent_block_hash": None if parent is None else _hash64(parent),
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": None,
            "medium": MEDIUM[event.tier],
            "lora_name": None,
        }
        tag = "BlockStored"
    elif isinstance(event, BlockRemoved):
        hashes = [_hash64(h) for h in event.block_hashes]
        fields, tag = {"block_hashes": hashes, "medium": MEDIUM[event.tier]}, "BlockRemoved"
    elif isinstance(event, AllBlocksCleared):
        fields, tag = {}, "AllBlocksCleared"
    else:
        raise TypeError(f"not a KV event: {event!r}")
    if fmt == "map":
        return {"type": tag, **fields}
    return [tag, *fields.values()]


def encode_batch(
    events: Sequence[KvEvent], ts: float, fmt: str = "array", dp_rank: int | None = 0
) -> bytes:
    """The msgpack ``KVEventBatch`` of ``events`` at time ``ts``."""
    import msgpack

    structs = [_event(e, fmt) for e in events]
    batch: Any = (
        {"ts": ts, "events": structs, "data_parallel_rank": dp_rank}
        if fmt == "map"
        else [ts, structs, dp_rank]
    )
    payload: bytes = msgpack.packb(batch, use_bin_type=True)
    return payload


def _binds(endpoint: str) -> bool:
    """vLLM's convention: bind wildcards and local transports, connect to a named host."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


class KvEventPublisher:
    """Publishes a cache's KV events on ZMQ from a thread of its own (see the module)."""

    def __init__(self, core: Any, config: Any) -> None:
        try:
            import msgpack  # noqa: F401  (encode_batch needs it: fail here, not in the thread)
            import zmq
        except ImportError as e:
            raise ImportError(
                f"kv_events_endpoint needs pyzmq and msgpack ({e}): pip install ferrumkv[events]"
            ) from None

        self._zmq = zmq
        self._core = core
        self._fmt: str = config.kv_events_format
        self._topic = config.kv_events_topic.encode()
        self._ctx: Any = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay = None
        try:
            endpoint = config.kv_events_endpoint
            (self._pub.bind if _binds(endpoint) else self._pub.connect)(endpoint)
            if config.kv_events_replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(config.kv_events_replay_endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise ValueError(f"invalid kv_events endpoint: {e}") from None
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BATCHES)
        self._seq = 0
        self.published = 0
        """Batches handed to PUB."""
        self._stop = threading.Event()
        # `sync`: a caller asks for step `_asked`; the thread reports steps started since.
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._asked = 0
        self._done = 0
        self._thread = threading.Thread(target=self._run, name="ferrumkv-kv-events", daemon=True)
        self._thread.start()

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch gets."""
        return self._seq

    def _publish_pending(self) -> None:
        events = self._core.drain_events()
        if not events:
            return
        payload = encode_batch(events, time.time(), self._fmt)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        # PUB never blocks: past the high-water mark it drops the message for that peer.
        self._pub.send_multipart(
            [self._topic, seq.to_bytes(8, "big"), payload], flags=self._zmq.NOBLOCK
        )
        self.published += 1

    def _serve_replay(self) -> None:
        assert self._replay is not None
        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                continue  # not a replay request: nothing to answer
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    self._replay.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            self._replay.send_multipart([client, b"", _END, b""])

    def _run(self) -> None:
        # Ends on close(), or when the engine was closed without it (a dropped cache).
        while not self._stop.is_set() and not self._core.closed:
            self._wake.wait(POLL_S)
            self._wake.clear()
            self._step()
        if not self._core.closed:
            self._step()  # what close() left pending
        self._close_sockets()
        with self._cond:
            self._done = self._asked  # nothing more will be sent: release every sync()
            self._cond.notify_all()

    def _step(self) -> None:
        with self._cond:
            asked = self._asked  # this step covers every event recorded before `asked`
        self._step_once()
        with self._cond:
            self._done = max(self._done, asked)
            self._cond.notify_all()

    def sync(self, timeout_s: float = 5.0) -> int:
        """Publishes every event recorded so far and returns the sequence number of the last
        batch handed to PUB (-1: none yet). For a consumer that must see them before it
        acts (a router that routes the next request on them); raises TimeoutError if the
        publisher thread does not get there within `timeout_s`."""
        with self._cond:
            self._asked += 1
            asked = self._asked
            self._wake.set()
            if not self._cond.wait_for(lambda: self._done >= asked, timeout_s):
                raise TimeoutError("the KV event publisher did not catch up")
            return self._seq - 1

    def _step_once(self) -> None:
        try:
            self._publish_pending()
            if self._replay is not None:
                self._serve_replay()
        except Exception:  # a closed engine, a socket error: keep the thread alive
            import logging

            logging.getLogger("ferrumkv").exception("KV event publisher step failed")

    def _close_sockets(self) -> None:
        # Up to CLOSE_LINGER_MS for the last batches to leave (a gone subscriber loses them).
        self._pub.close(linger=CLOSE_LINGER_MS)
        if self._replay is not None:
            self._replay.close(linger=0)

    def close(self) -> None:
        """Publishes what is pending, then closes the sockets (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
