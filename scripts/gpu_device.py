"""Issue 13's device check, the part that runs on the GPU machine: `scripts/gpu_device.sh`
installs the wheels `scripts/gpu_check.sh` built (into /tmp/site) and runs this; with
`--device cpu` (local mode) it runs here on the in-place build instead, which is what
`tests/test_gpu_check.py` exercises in `make check`.

Steps, each with its own time limit (killed at it), none stopping the next:

1. `pytest_cuda`: `python -m pytest -m cuda` over the test modules that mark tests `cuda`
   (tests/test_cuda.py, the `cuda` params of tests/test_real_model.py and
   tests/test_torch_ops.py; the other modules may import packages the machine lacks).
   Without a driver tests/conftest.py deselects them all: reported as `deselected`, not as
   passed.
2. `bandwidth`: benches/gpu_bandwidth.py (H2D / D2H swaps, offload / onboard and
   copy-on-write copies against torch's copies of the same bytes, in the same run).
3. `replay_cuda` and `replay_cpu`: `python -m ferrumkv replay` of the Mooncake synthetic trace
   (benches/data, which travels with the repo) with `--device cuda:0`, then `--device cpu`,
   the same flags otherwise (local mode: cpu only, `replay_cuda` is reported as skipped).

Results under --out ($OUT; at most 7 files, the device tool returns 8): summary.txt (the
environment and the table), summary.json, pytest_cuda.log, bandwidth.log, bandwidth.json,
replay.log (both runs), replay.json (both runs' `--json`). The table is printed last. The
exit status is 0 when every step passed (local mode: `deselected` counts as expected).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRACE = "benches/data/mooncake_synthetic_trace.jsonl"

DEFAULT_BUDGET_S = 330
"""All steps together, seconds: the device call's timeout_s leaves room above it."""

# Per-step caps (seconds); each step also gets at most what the budget has left, minus
# RESERVE_S for every step still to come.
CAPS = {"pytest_cuda": 150, "bandwidth": 75, "replay_cuda": 75, "replay_cpu": 60}
RESERVE_S = 20

# 2 layers x 8 heads x 64 dims x 16 tokens x float16: 64 KiB blocks, 1.25 GiB of device
# tier and 250 MiB of pinned host tier; the first 2,000 requests of the trace (about 16 s
# on 2 cores here, 94 GiB offloaded).
REPLAY_ARGS = (
    "--limit 2000 --num-layers 2 --num-kv-heads 8 --head-dim 64 --num-blocks 20000 "
    "--host-blocks 4000"
)
QUICK_REPLAY_ARGS = (
    "--limit 60 --num-layers 1 --num-kv-heads 2 --head-dim 16 --num-blocks 2600 --host-blocks 1000"
)

ENV_PROBE = r"""
import importlib.metadata as md, json, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform()}
names = ["ferrumkv", "torch", "transformers", "numpy", "pytest", "pytest-timeout",
         "hypothesis", "anyio", "trio", "outcome", "sniffio", "attrs", "sortedcontainers",
         "idna"]
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
info["versions"] = versions
try:
    import ferrumkv
    from ferrumkv import _core
    info["ferrumkv_file"] = ferrumkv.__file__
    info["ferrumkv_version"] = ferrumkv.__version__
    info["cuda_driver_present"] = bool(_core.cuda_driver_present)
except Exception as exc:
    info["ferrumkv_error"] = repr(exc)
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["torch_cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
except Exception as exc:
    info["torch_error"] = repr(exc)
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    status: str = "not run"  # pass, fail, timeout, deselected, skipped
    seconds: float = 0.0
    limit_s: float | None = None
    rc: int | None = None
    figures: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.cuda = args.device.startswith("cuda")
        self.deadline = time.monotonic() + args.budget
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.py = sys.executable
        self.scratch = Path(tempfile.mkdtemp(prefix="ferrumkv-gpu-check-"))

    # ----- running one command with a limit ----------------------------------------------

    def limit_for(self, name: str, later: int) -> float:
        left = self.deadline - time.monotonic() - RESERVE_S * later
        return max(5.0, min(CAPS[name], left))

    def run(self, step: Step, cmd: list[str], log: Path, limit: float, mode: str = "w") -> None:
        """Runs `cmd` in the repo root, its output to `log`; kills its process group at
        `limit` seconds (status `timeout`)."""
        step.limit_s = round(limit)
        print(f"== {step.name}: {shlex.join(cmd)}  (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        with log.open(mode) as f:
            f.write(f"== {step.name}: {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                step.rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                step.rc = None
                step.status = "timeout"
                f.write(f"\n== {step.name}: killed at its limit of {limit:.0f} s\n")
            step.seconds = time.monotonic() - t0
            f.write(f"\n== {step.name}: rc={step.rc}, {step.seconds:.1f} s\n")
        tail = log.read_text(errors="replace").splitlines()[-8:]
        print("\n".join("   " + line for line in tail), flush=True)

    # ----- steps -------------------------------------------------------------------------

    def setup(self) -> tuple[Step, dict[str, Any]]:
        step = Step("setup")
        t0 = time.monotonic()
        env: dict[str, Any] = {
            "mode": "device" if self.cuda else "local",
            "device": self.args.device,
        }
        try:
            p = subprocess.run(
                [self.py, "-c", ENV_PROBE],
                cwd=ROOT,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            env.update(json.loads(p.stdout.strip().splitlines()[-1]))
            if p.returncode:
                env["probe_stderr"] = p.stderr[-2000:]
        except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            env["probe_error"] = repr(exc)
        if self.cuda:
            try:
                smi = subprocess.run(
                    ["nvidia-smi"], capture_output=True, text=True, timeout=30
                ).stdout
            except (OSError, subprocess.TimeoutExpired) as exc:
                smi = f"nvidia-smi: {exc!r}"
            env["nvidia_smi"] = smi
        if self.args.install_log is not None and self.args.install_log.exists():
            env["install_log"] = self.args.install_log.read_text(errors="replace")[-4000:]
        env["install_rc"] = self.args.install_rc
        problems = []
        if self.args.install_rc:
            problems.append(f"wheel install failed (rc {self.args.install_rc})")
        if "ferrumkv_error" in env or "ferrumkv_file" not in env:
            problems.append(f"import ferrumkv failed: {env.get('ferrumkv_error')}")
        elif self.args.expect_site and not env["ferrumkv_file"].startswith(
            str(self.args.expect_site)
        ):
            problems.append(f"ferrumkv imported from {env['ferrumkv_file']}, not the wheel")
        if self.cuda and not env.get("torch_cuda_available"):
            problems.append("torch sees no GPU")
        if self.cuda and not env.get("cuda_driver_present"):
            problems.append("ferrumkv sees no CUDA driver")
        step.seconds = time.monotonic() - t0
        step.status = "fail" if problems else "pass"
        v = env.get("versions", {})
        bits = [f"ferrumkv {env.get('ferrumkv_version')} from {env.get('ferrumkv_file')}"]
        bits.append(f"torch {v.get('torch')}")
        if env.get("gpu"):
            bits.append(env["gpu"])
        step.figures = "; ".join(problems + bits)
        step.details = {"problems": problems}
        return step, env

    def pytest_cuda(self, later: int) -> Step:
        step = Step("pytest_cuda")
        log = self.out / "pytest_cuda.log"
        # -v lists each test that ran; a module that fails to import (a package the machine
        # lacks) must not stop the cuda tests of the others from running.
        cmd = [self.py, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-v"]
        cmd += ["--continue-on-collection-errors"]
        cmd += self.args.pytest_targets
        self.run(step, cmd, log, self.limit_for(step.name, later))
        counts = parse_pytest(log.read_text(errors="replace"))
        step.details = counts
        step.figures = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "seconds")
        if step.status == "timeout":
            return step
        if step.rc == 0 and counts.get("passed", 0) > 0:
            step.status = "pass"
        elif step.rc == 5 and not self.cuda and counts.get("deselected", 0) > 0:
            step.status = "deselected"  # no driver here: conftest deselected every cuda test
            step.figures += " (no driver: nothing ran)"
        else:
            step.status = "fail"
        return step

    def run_json(
        self, step: Step, cmd: list[str], log: Path, js: Path, later: int, mode: str = "w"
    ) -> dict[str, Any] | None:
        """Runs a step whose command writes JSON to `js`: the document, or None when the step
        timed out or wrote none (the step then says so)."""
        self.run(step, cmd, log, self.limit_for(step.name, later), mode=mode)
        if step.status == "timeout":
            return None
        try:
            return json.loads(js.read_text())
        except (OSError, ValueError) as exc:
            step.status, step.figures = "fail", f"no JSON ({exc.__class__.__name__})"
            return None

    def bandwidth(self, later: int) -> Step:
        step = Step("bandwidth")
        log, js = self.out / "bandwidth.log", self.out / "bandwidth.json"
        cmd = [self.py, "benches/gpu_bandwidth.py", "--device", self.args.device, "--json"]
        cmd += [str(js)] + (["--quick"] if self.args.quick else [])
        doc = self.run_json(step, cmd, log, js, later)
        if doc is None:
            return step
        s = doc["summary"]
        goal = {True: "met", False: "MISSED", None: "n/a on cpu"}[s["goal_met"]]
        by = {(r["size"], r["case"]): r for r in doc["rows"]}
        big = doc["sizes"][-1]
        parts = [
            f"swaps min ratio {s['min_swap_ratio']:.2f} (goal >= {s['goal']}: {goal})",
            f"cow min ratio {s['min_cow_ratio']:.2f}",
        ]
        for case, short in (("d2h swap_out", "d2h"), ("h2d swap_in", "h2d")):
            r = by.get((big, case))
            if r:
                parts.append(
                    f"{short} {big} {r['ferrumkv_gbps']:.1f} vs {r['baseline_gbps']:.1f} GB/s"
                )
        step.figures = "; ".join(parts)
        step.details = {"summary": s, "sizes": doc["sizes"]}
        step.status = "pass" if step.rc == 0 and len(doc["sizes"]) == 4 else "fail"
        return step

    def replay(self, device: str, later: int, runs: dict[str, Any]) -> Step:
        step = Step("replay_cuda" if device.startswith("cuda") else "replay_cpu")
        log = self.out / "replay.log"
        js = self.scratch / f"{step.name}.json"
        cmd = [self.py, "-m", "ferrumkv", "replay", "--trace", TRACE]
        cmd += [*shlex.split(self.args.replay_args), "--device", device, "--json", str(js)]
        doc = self.run_json(step, cmd, log, js, later, mode="a")
        if doc is None:
            return step
        runs[device] = doc
        done, total = doc["requests_done"], doc["requests"]
        step.figures = (
            f"{done}/{total} done, {doc['requests_rejected']} rejected, block hit "
            f"{100 * doc['block_hit_rate']:.1f}%, {doc['preemptions']} preemptions, "
            f"{doc['offload_bytes'] / 2**30:.1f} GiB offloaded, {doc['wall_s']:.1f} s, "
            f"{doc['engine_ops_per_s']:,.0f} ops/s"
        )
        keys = ("requests", "requests_done", "requests_rejected", "block_hit_rate", "wall_s")
        step.details = {k: doc[k] for k in keys}
        step.status = (
            "pass" if step.rc == 0 and done + doc["requests_rejected"] == total else "fail"
        )
        return step

    # ----- the whole check ---------------------------------------------------------------

    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "replay.log").write_text("")
        t0 = time.monotonic()
        setup, env = self.setup()
        steps = [setup]
        print(f"== setup: {setup.status}: {setup.figures}", flush=True)
        if env.get("nvidia_smi"):
            print(env["nvidia_smi"], flush=True)
        steps.append(self.pytest_cuda(later=3))
        steps.append(self.bandwidth(later=2))
        runs: dict[str, Any] = {}
        if self.cuda:
            steps.append(self.replay(self.args.device, later=1, runs=runs))
        else:
            steps.append(Step("replay_cuda", "skipped", figures="local mode: no GPU"))
        steps.append(self.replay("cpu", later=0, runs=runs))
        (self.out / "replay.json").write_text(json.dumps(runs, indent=2) + "\n")
        shutil.rmtree(self.scratch, ignore_errors=True)
        total = time.monotonic() - t0
        # Local mode expects the cuda tests deselected and the cuda replay skipped.
        expected = {"pass"} if self.cuda else {"pass", "deselected", "skipped"}
        ok = all(s.status in expected for s in steps)
        table = format_summary(steps, total, self.args.budget)
        summary = {
            "ok": ok,
            "mode": env["mode"],
            "device": self.args.device,
            "quick": self.args.quick,
            "budget_s": self.args.budget,
            "total_s": total,
            "env": env,
            "steps": [s.to_dict() for s in steps],
            "table": table,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "summary.txt").write_text(format_env(env) + "\n\n" + table + "\n")
        print("\n" + table, flush=True)
        return 0 if ok else 1


def cuda_test_files() -> list[str]:
    """The test modules with `cuda`-marked tests, relative to the repo root."""
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    return [str(p.relative_to(ROOT)) for p in tests if "mark.cuda" in p.read_text()]


def parse_pytest(text: str) -> dict[str, Any]:
    """The counts of pytest's closing line ("3 passed, 600 deselected in 12.3s")."""
    counts: dict[str, Any] = {}
    for line in reversed(text.splitlines()):
        m = re.search(r" in (\d+(?:\.\d+)?)s\b", line)
        if m and re.search(r"\d+ (passed|failed|deselected|skipped|errors?|no tests ran)", line):
            for n, kind in re.findall(r"(\d+) ([a-z]+)", line[: m.start()]):
                kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
                counts[kind] = int(n)
            counts["seconds"] = float(m.group(1))
            break
    return counts


def format_summary(steps: list[Step], total: float, budget: float) -> str:
    w = max(len(s.name) for s in steps)
    head = f"{'step':<{w}}  {'status':<10} {'seconds':>7} {'limit':>5}  key figures"
    lines = ["ferrumkv device check: summary", head, "-" * len(head)]
    for s in steps:
        limit = "-" if s.limit_s is None else str(s.limit_s)
        lines.append(f"{s.name:<{w}}  {s.status:<10} {s.seconds:>7.1f} {limit:>5}  {s.figures}")
    lines.append(f"{'total':<{w}}  {'':<10} {total:>7.1f} {budget:>5.0f}")
    return "\n".join(lines)


def format_env(env: dict[str, Any]) -> str:
    lines = [f"mode {env['mode']}, device {env['device']}"]
    for key in (
        "python",
        "executable",
        "platform",
        "ferrumkv_file",
        "ferrumkv_version",
        "cuda_driver_present",
        "torch_cuda",
        "torch_cuda_available",
        "gpu",
        "ferrumkv_error",
        "torch_error",
        "probe_error",
        "install_rc",
    ):
        if key in env:
            lines.append(f"{key}: {env[key]}")
    versions = env.get("versions", {})
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for key in ("nvidia_smi", "install_log", "probe_stderr"):
        if env.get(key):
            lines.append(f"--- {key}\n{env[key].rstrip()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="scripts/gpu_device.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        default=env.get("FERRUMKV_GPU_CHECK_DEVICE", "cuda:0"),
        help="cuda:N (on the GPU machine) or cpu (local mode)",
    )
    p.add_argument("--out", type=Path, default=Path(env.get("OUT", ROOT / "out" / "gpu-check")))
    p.add_argument(
        "--quick",
        action="store_true",
        default=env.get("FERRUMKV_GPU_CHECK_QUICK", "") not in ("", "0"),
        help="small sizes (the make-test run)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=float(env.get("FERRUMKV_GPU_CHECK_BUDGET", DEFAULT_BUDGET_S)),
        help="seconds for all steps together (default %(default)s)",
    )
    p.add_argument(
        "--pytest-targets",
        nargs="+",
        default=shlex.split(env.get("FERRUMKV_GPU_CHECK_PYTEST", "")) or cuda_test_files(),
        help="default: the test modules that mark tests `cuda` (the others may import "
        "packages the GPU machine lacks)",
    )
    p.add_argument("--replay-args", default=env.get("FERRUMKV_GPU_CHECK_REPLAY_ARGS"))
    p.add_argument("--expect-site", type=Path, help="ferrumkv must import from here")
    p.add_argument("--install-log", type=Path)
    p.add_argument("--install-rc", type=int, default=0)
    args = p.parse_args(argv)
    if args.replay_args is None:
        args.replay_args = QUICK_REPLAY_ARGS if args.quick else REPLAY_ARGS
    return Runner(args).main()


if __name__ == "__main__":
    raise SystemExit(main())
