"""``python -m ferrumkv``: the replay job end to end in a subprocess, its figures, its exit
codes for bad input, and the bench entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

import ferrumkv as ferrumkv_pkg
from ferrumkv import CacheConfig
from ferrumkv.workload import DEFAULT_VOCAB_SIZE, infinite_cache_hits, load_trace

pytestmark = pytest.mark.slow

TRACE = Path(__file__).resolve().parent / "data" / "mooncake_first100.jsonl"
SMALL_MODEL = ["--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "64"]
BYTES_PER_BLOCK = CacheConfig(
    num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=1
).bytes_per_block
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRACE_LIMIT = 50


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run(argv: list[str], timeout: float) -> Run:
    """Run a command, decoding its output without newline translation (keeps ``\r``)."""
    done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def ferrumkv(*args: str, timeout: float = 240) -> Run:
    """Run ``python -m ferrumkv ARGS``."""
    return run([sys.executable, "-m", "ferrumkv", *args], timeout)


WITHOUT_RICH = "import sys; sys.modules['rich'] = None\n"
"""Code that makes ``rich`` unimportable (as when the ``cli`` extra is not installed)."""


def ferrumkv_without_rich(*args: str, timeout: float = 240) -> Run:
    """Run the command line with ``rich`` hidden: the plain fallbacks draw."""
    code = f"{WITHOUT_RICH}from ferrumkv.cli import main\nraise SystemExit(main({list(args)!r}))\n"
    return run([sys.executable, "-c", code], timeout)


def replay_json(tmp_path: Path, *args: str) -> dict:
    """Run a replay that must succeed and return its JSON figures."""
    out = tmp_path / "figures.json"
    result = ferrumkv("replay", *args, "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "block hit rate" in result.stdout and "wall time" in result.stdout
    assert result.stderr == ""
    return json.loads(out.read_text())


def write_trace(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def line(input_length: int = 512, output_length: int = 2, hash_ids=(0,), ts: int = 0) -> str:
    return json.dumps(
        {
            "timestamp": ts,
            "input_length": input_length,
            "output_length": output_length,
            "hash_ids": list(hash_ids),
        }
    )


def assert_consistent(figures: dict) -> None:
    """Relations that hold for every finished replay."""
    stats = figures["stats"]
    device = stats["device"]
    assert figures["requests_done"] + figures["requests_rejected"] == figures["requests"]
    reasons = figures["requests_rejected_too_large"] + figures["requests_rejected_no_room"]
    assert reasons == figures["requests_rejected"]
    assert device["used_blocks"] + device["free_blocks"] == device["total_blocks"]
    assert stats["used_tokens"] + stats["free_tokens"] == stats["total_tokens"]
    assert device["used_blocks"] == 0 and stats["num_sequences"] == 0  # all released
    assert stats["reused_blocks"] <= stats["alloc_total_blocks"]
    assert stats["cache_tokens"] <= stats["prompt_tokens"]
    for rate in ("block_hit_rate", "token_hit_rate", "infinite_block_hit_rate", "peak_usage"):
        assert 0.0 <= figures[rate] <= 1.0, rate
    assert figures["block_hit_rate"] == pytest.approx(stats["cache_hit_rate"])
    assert figures["token_hit_rate"] == pytest.approx(stats["token_hit_rate"])
    assert figures["peak_used_blocks"] <= figures["device_blocks"] == device["total_blocks"]
    assert figures["swap_outs"] + figures["recomputes"] == figures["preemptions"]
    assert figures["swap_ins"] == figures["swap_outs"]
    # A recompute resumes with preempted=True: counted apart, so the engine's prompt tokens
    # are exactly the admitted prompts'.
    assert stats["preempted_requests"] == figures["recomputes"]
    assert stats["prompt_tokens"] == figures["prompt_tokens"]
    assert figures["preempted_prompt_tokens"] == stats["preempted_prompt_tokens"]
    assert figures["preempted_cache_tokens"] <= figures["preempted_prompt_tokens"]
    assert figures["offload_bytes"] == figures["offload_blocks"] * BYTES_PER_BLOCK
    assert figures["onboard_bytes"] == figures["onboard_blocks"] * BYTES_PER_BLOCK
    # Every admitted request allocates once and deallocates once; every token is one extend.
    admitted = figures["requests"] - figures["requests_rejected"]
    # Every admitted request allocates once and deallocates once; every token and every
    # later prefill chunk is one extend.
    steps = figures["generated_tokens"] + figures["prefill_chunks"]
    assert figures["engine_ops"] >= 2 * admitted + steps
    assert figures["engine_ops_per_s"] == pytest.approx(
        figures["engine_ops"] / figures["wall_s"], rel=1e-6
    )


# ---------------------------------------------------------------------- successful runs


def test_trace_slice(tmp_path: Path) -> None:
    trace = TRACE
    figures = replay_json(
        tmp_path,
        "--trace", str(trace), "--limit", str(TRACE_LIMIT),
        *SMALL_MODEL, "--num-blocks", "6000",
    )  # fmt: skip
    assert_consistent(figures)
    workload = load_trace(trace, vocab_size=DEFAULT_VOCAB_SIZE, limit=TRACE_LIMIT)
    assert figures["requests"] == TRACE_LIMIT and figures["requests_rejected"] == 0
    assert figures["prompt_tokens"] == sum(r.prompt_len for r in workload.requests)
    assert figures["generated_tokens"] == sum(r.output_len for r in workload.requests)
    infinite = infinite_cache_hits(workload, block_size=16)
    assert figures["infinite_block_hit_rate"] == pytest.approx(infinite.block_hit_rate)
    assert figures["infinite_token_hit_rate"] == pytest.approx(infinite.token_hit_rate)


def test_chunked_prefill_reserves_each_prompt_chunk_by_chunk(tmp_path: Path) -> None:
    """Without prefix caching and with room for everything, a prompt of p tokens takes
    ceil(p / chunk) steps: the allocation reserves the first chunk, extends the rest."""
    chunk = 100
    tiny = ["--num-layers", "1", "--num-kv-heads", "1", "--head-dim", "8"]
    args = ["--trace", str(TRACE), "--limit", "20", *tiny, "--num-blocks", "30000"]
    figures = replay_json(tmp_path, *args, "--no-prefix-cache", "--chunk-size", str(chunk))
    assert_consistent(figures)
    workload = load_trace(TRACE, vocab_size=DEFAULT_VOCAB_SIZE, limit=20)
    assert figures["preemptions"] == 0
    assert figures["prefill_chunks"] == sum(
        -(-r.prompt_len // chunk) - 1 for r in workload.requests
    )
    assert figures["prompt_tokens"] == sum(r.prompt_len for r in workload.requests)
    assert figures["generated_tokens"] == sum(r.output_len for r in workload.requests)


def test_chunked_prefill_keeps_the_hit_rate_of_whole_prompts(tmp_path: Path) -> None:
    """One request at a time, the whole prompt is looked up once at allocation: chunking
    changes neither the hits nor the infinite-cache figure."""
    tiny = ["--num-layers", "1", "--num-kv-heads", "1", "--head-dim", "8"]
    args = ["--trace", str(TRACE), *tiny, "--num-blocks", "6000"]
    whole = replay_json(tmp_path, *args, "--max-concurrency", "1")
    chunked = replay_json(tmp_path, *args, "--max-concurrency", "1", "--chunk-size", "64")
    assert_consistent(chunked)
    assert whole["block_hit_rate"] > 0 and whole["prefill_chunks"] == 0
    assert chunked["prefill_chunks"] > 0
    for key in ("block_hit_rate", "token_hit_rate", "infinite_block_hit_rate"):
        assert chunked[key] == whole[key], key
    assert chunked["stats"]["reused_blocks"] == whole["stats"]["reused_blocks"]


def test_chunked_prefill_under_pressure_recomputes_chunk_by_chunk(tmp_path: Path) -> None:
    figures = replay_json(
        tmp_path,
        "--requests", "60", "--seed", "5", *SMALL_MODEL, "--num-blocks", "256",
        "--chunk-size", "64",
    )  # fmt: skip
    assert_consistent(figures)
    assert figures["requests_done"] == 60
    assert figures["preemptions"] > 0 and figures["recomputes"] == figures["preemptions"]
    assert figures["prefill_chunks"] > 0


def test_the_infinite_cache_counts_only_admitted_requests(tmp_path: Path) -> None:
    """A prompt the device can never hold is rejected before any lookup: the infinite-cache
    figure leaves it out too, so it stays comparable with (and above) the measured rate."""
    trace = write_trace(
        tmp_path,
        [
            line(input_length=1024, hash_ids=(0, 1)),
            line(input_length=8192, hash_ids=tuple(range(16)), ts=1),  # 512 blocks
            line(input_length=1024, hash_ids=(0, 1), ts=2),
        ],
    )
    figures = replay_json(
        tmp_path, "--trace", str(trace), *SMALL_MODEL, "--num-blocks", "100",
        "--max-concurrency", "1",
    )  # fmt: skip
    assert (figures["requests_done"], figures["requests_rejected"]) == (2, 1)
    # The second 1,024-token prompt hits 63 of its 64 blocks in full and copies 15 tokens of
    # the last one (one token is computed); the infinite cache counts the same.
    stats = figures["stats"]
    assert (stats["full_reused_blocks"], stats["partial_reused_blocks"]) == (63, 1)
    assert figures["infinite_block_hit_rate"] == figures["block_hit_rate"] == 64 / 128
    assert figures["infinite_token_hit_rate"] == figures["token_hit_rate"] == 1023 / 2048


def test_a_cache_that_never_evicts_gets_the_infinite_cache_rate(tmp_path: Path) -> None:
    """One request at a time and room for every block: the measured rates are the infinite
    cache's exactly, partial hits included."""
    tiny = ["--num-layers", "1", "--num-kv-heads", "1", "--head-dim", "8"]
    figures = replay_json(
        tmp_path, "--requests", "100", *tiny, "--num-blocks", "200000", "--max-concurrency", "1"
    )
    assert figures["stats"]["evicted_blocks"] == 0 and figures["block_hit_rate"] > 0.5
    assert figures["stats"]["partial_reused_blocks"] > 0
    assert figures["block_hit_rate"] == figures["infinite_block_hit_rate"]
    assert figures["token_hit_rate"] == figures["infinite_token_hit_rate"]


def test_synthetic_run_under_pressure_recomputes(tmp_path: Path) -> None:
    figures = replay_json(
        tmp_path, "--requests", "60", "--seed", "5", *SMALL_MODEL, "--num-blocks", "256"
    )
    assert_consistent(figures)
    assert figures["requests_done"] == 60
    assert figures["preemptions"] > 0 and figures["recomputes"] == figures["preemptions"]
    assert figures["critical_events"] > 0
    assert figures["block_hit_rate"] > 0


def test_prefix_cache_off_means_no_hits(tmp_path: Path) -> None:
    figures = replay_json(
        tmp_path, "--requests", "20", *SMALL_MODEL, "--num-blocks", "2000", "--no-prefix-cache"
    )
    assert_consistent(figures)
    assert figures["block_hit_rate"] == 0.0 and figures["infinite_block_hit_rate"] > 0.0


def test_requests_that_can_never_fit_are_rejected(tmp_path: Path) -> None:
    trace = write_trace(
        tmp_path,
        [
            line(input_length=100, output_length=3),  # fits
            line(input_length=1000, output_length=1, hash_ids=[1, 2]),  # prompt too long
            line(input_length=100, output_length=100, hash_ids=[3]),  # outgrows the cache
        ],
    )
    figures = replay_json(tmp_path, "--trace", str(trace), *SMALL_MODEL, "--num-blocks", "8")
    assert_consistent(figures)
    assert (figures["requests_done"], figures["requests_rejected"]) == (1, 2)
    assert figures["requests_rejected_too_large"] == 2


def test_the_table_gives_the_reason_of_each_rejection(tmp_path: Path) -> None:
    trace = write_trace(
        tmp_path,
        [line(input_length=100, output_length=3), line(input_length=1000, hash_ids=[1, 2])],
    )
    result = ferrumkv("replay", "--trace", str(trace), *SMALL_MODEL, "--num-blocks", "8")
    assert result.returncode == 0, result.stderr
    assert "2 (1 done, 1 rejected: 1 larger than the device tier)" in result.stdout


def test_speedup_follows_arrival_times(tmp_path: Path) -> None:
    trace = write_trace(tmp_path, [line(ts=0), line(ts=2000, hash_ids=[1])])
    figures = replay_json(
        tmp_path, "--trace", str(trace), *SMALL_MODEL, "--num-blocks", "64", "--speedup", "10"
    )
    assert figures["wall_s"] >= 0.2


def test_plot_writes_a_png(tmp_path: Path) -> None:
    image = tmp_path / "replay.png"
    result = ferrumkv(
        "replay", "--requests", "30", *SMALL_MODEL, "--num-blocks", "256", "--plot", str(image)
    )
    assert result.returncode == 0, result.stderr
    assert image.read_bytes()[:8] == PNG_MAGIC


TABLE_ROWS = ("workload", "requests", "prompt tokens", "generated tokens", "block hit rate",
              "token hit rate", "peak usage", "CRITICAL episodes", "preemptions",
              "recomputed prompts", "offloaded", "onboarded", "disk I/O", "KV events dropped",
              "remote store", "engine ops", "wall time")  # fmt: skip
"""Every row of the replay table (its first column)."""


def assert_table(text: str) -> None:
    """`text` is the replay table, one row per line in order, with no terminal codes."""
    assert "\x1b" not in text
    labels = [row.split("   ")[0] for row in text.splitlines()]
    assert labels == list(TABLE_ROWS), text
    assert "infinite cache" in text
    assert "blocks written" in text and "blocks hit" in text  # disk and remote I/O


def test_default_run_prints_the_table() -> None:
    result = ferrumkv("replay", timeout=120)
    assert result.returncode == 0, result.stderr
    assert_table(result.stdout)
    assert "256 (256 done, 0 rejected)" in result.stdout


def test_without_rich_the_same_table_prints_plainly() -> None:
    args = ["replay", "--requests", "5", *SMALL_MODEL, "--num-blocks", "256"]
    plain = ferrumkv_without_rich(*args)
    assert plain.returncode == 0, plain.stderr
    assert_table(plain.stdout)
    with_rich = ferrumkv(*args)

    def untimed(text: str) -> list[list[str]]:
        timed = ("engine ops", "wall time")
        return [row.split() for row in text.splitlines() if not row.startswith(timed)]

    assert untimed(plain.stdout) == untimed(with_rich.stdout)  # the same cells either way


def test_progress_bar_only_when_asked() -> None:
    args = ["replay", "--requests", "5", *SMALL_MODEL, "--num-blocks", "256"]
    assert ferrumkv(*args).stderr == ""
    forced = ferrumkv(*args, "--progress")
    assert forced.returncode == 0, forced.stderr
    assert "5/5" in forced.stderr and "requests" in forced.stderr and "\x1b[" in forced.stderr
    assert_table(forced.stdout)  # the table stays free of the bar's codes


def test_progress_bar_without_rich_is_one_line_redrawn() -> None:
    args = ["replay", "--requests", "5", *SMALL_MODEL, "--num-blocks", "256", "--progress"]
    forced = ferrumkv_without_rich(*args)
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.startswith("\r[") and forced.stderr.endswith("\n")
    assert "[" + "#" * 30 + "] 5/5 requests" in forced.stderr
    assert "\x1b" not in forced.stderr


# ---------------------------------------------------------------------- bad input


def assert_usage_error(result: Run, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr


def test_missing_trace_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert_usage_error(ferrumkv("replay", "--trace", str(missing)), f"{missing}: cannot read trace")


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("{broken", "invalid JSON"),
        (line(input_length=-4), "'input_length' must be a non-negative integer, got -4"),
        (line(output_length=-1), "'output_length' must be a non-negative integer, got -1"),
        (line(hash_ids=["a"]), "'hash_ids' must be a list of integers"),
        (json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": 3}),
         "'hash_ids' must be a list of integers"),
    ],
)  # fmt: skip
def test_malformed_trace_line(tmp_path: Path, bad: str, fragment: str) -> None:
    trace = write_trace(tmp_path, [line(), bad])
    assert_usage_error(ferrumkv("replay", "--trace", str(trace)), f"{trace}:2: ", fragment)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--num-blocks", "0"], "--num-blocks: '0' is not a positive integer"),
        (["--requests", "-3"], "--requests: '-3' is not a positive integer"),
        (["--limit", "0"], "--limit: '0' is not a positive integer"),
        (["--block-size", "abc"], "--block-size: 'abc' is not a positive integer"),
        (["--speedup", "0"], "--speedup: '0' is not a positive number"),
        (["--wait-timeout", "-1"], "--wait-timeout: '-1' is not a positive number"),
        (["--host-blocks", "-1"], "--host-blocks: '-1' is not a non-negative integer"),
        (["--num-blocks", "8", "--memory-mb", "8"], "not allowed with argument"),
        (["--dtype", "float64"], "dtype"),
        (["--json", "/nonexistent-dir/x.json"], "does not exist"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_flags_out_of_range(flags: list[str], fragment: str) -> None:
    assert_usage_error(ferrumkv("replay", *flags), fragment)


def test_plot_without_matplotlib_fails_before_running(tmp_path: Path) -> None:
    image = tmp_path / "replay.png"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from ferrumkv.cli import main\n"
        f"raise SystemExit(main(['replay', '--plot', {str(image)!r}]))\n"
    )
    assert_usage_error(run([sys.executable, "-c", code], timeout=60), "matplotlib")
    assert not image.exists()


def test_failed_run_exits_1() -> None:
    # No machine has 1000 GPUs, so this fails with or without a driver.
    result = ferrumkv("replay", "--requests", "2", *SMALL_MODEL, "--device", "cuda:999")
    assert result.returncode == 1
    assert "run failed" in result.stderr and "CUDA" in result.stderr


def test_swaps_slower_than_the_wait_timeout_finish(tmp_path: Path) -> None:
    # 512 KiB blocks: every swap is copied on the worker and outlasts a 0.5 ms wait timeout.
    # The replay used to put that timeout around `swap_in`; timing out the await does not stop
    # the copy (API: a swap in flight finishes), so its retry found the swap still in
    # progress and the run failed ("cannot swap in ...: a swap is in progress").
    figures = replay_json(
        tmp_path, "--requests", "64", "--num-layers", "8", "--num-kv-heads", "8",
        "--head-dim", "128", "--block-size", "16", "--num-blocks", "300",
        "--host-blocks", "4000", "--wait-timeout", "0.0005",
    )  # fmt: skip
    assert figures["swap_outs"] > 0, figures
    assert figures["swap_ins"] == figures["swap_outs"], figures
    assert figures["requests_done"] == 64, figures


@pytest.mark.parametrize("kind", ["symlink", "directory", "missing-dir"])
def test_a_bad_disk_path_is_a_usage_error_and_touches_nothing(tmp_path: Path, kind: str) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    path = {
        "symlink": tmp_path / "kv.bin",
        "directory": tmp_path,
        "missing-dir": tmp_path / "nope" / "kv.bin",
    }[kind]
    if kind == "symlink":
        path.symlink_to(precious)
    result = ferrumkv(
        "replay", "--requests", "2", *SMALL_MODEL, "--host-blocks", "4",
        "--disk-path", str(path), "--disk-blocks", "8",
    )  # fmt: skip
    fragment = {"symlink": "symbolic link", "directory": "is a directory",
                "missing-dir": "does not exist"}[kind]  # fmt: skip
    assert_usage_error(result, "--disk-path", fragment)
    assert result.stderr.startswith("ferrumkv replay: error: --disk-path: ")
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no usage block
    assert precious.read_text() == "keep me"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_a_disk_path_the_engine_cannot_create_is_a_usage_error() -> None:
    # /proc exists but takes no new files: the path passes the checks, the engine's open fails.
    result = ferrumkv(
        "replay", "--requests", "2", *SMALL_MODEL, "--host-blocks", "4",
        "--disk-path", "/proc/ferrumkv-kv.bin", "--disk-blocks", "8",
    )  # fmt: skip
    assert_usage_error(result, "--disk-path", "/proc/ferrumkv-kv.bin")
    assert result.stderr.count("\n") == 1, result.stderr


def test_json_to_stdout_puts_the_table_on_stderr() -> None:
    result = ferrumkv("replay", "--requests", "4", *SMALL_MODEL, "--json", "-")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["requests_done"] == 4 and "stats" in figures
    assert_table(result.stderr)


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_a_closed_pipe_ends_the_run_quietly(rich: bool) -> None:
    # The reader is gone before the first line is written (as with `| head -0`).
    args = ["replay", "--requests", "4", *SMALL_MODEL]
    main = f"from ferrumkv.cli import main; raise SystemExit(main({args!r}))"
    with subprocess.Popen(
        [sys.executable, "-c", main if rich else WITHOUT_RICH + main],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    assert code == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_run_that_served_nothing_fails() -> None:
    # One 16-token block of device tier: every prompt is larger, every request rejected.
    result = ferrumkv("replay", "--requests", "3", *SMALL_MODEL, "--num-blocks", "1")
    assert result.returncode == 1, result.stderr
    assert result.stderr == "ferrumkv replay: run failed: no request was served\n"
    assert "3 (0 done, 3 rejected: 3 larger than the device tier)" in result.stdout


def test_version() -> None:
    result = ferrumkv("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ferrumkv {ferrumkv_pkg.__version__}"


# ---------------------------------------------------------------------- help and bench


def test_help_documents_both_commands() -> None:
    top = ferrumkv("--help")
    assert top.returncode == 0 and "replay" in top.stdout and "bench" in top.stdout
    replay = ferrumkv("replay", "--help")
    assert replay.returncode == 0
    for flag in ("--trace", "--limit", "--speedup", "--requests", "--seed", "--num-blocks",
                 "--host-blocks", "--no-prefix-cache", "--max-concurrency", "--json",
                 "--plot", "--progress"):  # fmt: skip
        assert flag in replay.stdout
    assert ferrumkv().returncode == 2


def test_bench_hands_its_arguments_to_the_suite() -> None:
    result = ferrumkv("bench", "--help")
    assert result.returncode == 0 and "bench" in result.stdout


def test_bench_without_the_suite_says_so() -> None:
    code = (
        "import sys; sys.modules['ferrumkv.bench'] = None\n"
        "from ferrumkv.cli import main\n"
        "raise SystemExit(main(['bench', '--quick']))\n"
    )
    result = run([sys.executable, "-c", code], timeout=60)
    assert result.returncode == 1 and "ferrumkv.bench" in result.stderr
