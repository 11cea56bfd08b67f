"""Redis / Valkey as the remote tier: one server (``redis://H:P``) or a cluster
(``redis+cluster://H:P[,H:P...]``), through the ``redis`` client (hiredis when installed).

- Lookups: the existence checks are one script call on a single server (``EXISTS`` of each
  key, server side) or one pipeline of ``EXISTS`` on a cluster (non-transactional, spread
  over the slots' nodes); the values one ``MGET`` per chunk (cluster: the client's
  cross-slot ``mget_nonatomic``).
- Writes: one pipeline of ``SET`` with ``EX ttl_s`` when the URL sets ``?ttl_s=N``. The
  server's ``maxmemory`` policy is respected: with an evicting policy the server makes room;
  with ``noeviction`` a full server answers OOM, and those values are counted as refused.
- URL options: ``ttl_s`` (default none), ``db`` (one server only), ``password``.
Every call is bounded by the socket timeout (``remote_timeout_s``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .backend import StoreUrl, probe

_EXISTS_ALL = """
local found = {}
for i, key in ipairs(KEYS) do found[i] = redis.call('EXISTS', key) end
return found
"""


class RedisBackend:
    name = "redis"

    def __init__(self, url: StoreUrl, timeout: float) -> None:
        import redis
        import redis.cluster

        host, port = url.hosts[0]
        probe(host, port, timeout)
        ttl = url.option("ttl_s", "")
        self._ttl: int | None = int(ttl) if ttl else None
        password = url.option("password", "") or None
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "password": password,
        }
        self._errors = (redis.exceptions.RedisError, OSError)
        self._cluster = url.scheme == "redis+cluster"
        if self._cluster:
            nodes = [redis.cluster.ClusterNode(h, p) for h, p in url.hosts]  # type: ignore[no-untyped-call]
            self._r: Any = redis.cluster.RedisCluster(startup_nodes=nodes, **common)
        else:
            db = int(url.option("db", "0"))
            self._r = redis.Redis(host=host, port=port, db=db, **common)
        self._r.ping()
        # One server: every key's EXISTS in one script call (10x fewer client round trips
        # of work than a pipeline of 850 EXISTS, measured); a cluster's keys span slots.
        self._exists_all: Any = None if self._cluster else self._r.register_script(_EXISTS_ALL)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        if self._exists_all is not None:
            return [bool(n) for n in self._exists_all(keys=list(keys))]
        pipe = self._r.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(n) for n in pipe.execute()]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self._cluster:
            return list(self._r.mget_nonatomic(list(keys)))
        return list(self._r.mget(list(keys)))

    def put(self, items: Sequence[tuple[str, bytes | memoryview]]) -> list[bool]:
        import redis

        if not items:
            return []
        pipe = self._r.pipeline(transaction=False)
        for k, v in items:
            pipe.set(k, v, ex=self._ttl)
        landed = []
        for r in pipe.execute(raise_on_error=False):
            if isinstance(r, redis.exceptions.OutOfMemoryError):  # maxmemory, noeviction
                landed.append(False)
            elif isinstance(r, Exception):
                raise r
            else:
                landed.append(True)
        return landed

    def close(self) -> None:
        self._r.close()
