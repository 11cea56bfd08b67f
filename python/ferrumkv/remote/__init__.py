"""The remote tier: KV blocks shared by replicas through a real distributed store.

``CacheConfig(remote_url=...)`` names the store; this package connects to it and moves the
bytes, the Rust engine decides what to move (``rust/core/src/remote.rs``):

- Keys are content addresses (namespace, KV geometry, dtype, layout, block size, hash
  algorithm, chained block hash; the salt is in the hash). Values carry a checksum over the
  key and the bytes, checked by the engine: a corrupt, truncated, foreign or misplaced value
  is a miss, never data.
- Writes: the engine queues a block when it leaves the local tiers (``remote_write=
  "on_evict"``) or when the sequence that computed it is released (``"on_store"``); one
  writer thread per cache drains the queue in batches. ``await cache.flush()`` waits for
  them; ``close()`` drains them (bounded by ``remote_timeout_s``).
- Lookups: ``await cache.allocate(...)`` first asks the store for the prompt's blocks after
  its locally cached prefix (one batched existence check, then one batched get of the run
  found), on worker threads, bounded by ``remote_timeout_s``; the blocks found become cached
  blocks of the host tier (or the device tier), and the allocation onboards them like any
  other hit. ``try_allocate`` never touches the network.
- Faults: an unreachable store at construction raises ``RemoteUnavailableError`` unless
  ``remote_required=False``; a store lost later makes the cache local-only (calls fail over
  to misses, writes are dropped, both counted in ``remote_errors`` / ``remote_dropped_writes``)
  and reconnects with exponential backoff.

Backends (``RemoteBackend``): Mooncake Store (``mooncake://``, its ``mooncake.store`` client)
and Redis / Valkey (``redis://``, ``redis+cluster://``, the ``redis`` client).
"""

from __future__ import annotations

from .backend import RemoteBackend, open_backend, parse_url
from .tier import RemoteTier

__all__ = ["RemoteBackend", "RemoteTier", "open_backend", "parse_url"]
