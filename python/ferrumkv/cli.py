"""The command line: ``python -m ferrumkv replay`` and ``python -m ferrumkv bench``.

Exit status: 0 on success, 1 when a run fails (a run that served no request fails too), 2 for
a usage error (bad flags, an unreadable or malformed trace, a disk tier file that cannot be
used, a missing optional package): one line on stderr, never a traceback. 130 on Ctrl-C, 141
when the reader of the output went away (``| head``), quietly.

Tables go through :mod:`ferrumkv._console` (``rich`` when the ``ferrumkv[cli]`` extra is
installed, plain text otherwise); the JSON figures are the same either way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from ferrumkv import (
    EVICTION_POLICIES,
    CacheConfig,
    FerrumKVError,
    KvCache,
    RemoteUnavailableError,
    __version__,
)
from ferrumkv._console import print_table
from ferrumkv.replay import (
    DEFAULT_WAIT_TIMEOUT_S,
    ReplayOptions,
    replay,
    summarize,
    summary_table,
    write_document,
    write_json,
    write_plot,
)
from ferrumkv.replicas import ROUTERS, replay_replicas
from ferrumkv.workload import (
    DEFAULT_VOCAB_SIZE,
    TraceError,
    Workload,
    infinite_cache_hits,
    load_trace,
    synthetic_workload,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

DEFAULT_DEVICE_MIB = 512
"""Device tier size when neither --num-blocks nor --memory-mb is given."""

DEFAULT_REQUESTS = 256
DEFAULT_MAX_CONCURRENCY = 64
PLOT_SAMPLE_INTERVAL_S = 0.02

_DESCRIPTION = """\
ferrumkv command line.

commands:
  replay   drive a KvCache like a serving loop over a Mooncake trace or a synthetic chat
           workload, then print hit rates, usage, preemptions and throughput
  bench    run the benchmark suite (ferrumkv.bench); every argument after 'bench' is
           passed to it, so 'bench --help' shows its own options

run 'python -m ferrumkv replay --help' for the replay options.
"""

_REPLAY_DESCRIPTION = """\
Replay a workload against a KvCache: one asyncio task per request allocates its prompt,
decodes output_length tokens one extend at a time, and deallocates. On CRITICAL pressure
the newest running sequences are preempted (swapped to the host tier when --host-blocks > 0,
else dropped and recomputed later) and resumed when pressure drops.

Without --trace a synthetic workload runs: a few shared system prompts and multi-turn chats
that resend their history. With --trace FILE a Mooncake JSONL trace runs (timestamp in ms,
input_length, output_length, hash_ids: one id per 512-token block); its prompts average
~15k tokens, so give it room (e.g. --num-blocks 20000 with a small --num-layers).
"""


class UsageError(Exception):
    """A problem with the command line or its inputs (exit status 2)."""


# ---------------------------------------------------------------------- argument types


_Number = TypeVar("_Number", int, float)


def _ranged(
    convert: Callable[[str], _Number], low: _Number, inclusive: bool, what: str
) -> Callable[[str], _Number]:
    """An argparse type converting with ``convert`` and requiring ``> low`` (or ``>=``)."""

    def parse(text: str) -> _Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _ranged(int, 0, False, "a positive integer")
non_negative_int = _ranged(int, 0, True, "a non-negative integer")
positive_float = _ranged(float, 0.0, False, "a positive number")


STDOUT = Path("-")
"""``--json -``: the JSON goes to standard output (the table to standard error)."""


def _output_path(text: str) -> Path:
    """A path a file can be written to: its directory exists and it is not a directory;
    ``-`` is standard output."""
    if text == "-":
        return STDOUT
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    return path


def _check_disk_path(path: Path) -> None:
    """The disk tier's file must be in an existing directory, not a directory, not a
    symbolic link (the tier never follows one): a bad path is a one-line usage error before
    anything runs (checked after parsing, so argparse prints no usage block)."""
    if path.is_symlink():
        raise UsageError(f"--disk-path: {str(path)!r} is a symbolic link (never followed)")
    if path.is_dir():
        raise UsageError(f"--disk-path: {str(path)!r} is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"--disk-path: directory {str(path.parent)!r} does not exist")


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with the ``replay`` and ``bench`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m ferrumkv",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ferrumkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    replay = commands.add_parser(
        "replay",
        help="replay a serving workload against the engine",
        description=_REPLAY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_workload_arguments(replay.add_argument_group("workload"))
    _add_cache_arguments(replay.add_argument_group("cache"))
    _add_serving_arguments(replay.add_argument_group("serving loop"))
    _add_output_arguments(replay.add_argument_group("output"))
    commands.add_parser(
        "bench", help="run the benchmark suite (arguments are passed to it)", add_help=False
    )
    return parser


def _add_workload_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--trace", type=Path, metavar="FILE", help="Mooncake JSONL trace")
    group.add_argument(
        "--limit", type=positive_int, metavar="N", help="take only the first N requests"
    )
    group.add_argument(
        "--requests",
        type=positive_int,
        default=DEFAULT_REQUESTS,
        metavar="N",
        help="synthetic workload size (default: %(default)s)",
    )
    group.add_argument(
        "--seed", type=non_negative_int, default=0, help="synthetic workload seed (default: 0)"
    )
    group.add_argument(
        "--vocab-size",
        type=positive_int,
        default=DEFAULT_VOCAB_SIZE,
        metavar="N",
        help="token ids are drawn from [0, N) (default: %(default)s, Llama-3)",
    )


def _add_cache_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--num-layers", type=positive_int, default=32, metavar="N")
    group.add_argument("--num-kv-heads", type=positive_int, default=8, metavar="N")
    group.add_argument(
        "--head-dim",
        type=positive_int,
        default=128,
        metavar="N",
        help="with the two above: the model shape (default: Llama-3-8B, 32 x 8 x 128)",
    )
    group.add_argument("--block-size", type=positive_int, default=16, metavar="TOKENS")
    group.add_argument(
        "--dtype", default="float16", help="float16, bfloat16, float32, uint8 (fp8 storage)"
    )
    group.add_argument("--device", default="cpu", help="cpu or cuda:N (default: cpu)")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--num-blocks", type=positive_int, metavar="N", help="device tier blocks")
    size.add_argument(
        "--memory-mb",
        type=positive_float,
        metavar="MIB",
        help=f"device tier size in MiB (default: {DEFAULT_DEVICE_MIB})",
    )
    group.add_argument(
        "--host-blocks",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="host tier blocks; > 0 makes preemption swap instead of recompute",
    )
    group.add_argument("--disk-path", type=Path, metavar="FILE", help="disk tier file")
    group.add_argument("--disk-blocks", type=non_negative_int, default=0, metavar="N")
    group.add_argument("--no-prefix-cache", action="store_true", help="disable prefix caching")
    group.add_argument(
        "--eviction-policy",
        choices=EVICTION_POLICIES,
        default="lru",
        help="which free cached block each tier gives up first (default: lru)",
    )
    group.add_argument(
        "--remote-url",
        metavar="URL",
        help="a shared store (redis://HOST:PORT, redis+cluster://HOST:PORT[,...], "
        "mooncake://HOST:PORT?metadata=URL): with --replicas every replica shares it",
    )
    group.add_argument(
        "--remote-write",
        choices=("on_evict", "on_store"),
        default="on_evict",
        help="with --remote-url: write a block when it leaves the local tiers, or when the "
        "request that computed it finishes (default: on_evict)",
    )
    group.add_argument(
        "--remote-namespace",
        metavar="NAME",
        help="with --remote-url: the namespace of the run's keys (default: a new one per run, "
        "so every run starts with an empty store)",
    )


def _add_serving_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=DEFAULT_MAX_CONCURRENCY,
        metavar="N",
        help="most requests in service at once (default: %(default)s)",
    )
    group.add_argument(
        "--chunk-size",
        type=positive_int,
        metavar="TOKENS",
        help="chunked prefill: reserve at most this many uncached prompt tokens per step, "
        "interleaved with the other sequences' decode steps (default: whole prompts)",
    )
    group.add_argument(
        "--speedup",
        type=positive_float,
        metavar="X",
        help="follow arrival times, X times faster than recorded; "
        "default: ignore them and send requests as fast as the loop admits them",
    )
    group.add_argument(
        "--replicas",
        type=positive_int,
        default=1,
        metavar="N",
        help="serve the workload with N replicas (each a cache of the given size) behind "
        "a router (default: %(default)s)",
    )
    group.add_argument(
        "--processes",
        action="store_true",
        help="with --replicas: run each replica as an OS process of its own (the router "
        "stays here; prefix-aware routing reads their KV events over ipc:// ZMQ)",
    )
    group.add_argument(
        "--router",
        choices=ROUTERS,
        default="round-robin",
        help="with --replicas: send each request to the next replica, or to the one holding "
        "the longest prefix of it, learned from the replicas' KV events over ZMQ "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--wait-timeout",
        type=positive_float,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="SECONDS",
        help="longest one engine call waits for blocks before the loop reconsiders "
        "(default: %(default)s)",
    )


def _add_output_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--json",
        type=_output_path,
        metavar="FILE",
        help="write the figures as JSON ('-': to standard output, the table to standard error)",
    )
    group.add_argument(
        "--plot",
        type=_output_path,
        metavar="FILE.png",
        help="plot usage, hit rate and pressure over time (needs matplotlib)",
    )
    group.add_argument(
        "--progress",
        action="store_true",
        help="draw the progress bar on stderr even when it is not a terminal",
    )


# ---------------------------------------------------------------------- commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status. Output cut short by a closed pipe
    (``| head``) ends the run quietly with 141, as a process killed by SIGPIPE does."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Whatever is still buffered for the closed pipe must not fail again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        return run_bench(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run_replay(args)
    except UsageError as exc:
        print(f"ferrumkv replay: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def run_bench(argv: list[str]) -> int:
    """Hand the arguments to ``ferrumkv.bench.main`` when the suite is installed."""
    try:
        bench = importlib.import_module("ferrumkv.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "ferrumkv.bench":
            raise
        print(
            "ferrumkv bench: error: the benchmark suite (module ferrumkv.bench) is not "
            "available in this installation",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return int(bench.main(argv) or EXIT_OK)


def run_replay(args: argparse.Namespace) -> int:
    """Validate inputs, replay, and report; raise :class:`UsageError` for bad input."""
    if args.plot is not None:
        _require_matplotlib()
    config = _cache_config(args)
    workload = _workload(args)
    try:
        cache = _open_cache(config)
    except FerrumKVError as exc:
        print(f"ferrumkv replay: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    options = ReplayOptions(
        max_concurrency=args.max_concurrency,
        chunk_size=args.chunk_size,
        speedup=args.speedup,
        wait_timeout_s=args.wait_timeout,
        progress=args.progress or sys.stderr.isatty(),
        sample_interval_s=PLOT_SAMPLE_INTERVAL_S if args.plot is not None else None,
    )
    if args.replicas > 1:
        cache.close()
        return _run_replicas(args, config, workload, options)

    def run() -> int:
        result = asyncio.run(replay(cache, config, workload, options))
        admitted = dataclasses.replace(workload, requests=result.admitted)
        infinite = infinite_cache_hits(admitted, config.block_size)
        summary = summarize(result, workload, infinite)
        print_table(summary_table(summary), _table_stream(args))
        if args.json is not None:
            write_json(args.json, summary, result)
        if args.plot is not None:
            write_plot(
                args.plot,
                result.samples,
                workload.description,
                infinite_hit_rate=infinite.block_hit_rate,
                low_watermark=config.low_watermark,
                high_watermark=config.high_watermark,
            )
        return _served(result.counters.done)

    return _reported(run, cache.close)


def _table_stream(args: argparse.Namespace) -> TextIO:
    """Where the table goes: standard output, or standard error when the JSON goes there."""
    return sys.stderr if args.json == STDOUT else sys.stdout


def _served(done: int) -> int:
    """The exit status of a run that finished: a run that served nothing failed."""
    if done == 0:
        print("ferrumkv replay: run failed: no request was served", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _reported(run: Callable[[], int], cleanup: Callable[[], None]) -> int:
    """Runs a replay, turning its failures into the command's exit status (a failed run is
    one line on stderr and 1, Ctrl-C 130; a closed pipe goes up to `main`), then `cleanup`."""
    try:
        return run()
    except BrokenPipeError:
        raise  # the reader of the output left: `main` ends quietly
    except (FerrumKVError, OSError, ImportError, RuntimeError) as exc:
        print(f"ferrumkv replay: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("ferrumkv replay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        cleanup()


def _require_matplotlib() -> None:
    """Fail before the run, not after it, when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs the matplotlib package (pip install matplotlib)") from None


def _cache_config(args: argparse.Namespace) -> CacheConfig:
    """The CacheConfig the flags describe; its ValueError becomes a usage error."""
    if args.disk_path is not None:
        _check_disk_path(args.disk_path)
    if args.num_blocks is not None:
        size = {"num_blocks": args.num_blocks}
    else:
        mib = args.memory_mb if args.memory_mb is not None else DEFAULT_DEVICE_MIB
        size = {"memory_bytes": int(mib * 2**20)}
    try:
        return CacheConfig(
            num_layers=args.num_layers,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            block_size=args.block_size,
            dtype=args.dtype,
            device=args.device,
            host_blocks=args.host_blocks,
            disk_path=None if args.disk_path is None else str(args.disk_path),
            disk_blocks=args.disk_blocks,
            enable_prefix_cache=not args.no_prefix_cache,
            eviction_policy=args.eviction_policy,
            **_remote_fields(args),
            **size,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _remote_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.remote_url is None:
        return {}
    ns = args.remote_namespace or f"replay-{os.getpid()}-{time.time_ns()}"
    return {
        "remote_url": args.remote_url,
        "remote_write": args.remote_write,
        "remote_namespace": ns,
    }


def _open_cache(config: CacheConfig) -> KvCache:
    """The engine for ``config``; a ValueError (a combination it rejects), an unreachable
    store or a disk tier file that cannot be created (the engine's only ``OSError`` at
    construction) is a usage error."""
    try:
        return KvCache(config)
    except (ValueError, RemoteUnavailableError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--disk-path: {exc}") from None


def _workload(args: argparse.Namespace) -> Workload:
    """The trace or synthetic workload the flags describe, cut to ``--limit``."""
    if args.trace is None:
        count = args.requests if args.limit is None else min(args.requests, args.limit)
        return synthetic_workload(count, seed=args.seed, vocab_size=args.vocab_size)
    try:
        workload = load_trace(args.trace, vocab_size=args.vocab_size, limit=args.limit)
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    if workload.clamped:
        print(
            f"ferrumkv replay: warning: {workload.clamped} trace request(s) have input_length "
            "inconsistent with hash_ids; their prompts were clamped",
            file=sys.stderr,
        )
    return workload


def _run_replicas(
    args: argparse.Namespace, config: CacheConfig, workload: Workload, options: ReplayOptions
) -> int:
    """``--replicas N``: the fleet's table (per replica and in total) and its JSON."""
    from ferrumkv.replicas import (
        ReplicaSet,
        close_replicas,
        fleet_summary,
        fleet_table,
        open_replicas,
        replay_processes,
    )

    if args.plot is not None:
        raise UsageError("--plot draws one cache: it does not take --replicas")
    opened: list[ReplicaSet] = []

    def run() -> int:
        if args.processes:
            replicas, results = asyncio.run(
                replay_processes(config, args.replicas, args.router, workload, options)
            )
        else:
            replicas = open_replicas(config, args.replicas, args.router)
            opened.append(replicas)
            results = asyncio.run(replay_replicas(replicas, config, workload, options))
        summary = {"workload": workload.description, **fleet_summary(replicas, results)}
        print_table(fleet_table(summary), _table_stream(args))
        if args.json is not None:
            write_document(args.json, summary)
        return _served(summary["requests_done"])

    def cleanup() -> None:
        for replicas in opened:
            close_replicas(replicas)

    return _reported(run, cleanup)
