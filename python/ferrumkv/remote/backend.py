"""The one interface every store backend implements, and the URL that picks one.

A backend is used from worker threads only (never the event loop's), one call at a time
per thread; every call is bounded by the store client's own timeout where it has one, and
by the caller's wait (``RemoteTier``) where it does not. A call that fails raises; the
caller counts it and degrades to local-only.
"""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StoreUrl:
    """A parsed ``remote_url``: scheme, ``(host, port)`` seeds and the query's options."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    options: dict[str, str] = field(default_factory=dict)

    def option(self, name: str, default: str) -> str:
        return self.options.get(name, default)


def parse_url(url: str) -> StoreUrl:
    """Parses ``mooncake://H:P?metadata=URL``, ``redis://H:P`` or ``redis+cluster://H:P,...``
    (the engine validated its shape already)."""
    scheme, _, rest = url.partition("://")
    hosts_part, _, query = rest.partition("?")
    hosts_part = hosts_part.split("/", 1)[0]
    hosts = []
    for hp in hosts_part.split(","):
        host, _, port = hp.rpartition(":")
        hosts.append((host.strip("[]"), int(port)))
    options = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
    return StoreUrl(scheme, tuple(hosts), options)


def parse_bytes(text: str) -> int:
    """``"64MiB"``, ``"1GB"``, ``"4096"`` -> bytes."""
    t = text.strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def probe(host: str, port: int, timeout: float) -> None:
    """Raises OSError unless a TCP connection to ``host:port`` opens within ``timeout``."""
    with socket.create_connection((host, port), timeout=timeout):
        pass


class RemoteBackend(Protocol):
    """A store of byte values under string keys, called from worker threads."""

    name: str

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key holds a value (one round trip)."""
        ...

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each key's value, None when absent (one batched call)."""
        ...

    def put(self, items: Sequence[tuple[str, bytes | memoryview]]) -> list[bool]:
        """Stores every value (one batched call): whether each landed. A value the store
        refuses (full) is False, not an error; a failed call raises."""
        ...

    def close(self) -> None: ...


def open_backend(url: str, timeout: float) -> RemoteBackend:
    """Connects to the store ``url`` names; raises on failure within about ``timeout``."""
    u = parse_url(url)
    if u.scheme in ("redis", "redis+cluster"):
        from .redis_backend import RedisBackend

        return RedisBackend(u, timeout)
    if u.scheme == "mooncake":
        from .mooncake_backend import MooncakeBackend

        return MooncakeBackend(u, timeout)
    raise ValueError(f"no backend for {url!r}")
