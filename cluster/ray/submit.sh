#!/usr/bin/env bash
# Submit preprocess + train + predict to a running Ray cluster as one Ray job.
#
#   cluster/ray/submit.sh [--address http://HEAD:8265] [--dask-address tcp://HOST:8786] \
#       DATASET WORKDIR [PREDICT_INPUT PREDICT_OUTPUT] [-- extra `segpipe train` flags]
#
# DATASET and WORKDIR must be paths every node sees (shared filesystem), or the store an fsspec URL.
# The project directory is shipped as the job's working_dir (the nodes need its dependencies
# installed, as cluster/ray/cluster.yaml does). Follow the job with
#   ray job status --address ADDR JOB_ID   and   ray job logs --address ADDR --follow JOB_ID
set -euo pipefail
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
DASK=()
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --dask-address) DASK=(--dask-address "$2"); shift 2 ;;
    --) break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -ge 2 ]] || { sed -n '2,12p' "$0"; exit 2; }
DATASET="$1"; WORKDIR="$2"; shift 2
PRED_IN=""; PRED_OUT=""
if [[ $# -ge 2 && "$1" != "--" ]]; then PRED_IN="$1"; PRED_OUT="$2"; shift 2; fi
[[ "${1:-}" == "--" ]] && shift
TRAIN_FLAGS="$*"

cd "$(dirname "$0")/../.."
STEPS="python -m pipeline.cli preprocess '$DATASET' --workdir '$WORKDIR' ${DASK[*]:-}"
STEPS+=" && python -m pipeline.cli train --workdir '$WORKDIR' --ray-address auto $TRAIN_FLAGS"
if [[ -n "$PRED_IN" ]]; then
  STEPS+=" && python -m pipeline.cli predict --workdir '$WORKDIR' '$PRED_IN' '$PRED_OUT' --ray-address auto"
fi
exec ray job submit --address "$ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "*.zarr", "demo_workdir", "benchmarks/results"], "env_vars": {"PYTHONUNBUFFERED": "1"}}' \
  -- bash -c "$STEPS"
