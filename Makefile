# MambaXray-CTL — developer and training entry points. `make help` lists the targets.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU build of torch on CPU-only machines; GPU users: `make setup TORCH_SPEC=torch` or use environment.yml.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
CLI        := $(VENV)/bin/mambaxray-ctl

# Training: `make stage1 DATA=iu_xray`, then stage2, stage3, predict, evaluate. DATA is a file in
# configs/data/; configs/$(DATA)/<stage config>.yaml, when present, adds that dataset's settings for the
# stage. The rules (configs, hand-off, checkpoint to predict from) live in `mambaxray-ctl pipeline`
# (src/mambaxray_ctl/pipeline.py); these targets only pass the variables on.
DATA       ?= demo
TRAINER    ?= $(if $(filter demo,$(DATA)),cpu,gpu)
# Stage 1's pretraining method: arm (the paper's), mae or simclr (Table II's alternatives).
STAGE1     ?= arm
# Extra LightningCLI arguments, e.g. ARGS="--trainer.max_epochs=2".
ARGS       ?=
# INIT=path overrides the hand-off (default: the newest export of the previous stage); INIT=none: none.
INIT       ?=
# CKPT=checkpoint (or stage-3 run folder) to predict from; default: the newest stage-3 run's best
# checkpoint by val/score when validation ran, else its last.ckpt.
CKPT       ?=
# PRED=predictions.jsonl to score; default: the newest one under outputs/$(DATA)/stage3/.
PRED       ?=
# RECIPE=paper adds configs/RECIPE/DATA/<stage config>.yaml to a step (after the dataset's, before TRAINER's).
RECIPE     ?=
# `make paper`: the official ARM pretraining weights stage 2 starts from (the paper does not retrain stage 1),
# e.g. MambaXray-VL's Pretrain-L.pth; DATA=demo: default the newest demo stage-1 export. PRETRAIN_FORMAT:
# auto (detected) or a handoff.format (arm-pretrain, mambaxray-vl, vim, backbone).
PRETRAIN   ?=
PRETRAIN_FORMAT ?= auto
# The paper's trainer: 8 GPUs with DDP (configs/trainer/ddp8.yaml), the demo on the CPU; TRAINER=... wins.
PAPER_TRAINER = $(if $(filter command line environment environment override,$(origin TRAINER)),$(TRAINER),$(if \
                $(filter demo,$(DATA)),cpu,ddp8))
PIPELINE    = $(CLI) pipeline
STEP_OPTS   = --data $(DATA) --trainer $(TRAINER) $(if $(RECIPE),--recipe $(RECIPE))
DEMO_DATA   = $(if $(filter demo,$(DATA)),demo-data)

.PHONY: help setup setup-cuda test test-full lint bench clean demo demo-data stage1 stage2 stage3 \
        predict evaluate ablation paper

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

stage1: setup $(DEMO_DATA)  ## stage 1 (pretraining, STAGE1=arm|mae|simclr) on DATA; export -> outputs/DATA/stage1/version_*/
	$(PIPELINE) stage1 $(STEP_OPTS) --method $(STAGE1) $(if $(INIT),--init $(INIT)) -- $(ARGS)

stage2: setup $(DEMO_DATA)  ## stage 2 (contrastive) from the newest stage-1 export (or INIT=path|none)
	$(PIPELINE) stage2 $(STEP_OPTS) $(if $(INIT),--init $(INIT)) -- $(ARGS)

stage3: setup $(DEMO_DATA)  ## stage 3 (report generation) from the newest stage-2 export (or INIT=path|none)
	$(PIPELINE) stage3 $(STEP_OPTS) $(if $(INIT),--init $(INIT)) -- $(ARGS)

predict: setup $(DEMO_DATA)  ## predictions.jsonl for the test split from CKPT (default: newest stage-3 run, best val/score else last)
	$(PIPELINE) predict $(STEP_OPTS) $(if $(CKPT),--ckpt $(CKPT)) -- $(ARGS)

paper: setup $(DEMO_DATA)  ## the paper's recipe: stage 2 from PRETRAIN=file -> stage 3 -> predict -> metrics (8 GPUs)
	$(PIPELINE) paper --data $(DATA) --trainer $(PAPER_TRAINER) $(if $(PRETRAIN),--init $(PRETRAIN)) \
		--init-format $(PRETRAIN_FORMAT) -- $(ARGS)

ablation: setup  ## Table II rows (stage-1 choice, stage 2 on/off, CTL-FT on/off) on the demo world, CPU
	$(CLI) ablation

evaluate: setup  ## score PRED=path/to/predictions.jsonl (default: the newest of DATA) with the paper's protocol
	$(PIPELINE) evaluate --data $(DATA) $(if $(PRED),--predictions $(PRED))

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
