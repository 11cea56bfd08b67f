"""Issue 13's prepared device check, its local part, with the device call itself left out:
`scripts/gpu_device.sh` (the runner the GPU machine runs) in local mode on the CPU, the same
runner in device mode on a machine without a GPU (every step still runs and reports), and
the call `scripts/gpu_check.sh` prints for the device tool.

The wheel build of `scripts/gpu_check.sh` (zig, about a minute on 2 cores) is not run here.
Cost: about 25 s, most of it the inner pytest importing transformers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ferrumkv import _core

ROOT = Path(__file__).resolve().parent.parent
SIZES = ["64 KiB", "256 KiB", "1 MiB", "2 MiB"]
CASES = [
    "d2h swap_out",
    "h2d swap_in",
    "d2h swap_out, reused cache",
    "h2d swap_in, reused cache",
    "d2h offload (gc)",
    "h2d onboard (prefix hit)",
    "d2d copy-on-write",
]
STEPS = ["setup", "pytest_cuda", "bandwidth", "replay_cuda", "replay_cpu"]
OUT_FILES = {
    "summary.txt",
    "summary.json",
    "pytest_cuda.log",
    "bandwidth.log",
    "bandwidth.json",
    "replay.log",
    "replay.json",
}

pytestmark = pytest.mark.slow


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OUT"))}
    env.update(FERRUMKV_GPU_CHECK_PYTHON=sys.executable, FERRUMKV_GPU_CHECK_QUICK="1", **kw)
    return env


def _run_runner(out: Path, **kw: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/gpu_device.sh"],
        cwd=ROOT,
        env=_env(OUT=str(out), **kw),
        capture_output=True,
        text=True,
        timeout=240,
    )


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """The summary table printed last: {step: [status, seconds, limit, figures...]}."""
    lines = stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line == "ferrumkv device check: summary")
    rows = {}
    for line in lines[start + 3 :]:
        parts = line.split()
        rows[parts[0]] = parts[1:]
    assert list(rows) == [*STEPS, "total"], lines[start:]
    return rows


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("gpu-check-local")
    p = _run_runner(
        out,
        FERRUMKV_GPU_CHECK_DEVICE="cpu",
        FERRUMKV_GPU_CHECK_PYTEST="tests/test_cuda.py tests/test_real_model.py",
    )
    return p, out


def test_local_mode_passes_and_prints_the_summary_last(local_run: tuple[Any, Path]) -> None:
    p, out = local_run
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = _table_rows(p.stdout)
    cuda_status = "pass" if _core.cuda_driver_present else "deselected"
    assert [rows[s][0] for s in STEPS] == ["pass", cuda_status, "pass", "skipped", "pass"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["mode"] == "local"
    assert [s["name"] for s in summary["steps"]] == STEPS
    by = {s["name"]: s for s in summary["steps"]}
    assert by["pytest_cuda"]["status"] == cuda_status
    if not _core.cuda_driver_present:
        assert by["pytest_cuda"]["rc"] == 5 and by["pytest_cuda"]["details"]["deselected"] > 0
        assert "passed" not in by["pytest_cuda"]["details"]
    assert summary["table"] in (out / "summary.txt").read_text()
    assert summary["env"]["ferrumkv_file"].startswith(str(ROOT / "python"))


def test_local_mode_leaves_what_the_device_tool_can_bring_back(
    local_run: tuple[Any, Path],
) -> None:
    """At most 8 plain files, named in letters, digits, '.', '_' and '-' alone."""
    _, out = local_run
    names = {f.name for f in out.iterdir()}
    assert names == OUT_FILES and len(names) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and (out / n).is_file() for n in names)
    assert "deselected" in (out / "pytest_cuda.log").read_text()


def test_bandwidth_json_has_every_size_and_case(local_run: tuple[Any, Path]) -> None:
    _, out = local_run
    doc = json.loads((out / "bandwidth.json").read_text())
    assert doc["device"] == "cpu" and doc["quick"] is True and doc["sizes"] == SIZES
    rows = {(r["size"], r["case"]): r for r in doc["rows"]}
    assert set(rows) == {(s, c) for s in SIZES for c in CASES}
    for (size, case), r in rows.items():
        assert (
            r["block_bytes"]
            == {"64 KiB": 64, "256 KiB": 256, "1 MiB": 1024, "2 MiB": 2048}[size] * 1024
        )
        assert r["bytes"] == r["blocks"] * r["block_bytes"] > 0
        for key in ("ferrumkv_gbps", "baseline_gbps", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (size, case, key)
        if case in ("d2h swap_out", "h2d swap_in"):
            assert r["runs"] == 1 and r["engine_gbps"] > 0  # one coalesced copy each way
        if case == "d2d copy-on-write":
            assert r["runs"] == r["blocks"] and r["bulk_gbps"] > 0
    s = doc["summary"]
    assert s["goal"] == 0.8 and s["goal_met"] is None  # the goal is a GPU's
    assert "d2h swap_out" in (out / "bandwidth.log").read_text()


def test_replay_step_ran_on_the_cpu_only(local_run: tuple[Any, Path]) -> None:
    _, out = local_run
    runs = json.loads((out / "replay.json").read_text())
    assert list(runs) == ["cpu"]
    r = runs["cpu"]
    assert r["requests"] == 60 and r["requests_done"] + r["requests_rejected"] == 60
    assert r["requests_done"] > 0 and r["stats"]["device"]["total_blocks"] == 2600
    log = (out / "replay.log").read_text()
    assert "--device cpu" in log and "mooncake_synthetic_trace.jsonl" in log


@pytest.mark.skipif(_core.cuda_driver_present, reason="checks the runner where no GPU is")
def test_device_mode_without_a_gpu_runs_every_step_and_reports(tmp_path: Path) -> None:
    """A failing step never stops the next: on this machine every cuda step fails, the cpu
    replay passes, and the table is still printed last (exit status 1)."""
    p = _run_runner(
        tmp_path,
        FERRUMKV_GPU_CHECK_DEVICE="cuda:0",
        FERRUMKV_GPU_CHECK_INSTALL="0",
        FERRUMKV_GPU_CHECK_PYTEST="tests/test_cuda.py",
    )
    assert p.returncode == 1, p.stdout[-4000:] + p.stderr[-4000:]
    rows = _table_rows(p.stdout)
    assert [rows[s][0] for s in STEPS] == ["fail", "fail", "fail", "fail", "pass"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["mode"] == "device"
    assert "torch sees no GPU" in summary["steps"][0]["figures"]
    assert list(json.loads((tmp_path / "replay.json").read_text())) == ["cpu"]


def test_the_device_call_fits_the_tool() -> None:
    """The call gpu_check.sh prints: a command of at most 2,000 characters that runs the
    runner (which travels: not ignored), dist/gpu carried (ignored, so only through carry),
    and a timeout above the runner's budget, within the tool's 600 s."""
    p = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--print-command"],
        cwd=ROOT,
        env={**os.environ, "VENV": sys.prefix},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    call = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(call) == {"command", "carry", "timeout_s"}
    assert 0 < len(call["command"]) <= 2000 and call["carry"] == ["dist/gpu"]
    words = shlex.split(call["command"])
    assert "scripts/gpu_device.sh" in words
    budget = next(
        float(w.split("=", 1)[1]) for w in words if w.startswith("FERRUMKV_GPU_CHECK_BUDGET=")
    )
    assert budget + 60 <= call["timeout_s"] <= 480  # under 8 minutes: it can run twice in 15
    for path, ignored in (("dist/gpu/x.whl", 0), ("scripts/gpu_device.sh", 1)):
        rc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode
        assert rc == ignored, path
    for script in ("scripts/gpu_check.sh", "scripts/gpu_device.sh"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


def test_pytest_closing_line_is_parsed() -> None:
    runner = _load(ROOT / "scripts" / "gpu_device.py")
    log = "x\n==== 12 passed, 1 failed, 600 deselected, 2 warnings in 45.20s ====\n"
    assert runner.parse_pytest(log) == {
        "passed": 12,
        "failed": 1,
        "deselected": 600,
        "warnings": 2,
        "seconds": 45.2,
    }
    assert runner.parse_pytest("617 deselected in 7.45s\n") == {"deselected": 617, "seconds": 7.45}
    assert runner.parse_pytest("1 error in 0.1s") == {"errors": 1, "seconds": 0.1}
    assert runner.parse_pytest("killed\n") == {}


def test_runs_counts_coalesced_copies() -> None:
    bench = _load(ROOT / "benches" / "gpu_bandwidth.py")
    assert bench._runs((0, 1, 2, 3), (4, 5, 6, 7)) == 1
    assert bench._runs((0, 1, 2, 3), (7, 6, 5, 4)) == 4
    assert bench._runs((0, 1, 5, 6), (0, 1, 2, 3)) == 2
    assert bench._runs((), ()) == 0
