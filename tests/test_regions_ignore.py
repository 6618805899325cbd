"""Region-based labels and the `ignore` label, as nnU-Net v2 declares them in dataset.json (issue 15,
items 2 and 3).

* Regions: the phantom's nested organ and lesion declared as `organ+lesion` = [1, 2] and `lesion` = 2
  with `regions_class_order` [1, 2]: one sigmoid output per region, Dice + BCE, regions painted back
  into label values in that order on export, evaluation per region as well as per label.
* Ignore: scribble phantoms whose labels are mostly `ignore` (3): those voxels weigh nothing in the
  loss or the pseudo-Dice, are never a sampling centre, are not scored, and are never predicted.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import stages
from pipeline.cli import main
from pipeline.data.labels import LabelMap, Region
from pipeline.data.synthetic import IGNORE_VALUE, make_demo_dataset
from pipeline.evaluation.postprocessing import decide_postprocessing
from pipeline.planning.plans import Plans
from pipeline.preprocessing.preprocess import sample_locations
from pipeline.preprocessing.store import open_store
from pipeline.training.losses import build_loss, pseudo_dice
from pipeline.training.sampling import choose_center

SHAPE = (32, 32, 16)  # small phantoms: a few seconds of training learn the organ
REGIONS = LabelMap((0, 1, 2), (Region("organ+lesion", (1, 2)), Region("lesion", (2,))), (1, 2))
IGNORE = LabelMap((0, 1, 2, 3), ignore_value=3)


def _train(workdir: Path, epochs: int, iterations: int):
    return stages.train(workdir, config="3d_lean", fold="0", epochs=epochs, iterations_per_epoch=iterations,
                        val_iterations=2, num_workers=1, checkpoint_every=epochs)


def _two_images(dataset: Path, folder: Path) -> Path:
    """A prediction input folder with the first two cases (prediction time is not what is tested)."""
    folder.mkdir()
    for path in sorted((dataset / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def _prepared(tmp_path_factory, dask_client, labels: str) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(f"phantom_{labels}")
    dataset_path = make_demo_dataset(root / "ds", num_cases=6, shape=SHAPE, labels=labels)
    dataset = stages.load_dataset(dataset_path)
    stages.plan(dataset, root / "w", client=dask_client, progress=False)
    stages.preprocess(dataset, root / "w", config="3d_lean", client=dask_client, progress=False)
    return dataset_path, root / "w"


@pytest.fixture(scope="module")
def region_run(tmp_path_factory, dask_client, ray_session):
    dataset, workdir = _prepared(tmp_path_factory, dask_client, "regions")
    return dataset, workdir, _train(workdir, epochs=1, iterations=12)


@pytest.fixture(scope="module")
def ignore_prepared(tmp_path_factory, dask_client):
    return _prepared(tmp_path_factory, dask_client, "ignore")


# ---------------------------------------------------------------- declarations


def test_a_region_dataset_declares_sigmoid_outputs_in_the_order_of_its_labels(tmp_path):
    dataset = stages.load_dataset(make_demo_dataset(tmp_path / "ds", num_cases=1, shape=SHAPE, labels="regions"))
    assert dataset.label_map == REGIONS
    assert (REGIONS.num_outputs, REGIONS.nonlinearity, REGIONS.region_indices) == (2, "sigmoid", ((1, 2), (2,)))
    assert dataset.labels == {0: "background", 1: "label_1", 2: "lesion"}  # every value a label file may hold
    assert (IGNORE.num_outputs, IGNORE.nonlinearity, IGNORE.ignore_index, IGNORE.class_values) == (3, "softmax", 3,
                                                                                                  (0, 1, 2))


def test_probabilities_become_label_values_regions_in_regions_class_order():
    """nnU-Net's rule: regions painted one after the other where p > 0.5, later ones win (the lesion
    inside the organ); softmax outputs take the argmax. One helper for both: what ensembles call."""
    p = np.array([[0.9, 0.9, 0.2, 0.6],    # organ+lesion
                  [0.1, 0.7, 0.8, 0.4]],   # lesion
                 dtype=np.float32).reshape(2, 4, 1, 1)
    assert REGIONS.probabilities_to_values(p).ravel().tolist() == [1, 2, 2, 1]
    tumours = LabelMap((0, 1, 2, 3), (Region("whole", (1, 2, 3)), Region("core", (2, 3)), Region("enhancing", (3,))),
                       (1, 2, 3))  # BraTS
    q = np.array([[0.9, 0.9, 0.9, 0.1], [0.1, 0.9, 0.9, 0.1], [0.1, 0.1, 0.9, 0.9]]).reshape(3, 4, 1, 1)
    assert tumours.probabilities_to_values(q).ravel().tolist() == [1, 2, 3, 3]
    softmax = np.array([[0.7, 0.1, 0.2], [0.2, 0.8, 0.1], [0.1, 0.1, 0.7]]).T.reshape(3, 3, 1, 1)
    assert IGNORE.probabilities_to_values(softmax).ravel().tolist() == [0, 1, 2]  # never the ignore label
    with pytest.raises(ValueError, match="expected 2"):
        REGIONS.probabilities_to_values(softmax)


BAD_DECLARATIONS = [
    ({"regions_class_order": None}, "no 'regions_class_order'"),
    ({"regions_class_order": [1]}, "1 entries for 2 regions"),
    ({"regions_class_order": [0, 2]}, "must be a foreground label value"),
    ({"labels": {"background": 0, "organ+lesion": [0, 1, 2], "lesion": 2}}, "contains background 0"),
    ({"labels": {"background": 0, "organ+lesion": [1, "two"], "lesion": 2}}, "non-empty list of"),
    ({"labels": {"background": 0, "organ": 1, "lesion": 2, "ignore": [3]}, "regions_class_order": None},
     "one value, not a region"),
    ({"labels": {"background": 0, "organ": 1, "ignore": 2, "lesion": 3}, "regions_class_order": None},
     "must be the highest label value"),
    ({"labels": {"background": 0, "organ+lesion": [1, 2, 3], "lesion": 2, "ignore": 3}}, "is part of a region"),
    ({"labels": {"background": 0, "organ": 1, "lesion": 2}}, "no region"),
]


@pytest.mark.parametrize("change, phrase", BAD_DECLARATIONS,
                         ids=["no-order", "order-length", "order-background", "region-with-background",
                              "region-not-ints", "ignore-list", "ignore-not-highest", "ignore-in-region",
                              "order-without-regions"])
def test_malformed_region_or_ignore_declarations_exit_2_naming_the_problem(tmp_path, capsys, change, phrase):
    root = make_demo_dataset(tmp_path / "ds", num_cases=1, shape=SHAPE, labels="regions")
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    meta = json.loads((bad / "dataset.json").read_text())
    meta.pop("synthetic")
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    (bad / "dataset.json").write_text(json.dumps(meta))
    assert main(["validate", str(bad)]) == 2
    assert phrase in capsys.readouterr().err


def test_a_region_dataset_is_not_converted_to_the_decathlon_layout_that_cannot_declare_regions(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "ds", num_cases=1, shape=SHAPE, labels="regions")
    assert main(["convert", str(root), str(tmp_path / "msd"), "--to", "msd"]) == 2
    assert "cannot express" in capsys.readouterr().err and not (tmp_path / "msd").exists()


def test_plans_carry_the_regions_and_version_1_plans_still_load(tmp_path, dask_client):
    dataset = stages.load_dataset(make_demo_dataset(tmp_path / "ds", num_cases=2, shape=SHAPE, labels="regions"))
    plans = stages.plan(dataset, tmp_path / "w", client=dask_client, progress=False)
    again = Plans.load(tmp_path / "w" / "plans.json")
    assert again.label_map() == REGIONS and again.schema_version == 2
    assert "sigmoid" in again.explanations["labels"]
    old = {k: v for k, v in plans.to_json().items() if k not in ("regions", "regions_class_order", "ignore_label")}
    old["schema_version"] = 1  # what seg-pipeline wrote before regions: loads as plain classes, same store hash
    v1 = Plans.from_json(old)
    assert v1.label_map() == LabelMap((0, 1, 2)) and v1.hash("3d_lean") == plans.hash("3d_lean")
    broken = dict(plans.to_json(), regions_class_order=[1, 7])
    with pytest.raises(Exception, match="regions_class_order"):
        Plans.from_json(broken)


# ---------------------------------------------------------------- losses and masking


def _target_with_ignore(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (2, 8, 8, 8), generator=g)
    target[:, :, :5] = IGNORE_VALUE  # most voxels ignored, as scribbles
    return target


@pytest.mark.parametrize("kind, label_map", [("dice_ce", IGNORE), ("ce", IGNORE),
                                             ("dice_ce", LabelMap((0, 1, 2, 3), REGIONS.regions, (1, 2), 3))],
                         ids=["dice+ce", "ce", "regions-dice+bce"])
def test_the_image_under_ignored_voxels_changes_neither_loss_nor_pseudo_dice(kind, label_map):
    """A fixed voxel-wise model (a 1x1x1 convolution: each output sees only its own voxel) on two images
    that differ only where the label is `ignore`: the same loss, the same pseudo-Dice counts, and no
    gradient reaches the ignored voxels' logits."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, label_map.num_outputs, 1)
    target = _target_with_ignore()
    ignored = (target == label_map.ignore_index).unsqueeze(1)
    image = torch.randn(2, 1, 8, 8, 8)
    changed = torch.where(ignored, torch.randn_like(image) * 100, image)
    loss_fn = build_loss(kind, deep_supervision=False, label_map=label_map)
    regions = label_map.region_indices if label_map.has_regions else None
    losses, counts = [], []
    for x in (image, changed):
        logits = model(x).detach().requires_grad_(True)
        loss = loss_fn(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and (logits.grad * ignored).abs().max() == 0
        losses.append(float(loss.detach()))
        counts.append(torch.cat(pseudo_dice(logits, target, label_map.num_outputs, regions, label_map.ignore_index)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    assert torch.equal(counts[0], counts[1])
    assert not torch.equal(model(image), model(changed))  # the change is real, where it is ignored


def test_region_loss_is_bce_plus_soft_dice_on_region_masks():
    target = torch.tensor([0, 1, 2, 2]).reshape(1, 4, 1, 1)
    masks = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float32).reshape(1, 2, 4, 1, 1)
    perfect = (masks * 2 - 1) * 30  # logits far on the right side
    assert float(build_loss("dice_ce", False, label_map=REGIONS)(perfect, target)) < 1e-4
    logits = torch.randn(1, 2, 4, 1, 1)
    bce_only = build_loss("ce", False, label_map=REGIONS)(logits, target)
    assert float(bce_only) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)))
    assert float(build_loss("dice_ce", False, label_map=REGIONS)(logits, target)) > float(bce_only)


# ---------------------------------------------------------------- sampling


def test_foreground_sampling_never_centres_on_ignored_voxels(ignore_prepared):
    """The stored locations never hold an ignored voxel (background is stored as annotated class 0),
    and every centre drawn from them, forced onto foreground or not, is an annotated voxel."""
    dataset, workdir = ignore_prepared
    plans = Plans.load(workdir / "plans.json")
    group = open_store(workdir / "store.zarr", "r").config(plans.configuration("3d_lean").data_identifier)
    ignore_index = plans.label_map().ignore_index
    rng = np.random.default_rng(0)
    raw = [np.asarray(nib.load(p).dataobj) for p in sorted((dataset / "labelsTr").glob("*.nii.gz"))]
    assert np.mean([(r == IGNORE_VALUE).mean() for r in raw]) > 0.8  # scribbles: mostly ignored
    for case_id in group.case_ids():
        label = np.asarray(group.label(case_id)[...])
        locations = group.locations(case_id)
        assert len(locations) and ignore_index not in locations[:, 0] and 0 in locations[:, 0]
        assert (label[tuple(locations[:, 1:].T)] == locations[:, 0]).all()
        for force_fg in (True, False) * 50:
            centre = choose_center(locations, force_fg, rng)
            value = label[tuple(centre)]
            assert value != ignore_index and (value > 0 or not force_fg)
    label = np.full((6, 6, 6), 3, np.uint8)
    label[0, 0, 0], label[5, 5, 5] = 1, 0
    rows = sample_locations(label, 4, seed=0, ignore_index=3)
    assert sorted(rows[:, 0].tolist()) == [0, 1]


# ---------------------------------------------------------------- end to end


def test_region_phantoms_train_predict_label_values_and_evaluate_each_region(region_run, tmp_path):
    dataset, workdir, result = region_run
    rows = list(csv.DictReader((workdir / "runs" / "3d_lean" / "fold_0" / "metrics.csv").open()))
    assert {"val_dice_organ+lesion", "val_dice_lesion"} <= set(rows[-1])  # pseudo-Dice per region
    out = tmp_path / "pred"
    stages.predict(workdir, _two_images(dataset, tmp_path / "in"), out, config="3d_lean", tta=False,
                   save_probabilities=True)
    values = set()
    for path in sorted(out.glob("*.nii.gz")):
        values |= set(np.unique(np.asarray(nib.load(path).dataobj)).tolist())
    assert values <= {0, 1, 2} and {0, 1} <= values  # label values, not region channels
    saved = np.load(next(out.glob("*.npz")))
    assert str(saved["nonlinearity"]) == "sigmoid" and saved["regions"].tolist() == ["organ+lesion", "lesion"]
    assert saved["labels"].tolist() == [1, 2] and saved["probabilities"].shape[0] == 2

    summary = stages.evaluate(out, dataset, tmp_path / "eval")
    assert set(summary["mean"]) == {"1", "2"} and "foreground_mean" in summary  # per label, as before
    regions = summary["regions"]
    assert regions["values"] == {"organ+lesion": [1, 2], "lesion": [2]}
    assert regions["mean"]["organ+lesion"]["dice"] > 0.5  # a few seconds of training find the organ
    assert all(set(c["regions"]) == {"organ+lesion", "lesion"} for c in summary["cases"])
    assert "## Regions" in (tmp_path / "eval" / "summary.md").read_text()
    assert "region,organ+lesion" in (tmp_path / "eval" / "per_case.csv").read_text()


def test_scribble_phantoms_train_and_never_predict_or_score_the_ignore_label(ignore_prepared, ray_session, tmp_path):
    dataset, workdir = ignore_prepared
    result = _train(workdir, epochs=1, iterations=4)
    rows = list(csv.DictReader((workdir / "runs" / "3d_lean" / "fold_0" / "metrics.csv").open()))
    assert np.isfinite(float(rows[-1]["train_loss"])) and {"val_dice_1", "val_dice_2"} <= set(rows[-1])
    assert "val_dice_3" not in rows[-1]
    payload = torch.load(result.final_model, weights_only=True)
    assert payload["num_classes"] == 3  # background, organ, lesion: no output for "ignore"
    out = tmp_path / "pred"
    stages.predict(workdir, _two_images(dataset, tmp_path / "in"), out, config="3d_lean", tta=False)
    for path in out.glob("*.nii.gz"):
        assert IGNORE_VALUE not in np.unique(np.asarray(nib.load(path).dataobj))
    summary = stages.evaluate(out, dataset, tmp_path / "eval")
    assert set(summary["labels"]) == {"1", "2"} and summary["ignore_label"] == IGNORE_VALUE
    first = summary["cases"][0]
    ref = np.asarray(nib.load(dataset / "labelsTr" / f"{first['case']}.nii.gz").dataobj)
    pred = np.asarray(nib.load(out / f"{first['case']}.nii.gz").dataobj)  # both in the file's own orientation
    scored = first["metrics"]["1"]
    assert scored["tp"] + scored["fn"] == int((ref == 1).sum())  # only annotated organ voxels are scored
    assert scored["fp"] == int(((pred == 1) & (ref != 1) & (ref != IGNORE_VALUE)).sum())
    assert int(((pred == 1) & (ref == IGNORE_VALUE)).sum()) > 0  # predictions under the ignore label: not counted
    assert decide_postprocessing(out, dataset).labels == (1, 2)  # evaluate-cv's rule, on the annotated voxels
