#!/usr/bin/env bash
# Issue 13's device check, on the GPU machine: the one command `scripts/gpu_check.sh` prints
# for the device tool's `run` (carry ["dist/gpu"]). Installs the wheels of dist/gpu (ferrumkv,
# built by gpu_check.sh for manylinux_2_28, and the test-only packages the machine lacks)
# into /tmp/site, then runs scripts/gpu_device.py: the CUDA tests, the bandwidth benchmark
# and the trace replay on cuda:0 and cpu, each with its own time limit, logs under $OUT and
# a summary table printed last.
#
#   bash scripts/gpu_device.sh                                # on the GPU machine ($OUT set)
#   FERRUMKV_GPU_CHECK_DEVICE=cpu bash scripts/gpu_device.sh  # local mode: the in-place build
#
# Local mode (FERRUMKV_GPU_CHECK_DEVICE=cpu) installs nothing and runs with .venv's python
# unless FERRUMKV_GPU_CHECK_INSTALL=1 (then the wheels, as on the device). Other knobs
# (scripts/gpu_device.py --help): FERRUMKV_GPU_CHECK_QUICK=1, FERRUMKV_GPU_CHECK_BUDGET=S,
# FERRUMKV_GPU_CHECK_PYTEST="tests/...", FERRUMKV_GPU_CHECK_REPLAY_ARGS="...".
set -u
cd "$(dirname "$0")/.."

DEVICE="${FERRUMKV_GPU_CHECK_DEVICE:-cuda:0}"
OUT="${OUT:-$PWD/out/gpu-check}"
SITE="${FERRUMKV_GPU_CHECK_SITE:-/tmp/site}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [ "$DEVICE" = cpu ]; then
    INSTALL="${FERRUMKV_GPU_CHECK_INSTALL:-0}"
    PY="${FERRUMKV_GPU_CHECK_PYTHON:-}"
    if [ -z "$PY" ]; then
        if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
    fi
else
    INSTALL="${FERRUMKV_GPU_CHECK_INSTALL:-1}"
    PY="${FERRUMKV_GPU_CHECK_PYTHON:-python3}"
fi

ARGS=(--device "$DEVICE" --out "$OUT")
if [ "$INSTALL" = 1 ]; then
    LOG="$(mktemp /tmp/ferrumkv-gpu-install.XXXXXX)"
    shopt -s nullglob
    WHEELS=(dist/gpu/*.whl)
    if [ ${#WHEELS[@]} -eq 0 ]; then
        echo "no wheels in dist/gpu: run scripts/gpu_check.sh here and carry dist/gpu" >"$LOG"
        RC=2
    else
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${WHEELS[@]}" >"$LOG" 2>&1
        RC=$?
        printf 'installed into %s: %s\n' "$SITE" "${WHEELS[*]##*/}" >>"$LOG"
    fi
    cat "$LOG"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    ARGS+=(--expect-site "$SITE" --install-log "$LOG" --install-rc "$RC")
fi

exec "$PY" scripts/gpu_device.py "${ARGS[@]}" "$@"
