"""`segpipe evaluate`: Dice, IoU, counts, volume and HD95 per class and case, and the files it writes."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pipeline.cli import main
from pipeline.errors import BadInputError
from pipeline.evaluation.metrics import OUTPUT_FILES, case_metrics, evaluate_folders, hausdorff_distance
from pipeline.plotting import plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_label(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.uint8), affine), str(path))
    return path


def cube(shape, lo, hi, value=1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(lo_, hi_) for lo_, hi_ in zip(lo, hi))] = value
    return a


def brute_force_hd(a: np.ndarray, b: np.ndarray, spacing, q: float) -> float:
    """Reference: every surface voxel's distance to every other-surface voxel, no distance transform."""
    from scipy import ndimage

    def surface_points(m):
        s = m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1))
        return np.argwhere(s) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), q), np.percentile(d.min(axis=0), q))


def png_ok(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(str(path)).shape


# ---------------------------------------------------------------- metrics on arrays


@pytest.mark.parametrize("axis, spacing", [(2, (0.8, 1.0, 2.5)), (0, (0.8, 1.0, 2.5)), (1, (0.5, 3.0, 1.0))])
def test_hd95_of_plates_offset_by_k_voxels_is_k_times_the_spacing_along_that_axis(axis, spacing):
    shape, k = (20, 20, 20), 3
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    idx = [slice(4, 14)] * 3
    idx[axis] = 6
    a[tuple(idx)] = True
    idx[axis] = 6 + k
    b[tuple(idx)] = True  # every voxel of a one-voxel plate is surface; its nearest partner is k voxels away
    assert hausdorff_distance(a, b, spacing) == pytest.approx(k * spacing[axis])
    assert hausdorff_distance(a, a, spacing) == 0.0


def test_hd95_matches_a_brute_force_surface_distance_with_anisotropic_spacing():
    spacing = (0.7, 1.3, 2.9)
    shape = (30, 28, 16)
    zz = np.indices(shape)
    ball = ((zz[0] - 14) * 0.7) ** 2 + ((zz[1] - 13) * 1.3) ** 2 + ((zz[2] - 8) * 2.9) ** 2 < 8.0**2
    box = cube(shape, (9, 6, 5), (24, 20, 13)).astype(bool)
    for q in (95.0, 100.0, 50.0):
        assert hausdorff_distance(ball, box, spacing, q) == pytest.approx(brute_force_hd(ball, box, spacing, q))


def test_cubes_offset_along_z_have_max_distance_k_times_the_z_spacing():
    spacing, k = (1.0, 1.0, 2.5), 3
    a = cube((30, 30, 30), (10, 10, 10), (20, 20, 20)).astype(bool)
    b = cube((30, 30, 30), (10, 10, 10 + k), (20, 20, 20 + k)).astype(bool)
    assert hausdorff_distance(a, b, spacing, percentile=100) == pytest.approx(k * 2.5)
    assert 0 < hausdorff_distance(a, b, spacing) <= k * 2.5


def test_case_metrics_counts_dice_iou_and_volume_of_offset_cubes():
    spacing = (1.0, 2.0, 0.5)  # 1 mm^3 per voxel
    ref = cube((20, 20, 20), (5, 5, 5), (15, 15, 15))  # 1000 voxels
    pred = cube((20, 20, 20), (7, 5, 5), (17, 15, 13))  # 10 x 10 x 8 = 800 voxels, 8 x 10 x 8 = 640 overlap
    m = case_metrics(pred, ref, spacing)[1]
    assert (m["tp"], m["fp"], m["fn"]) == (640, 160, 360)
    assert m["dice"] == pytest.approx(2 * 640 / (2 * 640 + 160 + 360))
    assert m["iou"] == pytest.approx(640 / (640 + 160 + 360))
    assert m["volume_diff_ml"] == pytest.approx((800 - 1000) / 1000)
    assert m["hd95"] == pytest.approx(brute_force_hd(pred > 0, ref > 0, spacing, 95))


def test_absent_classes_are_nan_and_one_sided_classes_score_zero_with_undefined_hd95():
    ref = cube((10, 10, 10), (2, 2, 2), (5, 5, 5), 1)
    pred = ref.copy()
    pred[7:9, 7:9, 7:9] = 3  # class 3 predicted, not in the reference
    m = case_metrics(pred, ref, (1, 1, 1), labels=[1, 2, 3])
    assert m[1]["dice"] == 1.0 and m[1]["hd95"] == 0.0
    assert math.isnan(m[2]["dice"]) and math.isnan(m[2]["iou"]) and math.isnan(m[2]["hd95"])
    assert m[3]["dice"] == 0.0 and m[3]["iou"] == 0.0 and math.isnan(m[3]["hd95"]) and m[3]["fp"] == 8


def test_a_value_outside_the_declared_labels_is_bad_input_naming_the_case():
    ref = cube((8, 8, 8), (1, 1, 1), (4, 4, 4), 1)
    pred = ref.copy()
    pred[6, 6, 6] = 9
    with pytest.raises(BadInputError, match=r"case_7: prediction holds label value\(s\) \[9\]"):
        case_metrics(pred, ref, (1, 1, 1), labels=[1, 2], case="case_7")


# ---------------------------------------------------------------- folders and files


@pytest.fixture
def two_cases(tmp_path):
    """case_a: class 1 offset by 2 voxels, class 2 exact. case_b: class 1 only, class 3 predicted but absent."""
    shape, spacing = (24, 24, 12), (0.8, 0.8, 2.0)
    ref_a = cube(shape, (4, 4, 2), (12, 12, 8), 1) + cube(shape, (14, 14, 2), (20, 20, 6), 2)
    pred_a = cube(shape, (6, 4, 2), (14, 12, 8), 1) + cube(shape, (14, 14, 2), (20, 20, 6), 2)
    ref_b = cube(shape, (4, 4, 2), (10, 10, 6), 1)
    pred_b = ref_b + cube(shape, (16, 16, 8), (18, 18, 10), 3)
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    for d, a, b in ((refs, ref_a, ref_b), (preds, pred_a, pred_b)):
        write_label(d / "case_a.nii.gz", a, spacing)
        write_label(d / "case_b.nii.gz", b, spacing)
    return preds, refs, {"a": (pred_a, ref_a), "b": (pred_b, ref_b), "spacing": spacing}


def test_summary_has_exactly_the_fixed_schema(two_cases, tmp_path):
    preds, refs, _ = two_cases
    summary = evaluate_folders(preds, refs, tmp_path / "out", progress=False)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == summary
    assert {"labels", "mean", "foreground_mean", "cases"} <= set(on_disk)
    assert on_disk["labels"] == {"1": "1", "2": "2", "3": "3"}  # no dataset.json: names are the values
    for label_mean in on_disk["mean"].values():
        assert {"dice", "iou", "hd95"} <= set(label_mean)
    assert {"dice", "iou"} <= set(on_disk["foreground_mean"])
    assert [c["case"] for c in on_disk["cases"]] == ["case_a", "case_b"]
    for c in on_disk["cases"]:
        assert set(c) == {"case", "metrics"}
        assert list(c["metrics"]) == ["1", "2", "3"]
        for m in c["metrics"].values():
            assert {"dice", "iou", "tp", "fp", "fn", "hd95"} <= set(m)


def test_absent_class_is_null_in_the_file_and_excluded_from_means(two_cases, tmp_path):
    preds, refs, arrays = two_cases
    evaluate_folders(preds, refs, tmp_path / "out", progress=False)
    text = (tmp_path / "out" / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    s = json.loads(text)
    b = next(c for c in s["cases"] if c["case"] == "case_b")["metrics"]
    assert b["2"]["dice"] is None and b["2"]["iou"] is None and b["2"]["hd95"] is None
    assert s["mean"]["2"]["dice"] == 1.0 and s["mean"]["2"]["n"] == 1  # case_b's null left out, not a 0
    # class 3: predicted in case_b only -> Dice 0, HD95 undefined; absent from both in case_a
    assert b["3"]["dice"] == 0.0 and b["3"]["hd95"] is None
    assert s["mean"]["3"]["dice"] == 0.0 and s["mean"]["3"]["hd95"] is None and s["mean"]["3"]["n_hd95"] == 0
    a1 = s["cases"][0]["metrics"]["1"]
    assert s["mean"]["1"]["dice"] == pytest.approx((a1["dice"] + 1.0) / 2)
    means = [s["mean"][k]["dice"] for k in ("1", "2", "3")]
    assert s["foreground_mean"]["dice"] == pytest.approx(np.mean(means))


def test_hd95_in_the_summary_uses_the_voxel_spacing_of_the_files(tmp_path):
    spacing, k = (0.6, 0.9, 3.0), 2
    a = np.zeros((16, 16, 12), np.uint8)
    b = np.zeros_like(a)
    a[3:12, 3:12, 4] = 1
    b[3:12, 3:12, 4 + k] = 1
    write_label(tmp_path / "p" / "c.nii.gz", a, spacing)
    write_label(tmp_path / "r" / "c.nii.gz", b, spacing)
    s = evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "out", progress=False)
    assert s["cases"][0]["metrics"]["1"]["hd95"] == pytest.approx(k * 3.0)
    assert s["cases"][0]["metrics"]["1"]["dice"] == 0.0


def test_per_case_csv_and_markdown_carry_every_case_and_class(two_cases, tmp_path):
    preds, refs, _ = two_cases
    s = evaluate_folders(preds, refs, tmp_path / "out", progress=False)
    rows = list(csv.DictReader((tmp_path / "out" / "per_case.csv").open()))
    assert len(rows) == 2 * 3
    row = next(r for r in rows if r["case"] == "case_b" and r["label"] == "2")
    assert row["dice"] == "" and row["tp"] == "0"  # undefined stays empty, not 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| 1 | 1 | 2 |" in md and "foreground mean" in md and f"{s['foreground_mean']['dice']:.4f}" in md


def test_geometry_mismatch_is_bad_input_naming_the_case(two_cases, tmp_path):
    preds, refs, arrays = two_cases
    pred_a, _ = arrays["a"]
    write_label(preds / "case_a.nii.gz", pred_a, arrays["spacing"], origin=(5.0, 0.0, 0.0))
    with pytest.raises(BadInputError, match="case_a: prediction and reference are on different grids"):
        evaluate_folders(preds, refs, tmp_path / "out", progress=False)
    write_label(preds / "case_a.nii.gz", pred_a[:, :, :10], arrays["spacing"])
    with pytest.raises(BadInputError, match=r"case_a: prediction shape \(24, 24, 10\) differs"):
        evaluate_folders(preds, refs, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "summary.json").exists()  # nothing half-written


def test_prediction_without_reference_is_bad_input_naming_the_case(two_cases, tmp_path):
    preds, refs, arrays = two_cases
    shutil.copy(preds / "case_a.nii.gz", preds / "case_zz.nii.gz")
    with pytest.raises(BadInputError, match="case_zz: prediction case_zz.nii.gz has no reference label"):
        evaluate_folders(preds, refs, tmp_path / "out", progress=False)


def test_a_reference_without_prediction_is_simply_not_evaluated(two_cases, tmp_path):
    preds, refs, _ = two_cases
    (preds / "case_b.nii.gz").unlink()  # a fold's validation predictions cover part of the dataset
    s = evaluate_folders(preds, refs, tmp_path / "out", progress=False)
    assert [c["case"] for c in s["cases"]] == ["case_a"] and s["n_cases"] == 1


def test_non_integer_prediction_is_bad_input(two_cases, tmp_path):
    preds, refs, arrays = two_cases
    img = nib.Nifti1Image(arrays["a"][0].astype(np.float32) * 0.5, np.diag([*arrays["spacing"], 1.0]))
    nib.save(img, str(preds / "case_a.nii.gz"))
    with pytest.raises(BadInputError, match="case_a: prediction case_a.nii.gz holds non-integer values"):
        evaluate_folders(preds, refs, tmp_path / "out", progress=False)


def test_reference_as_nnunet_v2_dataset_takes_names_and_values_from_its_dataset_json(tmp_path):
    root = tmp_path / "Dataset001_Liver"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 3},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    ref = cube((12, 12, 8), (2, 2, 2), (9, 9, 6), 1)
    ref[4:6, 4:6, 3:5] = 3
    write_label(root / "labelsTr" / "liver_1.nii.gz", ref)
    write_label(root / "imagesTr" / "liver_1_0000.nii.gz", ref * 10)
    pred = ref.copy()
    pred[pred == 3] = 1  # tumour missed
    write_label(tmp_path / "preds" / "liver_1.nii.gz", pred)
    s = evaluate_folders(tmp_path / "preds", root, tmp_path / "out", progress=False)
    assert s["labels"] == {"1": "liver", "3": "tumour"}
    assert s["cases"][0]["metrics"]["3"]["dice"] == 0.0 and s["cases"][0]["metrics"]["1"]["fp"] == 8


# ---------------------------------------------------------------- real data


@pytest.fixture
def hippo_preds(hippocampus, tmp_path):
    preds = tmp_path / "preds"
    preds.mkdir()
    for case in ("hippocampus_003", "hippocampus_004", "hippocampus_006"):
        shutil.copy(hippocampus / "labelsTr" / f"{case}.nii.gz", preds)
    return preds


def test_hippocampus_labels_against_themselves_score_dice_1_and_hd95_0(hippocampus, hippo_preds, tmp_path):
    s = evaluate_folders(hippo_preds, hippocampus, tmp_path / "out", num_workers=2, progress=False)
    assert s["labels"] == {"1": "Anterior", "2": "Posterior"}
    assert s["n_cases"] == 3
    for m in s["mean"].values():
        assert (m["dice"], m["iou"], m["hd95"], m["volume_diff_ml"], m["n"]) == (1.0, 1.0, 0.0, 0.0, 3)
    assert s["foreground_mean"]["dice"] == 1.0
    assert all(c["metrics"][k]["fp"] == 0 and c["metrics"][k]["tp"] > 0 for c in s["cases"] for k in ("1", "2"))


def test_reference_as_dataset_folder_or_label_folder_gives_the_same_summary(hippocampus, hippo_preds, tmp_path):
    # a shifted prediction, so the comparison is not between two trivially perfect summaries
    path = hippo_preds / "hippocampus_004.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.roll(np.asarray(img.dataobj), 2, axis=1), img.affine, img.header), str(path))
    keys = ("labels", "mean", "foreground_mean", "cases", "n_cases")
    from_dataset = evaluate_folders(hippo_preds, hippocampus, tmp_path / "a", progress=False)
    from_labels = evaluate_folders(hippo_preds, hippocampus / "labelsTr", tmp_path / "b", progress=False)
    assert {k: from_dataset[k] for k in keys} == {k: from_labels[k] for k in keys}
    assert from_dataset["mean"]["1"]["dice"] < 1.0
    plain = tmp_path / "plain_labels"  # a bare label folder: same numbers, names are the values
    plain.mkdir()
    for p in hippo_preds.iterdir():
        shutil.copy(hippocampus / "labelsTr" / p.name, plain)
    from_plain = evaluate_folders(hippo_preds, plain, tmp_path / "c", progress=False)
    assert from_plain["labels"] == {"1": "1", "2": "2"}
    assert from_plain["mean"] == from_dataset["mean"] and from_plain["cases"] == from_dataset["cases"]


def test_orientation_of_the_prediction_file_does_not_matter(spinalcord, tmp_path):
    ref = spinalcord / "labelsTr" / "sct_t2.nii.gz"  # stored PSR
    img = nib.load(str(ref))
    assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
    preds = tmp_path / "preds"
    preds.mkdir()
    nib.save(nib.as_closest_canonical(img), str(preds / "sct_t2.nii.gz"))  # same voxels written RAS
    s = evaluate_folders(preds, spinalcord, tmp_path / "out", progress=False)
    m = s["cases"][0]["metrics"]["1"]
    assert (m["dice"], m["hd95"], m["fp"], m["fn"]) == (1.0, 0.0, 0, 0) and m["tp"] > 0


def test_totalsegmentator_keeps_its_non_contiguous_label_values_as_keys(totalseg, tmp_path):
    ref = totalseg / "labelsTr" / "totalseg_ct_sm.nii.gz"
    img = nib.load(str(ref))
    pred = np.asarray(img.dataobj).copy()
    pred[pred == 5] = 0  # class 5 missed entirely
    preds = tmp_path / "preds"
    preds.mkdir()
    nib.save(nib.Nifti1Image(pred, img.affine, img.header), str(preds / "totalseg_ct_sm.nii.gz"))
    s = evaluate_folders(preds, totalseg, tmp_path / "out", progress=False)
    declared = json.loads((totalseg / "dataset.json").read_text())["labels"]
    assert list(s["mean"]) == sorted((k for k in declared if k != "0"), key=int)
    assert "117" in s["mean"] and "12" not in s["mean"] and len(s["mean"]) == len(declared) - 1 > 30
    m5 = s["cases"][0]["metrics"]["5"]
    assert m5["dice"] == 0.0 and m5["tp"] == 0 and m5["hd95"] is None and m5["volume_diff_ml"] < 0
    assert all(s["mean"][k]["dice"] in (1.0, None) for k in s["mean"] if k != "5")
    assert png_ok(tmp_path / "out" / "dice_boxplot.png")[1] > 1000  # widened for 41 classes


def test_cli_evaluate_writes_the_four_files_and_a_valid_png(hippocampus, hippo_preds, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(hippo_preds), str(hippocampus), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    h, w, _ = png_ok(out / "dice_boxplot.png")
    assert h > 100 and w > 100
    assert "foreground mean Dice 1.0000" in capsys.readouterr().out


def test_cli_evaluate_exits_2_on_bad_input(hippocampus, hippo_preds, tmp_path, capsys):
    shutil.copy(hippo_preds / "hippocampus_003.nii.gz", hippo_preds / "not_a_case.nii.gz")
    assert main(["evaluate", str(hippo_preds), str(hippocampus), "--out", str(tmp_path / "e")]) == 2
    assert "not_a_case" in capsys.readouterr().err
    assert not (tmp_path / "e" / "summary.json").exists()


def test_pictures_on_request_one_png_per_case_drawn_where_the_structures_are(hippocampus, hippo_preds, tmp_path):
    from pipeline.evaluation.pictures import pick_slices

    out = tmp_path / "eval"
    assert main(["evaluate", str(hippo_preds), str(hippocampus), "--out", str(out), "--pictures"]) == 0
    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert pictures == [f"{p.name[:-len('.nii.gz')]}.png" for p in sorted(hippo_preds.iterdir())]
    h, w, _ = png_ok(out / "pictures" / pictures[0])
    assert w > 2 * h > 200  # three slices side by side
    # the slices lie inside the structures' axial extent, spread over it
    label = nib.as_closest_canonical(nib.load(str(hippocampus / "labelsTr" / "hippocampus_003.nii.gz")))
    ref = np.asarray(label.dataobj)
    z = np.flatnonzero(ref.any(axis=(0, 1)))
    picks = pick_slices(ref, ref)
    assert len(picks) == 3 and z.min() < picks[0] < picks[1] < picks[2] < z.max()
    assert all(ref[:, :, k].any() for k in picks)


def test_pictures_of_chosen_cases_and_clear_errors_when_they_cannot_be_drawn(hippocampus, hippo_preds, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(hippo_preds), str(hippocampus), "--out", str(out), "--pictures", "hippocampus_004"]) == 0
    assert [p.name for p in (out / "pictures").iterdir()] == ["hippocampus_004.png"]
    assert main(["evaluate", str(hippo_preds), str(hippocampus), "--out", str(tmp_path / "e2"),
                 "--pictures", "hippocampus_999"]) == 2
    assert "hippocampus_999" in capsys.readouterr().err
    labels_only = tmp_path / "labels"  # a bare label folder: the images must be given
    shutil.copytree(hippo_preds, labels_only)
    assert main(["evaluate", str(hippo_preds), str(labels_only), "--out", str(tmp_path / "e3"), "--pictures"]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["evaluate", str(hippo_preds), str(labels_only), "--out", str(tmp_path / "e4"), "--pictures",
                 "--images", str(hippocampus / "imagesTr")]) == 0
    assert len(list((tmp_path / "e4" / "pictures").iterdir())) == 3


# ---------------------------------------------------------------- plotting helper shared with training


def test_training_curves_png_from_a_metrics_csv_with_gaps(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    lines = ["epoch,train_loss,val_loss,val_dice_1,val_dice_2,lr,seconds"]
    for e in range(12):
        val = e % 3 == 2  # validation every third epoch: other rows have empty cells
        lines.append(f"{e},{1 / (e + 1):.4f},{(1.2 / (e + 1)) if val else ''},"
                     f"{min(0.9, 0.1 * e) if val else ''},{min(0.8, 0.08 * e) if val else ''},"
                     f"{0.01 * (1 - e / 12) ** 0.9:.6f},{30 + e % 2}")
    csv_path.write_text("\n".join(lines) + "\n")
    out = plot_training_curves(csv_path, tmp_path / "curves" / "training_curves.png")
    h, w, _ = png_ok(out)
    assert w > 800 and h > 500
    assert not list(out.parent.glob(".*tmp*"))
