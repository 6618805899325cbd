"""Workdir and dataset in a bucket: every stage reads and writes `s3://` URLs through fsspec, against a
real S3-protocol server on 127.0.0.1 (moto's, started by the `s3_server` fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import BadInputError
from pipeline.storage import as_path, copy_file, inside, is_url, link, local_file, replacing, write_json_atomic
from pipeline.workdir import Workdir


def _fs():
    import s3fs

    return s3fs.S3FileSystem(use_listings_cache=False)


def _upload(local: Path, url: str) -> str:
    _fs().put(str(local), url.removeprefix("s3://"), recursive=True)
    return url


def test_paths_and_urls_are_one_api(bucket):
    wd = Workdir.at(f"{bucket}/work")
    assert is_url(wd.root) and str(wd.plans) == f"{bucket}/work/plans.json"
    assert str(wd.run_dir("3d_lean", 0)) == f"{bucket}/work/runs/3d_lean/fold_0"
    assert not is_url("relative/folder") and not is_url("file:///tmp/x") and as_path("file:///tmp/x") == Path("/tmp/x")
    write_json_atomic(wd.plans, {"a": 1})
    assert json.loads(wd.plans.read_text()) == {"a": 1}
    with local_file(wd.plans) as local:
        assert isinstance(local, Path) and json.loads(local.read_text()) == {"a": 1}
    assert not local.exists()  # the download was temporary


def test_a_failed_write_leaves_no_object_behind(bucket):
    target = as_path(f"{bucket}/model_final.pt")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half a model")
            raise RuntimeError("the writer died")
    assert not target.exists()  # an object appears whole (one PUT) or not at all


def test_links_become_copies_where_there_are_none(bucket, tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"voxels")
    link(tmp_path / "a.nii.gz", f"{bucket}/inputs/a.nii.gz")
    link(f"{bucket}/inputs/a.nii.gz", f"{bucket}/heldout/a.nii.gz")  # server-side copy
    assert as_path(f"{bucket}/heldout/a.nii.gz").read_bytes() == b"voxels"
    copy_file(f"{bucket}/heldout/a.nii.gz", tmp_path / "b.nii.gz")
    assert (tmp_path / "b.nii.gz").read_bytes() == b"voxels"


def test_a_dataset_in_a_bucket_cannot_point_outside_itself(bucket, synthetic_dataset):
    from pipeline import stages

    root = as_path(f"{bucket}/Phantom")
    assert inside(root, root / "imagesTr" / "x.nii.gz")
    assert not inside(root, root / ".." / "secrets" / "x.nii.gz")
    assert not inside(root, as_path(f"{bucket}/Other/x.nii.gz"))
    url = _upload(synthetic_dataset, f"{bucket}/Phantom")
    meta = json.loads(as_path(f"{url}/dataset.json").read_text())
    meta["training"][0]["image"] = "../Elsewhere/x.nii.gz"
    write_json_atomic(f"{url}/dataset.json", meta)
    with pytest.raises(BadInputError, match="escapes the dataset folder"):
        stages.load_dataset(url)


def test_validate_and_preprocess_read_a_bucket_case_by_case(bucket, synthetic_dataset):
    from pipeline import stages
    from pipeline.preprocessing.store import open_store, verify_store

    url = _upload(synthetic_dataset, f"{bucket}/Phantom")
    dataset = stages.load_dataset(url)
    assert all(is_url(c.images[0]) for c in dataset.cases)
    report = stages.preprocess(dataset, f"{bucket}/work", "3d_lean", progress=False)
    assert not report.failed and len(report.done) == len(dataset.cases)
    assert verify_store(f"{bucket}/work/store.zarr") == []
    store = open_store(f"{bucket}/work/store.zarr", "r")
    assert len(store.config(store.config_names()[0]).case_ids()) == len(dataset.cases)
    again = stages.preprocess(dataset, f"{bucket}/work", "3d_lean", progress=False)  # resumes: nothing redone
    assert again.skipped and not again.done and not again.changed


@pytest.mark.slow
def test_segpipe_run_from_a_bucket_into_a_bucket_writes_nothing_locally(bucket, synthetic_dataset, tmp_path, s3_server):
    """`segpipe run s3://.../dataset --workdir s3://.../work` from an empty folder: every artefact lands in
    the bucket (store, plans, models, Ray Train's checkpoints, predictions, evaluation, report, logs)."""
    url = _upload(synthetic_dataset, f"{bucket}/Phantom")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    env = {**os.environ, **s3_server, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", url, "--workdir", f"{bucket}/work", "--epochs", "1",
         "--iterations-per-epoch", "2", "--val-iterations", "1", "--workers", "2", "--no-tta"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    found = {p.removeprefix(f"{bucket.removeprefix('s3://')}/work/") for p in _fs().find(f"{bucket}/work")}
    for expected in ("fingerprint.json", "plans.json", "splits.json", "store.zarr/zarr.json",
                     "runs/3d_lean/fold_0/model_final.pt", "runs/3d_lean/fold_0/metrics.csv",
                     "runs/3d_lean/fold_0/training_curves.png", "runs/3d_lean/fold_0/placement.json",
                     "evaluation/3d_lean_fold0/summary.json", "report/index.html", "logs/run.log"):
        assert expected in found, f"{expected} not in the bucket: {sorted(found)[:40]}"
    assert any(p.startswith("runs/ray/3d_lean_fold0/checkpoint_") for p in found)  # Ray Train's storage_path
    predictions = [p for p in found if p.startswith("predictions/3d_lean_fold0/") and p.endswith(".nii.gz")]
    summary = json.loads(as_path(f"{bucket}/work/evaluation/3d_lean_fold0/summary.json").read_text())
    assert len(predictions) == summary["n_cases"] >= 1


def test_a_store_in_a_bucket_is_locked_against_a_second_preprocessing_run(bucket):
    """The run lock is an object created with a conditional PUT: a second run is refused naming the
    holder, a lock left by a dead process of this host is taken over, and a finished run leaves none."""
    import socket

    from pipeline.errors import SegPipeError
    from pipeline.preprocessing.store import open_store

    store = open_store(f"{bucket}/work/store.zarr", "a", dataset_name="Phantom")
    lock = as_path(f"{bucket}/work/store.zarr.lock")
    with store.lock():
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(SegPipeError, match=f"another preprocessing run \\(pid {os.getpid()} on "):
            with open_store(f"{bucket}/work/store.zarr", "a").lock():
                pass
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": 0}))
    with store.lock():  # the holder is gone: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_convert_and_import_write_datasets_into_a_bucket(bucket, synthetic_dataset, tmp_path):
    import tarfile

    from pipeline import stages
    from pipeline.cli import main

    url = _upload(synthetic_dataset, f"{bucket}/Phantom")
    assert main(["convert", url, f"{bucket}/Dataset001_Phantom", "--to", "nnunetv2"]) == 0
    converted = stages.load_dataset(f"{bucket}/Dataset001_Phantom")
    assert converted.layout == "nnunetv2" and len(converted.cases) == len(stages.load_dataset(url).cases)
    assert main(["convert", url, f"{bucket}/Dataset001_Phantom", "--to", "nnunetv2"]) == 2  # never over a dataset
    with tarfile.open(tmp_path / "Task99_Phantom.tar", "w") as tar:
        tar.add(synthetic_dataset, arcname="Task99_Phantom")
    assert main(["import-msd", str(tmp_path / "Task99_Phantom.tar"), "--dest", f"{bucket}/imported"]) == 0
    assert stages.load_dataset(f"{bucket}/imported/Task99_Phantom").layout == "msd"
