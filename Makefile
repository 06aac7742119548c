# Fresh machine: `make run` (the default pipeline) and `make test` (the suite).
# Both create .venv from requirements.lock when it is missing or stale.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export AWS_EC2_METADATA_DISABLED := true
export TMPDIR := $(CURDIR)/tmp
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test lint install lock bench bench-scale compile run-local compare clean

# torch: the CPU build unless asked. A torch 2.13.0 wheel that pip finds without an index
# (its configured find-links) is used as it is; else PyTorch's CPU index. For the CUDA
# build: make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (or any index
# that serves torch 2.13.0; PyPI's default build is the CUDA one).
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
ifeq ($(origin TORCH_INDEX_URL),file)
TORCH_LOCAL_FIRST := $(BIN)/pip install -q --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null ||
endif

install: $(VENV)/.installed $(VENV)/.decoder

# the compiled decoder (src/automoe/model/compiled.py; g++ and ninja, about 40 s).
# Without a compiler decoding takes the Python path, with one warning line.
$(VENV)/.decoder: $(VENV)/.installed src/automoe/model/csrc/decoder.cpp
	$(BIN)/python -m automoe.model.compiled || echo "compiled decoder not built: decoding takes the Python path"
	touch $@

$(VENV)/.installed: requirements.lock requirements-dev.lock pyproject.toml
	@mkdir -p $(TMPDIR)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the chosen index (its dependencies are in requirements.lock)
	$(TORCH_LOCAL_FIRST) $(BIN)/pip install -q --no-deps --index-url $(TORCH_INDEX_URL) torch==$(TORCH_VERSION)
	# exactly the locked set, every file checked against the lock's hashes, then a consistency check
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@

lock: install
	$(BIN)/python tools/lock.py

run: install
	@mkdir -p $(TMPDIR) results
	rm -f .automoe/parent_run.json   # one MLflow parent run per execution
	start=$$(date +%s); dvc repro && echo $$(( $$(date +%s) - start )) > results/make_run_seconds.txt
	@echo
	@echo "report:           results/evaluate/report.md"
	@echo "metrics:          reports/evaluate.json and every stage's reports/*.json (dvc metrics show)"
	@echo "MLflow UI:        .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
	@automoe outcome --registration results/register/registration.json
	@echo "make run: done in $$(cat results/make_run_seconds.txt) s"

# `dvc exp show` with the columns that matter (its full table is ~280 columns wide): the
# headline metrics of reports/evaluate.json and the params a run is usually varied by
EXP_COLUMNS := ^(Experiment|Created|State|searched_bleu|dense_bleu|searched_chrf|searched_latency_ratio|speedup|search\.budget\.value|search\.budget\.kind|search\.iterations|measure_latency\.n_archs|train_supernet\.train\.max_updates|retrain\.train\.max_updates|evaluate\.max_sentences)$$
compare: install
	dvc exp show --no-pager --md --drop '.*' --keep '$(EXP_COLUMNS)'

lint: install
	ruff check .
	ruff format --check .

test: install lint
	@mkdir -p $(TMPDIR)
	pytest -q --durations=30

bench: install
	$(BIN)/pip install -q transformers==5.23.0   # the peer library the translation benchmark compares with
	python bench/run_all.py

# WMT scale (about 7 minutes; 36M pairs: PAIRS=300000,1000000,4500000,36000000, about 15 more
# minutes and 25 GB of disk): prepare_data's time and memory, training tokens per update
bench-scale: install
	python bench/scale.py --pairs $(or $(PAIRS),300000,1000000,4500000) --work $(TMPDIR)/scale --json $(TMPDIR)/scale/scale.json

compile: install
	python pipeline.py compile --output pipeline.yaml

run-local: install
	python pipeline.py run-local

clean:
	rm -rf tmp .kfp_local .automoe mlflow.db mlartifacts data reports pipeline.yaml
