# The README's two commands are `make demo` and `make test`; each sets up .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stefx-installed
TORCH   := torch==2.13.0

.PHONY: demo test test-slow lint format bench bench-runtime bench-quality bench-docs clean

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

# Every block of docs/benchmarks.md, each rewritten by the script that measures it
# (--write-docs; benchmarks/docpage.py). Hours on 2 cores; run it on a quiet machine, and
# build llama-cpp-python first (pip install llama-cpp-python, ~12 min) for the GGUF rows.
DOCS := --write-docs
bench-docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_ste.py $(DOCS)
	$(BIN)/python benchmarks/bench_quantize.py $(DOCS)
	$(BIN)/python benchmarks/bench_profile.py $(DOCS)
	$(BIN)/python benchmarks/bench_estimate.py $(DOCS)
	$(BIN)/python benchmarks/bench_runtime.py --sizes 3m --repeats 9 --compile --memory $(DOCS)
	$(BIN)/python benchmarks/bench_runtime.py --sizes 30m --repeats 7 --compile --memory $(DOCS)
	$(BIN)/python benchmarks/bench_runtime.py --sizes 30m --repeats 7 --compile --variants float,stefx:w4a8,stefx:bitnet-b158,stefx:bnn,plain-ste $(DOCS)
	$(BIN)/python benchmarks/bench_runtime.py --sizes 3m --breakdown w4a8 $(DOCS)
	$(BIN)/python benchmarks/bench_runtime.py --sizes 30m --breakdown w4a8 $(DOCS)
	$(BIN)/python benchmarks/sweep_hf.py $(DOCS)
	$(BIN)/python benchmarks/bench_finetune.py $(DOCS)
	$(BIN)/python benchmarks/bench_quality_digits.py --threads 1 $(DOCS)
	$(BIN)/python benchmarks/bench_quality_lm.py --seeds 3 --jobs 3 --plot docs/img/quality_lm.png $(DOCS)
	$(BIN)/python benchmarks/bench_quality_lm.py --presets xnor,bireal,bnn --plain none --seeds 3 \
	    --jobs 3 --block "bench_quality_lm binary-activations" $(DOCS)
	$(BIN)/python benchmarks/bench_convert.py $(DOCS)
	$(BIN)/python benchmarks/bench_onnx.py --repeats 15 $(DOCS)
	$(BIN)/python benchmarks/bench_gguf.py $(DOCS)
	$(BIN)/python benchmarks/bench_gguf.py --speed-only $(DOCS)
	$(BIN)/python benchmarks/bench_demo.py --plot docs/img/demo.png $(DOCS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
