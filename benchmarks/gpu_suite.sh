#!/usr/bin/env bash
# GPU benchmarks: training-step and inference throughput with CUDA, AMP (float16 autocast + GradScaler)
# and torch.compile, the prediction profile and (with NNUNET_PYTHON and NNUNET_REF) prediction vs
# nnUNetv2_predict on the GPU, unattended, in under 10 minutes (every step runs under `timeout`; a
# step the budget cannot fit is skipped, never left hanging).
#
#   benchmarks/gpu_suite.sh                      # on a machine with an NVIDIA GPU
#   benchmarks/gpu_suite.sh --device cpu --tiny  # the same Python side on the CPU, tiny settings (a smoke test)
#
# Writes benchmarks/results/gpu_train_step, gpu_inference, gpu_profile_predict and gpu_predict
# .{json,md,png} (the same JSON layouts as the CPU benchmarks; with --device cpu: gpu_smoke_*).
# SEGPIPE_BENCH_RESULTS=DIR redirects.
# Environment: VENV (default .venv; created with torch==2.13.0 and the project if missing: that one-time
# install is not counted in the 8 minutes), or PYTHON (an interpreter that already has torch and the
# project's dependencies, e.g. a GPU image's python3 with wheels on PYTHONPATH: used as it is, no venv, the
# repository put first on PYTHONPATH), NNUNET_PYTHON (an interpreter with nnunetv2: adds nnU-Net's
# network + loss to the training-step rows and the prediction comparison, which also needs NNUNET_REF:
# raw/ and preprocessed/ with Dataset004_Hippocampus), GPU_SUITE_BUDGET_S (default 560),
# SEGPIPE_SHARED_DATA (the data folder, default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
TINY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -n ${PYTHON:-} ]]; then  # an interpreter as it is: no venv is created or required
  PY=$(command -v "$PYTHON") || { echo "gpu_suite: PYTHON=$PYTHON is not an interpreter on PATH" >&2; exit 2; }
  VENV="PYTHON=$PY"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  VENV=${VENV:-.venv}
  PY="$VENV/bin/python"
fi
RESULTS=${SEGPIPE_BENCH_RESULTS:-benchmarks/results}
BUDGET_S=${GPU_SUITE_BUDGET_S:-560}
FAILED=()

die() { echo "gpu_suite: $*" >&2; exit 1; }

command -v timeout >/dev/null || die "coreutils 'timeout' is needed"
if [[ $DEVICE == cuda* ]]; then
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine (try --device cpu --tiny)"
  timeout 30 nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi sees no GPU"
  echo "gpu_suite: $(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 4 | paste -sd ';')"
fi

if [[ -z ${PYTHON:-} && ! -x $PY ]]; then
  echo "gpu_suite: $VENV missing: creating it (torch==2.13.0, then the project; one-time, not in the budget)"
  rm -rf "$VENV.partial"
  python3 -m venv "$VENV.partial"
  "$VENV.partial/bin/python" -m pip install -q torch==2.13.0
  "$VENV.partial/bin/python" -m pip install -q -e .
  mv "$VENV.partial" "$VENV"  # only a complete venv takes the name
fi
# what the steps import (zarr, nibabel, upath through the pipeline): a missing package fails here, not minutes in
if ! why=$("$PY" -c "import torch, pipeline.inference.predict, pipeline.training.model, pipeline.training.losses" 2>&1); then
  hint="run 'make install' (or delete $VENV)"
  [[ -n ${PYTHON:-} ]] && hint="install the project's dependencies for it or put them on PYTHONPATH"
  die "$VENV cannot import the project and torch ($(tail -n 1 <<<"$why")): $hint"
fi
if [[ $DEVICE == cuda* ]]; then
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "torch $("$PY" -c 'import torch; print(torch.__version__)') in $VENV cannot use the GPU: install a CUDA build \
(e.g. '$PY -m pip install --force-reinstall torch==2.13.0', the PyPI wheel for Linux x86_64) or point VENV at one"
fi

START=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - START) )); }

# run_step NAME LIMIT_S COMMAND...: the command under `timeout`, its limit cut to what the budget has left
run_step() {
  local name=$1 limit=$2 remaining rc=0
  shift 2
  remaining=$(left)
  if (( remaining < 30 )); then
    echo "gpu_suite: skipping $name: the ${BUDGET_S}s budget is spent" >&2
    FAILED+=("$name (skipped)")
    return 0
  fi
  (( limit > remaining )) && limit=$remaining
  echo "gpu_suite: $name (at most ${limit}s) ..."
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  if (( rc != 0 )); then
    if (( rc == 124 || rc == 137 )); then echo "gpu_suite: $name timed out after ${limit}s" >&2
    else echo "gpu_suite: $name failed (exit $rc)" >&2; fi
    FAILED+=("$name")
  fi
}

export PYTHONUNBUFFERED=1 SEGPIPE_BENCH_RESULTS="$RESULTS"
NNUNET=()
[[ -n ${NNUNET_PYTHON:-} ]] && NNUNET=(--nnunet-python "$NNUNET_PYTHON")

# shellcheck disable=SC2054  # the comma-separated values are single arguments (--variants fp32,amp)
if [[ $DEVICE == cuda* ]]; then
  PREFIX=gpu
  if (( TINY )); then
    TRAIN=(--variants fp32,amp --min-time 1 --max-steps 3 --budget 120)
    INFER=(--cases 1 --configs 3d_lean --tta off --size 64 --forward-variants fp32,amp --forward-min-time 1)
    PROFILE=(--sets hippocampus,64 --cases 2)
    PREDICT=(--cases 4 --lean-cases 4 --tta off --nnunet-procs 3 --ct-cases 0)
  else
    TRAIN=(--variants fp32,amp,torch_compile,amp_compile --min-time 4 --max-steps 200 --budget 200)
    INFER=(--cases 8 --configs 3d_fullres,3d_lean --tta both --size 192 --forward-variants fp32,amp,compile,amp_compile
           --forward-batch 8 --forward-min-time 3 --forward-max-iters 500)
    PROFILE=(--sets hippocampus,ct,256 --cases 20 --large-config 3d_fullres)
    # rows are saved one by one: what the step's limit cuts off is missing, the rest is kept
    PREDICT=(--cases 60 --ct-cases 0 --lean-cases 60 --tta off,on --nnunet-procs 3,0 --size 256 --size-nnunet --timeout 120
             --size-timeout 120)
  fi
else
  PREFIX=gpu_smoke
  TRAIN=(--variants fp32 --threads 2 --batch 1 --min-time 0 --max-steps 1 --budget 120)
  INFER=(--cases 1 --configs 3d_lean --tta off --size 0 --forward-variants fp32 --forward-batch 1 --forward-min-time 0
         --forward-max-iters 1)
  PROFILE=(--sets hippocampus --cases 1 --whole none)
  PREDICT=()
fi

run_step "training step" 230 "$PY" benchmarks/train_step.py --device "$DEVICE" --aug-seconds 0 \
  --name "${PREFIX}_train_step" "${TRAIN[@]}" "${NNUNET[@]}"
run_step "inference" 150 "$PY" benchmarks/inference.py --device "$DEVICE" --name "${PREFIX}_inference" "${INFER[@]}"
run_step "prediction profile" 110 "$PY" benchmarks/profile_predict.py --device "$DEVICE" --name "${PREFIX}_profile_predict" \
  "${PROFILE[@]}"
if [[ ${#PREDICT[@]} -gt 0 && -n ${NNUNET_PYTHON:-} && -n ${NNUNET_REF:-} ]]; then
  run_step "prediction vs nnU-Net" 210 "$PY" benchmarks/predict.py --device "$DEVICE" --name "${PREFIX}_predict" \
    --workers 1 --nnunet-python "$NNUNET_PYTHON" --nnunet-ref "$NNUNET_REF" "${PREDICT[@]}"
elif [[ ${#PREDICT[@]} -gt 0 ]]; then
  echo "gpu_suite: prediction vs nnU-Net not run: it needs NNUNET_PYTHON and NNUNET_REF"
fi

echo
echo "gpu_suite: done in $(( SECONDS - START ))s; results in $RESULTS:"
for f in "$RESULTS/${PREFIX}"_{train_step,inference,profile_predict,predict}.{json,md,png}; do
  [[ -f $f ]] && echo "  $f"
done
if (( ${#FAILED[@]} )); then
  echo "gpu_suite: not complete: ${FAILED[*]}" >&2
  exit 1
fi
