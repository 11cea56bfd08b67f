"""Redis / Valkey as the remote tier: one server (``redis://H:P``) or a cluster
(``redis+cluster://H:P[,H:P...]``), through the ``redis`` client (hiredis when installed).

- Lookups: the existence checks are one pipeline of ``EXISTS`` (non-transactional, so a
  cluster spreads it over the slots' nodes), the values one ``MGET`` (cluster: the client's
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

    def exists(self, keys: Sequence[str]) -> list[bool]:
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
