"""`validate`: every defect a raw dataset can have is reported in one pass, naming its case, and
nothing is written. Broken datasets are built in tmp_path from copies of real hippocampus cases."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.validation import check_dataset, validate_dataset
from pipeline.errors import Problem

CASES = ("hippocampus_003", "hippocampus_004", "hippocampus_006")
VICTIM = "hippocampus_004"


@pytest.fixture
def small(hippocampus, tmp_path) -> Path:
    """A Decathlon dataset of three copied hippocampus cases; every test breaks it its own way."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in CASES:
        for folder in ("imagesTr", "labelsTr"):
            shutil.copy(hippocampus / folder / f"{case}.nii.gz", root / folder / f"{case}.nii.gz")
    meta = json.loads((hippocampus / "dataset.json").read_text())
    meta["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in CASES]
    meta["numTraining"] = len(CASES)
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


# ---------------------------------------------------------------- ways to break a dataset


def _image(root, case=VICTIM):
    return root / "imagesTr" / f"{case}.nii.gz"


def _label(root, case=VICTIM):
    return root / "labelsTr" / f"{case}.nii.gz"


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)


def _meta(root):
    return json.loads((root / "dataset.json").read_text())


def _set_meta(root, meta):
    (root / "dataset.json").write_text(json.dumps(meta))


def _edit_label(root, edit, dtype=None):
    data, affine = _load(_label(root))
    data = data.astype(dtype or data.dtype)
    edit(data)
    _save(_label(root), data, affine)


def _edit_image(root, edit):
    data, affine = _load(_image(root))
    data = data.astype(np.float32)
    edit(data)
    _save(_image(root), data, affine)


def _relabel_affine(root, change):
    data, affine = _load(_label(root))
    affine = affine.copy()
    change(affine)
    _save(_label(root), data, affine)


def missing_image(root):
    _image(root).unlink()


def missing_label(root):
    _label(root).unlink()


def truncated_gzip(root):
    raw = _image(root).read_bytes()
    _image(root).write_bytes(raw[: len(raw) // 2])


def corrupt_gzip_crc(root):
    """Intact header and deflate stream, bad checksum: nibabel alone would read it without complaint."""
    raw = bytearray(_image(root).read_bytes())
    raw[-6] ^= 0xFF
    _image(root).write_bytes(bytes(raw))


def text_file(root):
    _image(root).write_text("this is not an image\n")


def shape_mismatch(root):
    data, affine = _load(_label(root))
    _save(_label(root), data[:-2], affine)


def spacing_mismatch(root):
    _relabel_affine(root, lambda a: a.__setitem__((2, 2), a[2, 2] * 1.5))


def origin_mismatch(root):
    _relabel_affine(root, lambda a: a.__setitem__((0, 3), a[0, 3] + 2.0))


def direction_mismatch(root):
    _relabel_affine(root, lambda a: a.__setitem__((0, 0), -a[0, 0]))


def singular_affine(root):
    """An sform that flattens the third axis (nibabel cannot even write it as a qform)."""
    data, affine = _load(_label(root))
    affine = affine.copy()
    affine[:3, 2] = 0.0
    header = nib.Nifti1Header()
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(data, None, header=header), _label(root))


def four_d_with_two_channels(root):
    data, affine = _load(_image(root))
    _save(_image(root), np.stack([data, data], axis=-1).astype(np.float32), affine)


def two_d_image(root):
    data, affine = _load(_image(root))
    _save(_image(root), np.ascontiguousarray(data[:, :, 0]).astype(np.float32), affine)


def undeclared_label(root):
    _edit_label(root, lambda d: d.__setitem__((1, 1, 1), 5))


def non_integer_label(root):
    _edit_label(root, lambda d: d.__setitem__((1, 1, 1), 1.0000001), dtype=np.float32)


def negative_label(root):
    _edit_label(root, lambda d: d.__setitem__((1, 1, 1), -1), dtype=np.int16)


def nan_image(root):
    _edit_image(root, lambda d: d.__setitem__((3, 3, 3), np.nan))


def inf_image(root):
    _edit_image(root, lambda d: d.__setitem__((3, 3, 3), np.inf))


def duplicate_case(root):
    meta = _meta(root)
    meta["training"].append(dict(meta["training"][1]))
    _set_meta(root, meta)


def path_escapes(root):
    shutil.copy(_image(root), root.parent / "outside.nii.gz")
    meta = _meta(root)
    meta["training"][1]["image"] = "../outside.nii.gz"
    _set_meta(root, meta)


def symlink_outside(root):
    outside = root.parent / "elsewhere.nii.gz"
    shutil.move(_image(root), outside)
    os.symlink(outside, _image(root))


def forged_huge_shape(root):
    """A 100 KB file whose header claims a 4000^3 float32 volume (238 GiB)."""
    img = nib.load(_image(root))
    header = img.header.copy()
    header.set_data_shape((4000, 4000, 4000))
    with gzip.open(_image(root), "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        f.write(np.random.default_rng(0).bytes(100_000))


def gzip_bomb(root):
    """A small, valid header followed by a stream that inflates far past what the header declares."""
    header = nib.load(_image(root)).header.copy()
    header.set_data_dtype(np.uint8)  # same shape as the label: 70 KB declared
    with gzip.open(_image(root), "wb", compresslevel=9) as f:
        f.write(header.binaryblock + b"\0" * 4)
        for _ in range(64):
            f.write(bytes(2**20))  # 64 MiB of zeros: a ~64 KB file


DEFECTS = [
    # (break it, the case blamed, a phrase the message must hold)
    (missing_image, VICTIM, "missing file"),
    (missing_label, VICTIM, "missing file"),
    (truncated_gzip, VICTIM, "truncated or corrupt"),
    (corrupt_gzip_crc, VICTIM, "truncated or corrupt"),
    (text_file, VICTIM, "unreadable NIfTI"),
    (shape_mismatch, VICTIM, "shape mismatch"),
    (spacing_mismatch, VICTIM, "spacing"),
    (origin_mismatch, VICTIM, "origin"),
    (direction_mismatch, VICTIM, "direction"),
    (singular_affine, VICTIM, "singular"),
    (four_d_with_two_channels, VICTIM, "channel count mismatch"),
    (two_d_image, VICTIM, "expected a 3D volume"),
    (undeclared_label, VICTIM, "not declared in dataset.json: 5"),
    (non_integer_label, VICTIM, "non-integer"),
    (negative_label, VICTIM, "negative"),
    (nan_image, VICTIM, "1 NaN"),
    (inf_image, VICTIM, "1 Inf"),
    (duplicate_case, VICTIM, "duplicate case id"),
    (path_escapes, "outside", "escapes the dataset folder"),
    (symlink_outside, VICTIM, "points outside the dataset folder"),
    (forged_huge_shape, VICTIM, "forged header"),
    (gzip_bomb, VICTIM, "beyond what its header declares"),
]


@pytest.mark.parametrize("defect, case, phrase", DEFECTS, ids=[d[0].__name__ for d in DEFECTS])
def test_each_defect_is_reported_against_its_case(small, defect, case, phrase):
    defect(small)
    problems = validate_dataset(small)
    assert problems, f"{defect.__name__} went unnoticed"
    assert all(p.case == case for p in problems), problems  # the healthy cases are not blamed
    assert any(phrase in p.message for p in problems), problems


@pytest.mark.parametrize("edit, phrase", [
    (lambda root: (root / "dataset.json").write_text('{"modality": {"0": "MRI"},'), "not valid JSON"),
    (lambda root: _set_meta(root, {k: v for k, v in _meta(root).items() if k != "modality"}), "lacks 'modality'"),
    (lambda root: _set_meta(root, {**_meta(root), "labels": ["background"]}), "'labels' must be"),
    (lambda root: _set_meta(root, {**_meta(root), "training": {"image": "x"}}), "'training' must be a list"),
    (lambda root: _set_meta(root, {**_meta(root), "modality": "MRI"}), "'modality' must be"),
    (lambda root: _set_meta(root, {**_meta(root), "labels": {"1": "a", "2": "b"}}), "background as value 0"),
    (lambda root: _set_meta(root, {**_meta(root), "training": []}), "no training cases"),
    (lambda root: _set_meta(root, [1, 2]), "must hold a JSON object"),
    (lambda root: (root / "dataset.json").unlink(), "no dataset.json"),
], ids=["invalid-json", "no-modality", "labels-list", "training-object", "modality-string", "no-background",
        "empty", "json-list", "no-dataset-json"])
def test_dataset_json_problems_are_reported_for_the_dataset(small, edit, phrase):
    edit(small)
    problems = validate_dataset(small)
    assert any(p.case is None and phrase in p.message for p in problems), problems


@pytest.mark.parametrize("defect", [forged_huge_shape, gzip_bomb])
def test_forged_sizes_are_refused_without_allocating_them(small, defect):
    defect(small)
    tracemalloc.start()
    try:
        validate_dataset(small)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # the forged header claims 238 GiB; the bomb inflates to 64 MiB


def test_every_problem_of_a_dataset_comes_in_one_report(small):
    nan_image(small)
    undeclared_label(small)  # same case: both of its problems are listed
    _label(small, CASES[0]).unlink()
    data, affine = _load(_label(small, CASES[2]))
    _save(_label(small, CASES[2]), data[:, :-1], affine)
    problems = validate_dataset(small)
    assert [(p.case, key) for p in problems for key in ("missing file", "shape mismatch", "NaN", "not declared")
            if key in p.message] == [
        (CASES[0], "missing file"), (VICTIM, "NaN"), (VICTIM, "not declared"), (CASES[2], "shape mismatch")]


def test_on_dask_the_workers_read_the_voxels_and_the_report_is_the_same(small, dask_client, monkeypatch):
    """`check_dataset(client=...)`: every case is checked by a Dask worker, none by this process (on a
    cluster the dataset is not read twice through the driver), and the report is word for word the one
    a local check gives: errors and warnings, in case order."""
    from distributed import get_task_stream

    from pipeline.data.images import NiftiFile

    nan_image(small)
    undeclared_label(small)
    duplicate_case(small)  # the victim twice: tasks take their cases by position, so both are checked
    _label(small, CASES[0]).unlink()
    data, affine = _load(_label(small, CASES[2]))
    _save(_label(small, CASES[2]), np.zeros_like(data), affine)  # empty: a warning
    local = check_dataset(small, progress=False)
    assert local.problems and local.warnings

    def read_here(*args, **kwargs):
        raise AssertionError("this process read voxels: the Dask workers should have")

    monkeypatch.setattr(NiftiFile, "read_checked", read_here)  # here only: the workers are other processes
    with get_task_stream(dask_client) as stream:
        remote = check_dataset(small, client=dask_client, progress=False)

    assert [str(p) for p in remote.problems] == [str(p) for p in local.problems]
    assert [str(w) for w in remote.warnings] == [str(w) for w in local.warnings]
    assert {p.case for p in remote.problems} == {CASES[0], VICTIM}
    assert sum("NaN" in p.message for p in remote.problems) == 2  # the duplicated victim, checked twice
    assert any(t["key"].startswith("validate-") for t in stream.data)  # the checks ran as Dask tasks
    with pytest.raises(AssertionError, match="read voxels"):
        check_dataset(small, progress=False, workers=1)  # the guard works: a local check trips it


def test_nnunet_v2_layout_defects(hippocampus, tmp_path):
    from test_dataset import nnunet_v2_from_hippocampus

    root = nnunet_v2_from_hippocampus(hippocampus, tmp_path / "v2", cases=CASES, second_channel=True)
    (root / "imagesTr" / f"{CASES[0]}_0001.nii.gz").unlink()  # a missing channel
    data, affine = _load(root / "imagesTr" / f"{VICTIM}_0001.nii.gz")
    shifted = affine.copy()
    shifted[2, 2] *= 2
    _save(root / "imagesTr" / f"{VICTIM}_0001.nii.gz", data, shifted)  # channels on different grids
    shutil.copy(root / "imagesTr" / f"{CASES[2]}_0000.nii.gz", root / "imagesTr" / "stray.nii.gz")
    problems = validate_dataset(root)
    found = {(p.case, key) for p in problems for key in ("missing channel", "spacing", "_XXXX") if key in p.message}
    assert found == {(CASES[0], "missing channel"), (VICTIM, "spacing"), ("stray", "_XXXX")}, problems


def test_v2_label_linked_from_outside_is_reported_and_not_read(hippocampus, tmp_path):
    from test_dataset import nnunet_v2_from_hippocampus

    root = nnunet_v2_from_hippocampus(hippocampus, tmp_path / "v2", cases=CASES)
    outside = tmp_path / "secret.nii.gz"
    outside.write_text("not even an image")  # reading it would add an 'unreadable' problem
    _label(root).unlink()
    os.symlink(outside, _label(root))
    problems = validate_dataset(root)
    assert [(p.case, "points outside" in p.message) for p in problems] == [(VICTIM, True)], problems


def test_uncompressed_nii_files_are_read_and_truncation_caught(hippocampus, tmp_path):
    root = tmp_path / "nii"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in CASES:
        for folder, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
            img = nib.load(hippocampus / folder / f"{case}.nii.gz")
            nib.save(img, root / folder / f"{case}{suffix}.nii")
    _set_meta(root, {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "p": 2},
                     "file_ending": ".nii"})
    assert check_dataset(root).ok
    path = root / "labelsTr" / f"{VICTIM}.nii"
    path.write_bytes(path.read_bytes()[:-100])
    problems = validate_dataset(root)
    assert [p.case for p in problems] == [VICTIM]
    assert "cannot hold" in problems[0].message or "truncated" in problems[0].message


@pytest.mark.parametrize("name", ["hippocampus", "spinalcord", "totalseg"])
def test_the_shared_real_datasets_are_clean(name, request):
    report = check_dataset(request.getfixturevalue(name), progress=False)
    assert report.problems == []
    assert report.num_cases == {"hippocampus": 208, "spinalcord": 3, "totalseg": 1}[name]


def test_empty_label_and_constant_image_are_warnings_not_errors(small):
    _edit_label(small, lambda d: d.fill(0))
    _edit_image(small, lambda d: d.fill(0.0))
    report = check_dataset(small)
    assert report.ok
    assert [(w.case, "empty" in w.message or "constant" in w.message) for w in report.warnings] == [
        (VICTIM, True), (VICTIM, True)]


def test_reader_threads_do_not_change_the_report(small):
    nan_image(small)
    _label(small, CASES[2]).write_text("junk")
    one = check_dataset(small, workers=1)
    many = check_dataset(small, workers=4, progress=True)
    assert one.problems == many.problems and len(one.problems) == 2


def test_header_only_check_skips_voxel_defects(small):
    shape_mismatch(small)
    data, affine = _load(_image(small, CASES[0]))
    data = data.astype(np.float32)
    data[0, 0, 0] = np.nan
    _save(_image(small, CASES[0]), data, affine)
    assert [p.case for p in validate_dataset(small, check_voxels=False)] == [VICTIM]
    assert [p.case for p in validate_dataset(small)] == [CASES[0], VICTIM]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_cli_validate_exits_2_with_one_line_per_problem_and_writes_nothing(small, capsys):
    nan_image(small)
    _label(small, CASES[0]).unlink()
    before = _snapshot(small)
    expected = validate_dataset(small)
    assert main(["validate", str(small)]) == 2
    err = capsys.readouterr().err.splitlines()
    error_lines = [line for line in err if line.startswith("error ")]
    assert error_lines == [f"error {p}" for p in expected] and len(expected) == 2
    assert _snapshot(small) == before
    assert sorted(p.name for p in small.parent.iterdir()) == ["ds"]


def test_cli_validate_json_and_clean_exit(small, capsys):
    assert main(["validate", str(small)]) == 0
    assert "ok" in capsys.readouterr().out
    nan_image(small)
    assert main(["validate", "--json", str(small)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"] == [str(Problem(VICTIM, validate_dataset(small)[0].message))]


# ---------------------------------------------------------------- issue 13


def _set_scaling(path: Path, slope: float, inter: float = 0.0) -> None:
    """Rewrite the header's scl_slope / scl_inter in place: the stored values stay as they are."""
    import struct

    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:120] = struct.pack(nib.load(path).header.endianness + "ff", slope, inter)
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # nothing may leak from numpy
def test_validate_reads_scl_slope_and_scl_inter_as_every_stage_does(small, capsys):
    # a legal label stored as 0/2/4 with slope 0.5: the values are 0/1/2
    data, affine = _load(_label(small))
    img = nib.Nifti1Image((data * 2).astype(np.uint8), affine)
    img.set_data_dtype(np.uint8)
    nib.save(img, _label(small))
    _set_scaling(_label(small), 0.5)
    assert main(["validate", str(small)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # an int16 image with slope 1e38: its values are beyond float32, where every stage reads them
    data, affine = _load(_image(small, CASES[0]))
    img = nib.Nifti1Image(np.rint(data).astype(np.int16), affine)
    img.set_data_dtype(np.int16)
    nib.save(img, _image(small, CASES[0]))
    _set_scaling(_image(small, CASES[0]), 1e38)
    assert main(["validate", str(small)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith(f"error {CASES[0]}: imagesTr/{CASES[0]}.nii.gz: its header's scaling "
                                               "(scl_slope 1e+38, scl_inter 0) takes "), err
    assert "beyond the float32 range" in err[0]


def test_a_case_with_outlier_spacing_is_a_warning_saying_what_resampling_does(small, capsys):
    """0.1 x 0.1 x 50 mm among 1 mm cases: resampled to the median it becomes a needle of voxels."""
    for path in (_image(small), _label(small)):
        data, _ = _load(path)
        _save(path, data, np.diag([0.1, 0.1, 50.0, 1.0]))
    shape = nib.load(_image(small)).shape
    assert main(["validate", str(small)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    resampled = f"{max(1, round(shape[0] * 0.1))}x{max(1, round(shape[1] * 0.1))}x{shape[2] * 50}"
    assert warnings == [
        f"warning {VICTIM}: spacing (0.1, 0.1, 50) mm is far from the dataset's median (1, 1, 1) mm: resampled to it "
        f"the case becomes {resampled} voxels (from {'x'.join(map(str, shape))}), 10x coarser along x (structures "
        "thinner than 10 voxels there vanish); 10x coarser along y (structures thinner than 10 voxels there vanish); "
        "50x finer along z (each voxel becomes 50); check its header"], warnings


def test_real_spacing_differences_are_not_outliers(spinalcord):
    """SCT's 0.5 x 0.5 x 7.5 mm T2* among 1 mm cases is an ordinary anisotropic scan."""
    assert not [w for w in check_dataset(spinalcord).warnings if "far from" in w.message]


def test_a_zero_voxel_size_without_qform_or_sform_is_reported(small):
    data, _ = _load(_image(small))
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["pixdim"][1:4] = 0
    header["vox_offset"] = 352
    _image(small).write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + data.tobytes(order="F")))
    problems = validate_dataset(small)
    assert [p.case for p in problems] == [VICTIM]
    assert "declares a voxel size of 0 (pixdim[1..3]) and no qform/sform" in problems[0].message


@pytest.mark.parametrize("labels_json, phrase", [
    ('{"0": "background", "1": "anterior", "1": "posterior", "2": "posterior"}', "has the key '1' twice"),
    ('{"0": "background", "1": "hippocampus", "2": "hippocampus"}', "labels 1, 2 share the name 'hippocampus'"),
], ids=["msd-key-twice", "msd-name-twice"])
def test_duplicate_labels_are_refused_through_the_cli(small, capsys, labels_json, phrase):
    text = json.dumps(_meta(small))
    start = text.index('"labels": {')
    text = text[:start] + '"labels": ' + labels_json + text[text.index("}", start) + 1:]
    (small / "dataset.json").write_text(text)
    assert main(["validate", str(small)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert any(line.startswith("error dataset: dataset.json") and phrase in line for line in err), err


def test_num_training_counts_the_entries_listed_valid_or_not(small, capsys):
    meta = _meta(small)
    meta["training"][1]["image"] = 17  # an invalid entry: its own error, still an entry of the list
    meta["numTraining"] = 3
    _set_meta(small, meta)
    assert main(["validate", str(small)]) == 2
    err = capsys.readouterr().err
    assert "numTraining" not in err and "image path must be a non-empty string, got 17" in err
    meta["numTraining"] = 4
    _set_meta(small, meta)
    assert main(["validate", str(small)]) == 2
    assert "warning dataset: numTraining is 4 but 'training' lists 3 entries" in capsys.readouterr().err


def test_read_case_names_the_real_non_integer_value(small):
    """The loader behind preprocessing (reached when validation is skipped) prints the value it found."""
    from pipeline.data.dataset import load_dataset, read_case
    from pipeline.errors import BadInputError

    _edit_label(small, lambda d: d.__setitem__((1, 1, 1), 2.25), dtype=np.float32)
    with pytest.raises(BadInputError, match=r"label hippocampus_004\.nii\.gz holds non-integer values \(e\.g\. 2\.25\)"):
        read_case(load_dataset(small), VICTIM)
