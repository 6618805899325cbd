"""Security: model files are never unpickled as code, the services we start listen on loopback only,
and a dataset cannot point the pipeline at files outside its folder.

The listening sockets are read from /proc (the kernel's view), for every process of a session the
test starts, so a Ray agent or Dask worker bound to 0.0.0.0 cannot hide behind a reported address.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_bad_input import cli_env

from pipeline.errors import BadInputError, SegPipeError

# ---------------------------------------------------------------- malicious checkpoints


class _Payload:
    """Unpickling this runs os.mkdir(marker): the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _malicious_model(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": _Payload(marker), "configuration": "3d_fullres", "epoch": 1,
                "num_input_channels": 1, "num_classes": 3, "label_values": [0, 1, 2], "plans_hash": "x"}, path)


@pytest.fixture
def run_dir_with_malicious_model(tmp_path):
    """A run folder as inference finds it (plans.json + model_final.pt), the model a code-running pickle."""
    from pipeline.data.dataset import load_dataset
    from pipeline.data.synthetic import make_demo_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment

    ds = load_dataset(make_demo_dataset(tmp_path / "Phantom", num_cases=2, seed=4))
    plans = plan_experiment(compute_fingerprint(ds, client=None, progress=False), ds)
    run_dir = tmp_path / "W" / "runs" / "3d_fullres" / "fold_0"
    run_dir.mkdir(parents=True)
    plans.save(run_dir / "plans.json")
    marker = tmp_path / "pwned"
    _malicious_model(run_dir / "model_final.pt", marker)
    return tmp_path / "W", run_dir, marker


def test_the_payload_is_live_so_the_refusals_below_mean_something(tmp_path):
    marker = tmp_path / "control_marker"
    _malicious_model(tmp_path / "control.pt", marker)
    torch.load(tmp_path / "control.pt", weights_only=False)  # what a careless loader would do
    assert marker.is_dir()


def test_inference_and_training_refuse_a_pickle_that_would_run_code(run_dir_with_malicious_model, reliability):
    from pipeline.inference.predictor import Predictor
    from pipeline.training.launch import collect_result
    from pipeline.training.loop import load_trained_network

    workdir, run_dir, marker = run_dir_with_malicious_model
    reliability["bad_inputs"] += 1
    refused = r"refused to load .*model_final\.pt: not a plain tensor file .*GLOBAL posix\.mkdir"
    with pytest.raises(SegPipeError, match=refused):
        load_trained_network(run_dir)
    with pytest.raises(SegPipeError, match=refused):
        Predictor.load(workdir, "3d_fullres", "0")
    with pytest.raises(SegPipeError, match=refused):
        collect_result(run_dir, None, None)  # what `segpipe train` reads back at the end of a run
    assert not marker.exists()


def test_a_training_checkpoint_that_would_run_code_is_refused_on_resume(tmp_path):
    """Resuming (after `--resume` or a Ray worker restart) loads the checkpoint's model.pt and state.pt."""
    from ray.train import Checkpoint

    from pipeline.training.loop import _WorkerRun

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save(_Payload(marker), checkpoint / "model.pt")
    torch.save(_Payload(marker), checkpoint / "state.pt")
    run = object.__new__(_WorkerRun)  # only the restore step, without a Ray worker around it
    run.device, run.net = torch.device("cpu"), torch.nn.Linear(1, 1)
    with pytest.raises(SegPipeError, match=r"refused to load .*model\.pt"):
        run._restore(Checkpoint.from_directory(str(checkpoint)))
    assert not marker.exists()


def test_the_cli_refuses_it_too_in_one_line(run_dir_with_malicious_model, tmp_path):
    workdir, run_dir, marker = run_dir_with_malicious_model
    (tmp_path / "in").mkdir()
    shutil.copy(next((tmp_path / "Phantom" / "imagesTr").glob("*.nii.gz")), tmp_path / "in" / "case_0000.nii.gz")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", "--workdir", str(workdir),
                          str(tmp_path / "in"), str(tmp_path / "out"), "--no-tta"],
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error refused to load "), run.stderr
    assert "weights_only=False" not in run.stderr  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()
    assert not list(tmp_path.glob("out/*.nii.gz"))


# ---------------------------------------------------------------- services on loopback only


LISTENERS = textwrap.dedent('''
    import json, os, socket, sys, time

    def _addr(hexaddr):
        ip, port = hexaddr.split(":")
        raw = bytes.fromhex(ip)
        if len(raw) == 4:
            return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
        return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))), int(port, 16)

    def listeners():
        """(pid, command, ip, port) of every listening TCP socket of a process in this session."""
        me, inodes = os.getsid(0), {}
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getsid(int(p)) != me:
                    continue
                for fd in os.listdir(f"/proc/{p}/fd"):
                    link = os.readlink(f"/proc/{p}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = int(p)
            except OSError:
                continue
        found = []
        for table in ("tcp", "tcp6"):
            for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                    pid = inodes[f[9]]
                    try:
                        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0].decode()[-60:]
                    except OSError:
                        cmd = "?"
                    found.append((pid, cmd, *_addr(f[1])))
        return found
''')


def _run_in_own_session(body: str, timeout: float = 240) -> dict:
    """Run `body` (which prints one JSON line last) in a new session; end whatever it leaves behind."""
    proc = subprocess.Popen([sys.executable, "-c", LISTENERS + textwrap.dedent(body)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getsid(int(p)) == proc.pid and int(p) != os.getpid():
                    os.kill(int(p), 9)
            except OSError:
                continue
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _is_loopback(ip: str) -> bool:
    if ip.startswith("::ffff:"):
        ip = ip[len("::ffff:"):]
    try:
        return ip == "::1" or (socket.inet_aton(ip)[0] == 127 if ":" not in ip else False)
    except OSError:
        return False


def test_ray_started_for_training_and_prediction_listens_on_loopback_only():
    found = _run_in_own_session('''
        import ray
        from pipeline.parallel import ray_session

        out = {}
        with ray_session(None):  # what `segpipe train` does without --ray-address
            time.sleep(2)  # let the agents open their ports
            node = ray._private.worker.global_worker.node
            out["train"] = {"node_ip": node.node_ip_address, "webui_url": node.address_info.get("webui_url"),
                            "listeners": listeners()}
        with ray_session(None, num_cpus=1):  # what `segpipe predict --num-workers` does
            time.sleep(2)
            node = ray._private.worker.global_worker.node
            out["predict"] = {"node_ip": node.node_ip_address, "listeners": listeners()}
        print(json.dumps(out))
    ''')
    for use in ("train", "predict"):
        assert found[use]["node_ip"] == "127.0.0.1"
        listeners = found[use]["listeners"]
        assert len(listeners) >= 3, listeners  # GCS, raylet, agents: the check is not vacuous
        public = [entry for entry in listeners if not _is_loopback(entry[2])]
        assert not public, f"{use}: Ray listens beyond loopback: {public}"
    assert not found["train"]["webui_url"]  # include_dashboard=False: no dashboard URL is served


def test_dask_local_cluster_listens_on_loopback_only():
    found = _run_in_own_session('''
        from pipeline.parallel import dask_client

        with dask_client(workers=2) as client:
            info = client.scheduler_info()
            out = {"scheduler": client.scheduler.address, "workers": sorted(info["workers"]),
                   "nannies": sorted(w["nanny"] for w in info["workers"].values()),
                   "services": {k: v for k, v in info.get("services", {}).items()}, "listeners": listeners()}
        print(json.dumps(out))
    ''', timeout=120)
    assert found["scheduler"].startswith("tcp://127.0.0.1:")
    assert len(found["workers"]) == 2
    assert all(a.startswith("tcp://127.0.0.1:") for a in found["workers"] + found["nannies"])
    # the scheduler's HTTP server (Dask lists it as "dashboard": /health and /metrics, no dashboard
    # pages) is among the listeners below: loopback like the rest
    assert set(found["services"]) <= {"dashboard"}
    assert len(found["listeners"]) >= 5, found["listeners"]  # scheduler, its HTTP, 2 nannies, 2 workers
    public = [entry for entry in found["listeners"] if not _is_loopback(entry[2])]
    assert not public, f"Dask listens beyond loopback: {public}"


# ---------------------------------------------------------------- dataset paths


def _msd(tmp_path: Path) -> tuple[Path, Path]:
    from pipeline.data.synthetic import make_demo_dataset

    ds = tmp_path / "ds"
    shutil.copytree(make_demo_dataset(tmp_path / "Phantom", num_cases=2, seed=5), ds)
    outside = tmp_path / "outside"
    outside.mkdir()
    return ds, outside


def _set_image_path(ds: Path, path: str) -> None:
    meta = json.loads((ds / "dataset.json").read_text())
    meta["training"][0]["image"] = path
    (ds / "dataset.json").write_text(json.dumps(meta))


def _relative_escape(ds, outside):
    shutil.copy(ds / "imagesTr" / "phantom_000.nii.gz", outside / "x.nii.gz")
    _set_image_path(ds, "./imagesTr/../../outside/x.nii.gz")
    return "escapes the dataset folder"


def _absolute_path(ds, outside):
    shutil.copy(ds / "imagesTr" / "phantom_000.nii.gz", outside / "x.nii.gz")
    _set_image_path(ds, str(outside / "x.nii.gz"))
    return "escapes the dataset folder"


def _file_symlink(ds, outside):
    shutil.move(ds / "imagesTr" / "phantom_000.nii.gz", outside / "x.nii.gz")
    (ds / "imagesTr" / "phantom_000.nii.gz").symlink_to(outside / "x.nii.gz")
    return "link that points outside the dataset folder"


def _folder_symlink(ds, outside):
    shutil.move(ds / "labelsTr", outside / "labelsTr")
    (ds / "labelsTr").symlink_to(outside / "labelsTr", target_is_directory=True)
    return "link that points outside the dataset folder"


def _nnunet_label_symlink(ds, outside):
    from pipeline.data.conversion import msd_to_nnunet

    v2 = msd_to_nnunet(ds, ds.parent / "v2")
    shutil.rmtree(ds)
    shutil.move(v2, ds)
    label = next((ds / "labelsTr").glob("*.nii.gz"))
    shutil.move(label, outside / label.name)
    label.symlink_to(outside / label.name)
    return "link that points outside the dataset folder"


@pytest.mark.parametrize("escape", [_relative_escape, _absolute_path, _file_symlink, _folder_symlink,
                                    _nnunet_label_symlink], ids=lambda f: f.__name__.strip("_"))
def test_dataset_paths_that_escape_the_folder_are_rejected(tmp_path, escape, reliability):
    from pipeline.data.dataset import load_dataset
    from pipeline.data.validation import check_dataset

    ds, outside = _msd(tmp_path)
    phrase = escape(ds, outside)
    reliability["bad_inputs"] += 1
    with pytest.raises(BadInputError, match=phrase):
        load_dataset(ds)
    report = check_dataset(ds)
    assert report.problems and all(phrase in p.message for p in report.problems), report.problems
