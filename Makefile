# MambaXray-CTL — developer and training entry points. `make help` lists the targets.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU build of torch on CPU-only machines; GPU users: `make setup TORCH_SPEC=torch` or use environment.yml.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help setup setup-cuda test test-full lint bench clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv and install the package with its test extras (one pip resolve)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install -e '.[test]' '$(TORCH_SPEC)'
	@if $(VENV)/bin/pip list 2>/dev/null | grep -qiE '^(torchvision|timm) '; then \
		echo "torchvision/timm got installed: they break the CPU torch (see README)"; exit 1; fi
	touch $@

setup-cuda:  ## in an active CUDA environment (environment.yml): add mamba-ssm's CUDA kernels
	pip install --no-build-isolation -e '.[cuda]'

test: setup  ## run the fast test suite
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-full: setup  ## run every test, slow ones included
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: setup  ## ruff
	$(VENV)/bin/ruff check src tests bench

bench: setup  ## benchmarks: tables printed, JSON written to bench/results/
	$(PY) bench/bench_scan.py
	$(PY) bench/bench_backbone.py
	$(PY) bench/bench_data.py

clean:  ## remove caches (not the venv, not data)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
