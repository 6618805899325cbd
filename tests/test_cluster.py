"""Beyond one machine: every stage runs on a two-node Ray cluster and a two-worker Dask cluster
(cluster/local/two_nodes.sh, run here as it is), with the training ranks on different nodes and
nothing left running afterwards; a worker that cannot see the store or the workdir is named, with
the path, before any work starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import SegPipeError
from pipeline.parallel import SharedPath, check_dask_workers_see, check_ray_nodes_see, path_problems

REPO = Path(__file__).resolve().parents[1]
TWO_NODES = REPO / "cluster" / "local" / "two_nodes.sh"
SUBMIT = REPO / "cluster" / "ray" / "submit.sh"


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def rehearse(dataset: Path, workdir: Path, *flags: str) -> str:
    """Run two_nodes.sh as a user would; its output, after asserting that it succeeded in 9 minutes."""
    script = subprocess.Popen(["bash", str(TWO_NODES), str(dataset), str(workdir), *flags],
                              env={**os.environ, "SEGPIPE_PYTHON": sys.executable},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = script.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        script.send_signal(signal.SIGTERM)  # its EXIT trap stops what it started
        output, _ = script.communicate(timeout=120)
        pytest.fail(f"two_nodes.sh {' '.join(flags)} did not finish within 9 minutes:\n{output[-4000:]}")
    assert script.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_two_ray_nodes_and_two_dask_workers_run_every_stage_and_leave_nothing_running(tmp_path):
    from pipeline.data.dataset import load_dataset
    from pipeline.data.synthetic import make_demo_dataset
    from pipeline.planning.plans import Plans
    from pipeline.preprocessing.store import open_store
    from pipeline.training.splits import load_or_create_splits

    dataset = make_demo_dataset(tmp_path / "Phantom", num_cases=6)
    workdir = tmp_path / "work"
    rehearse(dataset, workdir, "--quick")
    out = workdir / "two_nodes"

    # preprocessing through the Dask scheduler wrote every case
    ds = load_dataset(dataset)
    data_id = Plans.load(workdir / "plans.json").configuration("3d_lean").data_identifier
    assert open_store(workdir / "store.zarr", "r").config(data_id).case_ids() == sorted(ds.case_ids)

    # the two data-parallel ranks ran on the two Ray nodes
    placement = json.loads((workdir / "runs" / "3d_lean" / "fold_0" / "placement.json").read_text())
    assert sorted(w["rank"] for w in placement["workers"]) == [0, 1]
    assert len({w["node_id"] for w in placement["workers"]}) == 2, placement
    assert all(w["node_ip"] == "127.0.0.1" for w in placement["workers"])
    assert (workdir / "runs" / "3d_lean" / "fold_0" / "model_final.pt").is_file()

    # the Ray job predicted every held-out case of fold 0, and they were scored
    heldout = load_or_create_splits(workdir, ds.case_ids).validation_cases("0")
    assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in heldout)
    assert "succeeded" in (out / "predict_job.log").read_text()
    evaluation = json.loads((out / "evaluation" / "summary.json").read_text())
    assert evaluation["foreground_mean"]["dice"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds_per_step"]) == {"preprocess", "train", "predict_job", "evaluate"}

    # every listener was on loopback, and nothing it started outlived it
    listeners = (out / "listeners.txt").read_text().split() if (out / "listeners.txt").exists() else []
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]") for a in listeners), listeners
    processes = json.loads((out / "processes.json").read_text())
    assert {p["name"] for p in processes["started"]} == {"ray-head", "ray-node2", "dask-scheduler",
                                                         "dask-worker-a", "dask-worker-b"}
    assert processes["left_running"] == [] and processes["processes_stopped"] >= 10
    assert not [p["pid"] for p in processes["started"] if running(p["pid"])]


def _can_unshare_mounts() -> bool:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_two_nodes_that_share_no_filesystem_run_every_stage_from_a_bucket(tmp_path):
    """two_nodes.sh --no-shared-fs: its own S3 server on 127.0.0.1 holds the dataset and every artefact; the
    second Ray node and the Dask workers run in mount namespaces where the dataset and the workdir do not exist."""
    pytest.importorskip("moto", reason="moto[server] (a test dependency) is the local S3 server")
    pytest.importorskip("s3fs", reason="s3fs (the [s3] extra) is needed for s3:// URLs")
    if not _can_unshare_mounts():
        pytest.skip("--no-shared-fs needs private mount namespaces (unshare -m: root)")
    from pipeline.data.dataset import load_dataset
    from pipeline.data.synthetic import make_demo_dataset
    from pipeline.training.splits import load_or_create_splits

    dataset = make_demo_dataset(tmp_path / "Phantom", num_cases=6)
    workdir = tmp_path / "work"
    rehearse(dataset, workdir, "--quick", "--no-shared-fs")
    out = workdir / "two_nodes"
    assert [p.name for p in workdir.iterdir()] == ["two_nodes"]  # the pipeline wrote nothing here
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds_per_step"]) == {"upload", "preprocess", "train", "predict_job", "evaluate"}

    # every step was given URLs, and the artefacts are in the bucket (listed before its server stopped)
    storage = summary["storage"]
    bucket = storage["bucket"]
    assert storage["shared_filesystem"] is False and storage["endpoint"].startswith("http://127.0.0.1:")
    assert storage["dataset"] == f"{bucket}/datasets/Phantom" and storage["workdir"] == f"{bucket}/work"
    objects = set((out / "bucket.txt").read_text().split())
    assert len(objects) == storage["objects"]
    for key in ("dataset.json", "imagesTr/phantom_000.nii.gz", "labelsTr/phantom_005.nii.gz"):
        assert f"{storage['dataset']}/{key}" in objects
    for key in ("plans.json", "splits.json", "store.zarr/zarr.json", "runs/3d_lean/fold_0/model_final.pt",
                "runs/3d_lean/fold_0/placement.json", "logs/train.log"):
        assert f"{bucket}/work/{key}" in objects, key
    assert any(o.startswith(f"{bucket}/work/runs/ray/3d_lean_fold0/checkpoint_") for o in objects)
    heldout = load_or_create_splits(tmp_path / "splits.json", load_dataset(dataset).case_ids).validation_cases("0")
    predictions = {o for o in objects if o.startswith(f"{storage['predictions']}/")}
    assert predictions == {f"{storage['predictions']}/{c}.nii.gz" for c in heldout}
    assert f"{storage['evaluation']}/summary.json" in objects
    assert summary["foreground_mean"]["dice"] is not None  # read from the bucket's evaluation/summary.json
    assert "predicting 2 case(s) on 2 Ray worker(s) on 2 node(s)" in (out / "predict_job.log").read_text()

    # the two ranks ran on two nodes, one of them the isolated one
    placement = summary["placement"]
    assert sorted(w["rank"] for w in placement["workers"]) == [0, 1]
    assert len({w["node_id"] for w in placement["workers"]}) == 2, placement
    assert len(summary["isolation"]["ray_node2"]["training_ranks"]) == 1

    # before and after the pipeline: from inside each private namespace the driver's files do not exist
    isolation = json.loads((out / "isolation.json").read_text())
    for label in ("before", "after"):
        check = isolation[label]
        assert check["ok"] and check["driver"]["sees"] == {"dataset": True, "workdir": True, "head_folder": True}
        assert {r["name"] for r in check["isolated"]} == {"ray-node2", "dask-worker-a", "dask-worker-b"}
        for r in check["isolated"]:
            assert r["mount_namespace"] != check["driver"]["mount_namespace"] and not r["processes_outside_it"]
            # a tmpfs covers the dataset and the workdir (/tmp itself, or narrower folders when the
            # checkout or the venv lives under /tmp and must stay visible)
            hidden = [Path(h) for h in r["hidden_by_tmpfs"]]
            for path in (dataset, workdir):
                assert any(h == path or h in path.parents for h in hidden), (path, hidden)
            assert r["sees"] == {"dataset": False, "workdir": False, "head_folder": False}
            assert not r["paths"][str(dataset)]["exists"] and not r["paths"][str(workdir)]["exists"]
        assert summary["isolation"][label]["ok"]

    # every listener, the S3 server's included, was on loopback, and nothing it started outlived it
    listeners = (out / "listeners.txt").read_text().split()
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]") for a in listeners), listeners
    assert f"127.0.0.1:{storage['endpoint'].rsplit(':', 1)[1]}" in listeners
    processes = json.loads((out / "processes.json").read_text())
    assert {p["name"] for p in processes["started"]} == {"s3-server", "ray-head", "ray-node2", "dask-scheduler",
                                                         "dask-worker-a", "dask-worker-b"}
    assert processes["left_running"] == [] and processes["processes_stopped"] >= 10
    assert not [p["pid"] for p in processes["started"] if running(p["pid"])]


def test_a_dask_worker_that_cannot_see_the_store_is_named_before_any_case_is_written(dask_client, synthetic_dataset):
    """A `memory://` store lives in the driver's process only: each Dask worker process sees none,
    as a worker on another machine would not see a driver-local folder."""
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment
    from pipeline.preprocessing.preprocess import run_preprocessing
    from pipeline.preprocessing.store import open_store

    dataset = load_dataset(synthetic_dataset)
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    url = f"memory://segpipe-blind-{os.getpid()}/store.zarr"
    with pytest.raises(SegPipeError) as err:
        run_preprocessing(dataset, plans, "3d_lean", url, client=dask_client, progress=False)
    message = str(err.value)
    workers = sorted(dask_client.scheduler_info()["workers"])
    for address in workers:
        assert f"Dask worker {address} (host " in message
    assert message.count(f"cannot see the store {url}: holds no Zarr store") == len(workers) == 2
    assert "cannot see the dataset" not in message  # the dataset folder it does see
    assert "shared filesystem" in message
    data_id = plans.configuration("3d_lean").data_identifier
    assert open_store(url, "r").config(data_id).case_ids() == []  # nothing was written anywhere

    # the same check passes where the workers do see everything, and says who answered
    checked = check_dask_workers_see(dask_client, [SharedPath("dataset", str(dataset.root))])
    assert sorted(r["address"] for r in checked) == workers and all(r["problems"] == [] for r in checked)


def test_a_ray_node_that_cannot_see_a_path_is_named_with_the_path(ray_session, tmp_path):
    import ray
    import zarr

    url = f"memory://segpipe-blind-{os.getpid()}/ray-store.zarr"
    zarr.open_group(url, mode="w", zarr_format=3)  # in this (driver) process only
    with pytest.raises(SegPipeError) as err:
        check_ray_nodes_see([SharedPath("store", url, "store"), SharedPath("run folder", str(tmp_path), "write")])
    message = str(err.value)
    node_ids = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    for node_id in node_ids:
        assert f"(node {node_id[:12]}, host " in message
    assert f"cannot see the store {url}: holds no Zarr store" in message
    assert "run folder" not in message  # tmp_path it can write

    checked = check_ray_nodes_see([SharedPath("run folder", str(tmp_path), "write")])
    assert sorted(r["node_id"] for r in checked) == sorted(node_ids)
    assert not list(tmp_path.iterdir())  # the write probe cleaned up after itself


def test_path_checks_say_what_is_wrong_with_each_path(tmp_path):
    store = tmp_path / "store.zarr"
    store.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    problems = path_problems([
        SharedPath("dataset", "data/Task04"),
        SharedPath("store", str(tmp_path / "missing.zarr"), "store"),
        SharedPath("store", str(store), "store"),
        SharedPath("run folder", str(a_file), "write"),
        SharedPath("output folder", str(tmp_path), "write"),
    ])
    assert problems == [
        "the dataset data/Task04: is a relative path (workers may run in another folder or on another machine)",
        f"the store {tmp_path / 'missing.zarr'}: does not exist here",
        f"the store {store}: exists but holds no Zarr store here (no zarr.json)",
        f"the run folder {a_file}: is not writable here (Not a directory)",
    ]
    (store / "zarr.json").write_text("{}")
    assert path_problems([SharedPath("store", f"file://{store}", "store")]) == []


def test_submit_sh_makes_paths_absolute_and_passes_config_and_fold_to_every_step(tmp_path):
    """The job runs in a copy of the project, not in the caller's folder: relative paths would land there."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ray").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake_bin / "ray").chmod(0o755)
    result = subprocess.run(
        ["bash", str(SUBMIT), "--address", "http://127.0.0.1:9", "--config", "3d_lean", "--fold", "2",
         "--dask-address", "tcp://127.0.0.1:8", "--predict-flags", "--no-tta", "data/Phantom", "work",
         "in dir", "out", "--", "--epochs", "1"],
        cwd=tmp_path, env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"},
        capture_output=True, text=True, check=True)
    args = result.stdout.splitlines()
    assert args[:4] == ["job", "submit", "--address", "http://127.0.0.1:9"]
    command = args[-1]
    steps = command.split(" && ")
    assert steps[0] == (f"python -m pipeline.cli preprocess {tmp_path}/data/Phantom --workdir {tmp_path}/work "
                        "--config 3d_lean --dask-address tcp://127.0.0.1:8")
    assert steps[1] == (f"python -m pipeline.cli train --workdir {tmp_path}/work --config 3d_lean --fold 2 "
                        "--ray-address auto --epochs 1")
    assert steps[2] == (f"python -m pipeline.cli predict --workdir {tmp_path}/work {tmp_path}/in\\ dir "
                        f"{tmp_path}/out --config 3d_lean --fold 2 --ray-address auto --no-tta")
