"""The embedded phantom dataset: a valid Decathlon dataset, reproducible for a seed, made once,
anisotropic and stored in several orientations, with nested labelled structures."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from pipeline.data.dataset import load_dataset, read_case
from pipeline.data.synthetic import make_demo_dataset
from pipeline.data.validation import check_dataset
from pipeline.errors import BadInputError


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_phantoms_validate_clean_without_warnings(synthetic_dataset):
    report = check_dataset(synthetic_dataset)
    assert report.problems == [] and report.warnings == []
    assert report.num_cases == 8


def test_decathlon_layout_and_declared_labels(synthetic_dataset):
    meta = json.loads((synthetic_dataset / "dataset.json").read_text())
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert meta["numTraining"] == 8
    assert sorted(p.name for p in synthetic_dataset.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


def test_volumes_are_anisotropic_varied_and_stored_in_several_orientations(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    axcodes, spacings, shapes = set(), [], []
    for case in ds.cases:
        img = nib.load(case.images[0])
        axcodes.add("".join(nib.aff2axcodes(img.affine)))
        c = read_case(ds, case)
        spacings.append(c.spacing)
        shapes.append(c.image.shape[1:])
    assert {"RAS", "LPS", "PSR"} <= axcodes  # mirrored and permuted cases exercise the reorientation
    spacings = np.array(spacings)
    assert np.all(spacings[:, 2] > 2 * spacings[:, :2].max(axis=1))  # thick slices along S, in RAS order
    assert len({tuple(s) for s in spacings}) == len(ds.cases)  # every case has its own spacing
    assert np.allclose(np.median(shapes, axis=0), (48, 48, 24), rtol=0.1)  # the requested size, varied
    assert len(set(shapes)) > 1


def test_lesion_lies_inside_the_organ_and_each_structure_has_its_own_intensity(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    for case in ds.cases:
        c = read_case(ds, case)
        label, image = c.label, c.image[0]
        assert (label == 1).sum() > 1000 and (label == 2).sum() > 100, case.case_id
        around_lesion = binary_dilation(label == 2) & (label != 2)
        assert set(np.unique(label[around_lesion]).tolist()) == {1}, case.case_id  # organ surrounds it
        means = [float(np.median(image[label == k])) for k in (0, 1, 2)]
        assert means[0] < means[1] < means[2], (case.case_id, means)


def test_same_seed_same_bytes_other_seed_other_phantoms(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_cases=3, seed=7)
    b = make_demo_dataset(tmp_path / "b", num_cases=3, seed=7)
    c = make_demo_dataset(tmp_path / "c", num_cases=3, seed=8)
    fa, fb, fc = ({k: v[0] for k, v in _files(x).items()} for x in (a, b, c))
    assert fa == fb
    image = "imagesTr/phantom_000.nii.gz"
    assert not np.array_equal(nib.load(a / image).get_fdata(), nib.load(c / image).get_fdata())


def test_a_complete_dataset_is_returned_untouched_and_other_parameters_rebuild_it(tmp_path):
    out = tmp_path / "Phantom"
    assert make_demo_dataset(out, num_cases=2) == out
    before = _files(out)
    assert make_demo_dataset(out, num_cases=2) == out
    assert _files(out) == before  # same bytes and modification times: nothing rewritten
    make_demo_dataset(out, num_cases=3)
    assert load_dataset(out).case_ids == ["phantom_000", "phantom_001", "phantom_002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Phantom"]  # no temporary folders left


def test_an_incomplete_dataset_is_rebuilt(tmp_path):
    out = make_demo_dataset(tmp_path / "Phantom", num_cases=2)
    (out / "labelsTr" / "phantom_001.nii.gz").unlink()
    make_demo_dataset(out, num_cases=2)
    assert check_dataset(out).ok


def test_a_folder_holding_something_else_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="not a synthetic dataset"):
        make_demo_dataset(out, num_cases=1)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_empty_folder_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert check_dataset(make_demo_dataset(out, num_cases=1, shape=(32, 32, 16))).ok
