"""The prediction benchmark's CT inputs: nnU-Net gets consecutive labels that map back to the dataset's values."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_predict_benchmark():
    if "benchmarks_predict" in sys.modules:
        return sys.modules["benchmarks_predict"]
    spec = importlib.util.spec_from_file_location("benchmarks_predict", REPO / "benchmarks" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ct_raw_dataset_for_nnunet_renumbers_the_41_labels_and_maps_back_to_their_values(totalseg, tmp_path):
    from pipeline.data.dataset import load_dataset

    bench = load_predict_benchmark()
    dataset = load_dataset(totalseg)
    values = dataset.label_map.values
    raw = tmp_path / "raw" / bench.CT_DATASET
    meta = bench.nnunet_ct_raw(dataset, values, raw)

    # nnU-Net's rule: labels 0..K-1, in the order of the values (so class i is our store index i)
    assert sorted(meta["labels"].values()) == list(range(len(values))) == list(range(42))
    assert json.loads((raw / "dataset.json").read_text()) == meta
    case = dataset.cases[0]
    original = nib.load(str(case.label))
    renumbered = nib.load(str(raw / "labelsTr" / f"{case.case_id}.nii.gz"))
    index = np.asarray(renumbered.dataobj)
    assert index.dtype == np.uint8 and int(index.max()) <= 41
    assert np.allclose(renumbered.affine, original.affine)
    # what the benchmark does to nnU-Net's outputs before comparing: values[index] gives the dataset's labels back
    assert np.array_equal(np.asarray(values)[index], np.asarray(original.dataobj))
    assert (raw / "imagesTr" / f"{case.case_id}_0000.nii.gz").is_file()

    # a second call keeps the folder (nnU-Net's plans beside it stay valid)
    stamp = (raw / "labelsTr" / f"{case.case_id}.nii.gz").stat().st_mtime_ns
    bench.nnunet_ct_raw(dataset, values, raw)
    assert (raw / "labelsTr" / f"{case.case_id}.nii.gz").stat().st_mtime_ns == stamp


def test_label_agreement_compares_renumbered_outputs_as_label_values(tmp_path):
    bench = load_predict_benchmark()
    ours = np.array([[[0, 1, 117], [52, 52, 0]]], dtype=np.int16)  # values
    theirs = np.array([[[0, 1, 3], [2, 1, 0]]], dtype=np.uint8)  # indices into (0, 1, 52, 117)
    for folder, array in (("a", ours), ("b", theirs)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / folder / "case.nii.gz"))
    same = bench.label_agreement(tmp_path / "a", tmp_path / "b", (0, 1, 52, 117))
    assert same["voxel_agreement"] == round(5 / 6, 6)  # one voxel: 52 vs index 1 (= value 1)
    assert bench.label_agreement(tmp_path / "a", tmp_path / "b")["voxel_agreement"] == round(3 / 6, 6)


def test_where_our_plan_differs_from_nnunets_the_benchmark_runs_nnunets_topology(totalseg, tmp_path):
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment

    bench = load_predict_benchmark()
    dataset = load_dataset(totalseg)
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    ours = plans.configuration("3d_fullres")
    theirs = {"patch_size": [32, 96, 96], "spacing": [3.0, 2.5, 2.5], "architecture": {"arch_kwargs": {
        "strides": ours.strides, "kernel_sizes": ours.kernel_sizes, "features_per_stage": [16, 32, 64, 128, 256],
        "n_conv_per_stage": [ours.n_conv_per_stage] * ours.num_stages}}}
    nnunet_plans = tmp_path / "nnUNetPlans.json"
    nnunet_plans.write_text(json.dumps({"configurations": {"3d_fullres": theirs}}))

    topo = bench.adopt_nnunet_topology(plans, nnunet_plans)
    assert topo["differences"] == ["patch_size", "features_per_stage", "spacing"]  # reported as our planner chose
    assert "nnU-Net's numbers" in topo["adopted"]
    assert bench.topology_check(plans, nnunet_plans)["differences"] == []  # and now built at nnU-Net's
    assert plans.configuration("3d_fullres").features_per_stage == [16, 32, 64, 128, 256]
