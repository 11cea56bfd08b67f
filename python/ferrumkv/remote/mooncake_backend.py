"""Mooncake Store as the remote tier (``mooncake://MASTER_HOST:PORT?metadata=URL``), through
its ``mooncake.store`` client over TCP (``mooncake-transfer-engine-non-cuda`` on PyPI).

- URL options: ``metadata`` (the HTTP metadata server's URL, required), ``segment`` (bytes
  of store memory this client contributes, default 0: it only uses what others mount, e.g.
  ``"256MiB"``), ``buffer`` (its local transfer buffer, default 64MiB), ``local`` (the
  address it advertises, default the master's host). ``MC_TCP_BIND_ADDRESS`` is set to that
  address unless already set, so a loopback store stays on loopback.
- Lookups are ``batch_is_exist`` then ``get_batch``; writes ``put_batch`` (a full store
  answers an error code, counted as refused: Mooncake evicts by its own watermarks).
- The client's ``setup`` blocks for a long time, holding the GIL, when the master is
  unreachable: the master's and the metadata server's ports are probed first, within the
  timeout, so an absent store fails fast.
NOTE: values cross as Python bytes; the client's zero-copy calls (``batch_put_from`` /
``batch_get_into`` on registered memory) would save one copy each way.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

from .backend import StoreUrl, parse_bytes, probe

# Mooncake's error codes for a full store (no segment has room for the value).
_NO_SPACE = (-200,)


class MooncakeBackend:
    name = "mooncake"

    def __init__(self, url: StoreUrl, timeout: float) -> None:
        host, port = url.hosts[0]
        metadata = url.option("metadata", "")
        if not metadata:
            raise ValueError("a mooncake:// remote_url needs ?metadata=http://HOST:PORT/metadata")
        probe(host, port, timeout)
        m = urllib.parse.urlsplit(metadata)
        if m.hostname and m.port:
            probe(m.hostname, m.port, timeout)
        local = url.option("local", host)
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", local)
        from mooncake.store import MooncakeDistributedStore

        self._s: Any = MooncakeDistributedStore()
        rc = self._s.setup(
            local,
            metadata,
            parse_bytes(url.option("segment", "0")),
            parse_bytes(url.option("buffer", "64MiB")),
            "tcp",
            "",
            f"{host}:{port}",
        )
        if rc != 0:
            raise ConnectionError(f"mooncake setup failed with code {rc}")

    def exists(self, keys: Sequence[str]) -> list[bool]:
        codes = self._s.batch_is_exist(list(keys))
        if any(c < 0 for c in codes):
            raise ConnectionError(f"mooncake batch_is_exist failed: {min(codes)}")
        return [c == 1 for c in codes]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return [v if v else None for v in self._s.get_batch(list(keys))]

    def put(self, items: Sequence[tuple[str, bytes | memoryview]]) -> list[bool]:
        if not items:
            return []
        rc = self._s.put_batch([k for k, _ in items], [v for _, v in items])
        if rc == 0 or rc in _NO_SPACE:  # the batch's answer is one code: all or none
            return [rc == 0] * len(items)
        raise ConnectionError(f"mooncake put_batch failed with code {rc}")

    def close(self) -> None:
        self._s.close()
