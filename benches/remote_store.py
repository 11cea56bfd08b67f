"""Remote tier throughput over loopback, beside the store's own client in the same run.

For each backend (a real ``redis-server`` and a real Mooncake Store, started here on
127.0.0.1) and block sizes of 64 KiB, 512 KiB and 2 MiB, moving about ``--mib`` MiB:

- write: a cache with ``remote_write="on_store"`` releases a prompt of N blocks (the engine
  stages them, the writer thread puts them in batches) and ``await flush()`` returns once
  all landed; beside it, the client puts N distinct values of the same size, already in
  memory, in the same batches (redis-py pipelined ``SET``; Mooncake ``put_batch``).
- read: a second cache allocates that prompt: its lookup checks existence, gets the N values
  and imports them (checksums verified, bytes copied into the cache); beside it, the client
  does the same existence check and batched get (``EXISTS`` pipeline + ``MGET``;
  ``batch_is_exist`` + ``get_batch``).
Medians of ``--rounds`` rounds, the two sides alternating (each round in a fresh namespace;
the reading cache's memory touched once before, as a serving cache's is), MB/s = 10^6 bytes
of payload a second. Goal (issue 11): at least 80% of the client's rate.

    python benches/remote_store.py [--mib 128] [--rounds 3] [--backends redis,mooncake]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np

import ferrumkv
from servers import mooncake_store, redis_server

SIZES = {"64 KiB": 1, "512 KiB": 8, "2 MiB": 32}  # num_layers of a 64 KiB-per-layer block
BATCH = 64


def config(url: str, ns: str, layers: int, n: int, **kw: Any) -> ferrumkv.CacheConfig:
    return ferrumkv.CacheConfig(
        num_layers=layers,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        num_blocks=n + 2,
        remote_url=url,
        remote_namespace=ns,
        remote_timeout_s=60.0,
        **kw,
    )


async def engine_round(url: str, layers: int, n: int) -> tuple[float, float, int]:
    """(write seconds, read seconds, payload bytes) of one round through the caches."""
    ns = "bench" + uuid.uuid4().hex[:10]
    prompt = list(range(n * 16 + 1))
    with ferrumkv.KvCache(config(url, ns, layers, n, remote_write="on_store")) as a:
        await a.allocate("p", prompt)
        t0 = time.perf_counter()
        await a.deallocate("p")
        await a.flush()
        write_s = time.perf_counter() - t0
        s = a.stats()
        assert s.remote_write_blocks == n and s.remote_dropped_writes == 0, s.to_dict()
    with ferrumkv.KvCache(config(url, ns, layers, n)) as b:
        warm_up(b, n)
        t0 = time.perf_counter()
        h = await b.allocate("p", prompt)
        read_s = time.perf_counter() - t0
        assert h.num_cached_tokens == n * 16, (h.num_cached_tokens, b.stats().to_dict())
    return write_s, read_s, n * config(url, ns, layers, n).bytes_per_block


def warm_up(cache: ferrumkv.KvCache, n: int) -> None:
    """Touches every block once (a serving cache's memory is warm; a new one's pages fault
    on first write, which is not the store's cost)."""
    cfg = cache.config
    tokens = np.arange(10**6, 10**6 + (n + 1) * cfg.block_size)
    asyncio.get_running_loop()  # called from the round's loop
    cache.try_allocate("warm", tokens)
    zeros = np.zeros((len(tokens), cfg.num_kv_heads, cfg.head_dim), np.float16)
    for layer in range(cfg.num_layers):
        cache.write_kv("warm", layer, 0, zeros, zeros)
    cache._core.deallocate("warm")
    cache.reset_prefix_cache()


def client_round(backend: Any, layers: int, n: int) -> tuple[float, float]:
    """The same puts and gets with the store's own client: n distinct values of the same
    size (ferrumkv's framing included), already in memory, in the same batches (at most 64
    values and 16 MiB a call, as Mooncake's local buffer needs)."""
    size = 12 + layers * 64 * 1024
    batch = max(1, min(BATCH, (16 << 20) // size))
    values = [os.urandom(16) * (size // 16) for _ in range(n)]
    keys = [f"raw/{uuid.uuid4().hex}/{i}" for i in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        landed = backend.put(list(zip(keys[i : i + batch], values[i : i + batch], strict=True)))
        assert all(landed), landed
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert all(backend.exists(keys))
    got = [v for i in range(0, n, batch) for v in backend.get(keys[i : i + batch])]
    read_s = time.perf_counter() - t0
    assert all(v is not None and len(v) == size // 16 * 16 for v in got)
    return write_s, read_s


def run(name: str, url: str, mib: int, rounds: int) -> list[dict[str, Any]]:
    from ferrumkv.remote import open_backend

    backend = open_backend(url, 60.0)
    rows = []
    for label, layers in SIZES.items():
        n = max(8, mib * 1024 // (64 * layers))
        eng, raw = [], []
        for _ in range(rounds):  # alternating, so both see the same machine
            eng.append(asyncio.run(engine_round(url, layers, n)))
            raw.append(client_round(backend, layers, n))
        payload = eng[0][2]
        for op, e, c in (
            ("write", [x[0] for x in eng], [x[0] for x in raw]),
            ("read", [x[1] for x in eng], [x[1] for x in raw]),
        ):
            e_rate = payload / statistics.median(e) / 1e6
            c_rate = payload / statistics.median(c) / 1e6
            rows.append(
                {
                    "backend": name,
                    "block": label,
                    "blocks": n,
                    "op": op,
                    "ferrumkv_MBps": e_rate,
                    "client_MBps": c_rate,
                    "ratio": e_rate / c_rate,
                }
            )
            print(
                f"{name:>9} {label:>8} {op:>5} {n:>5} blocks: ferrumkv {e_rate:8.0f} MB/s, "
                f"client {c_rate:8.0f} MB/s, {100 * e_rate / c_rate:5.0f}%",
                flush=True,
            )
    backend.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128, help="payload per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="redis,mooncake")
    args = ap.parse_args()
    # Every round's values stay stored: the store must hold them all (2 per round and size).
    segment = (2 * len(SIZES) * args.rounds + 2) * args.mib << 20
    stores = {"redis": redis_server, "mooncake": lambda: mooncake_store(segment)}
    for name in args.backends.split(","):
        with stores[name]() as store:
            run(name, store.url, args.mib, args.rounds)


if __name__ == "__main__":
    main()
