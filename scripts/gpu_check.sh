#!/usr/bin/env bash
# The GPU check: what CPU-only CI cannot run, on one GPU machine without network, in under 8 minutes
# on an H200 (`make gpu-check`; README "GPU check").
#
#   scripts/gpu_check.sh prepare        here, with network: download what a bare GPU machine lacks into
#                                       build/gpu-check/ (ignored, about 2 MB): pure-Python wheels and
#                                       mamba-ssm's source
#   scripts/gpu_check.sh [--dry-run]    on the GPU machine, from the repository root, build/gpu-check
#                                       carried along:
#     1. install the carried wheels into a private folder (no index, no dependencies);
#     2. build mamba-ssm's selective_scan_cuda for TORCH_CUDA_ARCH_LIST only (default 9.0: H100/H200);
#     3. pytest -m gpu (mamba-ssm's scan against the float64 reference);
#     4. mambaxray-ctl profile: a bf16-mixed training step of every stage at paper size with peak memory,
#        stage 3 with gradient checkpointing off and on, stage 3 with the LLaMA-2-7B-size LM;
#     5. stages 2 and 3 under DDP on 2 GPUs, when there are 2.
#   Each step has a time limit and the run a budget (GPU_CHECK_BUDGET_S, default 450 s): a step that
#   would start past it is reported as skipped. Everything is printed; with $OUT set, the log and the
#   profiles (profiles.json) are written there too. --dry-run prints the steps without running them.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${GPU_CHECK_CARRY:-$ROOT/build/gpu-check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
PYTHON=${PYTHON:-python3}
HOST_PYTHON=${HOST_PYTHON:-$ROOT/.venv/bin/python}
MAMBA_SSM_VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
# Pure-Python packages the GPU machine's image lacks (the versions this project is tested with).
WHEELS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 omegaconf==2.4.0 pycocoevalcap==1.2
  einops==0.8.2)
# mamba-ssm's compile flags (its setup.py) without its list of every GPU architecture, and without its
# -std=c++17: torch's extension builder sets the C++ standard its own headers need.
NVCC_FLAGS='["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
  "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
  "-lineinfo"]'

prepare() {
  local wheels=$CARRY/wheels
  mkdir -p "$wheels"
  "$HOST_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$wheels" "${WHEELS[@]}" || return 1
  # pycocoevalcap without its Java jars and METEOR's paraphrase table (100 MB; the carry limit is
  # 64 MiB): BLEU, ROUGE-L and CIDEr are pure Python, METEOR is reported as unavailable.
  "$HOST_PYTHON" - "$wheels"/pycocoevalcap-*.whl <<'PY' || return 1
import sys
import zipfile
from pathlib import Path

path = Path(sys.argv[1])
with zipfile.ZipFile(path) as wheel:
    entries = {info.filename: wheel.read(info) for info in wheel.infolist()}
kept = {name: data for name, data in entries.items() if name.endswith(".py") or ".dist-info/" in name}
record = next(name for name in kept if name.endswith(".dist-info/RECORD"))
lines = kept[record].decode().splitlines()
kept[record] = "\n".join(line for line in lines if line.split(",")[0] in kept).encode() + b"\n"
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
    for name, data in kept.items():
        wheel.writestr(name, data)
print(f"{path.name}: kept {len(kept)} of {len(entries)} files, {path.stat().st_size / 1e6:.2f} MB")
PY
  # mamba-ssm's source; its setup.py needs these two variables to produce metadata without CUDA.
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$HOST_PYTHON" -m pip download --quiet --no-deps \
    --no-binary :all: --no-build-isolation -d "$CARRY" "mamba-ssm==$MAMBA_SSM_VERSION" || return 1
  du -sh "$CARRY"
}

DRY_RUN=0
START=$SECONDS
SUMMARY=()

# step NAME LIMIT_S COMMAND...: run COMMAND under a time limit, unless the budget is spent.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 15)); then
    echo "== skip: $name (time budget spent)"
    SUMMARY+=("SKIP $name: time budget spent")
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): $*"
  if ((DRY_RUN)); then
    SUMMARY+=("DRY  $name")
    return 0
  fi
  local began=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if ((rc == 0)); then
    SUMMARY+=("OK   $name ($((SECONDS - began)) s)")
  else
    SUMMARY+=("FAIL $name (exit $rc after $((SECONDS - began)) s)")
  fi
  return $rc
}

# profile NAME LIMIT_S OPTION...: one `mambaxray-ctl profile` run, its JSON in $WORK/profiles/NAME.json.
profile() {
  local name=$1 limit=$2
  shift 2
  step "profile $name" "$limit" "$PYTHON" -m mambaxray_ctl profile --accelerator gpu --precision bf16-mixed \
    --steps 2 --ssm-impl "$SSM_IMPL" --configs "$ROOT/configs" --json "$WORK/profiles/$name.json" "$@"
}

build_scan_kernel() {
  local sources=("$CARRY"/mamba_ssm-*.tar.gz)
  local source=${sources[0]}
  if [[ ! -f $source ]]; then
    echo "no mamba-ssm source in $CARRY: run 'scripts/gpu_check.sh prepare' where there is network" >&2
    return 1
  fi
  tar -xzf "$source" -C "$WORK" || return 1
  # Python files only (its setup.py would compile for every architecture), then the one extension.
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip install --quiet --no-index --no-deps \
    --no-build-isolation --no-cache-dir --target "$WORK/site" "$source" || return 1
  # mamba_ssm/__init__.py imports Mamba2/Mamba3, whose kernel packages (tilelang, quack) this machine lacks
  # and the selective scan does not use: keep only its version, so that the scan's module imports.
  echo "__version__ = \"$MAMBA_SSM_VERSION\"" >"$WORK/site/mamba_ssm/__init__.py"
  local name=${source##*/}
  "$PYTHON" - "$WORK/${name%.tar.gz}/csrc/selective_scan" "$WORK/ext" "$NVCC_FLAGS" <<'PY'
import json
import sys
from pathlib import Path

from torch.utils.cpp_extension import load

source, out, flags = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
files = [source / "selective_scan.cpp", *sorted(source.glob("selective_scan_*.cu"))]
load(
    name="selective_scan_cuda",
    sources=[str(f) for f in files],
    extra_include_paths=[str(source)],
    extra_cflags=["-O3"],
    extra_cuda_cflags=flags,
    build_directory=str(out),
    verbose=True,
)
print(f"built {out / 'selective_scan_cuda.so'} from {len(files)} sources")
PY
}

merge_profiles() {
  "$PYTHON" - "$WORK/profiles" "$RESULTS/profiles.json" <<'PY'
import json
import sys
from pathlib import Path

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
profiles = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
out.write_text(json.dumps(profiles, indent=2) + "\n")
for name, result in profiles.items():
    gen = result.get("generation") or {}
    print(
        f"{name:<28} {result['seconds_per_step']:7.2f} s/step  peak {result['peak_memory_bytes'] / 2**30:6.1f} GiB"
        f"  trainable {result['params']['trainable']:>13,}  frozen {result['params']['frozen']:>13,}"
        + (f"  generation {gen['seconds']:.1f} s" if gen else "")
    )
PY
}

check() {
  cd "$ROOT" || return 1
  mkdir -p "$WORK/profiles" "$RESULTS"
  echo "gpu check of $ROOT at $(date -u +%FT%TZ); budget ${BUDGET} s; results in $RESULTS"
  ((DRY_RUN)) || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  export PYTHONPATH="$ROOT/src:$WORK/ext:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  step "install the carried wheels" 60 "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$WORK/site" "$CARRY"/wheels/*.whl
  SSM_IMPL=cuda
  if ! step "build selective_scan_cuda for sm_${TORCH_CUDA_ARCH_LIST/./}" 300 \
    bash "$ROOT/scripts/gpu_check.sh" build-kernel; then
    SSM_IMPL=reference
    echo "!! mamba-ssm's kernel is unavailable: the profiles below use the REFERENCE scan (slow, big)"
  fi
  # Only the files with GPU tests: collecting the others would import packages this machine lacks.
  local gpu_tests
  mapfile -t gpu_tests < <(grep -l "mark.gpu" "$ROOT"/tests/test_*.py)
  step "pytest -m gpu (${#gpu_tests[@]} files)" 90 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "${gpu_tests[@]}"
  profile stage3_iu 120 --stage 3
  profile stage3_iu_checkpointing 90 --stage 3 --gradient-checkpointing --no-generate
  profile stage2 90 --stage 2
  profile stage1_arm 60 --stage 1
  profile stage3_chexpert_llama7b 150 --stage 3 --dataset chexpert_plus
  local gpus
  gpus=${GPU_COUNT:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
  if ((gpus >= 2)); then
    profile stage2_ddp2 120 --stage 2 --devices 2 --strategy ddp
    profile stage3_ddp2 150 --stage 3 --devices 2 --strategy ddp --no-generate
  else
    echo "== skip: DDP on 2 GPUs ($gpus GPU found)"
    SUMMARY+=("SKIP DDP on 2 GPUs: $gpus GPU")
  fi
  profile stage1_mae 60 --stage stage1_mae
  profile stage1_simclr 60 --stage stage1_simclr
  ((DRY_RUN)) || merge_profiles
  echo "== summary ($((SECONDS - START)) s)"
  printf '  %s\n' "${SUMMARY[@]}"
  [[ " ${SUMMARY[*]} " != *"FAIL "* ]]
}

main() {
  case ${1:-} in
    prepare) prepare ;;
    build-kernel) build_scan_kernel ;;
    --dry-run | "")
      [[ ${1:-} == --dry-run ]] && DRY_RUN=1
      RESULTS=${OUT:-$WORK/results}
      mkdir -p "$RESULTS"
      check 2>&1 | tee "$RESULTS/gpu_check.log"
      ;;
    *)
      echo "usage: $0 [prepare | --dry-run | build-kernel]" >&2
      return 2
      ;;
  esac
}

main "$@"
