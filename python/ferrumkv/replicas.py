"""Replicas in the replay: N caches behind a router, as a KV-aware serving fleet runs them.

``python -m ferrumkv replay --replicas N --router round-robin|prefix-aware`` serves one
workload with N replicas in one process, each a full serving loop (`replay._Replayer`) on a
cache of its own, and a router that sends each arriving request to one of them:

- ``round-robin``: the next replica in turn (what a KV-unaware load balancer does).
- ``prefix-aware``: the replica that holds the longest cached prefix of the prompt, learned
  the way KV-aware routers (llm-d's kv-cache indexer, NVIDIA Dynamo's router) learn it: every
  replica publishes its KV events on a ZMQ endpoint of its own in vLLM's wire format
  (`ferrumkv.kv_events`), and the router subscribes to them all and keeps an index of which
  replica holds which block (in any tier). It hashes blocks its own way, chained over the
  events' `token_ids`, so it relies on nothing but the wire format. A replica whose queue is
  full (``max_concurrency`` requests in service) is passed over while another has room; ties
  go to the least loaded replica, then the lowest index. With no prefix held anywhere the
  request goes to the least loaded replica.

The index lags the replicas by the publishers' poll (20 ms) and drops nothing it was sent;
events published before the router's subscription took effect (ZMQ's slow joiner) are missed,
which only costs routing quality. Cost: one dict lookup per prompt block and per stored
block, in Python.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._console import Column, Table, render_table
from .cache import CacheConfig, KvCache
from .replay import (
    ReplayOptions,
    ReplayResult,
    _cancel_when_done,
    _first_leaf,
    _Replayer,
    arrival,
)
from .types import CacheStats
from .workload import Request, Workload

__all__ = ["ROUTERS", "PrefixIndex", "ReplicaSet", "replay_replicas"]

ROUTERS = ("round-robin", "prefix-aware")
"""The routers ``--router`` takes."""

_ROOT = 0


def _chain(parent: int, tokens: tuple[int, ...]) -> int:
    """The router's own chained block hash (deterministic: a tuple of ints)."""
    return hash((parent, tokens))


class PrefixIndex:
    """Which replica holds which block, built from the replicas' KV events on ZMQ.

    Batches are applied in sequence order per replica. A gap (a batch lost before the
    subscription took effect, ZMQ's slow joiner, or past the high-water mark) is filled from
    the replica's replay socket before the next batch is applied, as vLLM's consumers do, so
    the index misses nothing a replica published. `catch_up` waits until a replica's
    batches up to a given number are in."""

    def __init__(
        self,
        endpoints: Sequence[str],
        block_size: int,
        replay_endpoints: Sequence[str] | None = None,
    ) -> None:
        import msgpack
        import zmq

        self._unpack = msgpack.unpackb
        self._zmq = zmq
        self.block_size = block_size
        self._subs: list[Any] = []
        for endpoint in endpoints:
            sub: Any = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(endpoint)
            self._subs.append(sub)
        self._replay_endpoints = list(replay_endpoints or [])
        self.seen = [-1] * len(endpoints)
        """Per replica, the last batch applied (-1: none)."""
        self.replayed = 0
        """Batches fetched from the replay sockets (lost on the PUB path)."""
        n = len(endpoints)
        # Per replica: router hash -> the media holding it; engine hash -> router hash.
        self._held: list[dict[int, set[str]]] = [{} for _ in range(n)]
        self._ours: list[dict[int, int]] = [{} for _ in range(n)]
        self.batches = 0
        """KV event batches the index applied."""

    def poll(self) -> None:
        """Applies every batch that has arrived (waits only to fill a gap)."""
        for replica, sub in enumerate(self._subs):
            while True:
                try:
                    _, seq, payload = sub.recv_multipart(flags=self._zmq.NOBLOCK)
                except self._zmq.Again:
                    break
                self._receive(replica, int.from_bytes(seq, "big"), payload)

    def _receive(self, replica: int, seq: int, payload: bytes) -> None:
        if seq <= self.seen[replica]:
            return  # already applied (it came from the replay socket too)
        if seq > self.seen[replica] + 1:
            self._replay(replica, self.seen[replica] + 1, seq)
        self._apply_batch(replica, seq, payload)

    def _apply_batch(self, replica: int, seq: int, payload: bytes) -> None:
        _ts, events, _rank = self._unpack(payload)
        for event in events:
            self._apply(replica, event)
        self.seen[replica] = seq
        self.batches += 1

    def _replay(self, replica: int, first: int, before: int | None) -> None:
        """Fetches and applies batches `first` .. `before - 1` (or all from `first`) from
        the replica's replay socket."""
        if replica >= len(self._replay_endpoints):
            return  # no replay socket: the index goes on without those batches
        zmq = self._zmq
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self._replay_endpoints[replica])
        try:
            dealer.send_multipart([b"", first.to_bytes(8, "big")])
            while dealer.poll(5000):
                _, seq_bytes, payload = dealer.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq < 0:
                    return
                if seq > self.seen[replica] and (before is None or seq < before):
                    self._apply_batch(replica, seq, payload)
                    self.replayed += 1
            raise TimeoutError(f"replica {replica}'s replay socket did not answer")
        finally:
            dealer.close()

    def catch_up(self, replica: int, seq: int, timeout_s: float = 5.0) -> None:
        """Returns once the replica's batches up to `seq` are applied: from the subscription,
        or from the replay socket when one does not arrive there within 20 ms (lost)."""
        deadline = time.monotonic() + timeout_s
        while self.seen[replica] < seq:
            if self._subs[replica].poll(20):
                self.poll()
                continue
            self._replay(replica, self.seen[replica] + 1, None)
            if self.seen[replica] < seq and time.monotonic() > deadline:
                raise TimeoutError(f"replica {replica}'s KV events up to {seq} never came")

    def _apply(self, replica: int, event: list[Any]) -> None:
        held, ours = self._held[replica], self._ours[replica]
        tag = event[0]
        if tag == "BlockStored":
            _, hashes, parent, tokens, block_size, _lora, medium = event[:7]
            h = _ROOT if parent is None else ours.get(parent)
            if h is None:
                return  # its parent was never seen (missed before the subscription)
            for i, engine_hash in enumerate(hashes):
                h = _chain(h, tuple(tokens[i * block_size : (i + 1) * block_size]))
                ours[engine_hash] = h
                held.setdefault(h, set()).add(medium)
        elif tag == "BlockRemoved":
            _, hashes, medium = event[:3]
            for engine_hash in hashes:
                ours_h = ours.get(engine_hash)
                media = held.get(ours_h) if ours_h is not None else None
                if ours_h is None or media is None:
                    continue
                media.discard(medium)
                if not media:
                    del held[ours_h]
                    del ours[engine_hash]
        elif tag == "AllBlocksCleared":
            held.clear()
            ours.clear()

    def matched_blocks(self, prompt: Sequence[int] | Any) -> list[int]:
        """Per replica, how many of the prompt's leading full blocks it holds (hashing only
        as far as some replica still matches)."""
        bs = self.block_size
        tokens = [int(t) for t in prompt]
        out = [0] * len(self._held)
        alive = [i for i, held in enumerate(self._held) if held]
        h = _ROOT
        for b in range(len(tokens) // bs):
            if not alive:
                break
            h = _chain(h, tuple(tokens[b * bs : (b + 1) * bs]))
            alive = [i for i in alive if h in self._held[i]]
            for i in alive:
                out[i] = b + 1
        return out

    def close(self) -> None:
        for sub in self._subs:
            sub.close(linger=0)


@dataclass
class ReplicaSet:
    """The replicas, the router's choices, and what each served."""

    caches: list[KvCache]
    router: str
    size: int
    """How many replicas (their caches are here in-process, in other processes else)."""
    index: PrefixIndex | None = None
    routed: list[int] = field(default_factory=list)
    in_service: list[int] = field(default_factory=list)
    prefix_routed: int = 0
    """Requests the prefix-aware router sent by a held prefix (not by load alone)."""
    published: list[int] = field(default_factory=list)
    """Replica processes: the last KV event batch each said it had published."""
    _turn: int = 0

    def _sync(self) -> None:
        """Brings the index up to every batch the replicas have published, so a request is
        routed on the blocks of every request that finished before it."""
        assert self.index is not None
        self.index.poll()
        for i in range(self.size):
            if self.caches:
                publisher = self.caches[i]._publisher
                last = publisher.sync() if publisher is not None else -1
            else:
                last = self.published[i]
            self.index.catch_up(i, last)

    def route(self, prompt: Sequence[int] | Any, max_concurrency: int) -> int:
        """Picks the replica for a request (`pick`) and counts it in service there."""
        i = self.pick(prompt, max_concurrency)
        self.routed[i] += 1
        self.in_service[i] += 1
        return i

    def pick(self, prompt: Sequence[int] | Any, max_concurrency: int) -> int:
        n = self.size
        if self.router == "round-robin":
            i = self._turn % n
            self._turn += 1
            return i
        assert self.index is not None
        self._sync()
        matched = self.index.matched_blocks(prompt)
        room = [i for i in range(n) if self.in_service[i] < max_concurrency] or list(range(n))
        longest = max(matched[i] for i in room)
        if longest == 0:
            # No prefix held anywhere: round-robin over the replicas with room, as the other
            # router does, so the comparison isolates what the prefixes buy.
            order = [*range(self._turn, n), *range(self._turn)]
            turn = next(r for r in order if r in room)
            self._turn = (turn + 1) % n
            return int(turn)
        self.prefix_routed += 1
        best: int = min(
            (i for i in room if matched[i] == longest), key=lambda i: self.in_service[i]
        )
        return best


_FLEETS = itertools.count()


def _endpoint(fleet: int, i: int) -> str:
    return f"inproc://ferrumkv-replica-{os.getpid()}-{fleet}-{i}"


def open_replicas(config: CacheConfig, n: int, router: str) -> ReplicaSet:
    """N caches of `config`; for the prefix-aware router each publishes its KV events."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, not {router!r}")
    caches: list[KvCache] = []
    endpoints: list[str] = []
    replays: list[str] = []
    fleet = next(_FLEETS)
    try:
        for i in range(n):
            cfg = config
            if router == "prefix-aware":
                endpoints.append(_endpoint(fleet, i))
                replays.append(_endpoint(fleet, i) + "-replay")
                fields = config.to_dict()
                if fields["memory_bytes"] is not None:
                    del fields["num_blocks"]  # derived from memory_bytes
                cfg = CacheConfig(
                    **{
                        **fields,
                        "kv_events_endpoint": endpoints[-1],
                        "kv_events_replay_endpoint": replays[-1],
                    }
                )
            caches.append(KvCache(cfg))
        index = PrefixIndex(endpoints, config.block_size, replays) if endpoints else None
    except BaseException:
        for c in caches:
            c.close()
        raise
    return ReplicaSet(caches, router, n, index, [0] * n, [0] * n)


async def replay_replicas(
    replicas: ReplicaSet, config: CacheConfig, workload: Workload, options: ReplayOptions
) -> list[ReplayResult]:
    """Replay `workload` through the router onto the replicas; one result per replica."""
    finished = {r.request_id: asyncio.Event() for r in workload.requests}
    replayers = [_Replayer(c, config, workload, options, finished) for c in replicas.caches]
    pairs = zip(replicas.caches, replayers, strict=True)
    subscriptions = [c.on_pressure(r._on_pressure) for c, r in pairs]
    start = time.perf_counter()
    for r in replayers:
        r._start = start

    # The router holds arrived requests until the fleet has room (every replica's
    # `max_concurrency` together), and routes each when it lets it in, with what it knows
    # then: so a burst of arrivals is routed on fresh KV events, not on an empty index.
    room = asyncio.Semaphore(options.max_concurrency * len(replayers))

    async def serve(request: Request) -> None:
        try:
            await arrival(request, finished, start, options.speedup)
            prompt = request.prompt_tokens(workload.vocab_size)
            async with room:
                i = replicas.route(prompt, options.max_concurrency)
                try:
                    await replayers[i].serve_arrived(request)
                finally:
                    replicas.in_service[i] -= 1
        finally:
            finished[request.request_id].set()

    try:
        async with asyncio.TaskGroup() as group:
            helpers = [t for r in replayers for t in r.start_helpers(group, progress=False)]
            requests = [group.create_task(serve(r)) for r in workload.requests]
            group.create_task(_cancel_when_done(requests, helpers))
    except BaseExceptionGroup as group_error:
        raise _first_leaf(group_error) from None
    finally:
        for s in subscriptions:
            s.cancel()
    wall_s = time.perf_counter() - start
    results = []
    for r, c in zip(replayers, replicas.caches, strict=True):
        r._sample()
        results.append(
            ReplayResult(r.counters, c.stats(), wall_s, tuple(r.samples), tuple(r.admitted))
        )
    return results


def close_replicas(replicas: ReplicaSet) -> None:
    for c in replicas.caches:
        c.close()
    if replicas.index is not None:
        replicas.index.close()


def fleet_summary(replicas: ReplicaSet, results: list[ReplayResult]) -> dict[str, Any]:
    """Per-replica and total figures of a replicas replay."""
    per = []
    for i, (res, n) in enumerate(zip(results, replicas.routed, strict=True)):
        s: CacheStats = res.stats
        per.append(
            {
                "replica": i,
                "requests": n,
                "done": res.counters.done,
                "rejected": res.counters.rejected,
                "reused_blocks": s.reused_blocks,
                "missed_blocks": s.missed_blocks,
                "block_hit_rate": s.cache_hit_rate,
                "token_hit_rate": s.token_hit_rate,
                "preemptions": res.counters.preemptions,
                "remote_hit_blocks": s.remote_hit_blocks,
                "remote_read_bytes": s.remote_read_bytes,
                "remote_write_bytes": s.remote_write_bytes,
            }
        )
    reused = sum(p["reused_blocks"] for p in per)
    missed = sum(p["missed_blocks"] for p in per)
    cache_tokens = sum(r.stats.cache_tokens for r in results)
    prompt_tokens = sum(r.stats.prompt_tokens for r in results)
    return {
        "replicas": len(per),
        "router": replicas.router,
        "prefix_routed": replicas.prefix_routed,
        "requests_done": sum(p["done"] for p in per),
        "requests_rejected": sum(p["rejected"] for p in per),
        "block_hit_rate": reused / (reused + missed) if reused + missed else 0.0,
        "token_hit_rate": cache_tokens / prompt_tokens if prompt_tokens else 0.0,
        "preemptions": sum(p["preemptions"] for p in per),
        "remote_hit_blocks": sum(p["remote_hit_blocks"] for p in per),
        "remote_read_bytes": sum(p["remote_read_bytes"] for p in per),
        "remote_write_bytes": sum(p["remote_write_bytes"] for p in per),
        "wall_s": results[0].wall_s if results else 0.0,
        "per_replica": per,
    }


_FLEET_COLUMNS = tuple(
    Column(name, "right")
    for name in (
        "replica", "requests", "done", "rejected", "block hit", "token hit", "preempt",
        "remote hit", "remote in", "remote out",
    )
)  # fmt: skip
"""The fleet table's columns, all numbers (right-aligned)."""


def fleet_table(summary: dict[str, Any]) -> Table:
    """One row per replica and the total (of :func:`fleet_summary`, plus ``"workload"``)."""
    per = summary["per_replica"]
    title = f"{summary['replicas']} replicas, router {summary['router']}"
    if summary["router"] == "prefix-aware":
        title += f" ({summary['prefix_routed']} requests routed to a held prefix)"
    total = {**summary, "replica": "total", "requests": sum(p["requests"] for p in per)}
    total |= {"done": summary["requests_done"], "rejected": summary["requests_rejected"]}
    return Table(
        _FLEET_COLUMNS,
        tuple(_fleet_row(p) for p in per),
        footer=_fleet_row(total),
        title=title,
        caption=f"wall time {summary['wall_s']:.2f} s",
    )


def format_fleet(summary: dict[str, Any]) -> str:
    """The fleet's table as plain text (:func:`fleet_table`, rendered for a file)."""
    return render_table(fleet_table(summary))


def _fleet_row(p: dict[str, Any]) -> tuple[str, ...]:
    """The cells of one replica (or of the total)."""
    return (
        str(p["replica"]),
        f"{p['requests']:,}",
        f"{p['done']:,}",
        f"{p['rejected']:,}",
        f"{p['block_hit_rate']:.1%}",
        f"{p['token_hit_rate']:.1%}",
        f"{p['preemptions']:,}",
        f"{p['remote_hit_blocks']:,}",
        f"{p['remote_read_bytes'] / 2**20:.1f} MiB",
        f"{p['remote_write_bytes'] / 2**20:.1f} MiB",
    )


# ---------------------------------------------------------------------- replicas as processes
#
# ``--processes``: each replica is an OS process of its own (a cache and its serving loop,
# `_replica_main`), as replicas of a real fleet are. The router stays in this process: it
# sends each request to a replica over a pipe when it routes it, and the replica answers when
# the request has finished; with ``prefix-aware`` it reads the replicas' KV events from their
# ZMQ endpoints (ipc://, across processes). At the end every replica sends its result back.


def _replica_main(conn: Any, fields: dict[str, Any], options: ReplayOptions, vocab: int) -> None:
    """One replica process: serve the requests that arrive on `conn` until told to stop."""
    asyncio.run(_replica_loop(conn, CacheConfig(**fields), options, vocab))


async def _replica_loop(conn: Any, config: CacheConfig, options: ReplayOptions, vocab: int) -> None:
    from collections import defaultdict

    workload = Workload((), vocab, "replica")
    finished: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    with KvCache(config) as cache:
        replayer = _Replayer(cache, config, workload, options, finished)
        subscription = cache.on_pressure(replayer._on_pressure)
        start = time.perf_counter()
        replayer._start = start
        tasks: set[asyncio.Task[None]] = set()

        async def serve(request: Request) -> None:
            await replayer.serve_arrived(request)
            # The router routes the next turn on this one's blocks: publish them first.
            publisher = cache._publisher
            last = publisher.sync() if publisher is not None else -1
            conn.send(("done", (request.request_id, last)))

        try:
            async with asyncio.TaskGroup() as group:
                helpers = replayer.start_helpers(group, progress=False)
                while True:
                    message = await inbox.get()
                    if message is None:
                        break
                    task = group.create_task(serve(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(set(tasks))
                for h in helpers:
                    h.cancel()
        except BaseExceptionGroup as group_error:
            raise _first_leaf(group_error) from None
        finally:
            subscription.cancel()
            loop.remove_reader(conn.fileno())
        replayer._sample()
        result = ReplayResult(
            replayer.counters,
            cache.stats(),
            time.perf_counter() - start,
            tuple(replayer.samples),
            tuple(replayer.admitted),
        )
        cache.close()
    conn.send(("result", result))
    conn.close()


async def replay_processes(
    config: CacheConfig, n: int, router: str, workload: Workload, options: ReplayOptions
) -> tuple[ReplicaSet, list[ReplayResult]]:
    """Replay `workload` through the router onto `n` replica processes."""
    import multiprocessing
    import tempfile

    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, not {router!r}")
    ctx = multiprocessing.get_context("spawn")
    fields = config.to_dict()
    if fields["memory_bytes"] is not None:
        del fields["num_blocks"]
    sockets = tempfile.TemporaryDirectory(prefix="ferrumkv-replicas-")
    endpoints = [f"ipc://{sockets.name}/replica-{i}" for i in range(n)]
    replays = [f"ipc://{sockets.name}/replay-{i}" for i in range(n)]
    conns, procs = [], []
    for i in range(n):
        mine = dict(fields)
        if router == "prefix-aware":
            mine["kv_events_endpoint"] = endpoints[i]
            mine["kv_events_replay_endpoint"] = replays[i]
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(
            target=_replica_main,
            args=(child_end, mine, options, workload.vocab_size),
            name=f"ferrumkv-replica-{i}",
            daemon=True,
        )
        p.start()
        child_end.close()
        conns.append(parent_end)
        procs.append(p)
    index = PrefixIndex(endpoints, config.block_size, replays) if router == "prefix-aware" else None
    replicas = ReplicaSet([], router, n, index, [0] * n, [0] * n, published=[-1] * n)
    finished = {r.request_id: asyncio.Event() for r in workload.requests}
    results: list[ReplayResult | None] = [None] * n
    ended = [asyncio.Event() for _ in range(n)]
    loop = asyncio.get_running_loop()

    def on_message(i: int) -> None:
        try:
            kind, value = conns[i].recv()
        except EOFError:  # the replica died: nothing more will come
            loop.remove_reader(conns[i].fileno())
            ended[i].set()
            return
        if kind == "done":
            request_id, last = value
            replicas.in_service[i] -= 1
            replicas.published[i] = max(replicas.published[i], last)
            finished[request_id].set()
        else:
            results[i] = value
            loop.remove_reader(conns[i].fileno())
            ended[i].set()

    for i, c in enumerate(conns):
        loop.add_reader(c.fileno(), on_message, i)
    room = asyncio.Semaphore(options.max_concurrency * n)
    start = time.perf_counter()

    async def route(request: Request) -> None:
        await arrival(request, finished, start, options.speedup)
        prompt = request.prompt_tokens(workload.vocab_size)
        async with room:
            i = replicas.route(prompt, options.max_concurrency)
            conns[i].send(request)
            await finished[request.request_id].wait()

    try:
        await asyncio.gather(*(route(r) for r in workload.requests))
        for c in conns:
            c.send(None)
        await asyncio.gather(*(e.wait() for e in ended))
    finally:
        for p in procs:
            p.join(timeout=30)
        for c in conns:
            c.close()
        if index is not None:
            index.close()
        sockets.cleanup()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"replica process(es) {missing} ended without a result")
    return replicas, [r for r in results if r is not None]
