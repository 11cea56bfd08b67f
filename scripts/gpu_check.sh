#!/usr/bin/env bash
# Issue 13's device check, the local part (`make gpu-check`): builds what the GPU machine
# needs into dist/gpu (ignored; carried to it), checks it, and prints the ONE call of the
# device tool to make. The machine (Python 3.12, torch, transformers, numpy, pytest,
# hypothesis, anyio; no compiler, no network) then runs scripts/gpu_device.sh.
#
#   scripts/gpu_check.sh                  # build, verify, print the call
#   scripts/gpu_check.sh --skip-build     # keep dist/gpu's ferrumkv wheel, redo the rest
#   scripts/gpu_check.sh --print-command  # only print the call (JSON), build nothing
#
# 1. ziglang into .venv if missing; `maturin build --release --zig --compatibility
#    manylinux_2_28` (abi3-py311, pyproject.toml) into dist/gpu, in its own cargo target dir
#    (target/gpu-wheel) so the in-place build's artifacts stay as they are; then checks the
#    wheel's tag (cp311-abi3-manylinux_2_28_x86_64), that its extension needs no glibc
#    symbol newer than 2.28, and that it installs (pip --target) and imports.
# 2. The wheels of trio and of those of its requirements the machine lacks (outcome,
#    sniffio), at the versions .venv tests with, for CPython 3.12 on manylinux x86-64; every
#    Requires-Dist of every wheel there is checked to be on the machine or in dist/gpu.
# 3. dist/gpu's size (under 30 MiB) and what the call sends in all (under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
DIST=dist/gpu
TIMEOUT_S=390   # the runner's budget (300 s of steps) + install, probe and slack
DEVICE_COMMAND='FERRUMKV_GPU_CHECK_BUDGET=300 bash scripts/gpu_device.sh'
# Test-only packages the GPU machine lacks (device README: trio is not there); their own
# requirements are checked below.
EXTRA_WHEELS=(trio outcome sniffio)

print_call() {
    "$PY" - "$DEVICE_COMMAND" "$DIST" "$TIMEOUT_S" <<'EOF'
import json, sys
command, carry, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert len(command) <= 2000, f"the device command is {len(command)} characters (max 2000)"
print(json.dumps({"command": command, "carry": [carry], "timeout_s": timeout}))
EOF
}

SKIP_BUILD=0
case "${1:-}" in
    --print-command) print_call; exit 0 ;;
    --skip-build) SKIP_BUILD=1 ;;
    "") ;;
    *) echo "usage: $0 [--skip-build | --print-command]" >&2; exit 2 ;;
esac

export PATH="$PWD/$VENV/bin:$PATH"
mkdir -p "$DIST"

# ----- 1. the ferrumkv wheel ----------------------------------------------------------------
if [ "$SKIP_BUILD" = 0 ]; then
    if ! "$PY" -c 'import ziglang' 2>/dev/null; then
        echo "== installing ziglang into $VENV"
        "$PY" -m pip install --quiet ziglang
    fi
    rm -f "$DIST"/ferrumkv-*.whl
    echo "== maturin build --release --zig --compatibility manylinux_2_28 (target/gpu-wheel)"
    start=$(date +%s)
    CARGO_TARGET_DIR="$PWD/target/gpu-wheel" \
        maturin build --release --zig --compatibility manylinux_2_28 --out "$DIST"
    echo "== wheel built in $(( $(date +%s) - start )) s"
fi

echo "== checking the ferrumkv wheel"
"$PY" - "$DIST" <<'EOF'
import re, subprocess, sys, tempfile, zipfile
from pathlib import Path
dist = Path(sys.argv[1])
wheels = sorted(dist.glob("ferrumkv-*.whl"))
assert len(wheels) == 1, f"expected one ferrumkv wheel in {dist}, found {wheels}"
whl = wheels[0]
assert whl.name.endswith("-cp311-abi3-manylinux_2_28_x86_64.whl"), whl.name
with zipfile.ZipFile(whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
    tags = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
            if l.startswith("Tag:")]
    assert tags == ["cp311-abi3-manylinux_2_28_x86_64"], tags
    sos = [n for n in z.namelist() if n.endswith(".so")]
    assert sos == ["ferrumkv/_core.abi3.so"], sos
    so = z.read(sos[0])
glibc = max((int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", so))
assert glibc <= (2, 28), f"the extension needs glibc {glibc}, newer than manylinux_2_28"
with tempfile.TemporaryDirectory() as site:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", site, str(whl)], check=True)
    probe = ("import ferrumkv, sys; from ferrumkv import _core; "
             "assert ferrumkv.__file__.startswith(sys.argv[1]), ferrumkv.__file__; "
             "print(ferrumkv.__version__, ferrumkv.__file__, _core.cuda_driver_present)")
    env = {"PYTHONPATH": site, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe, site], env=env, cwd="/",
                         check=True, capture_output=True, text=True).stdout.strip()
print(f"{whl.name}: tag {tags[0]}, glibc <= {glibc[0]}.{glibc[1]}, imports: {out}")
EOF

# ----- 2. test-only wheels the machine lacks --------------------------------------------------
SPECS=()
for name in "${EXTRA_WHEELS[@]}"; do
    version="$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")"
    SPECS+=("$name==$version")
done
# Drop wheels of other versions from an earlier run: two versions stop the install there.
for name in "${EXTRA_WHEELS[@]}"; do
    for f in "$DIST/$name"-*.whl; do
        [ -e "$f" ] || continue
        keep=0
        for spec in "${SPECS[@]}"; do
            case "$(basename "$f")" in "${spec/==/-}"-*) keep=1 ;; esac
        done
        [ "$keep" = 1 ] || rm -f "$f"
    done
done
echo "== pip download ${SPECS[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DIST" "${SPECS[@]}"

echo "== checking every Requires-Dist"
"$PY" - "$DIST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
# On the GPU machine already (its package list, /work/.library/device/KINDS.md).
DEVICE_HAS = set(map(canonicalize_name, """
    anyio attrs certifi click filelock fsspec h11 httpcore httpx huggingface-hub hypothesis
    idna iniconfig jinja2 markupsafe matplotlib numpy packaging pluggy prometheus-client
    pygments pytest pytest-timeout pyyaml regex requests safetensors setuptools
    sortedcontainers sympy tokenizers torch tqdm transformers typing-extensions urllib3
""".split()))
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "os_name": "posix",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
dist = Path(sys.argv[1])
names: dict[str, str] = {}
reqs: list[tuple[str, Requirement]] = []
for whl in sorted(dist.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    text = meta.decode()
    name = canonicalize_name(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    assert name not in names, f"two wheels of {name}: {names[name]}, {whl.name}"
    names[name] = whl.name
    for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        r = Requirement(line.strip())
        if r.marker is None or r.marker.evaluate(ENV):
            reqs.append((whl.name, r))
missing = [f"{w}: {r}" for w, r in reqs
           if canonicalize_name(r.name) not in names.keys() | DEVICE_HAS]
assert not missing, "needed and neither on the machine nor in dist/gpu: " + "; ".join(missing)
for w, r in reqs:
    where = "dist/gpu" if canonicalize_name(r.name) in names else "the machine"
    print(f"  {w}: {r} ({where})")
print("wheels: " + ", ".join(sorted(names.values())))
EOF

# ----- 3. sizes and the call -----------------------------------------------------------------
"$PY" - "$DIST" <<'EOF'
import subprocess, sys
from pathlib import Path
dist = Path(sys.argv[1])
size = sum(f.stat().st_size for f in dist.rglob("*") if f.is_file())
assert size < 30 * 2**20, f"{dist} is {size / 2**20:.1f} MiB (keep it under 30)"
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       check=True, capture_output=True).stdout.split(b"\0")
tree = sum(p.stat().st_size for p in map(Path, map(bytes.decode, filter(None, files)))
           if p.is_file() and not p.is_symlink())
total = tree + size
assert total < 64 * 2**20, f"the call would send {total / 2**20:.1f} MiB (max 64)"
print(f"== {dist}: {size / 2**20:.1f} MiB; the call sends about {total / 2**20:.1f} MiB "
      f"(working tree {tree / 2**20:.1f} MiB + {dist})")
EOF
echo "== the device tool's run call (one call; then give_back):"
print_call
