# MambaXray-CTL — developer and training entry points. `make help` lists the targets.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU build of torch on CPU-only machines; GPU users: `make setup TORCH_SPEC=torch` or use environment.yml.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
CLI        := $(VENV)/bin/mambaxray-ctl

# Training: `make stage1 DATA=iu_xray`, then stage2, stage3. DATA is a file in configs/data/;
# configs/$(DATA)/<stage config>.yaml, when present, adds that dataset's settings for the stage.
DATA       ?= demo
TRAINER    ?= $(if $(filter demo,$(DATA)),cpu,gpu)
RUNS       := outputs/$(DATA)
ARGS       ?=
CKPT       ?= $(call newest,$(RUNS)/stage3/*/checkpoints/last.ckpt)
# The newest file matching a glob (runs are versioned: outputs/<data>/stageN/version_K/).
newest      = $(shell ls -t $(1) 2>/dev/null | head -n 1)
configs     = -c configs/data/$(DATA).yaml -c configs/$(1).yaml \
              $(addprefix -c ,$(wildcard configs/$(DATA)/$(1).yaml)) -c configs/trainer/$(TRAINER).yaml
# INIT=path overrides the hand-off; INIT=none starts the stage from scratch.
init_arg    = $(if $(filter none,$(1)),--model.init_args.init_from=null,\
              $(if $(1),--model.init_args.init_from=$(1),$(error no $(2) export under $(RUNS); \
              run `make $(2) DATA=$(DATA)` first or pass INIT=path (INIT=none: no hand-off))))
DEMO_DATA   = $(if $(filter demo,$(DATA)),demo-data)

.PHONY: help setup setup-cuda test test-full lint bench clean demo demo-data stage1 stage2 stage3 \
        predict evaluate ablation

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

# mamba-ssm's kernel (selective_scan_cuda) is compiled against $(VENV)'s torch: MAMBA_FORCE_BUILD skips
# mamba-ssm's download of a prebuilt wheel, MAMBA_KEEP_CUDA_BUILD makes releases that build the kernel
# only on request build it, and --no-binary stops pip reusing a cached mamba-ssm wheel built without it.
setup-cuda:  ## add mamba-ssm with its CUDA kernel to the venv (VENV; needs a CUDA torch there, and nvcc)
	@test -x $(VENV)/bin/pip || { echo "no $(VENV)/bin/pip: run 'make setup TORCH_SPEC=torch' first"; exit 1; }
	@$(PY) -c "import sys, torch; sys.exit(None if torch.version.cuda else \
		'setup-cuda: the torch in $(VENV) is a CPU build; rebuild it: rm -rf $(VENV) && make setup TORCH_SPEC=torch')"
	@$(PY) -c "import sys; from torch.utils.cpp_extension import CUDA_HOME; sys.exit(None if CUDA_HOME else \
		'setup-cuda: no CUDA toolkit found (nvcc): install one matching torch.version.cuda or set CUDA_HOME')"
	$(VENV)/bin/pip install --quiet --upgrade 'setuptools>=77' wheel packaging
	$(VENV)/bin/pip uninstall --yes mamba-ssm
	MAMBA_FORCE_BUILD=TRUE MAMBA_KEEP_CUDA_BUILD=TRUE \
		$(VENV)/bin/pip install --no-build-isolation --no-binary mamba-ssm -e '.[cuda]'
	$(PY) -c "from mambaxray_ctl.ops.cuda import require_mamba_ssm; require_mamba_ssm(); print('mamba-ssm kernel: OK')"

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

demo: setup  ## the whole pipeline on the synthetic world, on a CPU: data, 3 stages, predictions, metrics table
	$(CLI) demo

demo-data: setup  ## generate the synthetic world and its small text models (rebuilt when of an older version)
	$(CLI) demo --data-only

stage1: setup $(DEMO_DATA)  ## stage 1 (ARM pretraining) on DATA; export -> outputs/DATA/stage1/version_*/
	$(CLI) fit $(call configs,stage1_arm) $(ARGS)

stage2: setup $(DEMO_DATA)  ## stage 2 (contrastive) from the newest stage-1 export (or INIT=path|none)
	$(CLI) fit $(call configs,stage2_contrastive) \
		$(call init_arg,$(or $(INIT),$(call newest,$(RUNS)/stage1/*/backbone.safetensors)),stage1) $(ARGS)

stage3: setup $(DEMO_DATA)  ## stage 3 (report generation) from the newest stage-2 export (or INIT=path|none)
	$(CLI) fit $(call configs,stage3_reportgen) \
		$(call init_arg,$(or $(INIT),$(call newest,$(RUNS)/stage2/*/backbone.safetensors)),stage2) $(ARGS)

predict: setup $(DEMO_DATA)  ## predictions.jsonl for the test split from CKPT (default: newest stage-3 last.ckpt)
	$(CLI) predict $(call configs,stage3_reportgen) --ckpt_path $(CKPT) $(ARGS)

ablation: setup  ## Table II rows (stage-1 choice, stage 2 on/off, CTL-FT on/off) on the demo world, CPU
	$(CLI) ablation

evaluate: setup  ## score PRED=path/to/predictions.jsonl with the paper's protocol
	$(CLI) evaluate $(PRED) --dataset $(DATA)

.PHONY: profile gpu-check gpu-check-prepare
# `make profile` options (mambaxray-ctl profile --help); on a GPU, e.g. PROFILE="--stage 3 --gradient-checkpointing".
PROFILE    ?= --stage 3 --batch-size 2 --steps 3

profile: setup  ## a few training steps of a stage at paper size, random weights: memory, s/step, projected run time
	$(CLI) profile $(PROFILE) $(ARGS)

gpu-check-prepare:  ## download what the GPU check needs but a bare GPU machine lacks into build/gpu-check/
	scripts/gpu_check.sh prepare

gpu-check:  ## on a GPU machine (no venv needed, build/gpu-check carried): kernels, paper-size steps, DDP
	scripts/gpu_check.sh

clean:  ## remove caches (not the venv, not data)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
