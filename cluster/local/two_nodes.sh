#!/usr/bin/env bash
# Two Ray nodes and two Dask workers on this machine's loopback, and the whole pipeline through
# them: the closest one machine gets to a cluster, to show that no stage relies on sharing a
# process, a working directory or a node with the driver.
#
#   cluster/local/two_nodes.sh DATASET WORKDIR [--quick] [--no-shared-fs]
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
# --no-shared-fs: the nodes share no filesystem. A local S3 server (moto, 127.0.0.1) holds the dataset
#    (uploaded first) and the pipeline's workdir, predictions and evaluation; every step gets s3:// URLs.
#    The second Ray node and both Dask workers run in private mount namespaces (unshare -m; needs root)
#    with a fresh tmpfs over the folders holding DATASET, WORKDIR and the head's temp dir, which is
#    checked from inside each namespace before and after the pipeline (isolation.json).
# Results in WORKDIR/two_nodes/: summary.json (seconds per step, addresses, placement, Dice),
# processes.json (what was started, stopped, left), listeners.txt, every service's and step's log.
# Needs seg-pipeline installed (.venv, or SEGPIPE_PYTHON=/path/to/python; --no-shared-fs also s3fs
# and moto[server], the test extra). See cluster/README.md.
set -euo pipefail

usage() { sed -n '2,27p' "$0"; exit 2; }
[[ $# -ge 2 ]] || usage
DATASET="$(cd "$1" && pwd)" || { echo "no dataset folder $1" >&2; exit 2; }
mkdir -p "$2"
WORKDIR="$(cd "$2" && pwd)"
QUICK=0
SHARED_FS=1
for flag in "${@:3}"; do
  case "$flag" in
    --quick) QUICK=1 ;;
    --no-shared-fs) SHARED_FS=0 ;;
    *) usage ;;
  esac
done
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

# ---------------------------------------------------------------- --no-shared-fs: a bucket; nodes blind to local files

ISOLATED=()  # "name:pid" of the services started in a private mount namespace
if [[ $SHARED_FS == 0 ]]; then
  "$PY" -c "import s3fs, moto.server" 2>/dev/null \
    || { say "ERROR: --no-shared-fs needs s3fs and moto[server] in $PY (pip install -e '.[test]')"; exit 2; }
  unshare --mount --propagation private true 2>/dev/null \
    || { say "ERROR: --no-shared-fs starts nodes in private mount namespaces (unshare -m): run it as root"; exit 2; }
  # The folders a fresh tmpfs covers in the nodes' namespaces: for each of the dataset, the workdir and the head's
  # temp dir, its highest folder below the system ones (/usr, /opt, /var...) that holds nothing the nodes need
  # (Python, the installed packages, this repository, the token in ~/.ray); /tmp for anything under /tmp.
  HIDE="$("$PY" - "$REPO" "$DATASET" "$WORKDIR" "$TMP" <<'PY'
import os, sys
import pipeline, ray
repo, targets = sys.argv[1], sys.argv[2:]
needed = {os.path.realpath(p) for p in [*filter(None, sys.path), sys.prefix, sys.base_prefix, sys.executable,
                                        os.path.dirname(pipeline.__path__[0]), ray.__path__[0],
                                        os.path.expanduser("~/.ray"), repo]}
SYSTEM = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/proc", "/run",
          "/sbin", "/snap", "/srv", "/sys", "/usr", "/var"}
holds = lambda folder, path: path == folder or path.startswith(folder.rstrip("/") + "/")
hide = []
for target in map(os.path.realpath, targets):
    best, folder = None, target
    while folder not in SYSTEM and not any(holds(folder, n) for n in needed):
        best, folder = folder, os.path.dirname(folder)
    if best is None:
        need = [n for n in needed if holds(target, n)][0]
        sys.exit(f"ERROR: --no-shared-fs cannot hide {target} from the nodes: it holds {need}, which they need; "
                 "put the dataset and the workdir outside the repository and the Python environment")
    hide.append(best)
print(":".join(sorted({h for h in hide if not any(o != h and holds(o, h) for o in hide)})))
PY
)" || exit 2
  # what runs in each new namespace: a tmpfs over each folder of HIDE, the node's own (empty) temp dirs, the command
  # shellcheck disable=SC2016  # a script for `bash -c` in each namespace: it expands its own $1, $2, RAY_TMPDIR
  NS_SH='set -eu
IFS=: read -ra hide <<<"$1"
for folder in "${hide[@]}"; do mount -t tmpfs -o mode=1777 segpipe-hidden "$folder"; done
mkdir -p "$RAY_TMPDIR" "$2"
cd "$2"
shift 2
exec "$@"'
  BUCKET="segpipe-two-nodes"
  S3_DATASET="s3://$BUCKET/datasets/$(basename "$DATASET")"
  S3_WORKDIR="s3://$BUCKET/work"
fi

start_node() {  # start_node NAME DIR LOGFILE CMD...: like start; with --no-shared-fs, in a private mount namespace
  if [[ $SHARED_FS == 1 ]]; then start "$@"; return; fi
  local name="$1" dir="$2" logfile="$3"
  shift 3
  start "$name" "$dir" "$logfile" unshare --mount --propagation private bash -c "$NS_SH" segpipe-ns "$HIDE" "$dir" "$@"
  ISOLATED+=("$name:$PID")
}

isolation_check() {  # isolation_check LABEL: seen from inside each private namespace (nsenter), the dataset, the
  # workdir and the head's folder do not exist (or are the empty tmpfs over them), and every process of the service
  # is in it; the driver's namespace, the control, sees them. Adds LABEL to OUT/isolation.json; fails otherwise.
  local log="$OUT/isolation_$1.log"
  "$PY" - "$OUT/isolation.json" "$1" "$PY" "$$" "$DATASET" "$WORKDIR" "$TMP/head" "${ISOLATED[@]}" >"$log" 2>&1 \
    <<'PY' || { cat "$log" >&2; say "ERROR: isolation check $1 failed ($OUT/isolation.json)"; return 1; }
import json, os, subprocess, sys

out, label, py, driver_pid = sys.argv[1:5]
paths = dict(zip(("dataset", "workdir", "head_folder"), sys.argv[5:8]))
services = [(a.split(":")[0], int(a.split(":")[1])) for a in sys.argv[8:]]
INSIDE = """
import json, os, sys
hidden = [line.split(" - ")[0].split()[4] for line in open("/proc/self/mountinfo")
          if line.split(" - ")[1].split()[1] == "segpipe-hidden"]
print(json.dumps({"hidden_by_tmpfs": hidden, "paths": {p: {
    "exists": os.path.lexists(p), "entries": sorted(os.listdir(p))[:5] if os.path.isdir(p) else [],
    "tmpfs_mount_point": p in hidden} for p in sys.argv[1:]}}))
"""


def look(pid=None):
    cmd = [py, "-c", INSIDE, *paths.values()]
    if pid is not None:  # run in that process's mount namespace
        cmd = ["nsenter", f"--target={pid}", "--mount", "--", *cmd]
    seen = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    sees = {}
    for key, path in paths.items():
        p = seen["paths"][path]
        sees[key] = p["exists"] and (bool(p["entries"]) or not p["tmpfs_mount_point"])
    return {"hidden_by_tmpfs": seen["hidden_by_tmpfs"], "sees": sees, "paths": seen["paths"]}


def namespace(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone meanwhile
        return None


parents = {}
for entry in os.listdir("/proc"):
    try:
        parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
    except (ValueError, OSError):
        pass


def tree(pid):
    out, todo = [pid], [pid]
    while todo:
        node = todo.pop()
        kids = [c for c, p in parents.items() if p == node]
        out, todo = out + kids, todo + kids
    return out


driver = {"mount_namespace": namespace(driver_pid), **look()}
ok = driver["sees"]["dataset"] and driver["sees"]["workdir"]  # else the check could not tell
isolated = []
for name, pid in services:
    own = namespace(pid)
    members = {p: namespace(p) for p in tree(pid)}
    members = {p: ns for p, ns in members.items() if ns is not None}
    outside = [p for p, ns in members.items() if ns != own]
    record = {"name": name, "pid": pid, "mount_namespace": own, "processes": len(members),
              "processes_outside_it": outside, **look(pid)}
    ok = ok and own != driver["mount_namespace"] and not outside and not any(record["sees"].values())
    isolated.append(record)
    print(f"{name} (pid {pid}, {len(members)} processes in {own}; the driver's: {driver['mount_namespace']}) sees "
          + ", ".join(f"{k}: {v}" for k, v in record["sees"].items()) + f"; tmpfs over {record['hidden_by_tmpfs']}")
result = json.load(open(out)) if os.path.exists(out) else {}
result[label] = {"ok": ok, "driver": driver, "isolated": isolated}
json.dump(result, open(out, "w"), indent=2)
sys.exit(0 if ok else 1)
PY
  say "isolation ($1): ${#ISOLATED[@]} services in private mount namespaces see neither the dataset," \
    "the workdir nor the head's folder ($OUT/isolation.json)"
}

# ---------------------------------------------------------------- ports, Ray, Dask

read -r GCS DASH CLIENT DASK_PORT AGENT1 AGENT1_GRPC METRICS1 RUNTIME1 AGENT2 AGENT2_GRPC METRICS2 RUNTIME2 S3_PORT < <(
  "$PY" -c "
import socket
socks = [socket.socket() for _ in range(13)]
for s in socks:
    s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])")
RAY_ADDR="127.0.0.1:$GCS"
DASHBOARD="http://127.0.0.1:$DASH"
SCHEDULER="tcp://127.0.0.1:$DASK_PORT"
COMMON_RAY=(--num-cpus=1 --object-store-memory=100000000 --disable-usage-stats)

if [[ $SHARED_FS == 0 ]]; then
  # every process started from here on (Ray, Dask, the steps) finds the bucket through the environment, as on
  # a real cluster; the credentials are moto's dummies, the endpoint this loopback server
  S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
  unset AWS_PROFILE AWS_SESSION_TOKEN AWS_CONFIG_FILE AWS_SHARED_CREDENTIALS_FILE
  export AWS_ENDPOINT_URL="$S3_ENDPOINT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  say "S3 server (moto) on $S3_ENDPOINT; tmpfs over ${HIDE//:/, } in the second node's and the Dask workers' namespaces"
  start s3-server "$TMP/s3" "$OUT/s3_server.log" "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
  S3_PID=$PID
fi

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
start_node ray-node2 "$TMP/node2" "$OUT/ray_node2.log" "$PY" -c "$NODE2_PY" "$RAY_ADDR" "$TMP/ray" \
  "$AGENT2" "$AGENT2_GRPC" "$METRICS2" "$RUNTIME2"
NODE2_PID=$PID

say "Dask scheduler on $SCHEDULER and two workers"
start dask-scheduler "$TMP/dask" "$OUT/dask_scheduler.log" "$BIN/dask" scheduler --host 127.0.0.1 \
  --port "$DASK_PORT" --dashboard-address 127.0.0.1:0
DASK_SCHED_PID=$PID
for w in a b; do
  start_node "dask-worker-$w" "$TMP/dask-$w" "$OUT/dask_worker_$w.log" "$BIN/dask" worker "$SCHEDULER" --host 127.0.0.1 \
    --nthreads 1 --nworkers 1 --dashboard-address 127.0.0.1:0 --memory-limit 2GiB --name "worker-$w" --local-directory "$TMP/dask-$w"
done
wait_for "the second Ray node" "$NODE2_PID" 180 grep -q "node up" "$OUT/ray_node2.log"
wait_for "the two-node Ray cluster" "$NODE2_PID" 60 ray_nodes_alive 2
wait_for "the Dask cluster" "$DASK_SCHED_PID" 120 "$PY" -c "
from distributed import Client
with Client('$SCHEDULER', timeout='10s') as c:
    c.wait_for_workers(2, timeout=5)"
if [[ $SHARED_FS == 0 ]]; then
  wait_for "the S3 server" "$S3_PID" 60 "$PY" -c "import urllib.request; urllib.request.urlopen('$S3_ENDPOINT/moto-api/', timeout=2)"
fi
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
EVAL_OUT="$OUT/evaluation"
DATA_AT="$DATASET"  # what the steps are given: these paths, or with --no-shared-fs URLs in the bucket
WORK_AT="$WORKDIR"
if [[ $SHARED_FS == 0 ]]; then
  DATA_AT="$S3_DATASET"
  WORK_AT="$S3_WORKDIR"
  RUN_DIR="$S3_WORKDIR/runs/$CONFIG/fold_0"
  PRED_IN="s3://$BUCKET/two_nodes/heldout_images"
  PRED_OUT="s3://$BUCKET/two_nodes/predictions"
  EVAL_OUT="s3://$BUCKET/two_nodes/evaluation"
fi
cd "$TMP"  # the driver's working directory is no node's: every path below is absolute

if [[ $SHARED_FS == 0 ]]; then
  isolation_check before
  upload_dataset() {  # into a new bucket, as is
    "$PY" -c '
import sys
import s3fs
src, url = sys.argv[1:3]
fs = s3fs.S3FileSystem(use_listings_cache=False)
fs.mkdir(url.removeprefix("s3://").split("/")[0])
fs.put(src, url.removeprefix("s3://"), recursive=True)
print(f"{len(fs.find(url))} objects in {url}")' "$DATASET" "$S3_DATASET"
  }
  step upload upload_dataset
fi
step preprocess "${SEGPIPE[@]}" preprocess "$DATA_AT" --workdir "$WORK_AT" --config "$CONFIG" --dask-address "$SCHEDULER"
step train "${SEGPIPE[@]}" train --workdir "$WORK_AT" --config "$CONFIG" --fold 0 --num-workers 2 \
  --ray-address "$RAY_ADDR" "${TRAIN_FLAGS[@]}"
PLACEMENT_NODES="$("$PY" -c "
import json, sys
from pipeline.storage import as_path
print(len(json.loads(as_path(sys.argv[1]).read_text())['nodes']))" "$RUN_DIR/placement.json")"
if [[ "$PLACEMENT_NODES" != 2 ]]; then
  say "ERROR: the two training workers ran on $PLACEMENT_NODES node(s), not 2: $RUN_DIR/placement.json"
  exit 1
fi
say "training placement: 2 workers on 2 Ray nodes ($RUN_DIR/placement.json)"

"$PY" - "$DATA_AT" "$WORK_AT" "$PRED_IN" <<'PY'
import sys

from pipeline.data.dataset import load_dataset
from pipeline.evaluation.crossval import link_inputs
from pipeline.training.splits import load_or_create_splits
from pipeline.workdir import Workdir

dataset = load_dataset(sys.argv[1])
heldout = load_or_create_splits(Workdir.at(sys.argv[2]), dataset.case_ids).validation_cases("0")
link_inputs(dataset, heldout, sys.argv[3])  # links, or copies in the bucket
PY
[[ $SHARED_FS == 0 ]] || rm -rf "$PRED_OUT"  # the bucket is new in every run
step predict_job "$REPO/cluster/ray/submit.sh" --address "$DASHBOARD" --config "$CONFIG" --steps predict \
  --predict-flags "$PREDICT_FLAGS --num-workers 2" "$DATA_AT" "$WORK_AT" "$PRED_IN" "$PRED_OUT"
step evaluate "${SEGPIPE[@]}" evaluate "$PRED_OUT" "$DATA_AT" --out "$EVAL_OUT"
[[ $SHARED_FS == 1 ]] || isolation_check after

STORAGE=""
[[ $SHARED_FS == 1 ]] || STORAGE="s3://$BUCKET $S3_ENDPOINT $S3_DATASET $S3_WORKDIR $PRED_OUT $EVAL_OUT"
"$PY" - "$OUT/summary.json" "$RUN_DIR/placement.json" "$EVAL_OUT/summary.json" "$((SECONDS - START))" \
  "{$(IFS=,; echo "${STEPS_JSON[*]}")}" "$RAY_ADDR" "$DASHBOARD" "$SCHEDULER" "$CONFIG" "$QUICK" "$STORAGE" <<'PY'
import json, os, sys

from pipeline.storage import as_path

out, placement, evaluation, seconds, steps, ray, dashboard, dask, config, quick, storage = sys.argv[1:]
summary = {"config": config, "quick": quick == "1", "seconds_total_before_cleanup": int(seconds),
           "seconds_per_step": json.loads(steps), "ray": ray, "dashboard": dashboard, "dask": dask,
           "placement": json.loads(as_path(placement).read_text()),
           "foreground_mean": json.loads(as_path(evaluation).read_text()).get("foreground_mean")}
if storage:  # --no-shared-fs: what the bucket holds (listed here: the server stops with the rest) and the isolation
    import s3fs

    bucket, endpoint, dataset, workdir, predictions, evaluation_url = storage.split()
    objects = sorted(s3fs.S3FileSystem(use_listings_cache=False).find(bucket))
    listing = os.path.join(os.path.dirname(out), "bucket.txt")
    with open(listing, "w") as f:
        f.writelines(f"s3://{o}\n" for o in objects)
    isolation = json.load(open(os.path.join(os.path.dirname(out), "isolation.json")))
    node2 = open(os.path.join(os.path.dirname(out), "ray_node2.log")).read().split("node up ", 1)[1].split()[0]
    summary["storage"] = {"shared_filesystem": False, "endpoint": endpoint, "bucket": bucket, "dataset": dataset,
                          "workdir": workdir, "predictions": predictions, "evaluation": evaluation_url,
                          "objects": len(objects), "listing": listing}
    summary["isolation"] = {
        label: {"ok": check["ok"], "driver_mount_namespace": check["driver"]["mount_namespace"],
                "driver_sees": check["driver"]["sees"],
                "isolated": [{k: r[k] for k in ("name", "pid", "mount_namespace", "processes", "hidden_by_tmpfs",
                                                "sees")} for r in check["isolated"]]}
        for label, check in isolation.items()}
    # the isolated Ray node's training rank(s): their processes are children of its raylet, in its namespace
    summary["isolation"]["ray_node2"] = {"node_id": node2, "training_ranks": [
        w["rank"] for w in summary["placement"]["workers"] if w["node_id"] == node2]}
json.dump(summary, open(out, "w"), indent=2)
PY
say "done: $OUT/summary.json"
