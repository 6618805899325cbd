#!/usr/bin/env bash
# Submit preprocess + train + predict to a running Ray cluster as one Ray job.
#
#   cluster/ray/submit.sh [--address http://HEAD:8265] [--dask-address tcp://HOST:8786] [--config NAME]
#       [--fold K] [--steps preprocess,train,predict] [--predict-flags "--no-tta ..."] \
#       DATASET WORKDIR [PREDICT_INPUT PREDICT_OUTPUT] [-- extra `segpipe train` flags]
#
# DATASET, WORKDIR and the prediction folders are URLs every node reaches (s3://, gs://, az://,
# with credentials in the nodes' environment or roles) or paths every node sees (a shared
# filesystem, cluster/README.md); relative paths are made absolute here, since the job runs in a
# copy of the project, not in this folder. Preprocessing runs on Dask workers started on the Ray
# cluster's nodes (`--ray-address auto`), or on your Dask scheduler with --dask-address. The project
# directory is shipped as the job's working_dir (the nodes need its dependencies installed, as
# cluster/ray/cluster.yaml does). `ray job submit` follows the job's log and exits 1 when the job
# fails. Elsewhere: ray job status / logs --address ADDR JOB_ID
set -euo pipefail
ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
DASK=(--ray-address auto)  # preprocessing on the Ray nodes unless --dask-address
CONFIG="3d_fullres"
FOLD="0"
STEPS_WANTED="preprocess,train,predict"
PREDICT_FLAGS=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --dask-address) DASK=(--dask-address "$2"); shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --fold) FOLD="$2"; shift 2 ;;
    --steps) STEPS_WANTED="$2"; shift 2 ;;
    --predict-flags) PREDICT_FLAGS="$2"; shift 2 ;;
    --) break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -ge 2 && "$1" != "--" ]] || { sed -n '2,15p' "$0"; exit 2; }
abspath() { case "$1" in /*|*://*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
DATASET="$(abspath "$1")"; WORKDIR="$(abspath "$2")"; shift 2
PRED_IN=""; PRED_OUT=""
if [[ $# -ge 2 && "$1" != "--" ]]; then PRED_IN="$(abspath "$1")"; PRED_OUT="$(abspath "$2")"; shift 2; fi
[[ "${1:-}" == "--" ]] && shift
TRAIN_FLAGS=()
for flag in "$@"; do TRAIN_FLAGS+=("$(printf '%q' "$flag")"); done

q() { printf '%q' "$1"; }
# the default steps without prediction folders: preprocess and train only
[[ -z "$PRED_IN" && "$STEPS_WANTED" == "preprocess,train,predict" ]] && STEPS_WANTED="preprocess,train"
SEGPIPE="python -m pipeline.cli"
STEPS=()
for step in ${STEPS_WANTED//,/ }; do
  case "$step" in
    preprocess) STEPS+=("$SEGPIPE preprocess $(q "$DATASET") --workdir $(q "$WORKDIR") --config $(q "$CONFIG") ${DASK[*]:-}") ;;
    train) STEPS+=("$SEGPIPE train --workdir $(q "$WORKDIR") --config $(q "$CONFIG") --fold $(q "$FOLD") --ray-address auto ${TRAIN_FLAGS[*]:-}") ;;
    predict)
      [[ -n "$PRED_IN" ]] || { echo "the predict step needs PREDICT_INPUT and PREDICT_OUTPUT" >&2; exit 2; }
      STEPS+=("$SEGPIPE predict --workdir $(q "$WORKDIR") $(q "$PRED_IN") $(q "$PRED_OUT") --config $(q "$CONFIG") --fold $(q "$FOLD") --ray-address auto $PREDICT_FLAGS") ;;
    *) echo "unknown step $step (preprocess, train, predict)" >&2; exit 2 ;;
  esac
done
JOINED="$(printf ' && %s' "${STEPS[@]}")"

cd "$(dirname "$0")/../.."
exec ray job submit --address "$ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "*.zarr", "demo_workdir", "benchmarks/results"], "env_vars": {"PYTHONUNBUFFERED": "1"}}' \
  -- bash -c "${JOINED# && }"
