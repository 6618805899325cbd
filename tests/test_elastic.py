"""Elastic Ray as real clusters are: a head with 0 CPUs, workers that join after the job started,
a machine lost mid-training. Training asks Ray for what it needs and waits for it (an autoscaler's
cue), and fails after its timeout saying what it waited for."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from loopback_ray import LoopbackRayCluster

CONFIG = "3d_lean"


def _tiny(plans):
    conf = plans.configurations[CONFIG]
    conf.patch_size, conf.batch_size = [16, 32, 32], 2
    conf.strides, conf.kernel_sizes = [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3
    conf.features_per_stage = [4, 8, 16]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """6 phantom cases preprocessed in this process for a 3-stage 4..16-feature U-Net on 16x32x32 patches."""
    from pipeline import stages
    from pipeline.data.synthetic import make_demo_dataset
    from pipeline.planning.fingerprint import Fingerprint
    from pipeline.planning.planner import plan_experiment
    from pipeline.workdir import Workdir

    root = tmp_path_factory.mktemp("elastic")
    dataset = stages.load_dataset(make_demo_dataset(root / "Phantom", num_cases=6, seed=5))
    wd = Workdir.at(root / "W")
    stages.fingerprint(dataset, wd, progress=False)
    plans = plan_experiment(Fingerprint.load(wd.fingerprint), dataset)
    _tiny(plans)
    plans.save(wd.plans)
    report = stages.preprocess(dataset, wd, CONFIG, plans=plans, progress=False)
    assert not report.failed
    return wd


def _segpipe(cluster: LoopbackRayCluster, *args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=cluster.env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_training_waits_for_a_node_that_joins_later_and_fails_clearly_when_none_does(tiny_workdir, tmp_path):
    wd = tiny_workdir.root
    with LoopbackRayCluster(head_cpus=0) as cluster:
        train = ("train", "--workdir", wd, "--config", CONFIG, "--fold", "0", "--epochs", "1",
                 "--iterations-per-epoch", "2", "--val-iterations", "1", "--ray-address", cluster.address)

        # nobody joins: a clear failure after the timeout, naming what it waited for
        start = time.monotonic()
        failed = _segpipe(cluster, *train, "--resources-timeout-s", "8", cwd=tmp_path)
        assert failed.returncode == 1, failed.stderr
        assert "waited 8 s for 1 training worker(s) of 3d_lean fold 0: 1 x {1 CPU}" in failed.stderr
        assert "Traceback" not in failed.stderr and time.monotonic() - start < 120

        # a node joins 20 s after the job started: the job waits for it, then trains on it
        joined: dict = {}
        late = threading.Timer(20, lambda: joined.setdefault("node", cluster.add_node("late", cpus=2)))
        late.start()
        try:
            done = _segpipe(cluster, *train, "--cpus-per-worker", "2", "--resources-timeout-s", "300", cwd=tmp_path)
        finally:
            late.join()
        assert done.returncode == 0, done.stderr[-3000:]
        assert "waiting up to 300 s for 1 training worker(s)" in done.stderr
        run_dir = wd / "runs" / CONFIG / "fold_0"
        assert (run_dir / "model_final.pt").is_file()
        import json

        placement = json.loads((run_dir / "placement.json").read_text())
        assert placement["nodes"] == [joined["node"]]
        settings = json.loads((run_dir / "train_settings.json").read_text())
        assert settings["cpus_per_worker"] == 2
        assert "2 torch thread(s)" in (run_dir / "training_log.txt").read_text()


@pytest.mark.slow
def test_a_lost_node_restarts_training_elsewhere_from_the_checkpoint_in_the_bucket(tiny_workdir, tmp_path, bucket,
                                                                                   s3_server):
    """The workdir in a bucket, two worker nodes: the node running the training worker is killed after
    a checkpoint; Ray Train restarts the worker group on the other node from the bucket's checkpoint,
    the epoch counter goes on, and the final model lands in the bucket."""
    import s3fs

    from pipeline.storage import as_path

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    fs.put(str(tiny_workdir.root), f"{bucket}/W".removeprefix("s3://"), recursive=True)
    if fs.exists(f"{bucket}/W/runs"):  # another test of the module trained in the local workdir: start clean
        fs.rm(f"{bucket}/W/runs", recursive=True)
    work = f"{bucket}/W"
    epochs = 8
    with LoopbackRayCluster(head_cpus=0) as cluster:
        cluster.env.update(s3_server)
        nodes = {"a": cluster.add_node("a", cpus=1), "b": cluster.add_node("b", cpus=1)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "train", "--workdir", work, "--config", CONFIG, "--fold", "0",
             "--epochs", str(epochs), "--iterations-per-epoch", "3", "--val-iterations", "1", "--checkpoint-every", "1",
             "--ray-address", cluster.address],
            env=cluster.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        snapshot = as_path(f"{work}/runs/ray/{CONFIG}_fold0/checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + 300
        while _registered_epoch(snapshot) < 1:  # a checkpoint Ray Train has registered (not only uploaded)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        rank0 = json_load(as_path(f"{work}/runs/{CONFIG}/fold_0/placement/rank_0.json"))  # where the worker runs
        victim = next(name for name, node in nodes.items() if node == rank0["node_id"])
        cluster.kill_node(victim)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        log = as_path(f"{work}/runs/{CONFIG}/fold_0/training_log.txt").read_text()
        assert "resumed from the checkpoint of epoch" in log, f"killed node {victim} ({rank0}):\n{log}\n{err[-4000:]}"
        with as_path(f"{work}/runs/{CONFIG}/fold_0/metrics.csv").open("r") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # no epoch lost or repeated
        assert as_path(f"{work}/runs/{CONFIG}/fold_0/model_final.pt").is_file()
        from pipeline.training.launch import latest_checkpoint_epoch

        assert latest_checkpoint_epoch(as_path(f"{work}/runs/ray/{CONFIG}_fold0")) == epochs  # Ray's public API
        survivor = nodes["b" if victim == "a" else "a"]
        assert json_load(as_path(f"{work}/runs/{CONFIG}/fold_0/placement.json"))["nodes"] == [survivor]
        assert not (Path(tmp_path) / "runs").exists() and os.listdir(tmp_path) == []


def _registered_epoch(snapshot) -> int:
    """The test looks inside Ray's own record of the run (the product never does)."""
    try:
        latest = json_load(snapshot).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, ValueError):
        return 0
    return int((latest.get("metrics") or {}).get("epoch") or 0)


def json_load(path):
    import json

    return json.loads(path.read_text())
