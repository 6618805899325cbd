"""The fingerprint: one small summary per case, computed the same in-process and on Dask."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.dataset import load_dataset
from pipeline.errors import BadInputError, SegPipeError
from pipeline.planning.fingerprint import (
    INTENSITY_SAMPLE_BUDGET,
    Fingerprint,
    compute_fingerprint,
    nonzero_bbox,
    samples_per_case,
)

REFERENCE = Path(__file__).parent / "reference" / "nnunet_v2_plans.json"


def _subset(path: Path, n: int):
    dataset = load_dataset(path)
    return dataclasses.replace(dataset, cases=dataset.cases[:n])


def _write(path: Path, data: np.ndarray, affine=None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _two_channel_dataset(root: Path, extra_cases: dict | None = None) -> Path:
    """nnU-Net v2 layout, two channels that are nonzero in different boxes, one label block."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    t1 = np.zeros((20, 16, 12), np.float32)
    t1[2:10, 3:12, 1:8] = 10.0
    t2 = np.zeros_like(t1)
    t2[5:15, 4:6, 2:9] = 7.0
    label = np.zeros(t1.shape, np.uint8)
    label[4:8, 4:8, 3:6] = 1
    cases = {"good": (t1, t2, label), **(extra_cases or {})}
    for cid, (a, b, lab) in cases.items():
        _write(root / "imagesTr" / f"{cid}_0000.nii.gz", a)
        _write(root / "imagesTr" / f"{cid}_0001.nii.gz", b)
        _write(root / "labelsTr" / f"{cid}.nii.gz", lab)
    (root / "dataset.json").write_text(json.dumps({
        "name": "TwoChannel", "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "lesion": 1}, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return root


def test_dask_and_in_process_fingerprints_are_identical(hippocampus, dask_client):
    dataset = _subset(hippocampus, 12)
    local = compute_fingerprint(dataset, client=None, progress=False)
    distributed = compute_fingerprint(dataset, client=dask_client, progress=False)
    assert distributed == local
    assert distributed.hash() == local.hash()
    assert [c.case_id for c in local.cases] == dataset.case_ids  # dataset order, not completion order


def test_hippocampus_case_summaries_are_consistent(hippocampus):
    fp = compute_fingerprint(_subset(hippocampus, 6), progress=False)
    assert fp.channels == ["MRI"] and fp.label_values == [0, 1, 2]
    for case in fp.cases:
        assert case.spacing == [1.0, 1.0, 1.0] and case.axcodes == ["R", "A", "S"]
        assert sum(case.class_voxels.values()) == np.prod(case.shape)
        assert set(case.class_voxels) <= {"0", "1", "2"}
        assert all(a <= s for a, s in zip(case.shape_after_crop, case.shape))
        (stats,) = case.intensity
        assert stats.count == case.class_voxels.get("1", 0) + case.class_voxels.get("2", 0)
        assert stats.min <= stats.percentile_00_5 <= stats.median <= stats.percentile_99_5 <= stats.max
        assert stats.min <= stats.mean <= stats.max and stats.std > 0
    (pooled,) = fp.foreground_intensity_properties
    assert pooled.count == 6 * fp.samples_per_case
    assert pooled.min == min(c.intensity[0].min for c in fp.cases)  # exact, not sampled
    assert pooled.percentile_00_5 <= pooled.median <= pooled.percentile_99_5


def test_all_hippocampus_cases_on_dask_agree_with_nnunets_fingerprint(hippocampus, dask_client):
    fp = compute_fingerprint(load_dataset(hippocampus), client=dask_client, progress=False)
    assert len(fp.cases) == 208
    assert fp.samples_per_case == INTENSITY_SAMPLE_BUDGET // 208
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    ref = json.loads(REFERENCE.read_text())["Task04_Hippocampus"]["fingerprint"]
    # nnU-Net's lists are (z, y, x) of RAS-stored files: reversed RAS
    assert np.median(fp.shapes_after_crop, axis=0).tolist() == ref["median_shape_after_crop"][::-1]
    assert np.median(fp.spacings, axis=0).tolist() == ref["median_spacing"][::-1]
    assert fp.median_relative_size_after_crop == ref["median_relative_size_after_cropping"]
    theirs = ref["foreground_intensity_properties_per_channel"]["0"]
    ours = fp.foreground_intensity_properties[0]
    # nnU-Net draws 480,769 voxels per case with replacement; we keep 9,615: the same distribution
    for key in ("mean", "std", "median", "percentile_99_5"):
        assert getattr(ours, key) == pytest.approx(theirs[key], rel=0.02), key
    assert ours.percentile_00_5 == pytest.approx(theirs["percentile_00_5"], abs=2.0)
    assert (ours.min, ours.max) == (theirs["min"], theirs["max"])


def test_spinalcord_spacing_and_shape_are_in_the_ras_frame(spinalcord):
    fp = compute_fingerprint(load_dataset(spinalcord), progress=False)
    by_id = {c.case_id: c for c in fp.cases}
    assert by_id["sct_t2"].axcodes == ["P", "S", "R"]
    assert by_id["sct_t2"].shape == [52, 60, 55]  # stored (60, 55, 52) as P, S, R
    assert by_id["sct_t2s"].spacing == pytest.approx([0.5, 0.5, 7.5], abs=1e-5)


def test_crop_is_the_nonzero_box_of_all_channels(tmp_path):
    fp = compute_fingerprint(load_dataset(_two_channel_dataset(tmp_path / "ds")), progress=False)
    (case,) = fp.cases
    assert case.crop_bbox == [[2, 15], [3, 12], [1, 9]]
    assert case.shape_after_crop == [13, 9, 8] and case.shape == [20, 16, 12]
    assert fp.median_relative_size_after_crop == pytest.approx(13 * 9 * 8 / (20 * 16 * 12))
    assert case.class_voxels == {"0": 20 * 16 * 12 - 48, "1": 48}
    t1, t2 = case.intensity
    assert (t1.min, t1.max, t1.count) == (10.0, 10.0, 48)
    assert (t2.min, t2.max) == (0.0, 7.0)  # the label block reaches outside T2's box
    assert t2.mean == pytest.approx(7.0 * (3 * 2 * 3) / 48)


def test_an_all_zero_image_keeps_its_full_extent():
    image = np.zeros((1, 4, 5, 6))
    assert nonzero_bbox(image) == [[0, 4], [0, 5], [0, 6]]


def test_every_bad_case_is_named(tmp_path, dask_client):
    t1 = np.ones((8, 8, 8), np.float32)
    wrong = np.zeros((8, 8, 8), np.uint8)
    wrong[2, 2, 2] = 5
    root = _two_channel_dataset(tmp_path / "ds", {"undeclared": (t1, t1, wrong), "truncated": (t1, t1, wrong * 0)})
    blob = (root / "imagesTr" / "truncated_0001.nii.gz").read_bytes()
    (root / "imagesTr" / "truncated_0001.nii.gz").write_bytes(blob[: len(blob) // 2])
    dataset = load_dataset(root)
    for client in (None, dask_client):
        with pytest.raises(BadInputError) as info:
            compute_fingerprint(dataset, client=client, progress=False)
        named = {p.case: p.message for p in info.value.problems}
        assert set(named) == {"undeclared", "truncated"}
        assert "[5]" in named["undeclared"] and "not declared" in named["undeclared"]


def test_sample_budget_bounds_memory_whatever_the_case_count():
    for n in (1, 3, 208, 10_000, 3_000_000):
        assert 1 <= samples_per_case(n)
        assert n * samples_per_case(n) <= max(INTENSITY_SAMPLE_BUDGET, n)


def test_save_load_round_trip_and_schema_check(spinalcord, tmp_path):
    fp = compute_fingerprint(load_dataset(spinalcord), progress=False)
    fp.save(tmp_path / "fingerprint.json")
    again = Fingerprint.load(tmp_path / "fingerprint.json")
    assert again == fp and again.hash() == fp.hash()
    data = json.loads((tmp_path / "fingerprint.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(SegPipeError, match="schema version 99"):
        Fingerprint.load(tmp_path / "old.json")
    with pytest.raises(SegPipeError, match="segpipe fingerprint"):
        Fingerprint.load(tmp_path / "missing.json")


def test_cli_fingerprint_then_plan_explain(spinalcord, dask_client, tmp_path, capsys):
    work = tmp_path / "work"
    address = ["--dask-address", dask_client.scheduler.address]
    assert main(["fingerprint", str(spinalcord), "--workdir", str(work), *address]) == 0
    fp = Fingerprint.load(work / "fingerprint.json")
    assert [c.case_id for c in fp.cases] == ["sct_t1w", "sct_t2", "sct_t2s"]
    capsys.readouterr()
    assert main(["plan", str(spinalcord), "--workdir", str(work), "--explain", "--gpu-memory-gb", "4", *address]) == 0
    out = capsys.readouterr().out
    assert "memory budget 4 GB" in out
    for text in ("3d_fullres", "3d_lean", "2d", "patch_size = ", "batch_size = ", "why: ", "transpose_forward"):
        assert text in out
    assert (work / "plans.json").is_file()


def test_cli_fingerprint_of_a_broken_dataset_exits_2(tmp_path, capsys):
    t1 = np.ones((8, 8, 8), np.float32)
    wrong = np.zeros((8, 8, 8), np.uint8)
    wrong[1, 1, 1] = 9
    root = _two_channel_dataset(tmp_path / "ds", {"undeclared": (t1, t1, wrong)})
    code = main(["fingerprint", str(root), "--workdir", str(tmp_path / "work"), "--workers", "1"])
    assert code == 2
    assert "undeclared" in capsys.readouterr().err
    assert not (tmp_path / "work" / "fingerprint.json").exists()
