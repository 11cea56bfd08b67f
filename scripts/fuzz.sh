#!/usr/bin/env bash
# Coverage-guided fuzzing of the engine on stable Rust: builds the libFuzzer target
# (rust/fuzz/fuzz_targets/ops.rs) with sanitizer-coverage instrumentation passed through
# RUSTFLAGS (no -Z flag, no cargo-fuzz), then fuzzes for SECONDS (default 60) starting from
# the checked-in seed corpus. Fails on any crash, panic, hang (-timeout) or leak of memory
# past -rss_limit_mb; the input that failed is written to target/fuzz/artifacts/ops/.
#
#   scripts/fuzz.sh [SECONDS]         # make fuzz runs it for 300 s, make check for a short run
#   FUZZ_ARGS="-jobs=2" scripts/fuzz.sh 600
#
# New inputs go to target/fuzz/corpus/ops (kept between local runs); the checked-in corpus
# (rust/fuzz/corpus/ops) is only read. To keep a crash as a regression test, minimize it
# (see the message printed on failure) and copy it into rust/fuzz/corpus/ops/.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-60}"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
DIR=target/fuzz
SEEDS=rust/fuzz/corpus/ops

# The flags cargo-fuzz passes, minus -Zsanitizer (nightly only). `--target` keeps them off
# build scripts and proc macros, which are not linked with libFuzzer.
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions"
# Optimized, with debug assertions and overflow checks, without LTO (faster to build).
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only

t0=$(date +%s)
# libFuzzer's own C++ (compiled by libfuzzer-sys's build script) at -O2 without debug info:
# the default (-O3 -g) takes several times longer to build, and at -O0 its comparison
# tracing costs more than the engine does.
cargo build --release --quiet -p ferrumkv-fuzz --bin ops --target "$HOST" --target-dir "$DIR" \
    --config 'profile.release.package.libfuzzer-sys.opt-level=2' \
    --config 'profile.release.package.libfuzzer-sys.debug=false'
echo "fuzz: instrumented build took $(( $(date +%s) - t0 )) s"

BIN="$DIR/$HOST/release/ops"
mkdir -p "$DIR/corpus/ops" "$DIR/artifacts/ops"
# shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
if ! "$BIN" "$DIR/corpus/ops" "$SEEDS" \
    -max_total_time="$SECS" -timeout=60 -rss_limit_mb=4096 -max_len=2048 \
    -artifact_prefix="$DIR/artifacts/ops/" -print_final_stats=1 ${FUZZ_ARGS:-}; then
    echo >&2 "fuzz: FAILED. The input is in $DIR/artifacts/ops/. To see and shrink it:"
    echo >&2 "  FERRUMKV_FUZZ_TRACE=1 cargo run -p ferrumkv-fuzz --bin ops -- $DIR/artifacts/ops/crash-..."
    echo >&2 "  $BIN -minimize_crash=1 -runs=20000 -artifact_prefix=$DIR/artifacts/ops/min- $DIR/artifacts/ops/crash-..."
    exit 1
fi
echo "fuzz: no failure in $SECS s"
