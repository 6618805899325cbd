"""The public stage API (`pipeline.stages`) the CLI, `segpipe run`, the cluster scripts and notebooks
share, the README's Python example, and three defects found reading the code (issue 18)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import stages
from pipeline.cli import main
from pipeline.errors import BadInputError, SegPipeError

REPO = Path(__file__).resolve().parents[1]


def test_load_dataset_refuses_a_broken_dataset_listing_every_problem(tmp_path, synthetic_dataset):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dataset, broken)
    labels = sorted((broken / "labelsTr").iterdir())
    labels[0].unlink()
    labels[1].write_bytes(b"not a nifti")
    with pytest.raises(BadInputError) as err:
        stages.load_dataset(broken)
    named = {p.case for p in err.value.problems}
    assert {labels[0].name.split(".")[0], labels[1].name.split(".")[0]} <= named


def test_fingerprint_and_plan_write_the_workdir_and_reuse_it(tmp_path, synthetic_dataset):
    dataset = stages.load_dataset(synthetic_dataset)
    plans = stages.plan(dataset, tmp_path / "w", progress=False)  # no client: in this process
    assert (tmp_path / "w" / "fingerprint.json").is_file() and (tmp_path / "w" / "plans.json").is_file()
    assert "3d_fullres" in plans.configurations
    stamp = (tmp_path / "w" / "plans.json").stat().st_mtime_ns
    again = stages.plan(dataset, tmp_path / "w", progress=False)  # reuse=True: the file is read back
    assert again.to_json() == plans.to_json() and (tmp_path / "w" / "plans.json").stat().st_mtime_ns == stamp
    fp = stages.fingerprint(dataset, tmp_path / "w", progress=False)  # reuse=False: computed again
    assert len(fp.cases) == len(dataset.cases)


def test_train_names_settings_it_does_not_know(tmp_path):
    with pytest.raises(TypeError, match="epoch_count"):
        stages.train(tmp_path, epoch_count=3)


# ---------------------------------------------------------------- issue 18, defect 1


def test_run_without_a_dataset_runs_the_demo(tmp_path, monkeypatch):
    """`segpipe run` with no DATASET used to crash on `args.cases` (only `demo` defined it)."""
    import pipeline.run

    calls = []
    monkeypatch.setattr(pipeline.run, "run_all", lambda dataset, workdir, options: calls.append(
        (Path(dataset), Path(workdir), options)) or {"report": "r"})
    assert main(["run", "--workdir", str(tmp_path / "w"), "--cases", "2", "--epochs", "1"]) == 0
    (dataset, workdir, options), = calls
    assert dataset == (tmp_path / "w" / "demo_dataset").absolute() and (dataset / "dataset.json").is_file()
    assert len(list((dataset / "labelsTr").iterdir())) == 2
    assert options.demo and options.train["epochs"] == 1


# ---------------------------------------------------------------- issue 18, defect 2


def test_a_case_that_cannot_be_read_is_never_deleted_as_incomplete(tmp_path, synthetic_dataset, monkeypatch):
    """A permission or network error while opening a complete case stops the run naming the case;
    only a case whose metadata is missing (an interrupted write) is treated as incomplete."""
    import zarr

    from pipeline.preprocessing.store import open_store

    dataset = stages.load_dataset(synthetic_dataset)
    report = stages.preprocess(dataset, tmp_path / "w", "3d_lean", progress=False)
    assert not report.failed
    store_path = tmp_path / "w" / "store.zarr"
    cstore = open_store(store_path, "r").config(open_store(store_path, "r").config_names()[0])
    victim = cstore.case_ids()[0]
    before = sorted(p.relative_to(store_path) for p in store_path.rglob("*"))

    real_get = zarr.storage.LocalStore.get

    async def flaky(self, key, *args, **kwargs):  # the storage layer fails to read that case's metadata
        if key.endswith(f"cases/{victim}/zarr.json"):
            raise PermissionError(13, "Permission denied (simulated)")
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", flaky)
    with pytest.raises(SegPipeError, match=f"case {victim}: cannot read its metadata.*nothing was deleted"):
        stages.preprocess(dataset, tmp_path / "w", "3d_lean", progress=False)
    monkeypatch.undo()
    assert sorted(p.relative_to(store_path) for p in store_path.rglob("*")) == before
    assert victim in cstore.case_ids()

    # an interrupted write (metadata gone) is still treated as incomplete and redone
    (store_path / cstore.data_identifier / "cases" / victim / "zarr.json").unlink()
    assert victim in cstore.incomplete_case_ids()
    report = stages.preprocess(dataset, tmp_path / "w", "3d_lean", progress=False)
    assert victim in report.deleted_incomplete and victim in report.done and victim in cstore.case_ids()


# ---------------------------------------------------------------- issue 18, defect 3


def _nii_dataset(root: Path, cases: int = 3) -> Path:
    """A tiny nnU-Net v2 dataset stored as uncompressed `.nii`."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        label = np.zeros((32, 32, 24), np.uint8)
        label[8 + i:20, 10:22, 6:18] = 1
        image = (label * 100 + rng.normal(0, 10, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"case{i}_0000.nii")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"case{i}.nii")
    (root / "dataset.json").write_text(json.dumps({
        "name": "NiiPhantom", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1},
        "numTraining": cases, "file_ending": ".nii"}))
    return root


def test_the_report_shows_overlays_for_a_dataset_of_nii_files(tmp_path):
    """Predictions are written in their input's format (`.nii` here); the report must look for them
    under the name `segpipe predict` gives them (a wrong ending once drew no overlay, silently)."""
    from pipeline.evaluation.report import build_report
    from pipeline.inference.predictor import prediction_name
    from pipeline.workdir import Workdir

    dataset = stages.load_dataset(_nii_dataset(tmp_path / "Dataset900_Nii"))
    plans = stages.plan(dataset, tmp_path / "w", progress=False)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for case in dataset.cases:  # a perfect "prediction", named as `segpipe predict` writes it
        img = nib.load(case.label)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), pred_dir / prediction_name(case.case_id, case.images[0]))
    stages.evaluate(pred_dir, dataset.root, tmp_path / "eval", progress=False)
    page = build_report(Workdir.at(tmp_path / "w"), plans, "3d_fullres", "0", dataset, pred_dir, tmp_path / "eval")
    overlays = sorted(p.name for p in page.parent.glob("overlay_*.png"))
    assert overlays and all(f'src="{name}"' in page.read_text() for name in overlays)


# ---------------------------------------------------------------- the README's example


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- python-example:start.*?```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its Python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102 - the example, as a user runs it
    assert Path(namespace["result"].final_model).is_file()
    assert 0.0 <= namespace["summary"]["foreground_mean"]["dice"] <= 1.0
    assert len(os.listdir(tmp_path / "predictions")) >= 8
