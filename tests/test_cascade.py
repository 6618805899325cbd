"""The 3D cascade (nnU-Net v2's 3d_cascade_fullres): planned wherever 3d_lowres is, trained on 3d_lowres's
cross-validated segmentations as extra one-hot input channels (perturbed as nnU-Net perturbs them), and
predicted with both stages in order. Synthetic phantoms planned with a small memory budget, so the patch
covers < 25 % of the image and the planner makes 3d_lowres; a few training iterations per stage."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import stages
from pipeline.cli import main
from pipeline.data.synthetic import make_demo_dataset
from pipeline.errors import BadInputError
from pipeline.planning.fingerprint import Fingerprint, compute_fingerprint
from pipeline.planning.planner import explain_plans, plan_experiment
from pipeline.planning.plans import Plans
from pipeline.preprocessing.preprocess import run_preprocessing
from pipeline.preprocessing.store import open_store
from pipeline.training.augmentation import AugmentationConfig, Augmenter
from pipeline.training.cascade import (
    NextStageSegmentations,
    binary_operation,
    combine_labels,
    one_hot_foreground,
    random_binary_operator_,
    remove_random_component_,
    split_labels,
)
from pipeline.training.sampling import BatchSampler, PatchSpec, foreground_slots
from pipeline.workdir import Workdir

SMALL_BUDGET_GB = 0.02  # a patch of ~10x20x24 on 24x48x51 phantoms: 8 % of the image, so 3d_lowres is planned
TRAIN = dict(epochs=1, iterations_per_epoch=2, val_iterations=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("cascade_data") / "Phantom", num_cases=5, seed=3)


@pytest.fixture(scope="module")
def planned(tmp_path_factory, phantoms):
    """A workdir with small-budget plans, both stages preprocessed, and a 2-fold split (fewer trainings)."""
    wd = Workdir.at(tmp_path_factory.mktemp("cascade_wd"))
    dataset = stages.load_dataset(phantoms)
    fingerprint = compute_fingerprint(dataset, client=None, progress=False)  # in this process: no Dask start-up
    fingerprint.save(wd.fingerprint)
    plans = plan_experiment(fingerprint, dataset, gpu_memory_gb=SMALL_BUDGET_GB)
    plans.save(wd.plans)
    for config in ("3d_lowres", "3d_cascade_fullres"):
        assert not run_preprocessing(dataset, plans, config, wd.store, client=None, progress=False).failed
    cases = sorted(dataset.case_ids)
    folds = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    wd.splits.write_text(json.dumps({"seed": None, "cases": cases, "folds": folds}))
    return wd, dataset


# ---------------------------------------------------------------- planning


def test_the_cascade_is_planned_exactly_where_3d_lowres_is(planned):
    wd, dataset = planned
    plans = Plans.load(wd.plans)
    cascade = plans.configurations["3d_cascade_fullres"]
    assert (cascade.inherits_from, cascade.previous_stage) == ("3d_fullres", "3d_lowres")
    resolved, full = plans.configuration("3d_cascade_fullres"), plans.configuration("3d_fullres")
    assert (resolved.patch_size, resolved.data_identifier, resolved.spacing) == (full.patch_size, "3d_fullres", full.spacing)
    assert plans.hash("3d_cascade_fullres") == plans.hash("3d_fullres")  # one store serves both
    assert "3d_lowres exists" in plans.explanations["3d_cascade_fullres"]

    roomy = plan_experiment(Fingerprint.load(wd.fingerprint), dataset)  # 8 GB: the patch covers the image
    assert "3d_lowres" not in roomy.configurations and "3d_cascade_fullres" not in roomy.configurations
    with pytest.raises(BadInputError, match="no 3d_cascade_fullres"):
        roomy.configuration("3d_cascade_fullres")


def test_explain_says_when_and_why(planned):
    text = explain_plans(Plans.load(planned[0].plans))
    assert "3d_cascade_fullres (inherits 3d_fullres; changes previous_stage)" in text
    assert "previous_stage = 3d_lowres" in text and "cross-validated" in text and "one-hot" in text


def test_a_previous_stage_that_does_not_exist_is_refused_by_the_schema(planned):
    data = json.loads(planned[0].plans.read_text())
    data["configurations"]["3d_cascade_fullres"]["previous_stage"] = "3d_midres"
    with pytest.raises(BadInputError, match="previous_stage names '3d_midres'"):
        Plans.from_json(data)


# ---------------------------------------------------------------- the previous stage's segmentation in a batch


def test_morphology_uses_a_euclidean_ball_and_never_erodes_from_the_patch_border():
    point = np.zeros((15, 15, 15), bool)
    point[7, 7, 7] = True
    ball = binary_operation(point, "dilation", 2.0)
    z, y, x = np.ogrid[-7:8, -7:8, -7:8]
    assert np.array_equal(ball, z * z + y * y + x * x <= 4)
    assert np.array_equal(binary_operation(ball, "erosion", 2.0), point)
    full = np.ones((6, 6, 6), bool)
    assert binary_operation(full, "erosion", 3.0).all()  # the border is not a boundary
    two = np.zeros((9, 9, 9), bool)
    two[1:3, 1:3, 1:3] = two[6:8, 6:8, 6:8] = True
    assert np.array_equal(binary_operation(two, "opening", 0.5), two)  # radius < 1: a single voxel ball
    assert binary_operation(two, "closing", 1.0).sum() == two.sum()  # far apart: closing bridges nothing


def test_the_random_operators_keep_the_one_hot_exclusive_and_removal_spares_large_components():
    rng = np.random.default_rng(0)
    for trial in range(20):
        seg = np.zeros((20, 20, 20), np.int64)
        seg[2:12, 2:12, 2:12] = 1
        seg[8:14, 8:14, 8:14] = 2
        onehot = one_hot_foreground(torch.from_numpy(seg)[None], 3)[0].numpy()
        done = random_binary_operator_(onehot, rng, p_per_class=1.0)
        assert len(done) == 2 and {op for _, op, _ in done} <= {"dilation", "erosion", "closing", "opening"}
        assert onehot.sum(0).max() <= 1  # one class per voxel, even after a dilation grew into the other
    onehot = np.zeros((1, 20, 20, 20), np.float32)
    onehot[0, :10, :10, :10] = 1  # 12.5 % of the patch: removable
    onehot[0, 15:17, 15:17, 15:17] = 1
    big = np.zeros_like(onehot)
    big[0, :, :, :8] = 1  # 40 %: never removed
    removed = remove_random_component_(onehot, np.random.default_rng(1), p_per_class=1.0)
    assert removed and removed[0][1] in (1000, 8) and onehot.sum() in (8, 1000)
    assert remove_random_component_(big, np.random.default_rng(1), p_per_class=1.0) == [] and big.sum() == 20 * 20 * 8


def test_the_label_and_the_previous_segmentation_move_together_through_spatial_augmentation():
    rng = np.random.default_rng(4)
    label = torch.zeros((4, 16, 24, 24), dtype=torch.int64)
    label[:, 4:12, 6:18, 5:15] = 1
    label[:, 6:10, 9:13, 8:12] = 2
    config = AugmentationConfig(p_rotation=1.0, p_scale=1.0)
    image = torch.randn(4, 1, 16, 24, 24)
    _, combined = Augmenter(config, (16, 24, 24))(image, combine_labels(label, label, 3), rng)
    moved, previous = split_labels(combined, 3)
    assert not torch.equal(moved, label)  # it was rotated ...
    assert torch.equal(moved, previous)  # ... and both identically


def test_a_lost_chunk_of_a_stored_segmentation_is_damage_not_background(tmp_path):
    from pipeline.preprocessing.store import StoreDamageError
    from pipeline.training.sampling import read_patch

    store = NextStageSegmentations.open(tmp_path / "segs.zarr", create_with={"num_classes": 3})
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[2:6, 2:6, 2:6] = 2
    store.write("case_a", seg, chunks=(4, 4, 4), fold="1", model="abc")
    assert NextStageSegmentations.open(tmp_path / "segs.zarr").completed()["case_a"]["fold"] == "1"
    with pytest.raises(BadInputError, match="case_b"):
        store.array("case_b")  # never made: named, with the command that makes it
    next(p for p in (tmp_path / "segs.zarr" / "cases" / "case_a").rglob("*") if p.is_file() and p.parent.name == "0").unlink()
    out = np.zeros((8, 8, 8), np.int64)
    read_patch(NextStageSegmentations.open(tmp_path / "segs.zarr").array("case_a"), (0, 0, 0), (8, 8, 8), out)
    with pytest.raises(StoreDamageError, match="case_a"):
        store.check_patch("case_a", out)


# ---------------------------------------------------------------- both stages, end to end


@pytest.mark.slow
def test_both_stages_train_and_predict_in_order(planned, ray_session, tmp_path, capsys):
    wd, dataset = planned
    # nothing of 3d_lowres yet: the cascade names the commands that train it (exit 2)
    assert main(["train", "--workdir", str(wd.root), "--config", "3d_cascade_fullres", "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "--config 3d_lowres --fold 0" in err and "--config 3d_lowres --fold 1" in err

    for fold in ("0", "1"):
        stages.train(wd, "3d_lowres", fold, **TRAIN)
    # each case segmented by the 3d_lowres fold that validated on it (mirroring off here, for time),
    # then training the cascade finds them made by the same models and redoes nothing
    first = stages.previous_stage(wd, "3d_cascade_fullres", "0", tta=False, progress=False)
    assert sorted(first.predicted) == sorted(dataset.case_ids) and first.folds.keys() == {"0", "1"}
    result = stages.train(wd, "3d_cascade_fullres", "0", **TRAIN)

    seg_path = wd.next_stage_predictions("3d_lowres", "3d_cascade_fullres")
    made = NextStageSegmentations.open(seg_path).completed()
    assert {c: a["fold"] for c, a in made.items()} == {c: str(k) for k, f in enumerate(json.loads(wd.splits.read_text())["folds"])
                                                     for c in f["val"]}
    full = open_store(wd.store, "r").config("3d_fullres")
    store = NextStageSegmentations.open(seg_path)
    for case in made:
        seg = store.array(case)
        assert seg.shape == full.label(case).shape and seg.chunks == tuple(full.patch_size)
        assert set(np.unique(seg[...]).tolist()) <= {0, 1, 2}
    again = stages.previous_stage(wd, "3d_cascade_fullres", "0", progress=False)
    assert again.predicted == [] and sorted(again.skipped) == sorted(made)  # resumable: nothing redone

    # the second stage's network reads the image plus one channel per foreground class
    payload = torch.load(result.final_model, weights_only=True)
    assert payload["num_input_channels"] == 1 + 2
    plans = Plans.load(wd.plans)
    conf = plans.configuration("3d_cascade_fullres")
    spec = PatchSpec(str(wd.store), "3d_fullres", tuple(made), patch_size=tuple(conf.patch_size),
                     slots=foreground_slots(2), previous_stage=str(seg_path), num_classes=3,
                     augmentation=AugmentationConfig.for_patch(conf.patch_size).to_json())
    image, label = BatchSampler(spec).batch((0, 0, 0, 0))
    assert image.shape == (2, 3, *conf.patch_size) and label.shape == (2, *conf.patch_size)
    extra = image[:, 1:]
    assert set(extra.unique().tolist()) <= {0.0, 1.0} and extra.sum(1).max() <= 1

    # prediction: 3d_lowres first, then the cascade; labels in each input's own geometry
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    val = json.loads(wd.splits.read_text())["folds"][0]["val"]
    for case in val:
        shutil.copy(dataset.case(case).images[0], inputs / f"{case}.nii.gz")
    out = tmp_path / "predicted"
    report = stages.predict(wd, inputs, out, config="3d_cascade_fullres", fold="0", tta=False, progress=False)
    assert sorted(report.predicted) == sorted(val)
    for case in val:
        source, written = nib.load(inputs / f"{case}.nii.gz"), nib.load(out / f"{case}.nii.gz")
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}

    # the first stage gone: prediction names the command that trains it (exit 2)
    shutil.move(wd.run_dir("3d_lowres", "0"), tmp_path / "aside")
    assert main(["predict", "--workdir", str(wd.root), "--config", "3d_cascade_fullres", "--fold", "0",
                 str(inputs), str(tmp_path / "again")]) == 2
    assert "--config 3d_lowres --fold 0" in capsys.readouterr().err
