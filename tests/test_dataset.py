"""Reading datasets: both raw layouts give the same arrays, labels map to contiguous indices and
back, and every volume is read in RAS and written back exactly as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.data.dataset import LAYOUT_MSD, LAYOUT_NNUNET, LabelMap, load_dataset, read_case
from pipeline.data.nifti import from_ras, read_volume, to_ras, write_volume
from pipeline.errors import BadInputError

HIPPO_CASES = ("hippocampus_003", "hippocampus_004", "hippocampus_006")


def nnunet_v2_from_hippocampus(hippocampus: Path, root: Path, cases=HIPPO_CASES, second_channel=False) -> Path:
    """A v2 raw dataset (`CASE_0000.nii.gz` images, `channel_names`) made of copied hippocampus cases.

    With `second_channel`, each case gets a `_0001` file holding 2 * image + 1 on the same grid.
    """
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in cases:
        src = hippocampus / "imagesTr" / f"{case}.nii.gz"
        shutil.copy(src, root / "imagesTr" / f"{case}_0000.nii.gz")
        if second_channel:
            img = nib.load(src)
            data = np.asarray(img.dataobj, dtype=np.float32) * 2 + 1
            nib.save(nib.Nifti1Image(data, img.affine, img.header), root / "imagesTr" / f"{case}_0001.nii.gz")
        shutil.copy(hippocampus / "labelsTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    channels = {"0": "T1", "1": "T2"} if second_channel else {"0": "MRI"}
    meta = {"channel_names": channels, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
            "numTraining": len(cases), "file_ending": ".nii.gz", "name": "HippoV2"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_decathlon_layout_lists_every_hippocampus_case_without_reading_voxels(hippocampus):
    ds = load_dataset(hippocampus)
    assert ds.layout == LAYOUT_MSD
    assert len(ds.cases) == 208 and len(set(ds.case_ids)) == 208
    assert ds.channels == ("MRI",) and ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert ds.label_map.is_identity
    case = read_case(ds, "hippocampus_003")
    assert case.image.dtype == np.float32 and case.image.shape[0] == 1
    assert case.label.shape == case.image.shape[1:]
    assert set(np.unique(case.label).tolist()) == {0, 1, 2}
    assert case.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_nnunet_v2_layout_reads_the_same_arrays_as_decathlon(hippocampus, tmp_path):
    v2 = load_dataset(nnunet_v2_from_hippocampus(hippocampus, tmp_path / "v2"))
    msd = load_dataset(hippocampus)
    assert v2.layout == LAYOUT_NNUNET
    assert v2.case_ids == list(HIPPO_CASES)
    assert v2.labels == msd.labels and v2.channels == ("MRI",)
    for case in HIPPO_CASES:
        a, b = read_case(v2, case), read_case(msd, case)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.geometry == b.geometry


def test_two_channel_case_reads_channels_first_in_both_layouts(hippocampus, tmp_path):
    """v2: one file per channel; Decathlon: one 4D file with the channels last. Same result."""
    v2 = load_dataset(nnunet_v2_from_hippocampus(hippocampus, tmp_path / "v2", cases=HIPPO_CASES[:1], second_channel=True))
    assert v2.num_channels == 2 and v2.channels == ("T1", "T2")
    a = read_case(v2, HIPPO_CASES[0])
    assert a.image.shape[0] == 2
    np.testing.assert_allclose(a.image[1], a.image[0] * 2 + 1)

    root = tmp_path / "msd4d"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    src = nib.load(hippocampus / "imagesTr" / f"{HIPPO_CASES[0]}.nii.gz")
    data = np.asarray(src.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, data * 2 + 1], axis=-1), src.affine), root / "imagesTr" / "c.nii.gz")
    shutil.copy(hippocampus / "labelsTr" / f"{HIPPO_CASES[0]}.nii.gz", root / "labelsTr" / "c.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": [{"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"}]}))
    msd = load_dataset(root)
    b = read_case(msd, "c")
    assert msd.cases[0].four_d
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)


def test_v2_case_without_its_second_channel_is_refused_by_name(hippocampus, tmp_path):
    root = nnunet_v2_from_hippocampus(hippocampus, tmp_path / "v2", second_channel=True)
    (root / "imagesTr" / "hippocampus_004_0001.nii.gz").unlink()
    with pytest.raises(BadInputError) as err:
        load_dataset(root)
    assert [(p.case, "missing channel" in p.message) for p in err.value.problems] == [("hippocampus_004", True)]


def test_non_contiguous_totalsegmentator_labels_round_trip(totalseg):
    ds = load_dataset(totalseg)
    lm = ds.label_map
    assert lm.values[0] == 0 and lm.values[-1] == 117 and not lm.is_identity
    assert lm.num_classes == len(ds.labels)
    label = read_case(ds, ds.cases[0]).label
    index = lm.to_index(label)
    assert index.dtype == np.uint8
    assert index.max() < lm.num_classes
    assert set(np.unique(index).tolist()) == {lm.values.index(v) for v in np.unique(label).tolist()}
    restored = lm.to_values(index)
    np.testing.assert_array_equal(restored, label)
    assert restored.dtype == np.uint8  # 117 fits


def test_label_map_refuses_undeclared_values():
    lm = LabelMap((0, 1, 5))
    np.testing.assert_array_equal(lm.to_index(np.array([0, 5, 1])), [0, 2, 1])
    with pytest.raises(ValueError, match=r"\[3\] are not declared"):
        lm.to_index(np.array([0, 3, 5]))
    with pytest.raises(ValueError):
        LabelMap((1, 2))  # no background


@pytest.mark.parametrize("case, axcodes", [("sct_t2", ("P", "S", "R")), ("sct_t2s", ("L", "A", "S"))])
def test_ras_reorientation_round_trips(spinalcord, tmp_path, case, axcodes):
    path = spinalcord / "imagesTr" / f"{case}.nii.gz"
    original = nib.load(path)
    data = np.asarray(original.dataobj, dtype=np.float32)
    ras, geometry = read_volume(path, case)
    assert geometry.axcodes == axcodes
    # Same voxels and spacing as nibabel's own closest-canonical image: no interpolation.
    canonical = nib.as_closest_canonical(original)
    np.testing.assert_array_equal(ras, np.asarray(canonical.dataobj, dtype=np.float32))
    assert geometry.spacing == pytest.approx(canonical.header.get_zooms()[:3])
    assert ras.shape == geometry.ras_shape
    np.testing.assert_array_equal(from_ras(to_ras(data, geometry), geometry), data)
    # Written back: the input's orientation, affine and voxels, exactly.
    out = tmp_path / f"{case}.nii.gz"
    write_volume(ras, geometry, out, reference=path)
    back = nib.load(out)
    assert nib.aff2axcodes(back.affine) == axcodes
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj, dtype=np.float32), data)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


def test_anisotropic_spacing_is_reported_in_ras_axis_order(spinalcord):
    ds = load_dataset(spinalcord)
    t2s = read_case(ds, "sct_t2s")
    assert t2s.spacing == pytest.approx((0.5, 0.5, 7.5), rel=1e-3)
    t2 = read_case(ds, "sct_t2")  # stored P, S, R: the R axis is the file's third
    zooms = nib.load(spinalcord / "imagesTr" / "sct_t2.nii.gz").header.get_zooms()
    assert t2.spacing == pytest.approx((zooms[2], zooms[0], zooms[1]))
    assert t2.label.shape == t2.image.shape[1:]


def test_label_values_beyond_the_declared_range_are_not_wrapped_around(hippocampus, tmp_path):
    root = nnunet_v2_from_hippocampus(hippocampus, tmp_path / "v2", cases=HIPPO_CASES[:1])
    path = root / "labelsTr" / f"{HIPPO_CASES[0]}.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.int16)
    data[0, 0, 0] = 256  # would read as 0 in the uint8 that labels 0..2 fit in
    nib.save(nib.Nifti1Image(data, img.affine), path)
    label = read_case(load_dataset(root), HIPPO_CASES[0]).label
    assert label.max() == 256
