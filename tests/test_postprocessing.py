"""nnU-Net's post-processing decision: keep the largest component only where validation Dice improves."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import BadInputError
from pipeline.evaluation.postprocessing import decide_postprocessing
from pipeline.inference.postprocessing import PostprocessingRule, apply_postprocessing, keep_largest, largest_component

SHAPE = (32, 32, 16)


def write(path, arr, spacing=(1.0, 1.0, 2.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, np.uint8), np.diag([*spacing, 1.0])), str(path))


def organ(shift=0) -> np.ndarray:
    """Class 1 and class 2 side by side, touching: one foreground component."""
    a = np.zeros(SHAPE, np.uint8)
    a[6 + shift:16 + shift, 8:20, 4:10] = 1
    a[16 + shift:22 + shift, 8:20, 4:10] = 2
    return a


def make_folders(tmp_path, pairs):
    preds, refs = tmp_path / "preds", tmp_path / "refs"
    for i, (pred, ref) in enumerate(pairs):
        write(preds / f"case_{i}.nii.gz", pred)
        write(refs / f"case_{i}.nii.gz", ref)
    return preds, refs


def test_largest_component_uses_full_connectivity_and_keeps_ties():
    m = np.zeros((8, 8, 8), bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # touching only at a corner: one component with 26-connectivity
    m[6, 6, 6] = True
    assert largest_component(m).sum() == 2 and not largest_component(m)[6, 6, 6]
    tie = np.zeros((8, 8, 8), bool)
    tie[1, 1, 1] = tie[6, 6, 6] = True
    assert largest_component(tie).sum() == 2
    assert not largest_component(np.zeros((4, 4, 4), bool)).any()


def test_a_spurious_far_away_blob_enables_keep_largest_foreground_and_improves_dice(tmp_path):
    pairs = []
    for shift in (0, 1, 2):
        ref = organ(shift)
        pred = ref.copy()
        pred[26:29, 26:29, 12:14] = 1  # false positive far from the organ
        pairs.append((pred, ref))
    preds, refs = make_folders(tmp_path, pairs)
    rule = decide_postprocessing(preds, refs, labels=[1, 2])
    assert rule.keep_largest_foreground
    assert rule.keep_largest_per_class == ()  # after step 1 nothing is left for a class step to fix
    assert rule.dice_after["1"] > rule.dice_before["1"] and rule.dice_after["2"] == rule.dice_before["2"] == 1.0
    assert rule.dice_after["foreground"] == 1.0 > rule.dice_before["foreground"]
    pred, ref = pairs[0]
    cleaned = apply_postprocessing(pred, rule)
    assert np.array_equal(cleaned, ref)
    assert pred[27, 27, 12] == 1  # the input is untouched


def test_an_island_of_one_class_inside_another_is_removed_by_a_per_class_step(tmp_path):
    pairs = []
    for shift in (0, 1):
        ref = organ(shift)
        pred = ref.copy()
        pred[8 + shift:10 + shift, 12:14, 6:8] = 2  # class-2 island inside class 1: same foreground component
        pairs.append((pred, ref))
    preds, refs = make_folders(tmp_path, pairs)
    rule = decide_postprocessing(preds, refs, labels={1: "a", 2: "b"})
    assert not rule.keep_largest_foreground  # the foreground is one component: step 1 changes nothing
    assert rule.keep_largest_per_class == (2,)
    assert rule.dice_after["2"] > rule.dice_before["2"]
    out = apply_postprocessing(pairs[0][0], rule)
    assert (out == 2).sum() == (pairs[0][1] == 2).sum() and out[9, 13, 7] == 0


def test_keep_largest_is_not_enabled_where_it_hurts(tmp_path):
    pairs = []
    for shift in (0, 2):
        ref = organ(shift)
        ref[26:30, 24:30, 10:14] = 1  # the reference itself has a second component
        pred = ref.copy()
        pred[10 + shift, 10, 5] = 0  # imperfect but both components right
        pairs.append((pred, ref))
    preds, refs = make_folders(tmp_path, pairs)
    rule = decide_postprocessing(preds, refs)
    assert rule.is_identity
    assert rule.dice_after == rule.dice_before and rule.dice_before["1"] < 1.0
    assert np.array_equal(apply_postprocessing(pairs[0][0], rule), pairs[0][0])


def test_the_foreground_step_is_refused_when_one_class_gets_worse_even_if_the_mean_improves(tmp_path):
    # nnU-Net's defensive rule. Class 2 has a small part apart from the organ in the reference too;
    # a large class-1 false positive far away makes step 1 raise the foreground mean (class 1 gains
    # more than class 2 loses), but class 2 gets worse, so step 1 is refused and the per-class step
    # for class 1 does the cleaning instead.
    ref = np.zeros(SHAPE, np.uint8)
    ref[4:20, 4:20, 2:12] = 1
    ref[20:24, 4:20, 2:12] = 2
    ref[28:30, 28:30, 13:15] = 2
    pred = ref.copy()
    pred[26:30, 4:10, 2:10] = 1
    preds, refs = make_folders(tmp_path, [(pred, ref)])
    rule = decide_postprocessing(preds, refs, labels=[1, 2])
    after_step1 = keep_largest(pred, [1, 2])
    d = lambda p, v: 2 * ((p == v) & (ref == v)).sum() / ((p == v).sum() + (ref == v).sum())  # noqa: E731
    assert d(after_step1, 1) + d(after_step1, 2) > d(pred, 1) + d(pred, 2)  # the mean would improve
    assert d(after_step1, 2) < d(pred, 2)  # but class 2 gets worse
    assert not rule.keep_largest_foreground
    assert rule.keep_largest_per_class == (1,)
    assert rule.dice_after == {"foreground": pytest.approx(1.0), "1": 1.0, "2": 1.0}


def test_rule_round_trips_through_json_beside_the_model(tmp_path):
    rule = PostprocessingRule(labels=(1, 2, 117), keep_largest_foreground=True, keep_largest_per_class=(117,),
                              dice_before={"foreground": 0.5, "1": float("nan")}, dice_after={"foreground": 0.6},
                              num_cases=4)
    path = rule.save(tmp_path / "model" / "postprocessing.json")
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["dice_before"]["1"] is None
    loaded = PostprocessingRule.load(path)
    assert (loaded.labels, loaded.keep_largest_foreground, loaded.keep_largest_per_class, loaded.num_cases) == \
        ((1, 2, 117), True, (117,), 4)
    path.write_text(json.dumps({"labels": [1], "keep_largest_per_class": [5]}))
    with pytest.raises(BadInputError, match="not among its labels"):
        PostprocessingRule.load(path)


def test_keep_largest_keeps_original_non_contiguous_values():
    a = np.zeros((10, 10, 10), np.uint8)
    a[1:5, 1:5, 1:5] = 117
    a[8, 8, 8] = 117
    a[1:3, 6:9, 1:3] = 52
    out = keep_largest(a, [117])
    assert out[8, 8, 8] == 0 and (out == 117).sum() == 64 and (out == 52).sum() == 12


def test_decided_on_real_hippocampus_labels_with_a_planted_blob(hippocampus, tmp_path):
    preds = tmp_path / "preds"
    preds.mkdir()
    for case in ("hippocampus_003", "hippocampus_004"):
        src = hippocampus / "labelsTr" / f"{case}.nii.gz"
        img = nib.load(str(src))
        a = np.asarray(img.dataobj).astype(np.uint8)
        if case == "hippocampus_003":
            a[0:2, 0:2, 0:2] = 2  # a corner blob far from the hippocampus
            nib.save(nib.Nifti1Image(a, img.affine, img.header), str(preds / src.name))
        else:
            shutil.copy(src, preds)
    rule = decide_postprocessing(preds, hippocampus)
    assert rule.labels == (1, 2) and rule.num_cases == 2
    assert rule.keep_largest_foreground and rule.dice_after["foreground"] == 1.0
