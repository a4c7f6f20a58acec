# The two README commands: `make study` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup study test lint bench

setup: $(VENV)/.installed

# constraints-cpu.txt pins the CPU build of torch (a bare `torch>=2.3` pulls a CUDA build).
# The hf extra (transformers, tokenizers) is installed too, so the text/transformer tests run.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e ".[dev,hf]"
	touch $@

study: setup
	$(BIN)/kd-lightning study experiments/digits/study_core.yaml

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check kd_lightning tests benchmarks
	$(BIN)/ruff format --check kd_lightning tests benchmarks

bench: setup
	$(BIN)/python benchmarks/distillation_step_overhead.py
