# The README's two commands are `make demo` and `make test`; each sets up .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stefx-installed
TORCH   := torch==2.13.0

.PHONY: demo test test-slow lint format bench bench-runtime bench-quality clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel. A bare `torch` requirement pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stefx demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check stefx tests benchmarks examples tools
	$(BIN)/ruff format --check stefx tests benchmarks examples tools

format: $(STAMP)
	$(BIN)/ruff format stefx tests benchmarks examples tools
	$(BIN)/ruff check --fix stefx tests benchmarks examples tools

# Benchmarks, with the other counters the profile is compared against (fvcore, ptflops).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_ste.py
	$(BIN)/python benchmarks/bench_quantize.py
	$(BIN)/python benchmarks/bench_profile.py

# The quantizer runtime against float, torchao and Brevitas (docs/benchmarks.md): ~40 min.
bench-runtime: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_runtime.py --sizes 3m --repeats 9 --compile --memory
	$(BIN)/python benchmarks/bench_runtime.py --sizes 30m --repeats 7 --compile --memory

# QAT quality of the presets: digits CNN (~1.5 min) and a byte-level LM (~15 min a seed).
bench-quality: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_quality_digits.py
	$(BIN)/python benchmarks/bench_quality_lm.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
