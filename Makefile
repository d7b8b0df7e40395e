# MoE-DiffuSeq. `make quickstart` and `make test` work on a fresh machine: each installs
# what it needs into .venv first (torch==2.13.0, the CPU build these machines carry).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test lint data bench bench-attention bench-moe bench-sampling bench-compare bench-compare-quick bench-learn bench-long-cost bench-long bench-long-abstracts report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Train the quickstart model on code-outline (built from the running Python's standard
# library), then sample held-out sources and print each beside its reference, scored.
quickstart: install
	$(VENV)/bin/moe-diffuseq fit --config lightning_configs/quickstart.yaml
	$(VENV)/bin/moe-diffuseq evaluate --ckpt runs/quickstart/checkpoints/last.ckpt \
		--data data/code-outline-600/validation.jsonl --limit 64 --show 8 --out runs/quickstart/eval
	@echo "checkpoint: runs/quickstart/checkpoints/last.ckpt  report: runs/quickstart/eval.md"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check moe_diffuseq data_modules tests bench

data: install
	$(VENV)/bin/moe-diffuseq prepare-data code

bench: bench-attention bench-moe bench-compare

bench-attention: install
	$(PY) -m bench.attention

bench-moe: install
	$(PY) -m bench.moe

bench-sampling: install
	$(PY) -m bench.sampling

clean:
	rm -rf runs lightning_logs .pytest_cache

report: install
	$(PY) -m bench.report

bench-compare: install
	$(PY) -m bench.compare

bench-learn: install
	$(PY) -m bench.learn

bench-long-cost: install
	$(PY) -m bench.long_cost

# Item F1 at sources of 1k-8k tokens, equal wall-clock per model (about 2 hours on 2 cores).
bench-long: install
	$(PY) -m bench.long_tasks

# ROUGE-L on vignette body -> abstract at 4k tokens, equal wall-clock (about 25 minutes).
bench-long-abstracts: install
	$(PY) -m bench.long_abstracts

bench-compare-quick: install
	$(PY) -m bench.compare --quick
