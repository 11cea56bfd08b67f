# The one place that says how to build, run and test ferrumkv; CI calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help venv build dev run test check rust-checks rust-test cargo-test fuzz fuzz-smoke py-lint typecheck docs py-test py-test-fast fmt bench gpu-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

# requirements-dev.lock pins every version (and what the requirements pull in) as constraints.
$(VENV)/.ready: requirements-dev.txt requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -c requirements-dev.lock
	touch $@

venv: $(VENV)/.ready ## the virtual environment with the dev requirements

build: venv ## the extension, optimized, into the venv (run, bench and the tests use it)
	maturin develop --release --quiet

dev: venv ## the extension unoptimized, for a quick edit loop (make build again before make run)
	maturin develop --quiet

run: build ## the main job: replay the default workload
	$(PY) -m ferrumkv replay

rust-checks: venv ## rustfmt and clippy (also with shuttle)
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p ferrumkv-core --all-targets --features shuttle -- -D warnings

# The second line model-checks the engine's thread handshakes with shuttle (about 10 s).
rust-test: cargo-test ## cargo test, and the shuttle model check
	cargo test -p ferrumkv-core --features shuttle --test shuttle_handshake

cargo-test: venv ## cargo test
	cargo test --workspace

# Coverage-guided fuzzing of the engine (libFuzzer, on stable: scripts/fuzz.sh).
FUZZ_SECS ?= 300
fuzz: ## coverage-guided fuzzing for FUZZ_SECS (default 300)
	scripts/fuzz.sh $(FUZZ_SECS)

# The bounded run `make check` makes, after the instrumented build (about 45 s on 2 idle cores).
FUZZ_SMOKE_SECS ?= 30
fuzz-smoke: ## the bounded fuzz run of make check
	scripts/fuzz.sh $(FUZZ_SMOKE_SECS)

py-lint: venv ## ruff check and ruff format --check
	ruff check python tests benches examples scripts
	ruff format --check python tests benches examples scripts

# mypy --strict over python/ferrumkv (settings in pyproject.toml, [tool.mypy]), and the
# hand-written stub of the extension checked against the built module.
typecheck: build ## mypy --strict and stubtest
	$(PY) -m mypy
	$(PY) -m mypy.stubtest ferrumkv._core

# The API reference from the docstrings (mkdocs.yml, docs/) into site/. --strict fails the build
# on an object, a cross-reference or a relative link that does not resolve; not -q, which hides
# the warnings --strict counts. It reads the built extension's docstrings, so it needs build.
docs: build ## build the API reference into site/ (mkdocs build --strict)
	mkdocs build --strict

py-test: build ## pytest, every test (the slow ones too)
	$(PY) -m pytest

# The edit loop's tests: no `slow` test (subprocesses, stress, the CLI), the model-based
# test at 150 examples instead of 1,100, and any test that runs past 60 s fails.
py-test-fast: build ## pytest without the slow tests, 60 s a test at most
	FERRUMKV_MODEL_EXAMPLES=150 $(PY) -m pytest -m "not slow" --timeout 60 --durations=5

test: rust-checks cargo-test py-lint typecheck docs py-test-fast ## the fast suite (the edit loop)

check: rust-checks rust-test fuzz-smoke py-lint typecheck docs py-test ## everything: CI runs this

fmt: venv ## format Rust and Python, and apply ruff's safe fixes
	cargo fmt --all
	ruff check --fix python tests benches examples scripts
	ruff format python tests benches examples scripts

bench: build ## the benchmark suite
	$(PY) -m ferrumkv bench

# Issue 13's device check, local part (scripts/gpu_check.sh): the manylinux_2_28 wheel built with
# zig and the test-only wheels the GPU machine lacks, into dist/gpu; prints the one device `run`
# call that runs scripts/gpu_device.sh there.
gpu-check: venv ## the device check's local part; prints the one device call
	VENV=$(VENV) scripts/gpu_check.sh

clean: ## cargo clean and the venv
	cargo clean
	rm -rf $(VENV)
