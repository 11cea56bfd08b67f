"""Real stores for the remote tier's tests and benchmarks, on 127.0.0.1 only, free ports.

- `redis_server(...)`: one `redis-server` (no persistence), optionally with `maxmemory`.
- `redis_cluster(3)`: three `--cluster-enabled yes` nodes joined by `redis-cli --cluster
  create` (no replicas), waited for until `cluster_state:ok`.
- `mooncake_store(segment_bytes)`: Mooncake's HTTP metadata server, its master, and one
  store process that mounts `segment_bytes` of memory for the store (a Mooncake client with
  a global segment); the engines under test mount none.
Each yields a `Store` with its `remote_url`, and can `pause()` (SIGSTOP) and `resume()` the
processes that answer the calls (Redis: the server(s); Mooncake: the master), or `kill()` and
`restart()` a single Redis server (empty, same port). A binary that is missing is an error
(`StoreUnavailable`), never a skip: CI installs them (.ci/run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class StoreUnavailable(RuntimeError):
    """A store's binary is missing or it did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, Redis' rule) is valid and free."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with contextlib.suppress(OSError), socket.socket() as s:
                s.bind((LOOPBACK, port + 10000))
                return port


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise StoreUnavailable(f"{name} is not installed (.ci/run installs it)")
    return path


def _wait(ok: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if ok():
                return
        time.sleep(0.05)
    raise StoreUnavailable(f"{what} did not come up within {timeout} s")


def _listening(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=0.5):
        return True


@dataclass
class Store:
    """A running store: its URL, and the processes behind it (the data server last)."""

    url: str
    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    start_data: Callable[[], subprocess.Popen[bytes]] | None = None

    @property
    def data(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def pause(self) -> None:
        for p in self._servers():
            p.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for p in self._servers():
            p.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        for p in self._servers():
            p.kill()
            p.wait()

    def restart(self) -> None:
        """Starts the killed data server(s) again, empty, on the same port(s)."""
        assert self.start_data is not None
        self.procs[-1] = self.start_data()

    def _servers(self) -> list[subprocess.Popen[bytes]]:
        return [self.data]

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(timeout=10)


def _redis(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [_binary("redis-server"), "--port", str(port), "--bind", LOOPBACK]
    args += ["--save", "", "--appendonly", "no", "--dir", str(workdir), *extra]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: _redis_ping(port), f"redis-server on port {port}")
    return p


def _redis_ping(port: int) -> bool:
    import redis

    return bool(redis.Redis(host=LOOPBACK, port=port, socket_timeout=1).ping())


@contextlib.contextmanager
def redis_server(*, maxmemory: str | None = None, policy: str = "noeviction") -> Iterator[Store]:
    with tempfile.TemporaryDirectory(prefix="ferrumkv-redis-") as tmp:
        port = free_port()
        extra = ("--maxmemory", maxmemory, "--maxmemory-policy", policy) if maxmemory else ()

        def start() -> subprocess.Popen[bytes]:
            return _redis(port, Path(tmp), *extra)

        store = Store(f"redis://{LOOPBACK}:{port}", [port], [start()], start)
        try:
            yield store
        finally:
            store.stop()


class _Cluster(Store):
    def _servers(self) -> list[subprocess.Popen[bytes]]:
        return list(self.procs)

    def resume(self) -> None:
        """Resumes every node and waits until the cluster serves again (each node says
        `cluster_state:ok` and a client's write goes through)."""
        super().resume()
        _wait_cluster(self.ports)


def _wait_cluster(ports: list[int]) -> None:
    import redis
    import redis.cluster

    def ok() -> bool:
        for p in ports:
            if (
                redis.Redis(host=LOOPBACK, port=p, socket_timeout=1).cluster("info")[
                    "cluster_state"
                ]
                != "ok"
            ):
                return False
        nodes = [redis.cluster.ClusterNode(LOOPBACK, p) for p in ports]  # type: ignore[no-untyped-call]
        client = redis.cluster.RedisCluster(startup_nodes=nodes, socket_timeout=1)
        try:
            return bool(client.set("ferrumkv-probe", b"1")) and client.delete("ferrumkv-probe") == 1
        finally:
            client.close()

    _wait(ok, "the redis cluster")


@contextlib.contextmanager
def redis_cluster(n: int = 3) -> Iterator[Store]:

    with tempfile.TemporaryDirectory(prefix="ferrumkv-cluster-") as tmp:
        ports = [free_cluster_port() for _ in range(n)]
        store = _Cluster("redis+cluster://" + ",".join(f"{LOOPBACK}:{p}" for p in ports), ports)
        try:
            for p in ports:
                store.procs.append(
                    _redis(
                        p,
                        Path(tmp),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{p}.conf",
                    )
                )
            create = [_binary("redis-cli"), "--cluster", "create"]
            create += [f"{LOOPBACK}:{p}" for p in ports]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
            subprocess.run(create, check=True, capture_output=True, timeout=60)
            _wait_cluster(ports)
            yield store
        finally:
            store.stop()


class _Mooncake(Store):
    def _servers(self) -> list[subprocess.Popen[bytes]]:
        return [self.procs[1]]  # the master: every lookup and put goes through it


# The store process: a Mooncake client that mounts a segment and serves it until killed.
_MOONCAKE_SEGMENT = """
import sys, time
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
rc = s.setup("127.0.0.1", sys.argv[1], int(sys.argv[3]), 16 << 20, "tcp", "", sys.argv[2])
print("ready" if rc == 0 else f"setup failed {rc}", flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.contextmanager
def mooncake_store(segment_bytes: int = 256 << 20) -> Iterator[Store]:
    env = {**os.environ, "MC_TCP_BIND_ADDRESS": LOOPBACK}
    rpc, meta, metrics = free_port(), free_port(), free_port()
    metadata = f"http://{LOOPBACK}:{meta}/metadata"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    store = _Mooncake(f"mooncake://{LOOPBACK}:{rpc}?metadata={metadata}", [rpc, meta])
    try:
        store.procs.append(
            subprocess.Popen(
                [
                    _binary("mooncake_http_metadata_server"),
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(meta),
                ],
                **quiet,  # type: ignore[call-overload]
            )
        )
        _wait(lambda: _listening(meta), "mooncake_http_metadata_server")
        store.procs.append(
            subprocess.Popen(
                [
                    _binary("mooncake_master"),
                    f"--rpc_port={rpc}",
                    f"--rpc_address={LOOPBACK}",
                    f"--metrics_host={LOOPBACK}",
                    f"--metrics_port={metrics}",
                ],
                **quiet,  # type: ignore[call-overload]
            )
        )
        _wait(lambda: _listening(rpc), "mooncake_master")

        def start() -> subprocess.Popen[bytes]:
            args = [metadata, f"{LOOPBACK}:{rpc}", str(segment_bytes)]
            p = subprocess.Popen(
                [sys.executable, "-c", _MOONCAKE_SEGMENT, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            assert p.stdout is not None
            line = p.stdout.readline().decode().strip()
            p.stdout.close()
            if line != "ready":
                raise StoreUnavailable(f"the mooncake store process: {line or 'no answer'}")
            return p

        store.start_data = start
        store.procs.append(start())
        yield store
    finally:
        store.stop()


STORES = {"redis": redis_server, "redis-cluster": redis_cluster, "mooncake": mooncake_store}
