#!/usr/bin/env bash
# Two Ray nodes and two Dask workers on this machine's loopback, and the whole pipeline through
# them: the closest one machine gets to a cluster, to show that no stage relies on sharing a
# process, a working directory or a node with the driver.
#
#   cluster/local/two_nodes.sh DATASET WORKDIR [--quick]
#
# 1. Ray: a head (`ray start --head`, with the dashboard, whose job server `ray job submit` needs)
#    and a second node, 1 CPU each, every listener on 127.0.0.1, its own temp dir and free ports.
# 2. Dask: a scheduler and two single-threaded workers, each in a working directory of its own.
# 3. preprocess through Dask (--dask-address), train two data-parallel workers through Ray
#    (--ray-address; one per node, checked from the run's placement.json), predict the fold's
#    held-out cases as a Ray job (cluster/ray/submit.sh), evaluate them.
# 4. on exit, success or not: stop every process it started, by PID (never `ray stop`, which would
#    stop every Ray on the machine), and check that none is left.
#
# --quick: 1 epoch of 2 iterations, no test-time augmentation (a smoke run, not a useful model);
# otherwise a 5-minute training budget. CONFIG=... picks the configuration (default 3d_lean).
# Results in WORKDIR/two_nodes/: summary.json (seconds per step, addresses, placement, Dice),
# processes.json (what was started, stopped, left), listeners.txt, every service's and step's log.
# Needs seg-pipeline installed (.venv, or SEGPIPE_PYTHON=/path/to/python). See cluster/README.md.
set -euo pipefail

usage() { sed -n '2,20p' "$0"; exit 2; }
[[ $# -ge 2 ]] || usage
DATASET="$(cd "$1" && pwd)" || { echo "no dataset folder $1" >&2; exit 2; }
mkdir -p "$2"
WORKDIR="$(cd "$2" && pwd)"
QUICK=0
[[ "${3:-}" == "--quick" ]] && QUICK=1
[[ $# -le 2 || "${3:-}" == "--quick" ]] || usage
CONFIG="${CONFIG:-3d_lean}"

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${SEGPIPE_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
BIN="$(dirname "$PY")"
export PATH="$BIN:$PATH"  # `python` inside the Ray job is this one
SEGPIPE=("$PY" -m pipeline.cli)

OUT="$WORKDIR/two_nodes"
mkdir -p "$OUT"
TMP="$(mktemp -d /tmp/segpipe-2n-XXXXXX)"  # short: Ray's socket paths live under it
# Ray listens on loopback only when its node address is 127.0.0.1 and this is set (pipeline/parallel.py,
# keep_local_ray_on_loopback); RAY_TMPDIR keeps every Ray file (sessions, address files) in our folder.
# RAY_AUTH_MODE=token: every client of this cluster sends the token of ~/.ray/auth_token (made by the head if
# missing). No graceful drain on SIGTERM: nothing here serves traffic, and a drain only delays the cleanup by 30s.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_TMPDIR="$TMP" RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 \
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 PYTHONUNBUFFERED=1
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
START=$SECONDS
STARTED=()        # "name:pid" of every process group leader started here
STEP_PID=""       # the pipeline step running now (in the background, so a signal is handled at once)
STEPS_JSON=()

say() { printf '[two_nodes %3ds] %s\n' "$((SECONDS - START))" "$*"; }

# ---------------------------------------------------------------- cleanup by PID

descendants() {  # a pid and, recursively, its children
  local pid="$1" child
  echo "$pid"
  for child in $(ps -eo pid=,ppid= | awk -v p="$pid" '$2 == p {print $1}'); do descendants "$child"; done
}
starttime() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'; }

cleanup() {
  local rc=$? entry pid snapshot=() left=() i
  set +e
  trap - EXIT INT TERM
  # every process we started, with its start time (so a recycled pid is never touched)
  [[ -n "$STEP_PID" ]] && STARTED+=("step:$STEP_PID")
  for entry in "${STARTED[@]}"; do
    for pid in $(descendants "${entry#*:}"); do snapshot+=("$pid:$(starttime "$pid")"); done
  done
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do kill -TERM "${STARTED[i]#*:}" 2>/dev/null; done
  for _ in $(seq 60); do
    left=()
    for entry in "${snapshot[@]}"; do
      pid="${entry%%:*}"
      [[ -n "${entry#*:}" && "$(starttime "$pid")" == "${entry#*:}" ]] && left+=("$pid")
    done
    [[ ${#left[@]} -eq 0 ]] && break
    sleep 0.5
  done
  if [[ ${#left[@]} -gt 0 ]]; then
    say "killing ${#left[@]} process(es) that outlived SIGTERM: ${left[*]}"
    kill -KILL "${left[@]}" 2>/dev/null
    sleep 1
  fi
  wait 2>/dev/null
  left=()
  for entry in "${snapshot[@]}"; do
    pid="${entry%%:*}"
    [[ -n "${entry#*:}" && "$(starttime "$pid")" == "${entry#*:}" ]] && left+=("$pid")
  done
  # nothing that names our temp dir either (a process started after the snapshot)
  for pid in $(pgrep -f -- "$TMP" 2>/dev/null); do [[ "$pid" != "$$" ]] && left+=("$pid"); done
  "$PY" - "$OUT/processes.json" "${#snapshot[@]}" "${left[*]:-}" "${STARTED[@]}" <<'PY'
import json, sys
out, count, left, started = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
json.dump({"started": [{"name": s.split(":")[0], "pid": int(s.split(":")[1])} for s in started],
           "processes_stopped": count, "left_running": [int(p) for p in left]}, open(out, "w"), indent=2)
PY
  if [[ ${#left[@]} -gt 0 ]]; then
    say "ERROR: still running after cleanup: ${left[*]}"
    rc=1
  else
    say "stopped all ${#snapshot[@]} process(es) started here"
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start NAME DIR LOGFILE CMD...: in the background, in DIR, in a session of its own; sets PID
  local name="$1" dir="$2" logfile="$3"
  shift 3
  mkdir -p "$dir"
  (cd "$dir" && exec setsid "$@") >"$logfile" 2>&1 &
  PID=$!
  STARTED+=("$name:$PID")
}

wait_for() {  # wait_for WHAT PID SECONDS CMD...: until CMD succeeds; fail if PID dies or time runs out
  local what="$1" pid="$2" deadline=$((SECONDS + $3))
  shift 3
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { say "ERROR: $what exited while starting; see $OUT"; return 1; }
    [[ $SECONDS -lt $deadline ]] || { say "ERROR: $what not up after $3s; see $OUT"; return 1; }
    sleep 1
  done
}

# ---------------------------------------------------------------- ports, Ray, Dask

read -r GCS DASH CLIENT DASK_PORT AGENT1 AGENT1_GRPC METRICS1 RUNTIME1 AGENT2 AGENT2_GRPC METRICS2 RUNTIME2 < <(
  "$PY" -c "
import socket
socks = [socket.socket() for _ in range(12)]
for s in socks:
    s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])")
RAY_ADDR="127.0.0.1:$GCS"
DASHBOARD="http://127.0.0.1:$DASH"
SCHEDULER="tcp://127.0.0.1:$DASK_PORT"
COMMON_RAY=(--num-cpus=1 --object-store-memory=100000000 --disable-usage-stats)

say "Ray head on $RAY_ADDR (dashboard $DASHBOARD), temp dir $TMP"
start ray-head "$TMP/head" "$OUT/ray_head.log" "$BIN/ray" start --head --block --port="$GCS" \
  --node-ip-address=127.0.0.1 --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
  --ray-client-server-port="$CLIENT" --dashboard-agent-listen-port="$AGENT1" --dashboard-agent-grpc-port="$AGENT1_GRPC" \
  --metrics-export-port="$METRICS1" --runtime-env-agent-port="$RUNTIME1" --temp-dir="$TMP/ray" "${COMMON_RAY[@]}"
HEAD_PID=$PID

# The second node. `ray start --address=...` refuses to join while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# and without it rewrites 127.0.0.1 to the machine's outward address and listens on every interface;
# so, like Ray's own ray.cluster_utils.Cluster, the node is started directly on 127.0.0.1.
NODE2_PY='
import signal, sys, time
import ray._private.node, ray._private.parameter
gcs, temp_dir, agent, agent_grpc, metrics, runtime = sys.argv[1:7]
params = ray._private.parameter.RayParams(
    gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0, resources={"segpipe_node2": 1},
    object_store_memory=100_000_000, temp_dir=temp_dir, include_log_monitor=False, node_manager_port=0,
    dashboard_agent_listen_port=int(agent), metrics_agent_port=int(agent_grpc), metrics_export_port=int(metrics),
    runtime_env_agent_port=int(runtime), min_worker_port=0, max_worker_port=0)
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("node up", node.node_id, flush=True)
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
'
ray_nodes_alive() {
  timeout 30 "$BIN/ray" status --address="$RAY_ADDR" 2>/dev/null | awk '/^Active:/{a=1; next} /^Pending:/{a=0} a && /node_/{n++} END{exit !(n >= '"$1"')}'
}
wait_for "the Ray head" "$HEAD_PID" 180 grep -q "Ray runtime started" "$OUT/ray_head.log"
say "second Ray node"
start ray-node2 "$TMP/node2" "$OUT/ray_node2.log" "$PY" -c "$NODE2_PY" "$RAY_ADDR" "$TMP/ray" \
  "$AGENT2" "$AGENT2_GRPC" "$METRICS2" "$RUNTIME2"
NODE2_PID=$PID

say "Dask scheduler on $SCHEDULER and two workers"
start dask-scheduler "$TMP/dask" "$OUT/dask_scheduler.log" "$BIN/dask" scheduler --host 127.0.0.1 \
  --port "$DASK_PORT" --dashboard-address 127.0.0.1:0
DASK_SCHED_PID=$PID
for w in a b; do
  start "dask-worker-$w" "$TMP/dask-$w" "$OUT/dask_worker_$w.log" "$BIN/dask" worker "$SCHEDULER" --host 127.0.0.1 \
    --nthreads 1 --nworkers 1 --dashboard-address 127.0.0.1:0 --memory-limit 2GiB --name "worker-$w" --local-directory "$TMP/dask-$w"
done
wait_for "the second Ray node" "$NODE2_PID" 180 grep -q "node up" "$OUT/ray_node2.log"
wait_for "the two-node Ray cluster" "$NODE2_PID" 60 ray_nodes_alive 2
wait_for "the Dask cluster" "$DASK_SCHED_PID" 120 "$PY" -c "
from distributed import Client
with Client('$SCHEDULER', timeout='10s') as c:
    c.wait_for_workers(2, timeout=5)"
say "clusters up: 2 Ray nodes, 2 Dask workers"

# every listening socket of the processes started here must be on loopback
if command -v ss >/dev/null; then
  OURS="$(for entry in "${STARTED[@]}"; do descendants "${entry#*:}"; done | paste -sd'|')"
  ss -ltnpH 2>/dev/null | grep -E "pid=($OURS)," | awk '{print $4}' | sort -u >"$OUT/listeners.txt" || true
  if grep -vE '^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):[0-9]+$' "$OUT/listeners.txt"; then
    say "ERROR: the listeners above are not on loopback"
    exit 1
  fi
  say "$(wc -l <"$OUT/listeners.txt") listening socket(s), all on loopback ($OUT/listeners.txt)"
fi

# ---------------------------------------------------------------- the pipeline

step() {  # step NAME CMD...: run, time, log to OUT/NAME.log
  local name="$1" t0=$SECONDS
  shift
  say "$name: $*"
  "$@" >"$OUT/$name.log" 2>&1 &
  STEP_PID=$!
  if ! wait "$STEP_PID"; then
    tail -n 40 "$OUT/$name.log" >&2
    say "ERROR: $name failed (log: $OUT/$name.log)"
    return 1
  fi
  STEP_PID=""
  STEPS_JSON+=("\"$name\": $((SECONDS - t0))")
}

if [[ $QUICK == 1 ]]; then
  TRAIN_FLAGS=(--epochs 1 --iterations-per-epoch 2 --val-iterations 2)
  PREDICT_FLAGS="--no-tta"
else
  TRAIN_FLAGS=(--time-budget-min 5)
  PREDICT_FLAGS=""
fi
RUN_DIR="$WORKDIR/runs/$CONFIG/fold_0"
PRED_IN="$WORKDIR/two_nodes/heldout_images"
PRED_OUT="$WORKDIR/two_nodes/predictions"
cd "$TMP"  # the driver's working directory is no node's: every path below is absolute

step preprocess "${SEGPIPE[@]}" preprocess "$DATASET" --workdir "$WORKDIR" --config "$CONFIG" --dask-address "$SCHEDULER"
step train "${SEGPIPE[@]}" train --workdir "$WORKDIR" --config "$CONFIG" --fold 0 --num-workers 2 \
  --ray-address "$RAY_ADDR" "${TRAIN_FLAGS[@]}"
PLACEMENT_NODES="$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['nodes']))" "$RUN_DIR/placement.json")"
if [[ "$PLACEMENT_NODES" != 2 ]]; then
  say "ERROR: the two training workers ran on $PLACEMENT_NODES node(s), not 2: $RUN_DIR/placement.json"
  exit 1
fi
say "training placement: 2 workers on 2 Ray nodes ($RUN_DIR/placement.json)"

"$PY" - "$DATASET" "$WORKDIR" "$PRED_IN" <<'PY'
import sys
from pathlib import Path

from pipeline.data.dataset import load_dataset
from pipeline.evaluation.crossval import link_inputs
from pipeline.training.splits import load_or_create_splits
from pipeline.workdir import Workdir

dataset = load_dataset(sys.argv[1])
heldout = load_or_create_splits(Workdir.at(sys.argv[2]), dataset.case_ids).validation_cases("0")
link_inputs(dataset, heldout, Path(sys.argv[3]))
PY
rm -rf "$PRED_OUT"
step predict_job "$REPO/cluster/ray/submit.sh" --address "$DASHBOARD" --config "$CONFIG" --steps predict \
  --predict-flags "$PREDICT_FLAGS --num-workers 2" "$DATASET" "$WORKDIR" "$PRED_IN" "$PRED_OUT"
step evaluate "${SEGPIPE[@]}" evaluate "$PRED_OUT" "$DATASET" --out "$OUT/evaluation"

"$PY" - "$OUT/summary.json" "$RUN_DIR/placement.json" "$OUT/evaluation/summary.json" "$((SECONDS - START))" \
  "{$(IFS=,; echo "${STEPS_JSON[*]}")}" "$RAY_ADDR" "$DASHBOARD" "$SCHEDULER" "$CONFIG" "$QUICK" <<'PY'
import json, sys
out, placement, evaluation, seconds, steps, ray, dashboard, dask, config, quick = sys.argv[1:]
summary = {"config": config, "quick": quick == "1", "seconds_total_before_cleanup": int(seconds),
           "seconds_per_step": json.loads(steps), "ray": ray, "dashboard": dashboard, "dask": dask,
           "placement": json.load(open(placement)),
           "foreground_mean": json.load(open(evaluation)).get("foreground_mean")}
json.dump(summary, open(out, "w"), indent=2)
PY
say "done: $OUT/summary.json"
