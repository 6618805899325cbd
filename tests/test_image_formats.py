"""Images in the formats users have (issue 16): `.mha`, `.nrrd`, `.mhd`, `.nhdr` and DICOM series read
through SimpleITK keep their voxels and their place in the world, a dataset in any of them validates,
preprocesses and predicts, and the prediction comes back in the input's format on the input's grid."""

from __future__ import annotations

import json
import locale
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (the [itk] extra, in the test extra) reads these formats")

from test_inference import save_untrained_model  # noqa: E402

from pipeline.cli import main  # noqa: E402  (imported before capsys: cli binds sys.stderr at import)
from pipeline.data.images import ItkFile, keeping_locale, open_image, read_volume, write_volume  # noqa: E402
from pipeline.data.synthetic import make_case  # noqa: E402
from pipeline.errors import SegPipeError  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0])
CONFIG = "3d_lean"
SHAPE = (40, 36, 16)  # small phantoms: (x, y, z) voxels


def rotation(ax: float, az: float) -> np.ndarray:
    """An oblique rotation: `ax` radians about x, then `az` about z."""
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


# directions: oblique; a permutation with flips (like a sagittal PSR scan), slightly oblique
DIRECTIONS = {"oblique": rotation(0.2, 0.3),
              "permuted": rotation(0.05, 0.0) @ np.array([[0.0, 0, -1], [-1, 0, 0], [0, 1, 0]])}


def itk_image(array_xyz: np.ndarray, spacing, origin, direction) -> sitk.Image:
    """A SimpleITK image of an (x, y, z) array (SimpleITK's numpy view is (z, y, x))."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return image


def write_itk(image: sitk.Image, path) -> None:
    """Write with SimpleITK itself; a `.dcm` path becomes a folder of one slice file per z (the tags
    DICOM readers sort and place slices by)."""
    if not str(path).endswith(".dcm"):
        sitk.WriteImage(image, str(path), useCompression=True)
        return
    path.mkdir(parents=True)
    with keeping_locale():  # GDCM's writer sets the C locale to "C" (ASCII text files) and leaves it
        write_series(image, path)


def write_series(image: sitk.Image, path) -> None:
    d = image.GetDirection()
    fmt = lambda v: f"{v:.10g}"  # noqa: E731 - DICOM decimal strings hold 16 characters
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "2.25.1234567890" + str(abs(hash(str(path))) % 10**12)
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        plane.SetMetaData("0020|000e", series)
        plane.SetMetaData("0020|000d", series + ".1")
        plane.SetMetaData("0008|0060", "MR")
        plane.SetMetaData("0010|0020", "phantom")
        plane.SetMetaData("0020|0037", "\\".join(fmt(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])))
        plane.SetMetaData("0020|0032", "\\".join(fmt(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(path / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


# geometry tolerance per format: .mha stores spacing, origin and direction as written; .nrrd stores
# spacing x direction vectors (SimpleITK splits them again, off by float64 rounding); DICOM stores
# decimal strings of 16 characters (here written with 10 significant digits)
TOLERANCE = {".mha": 0.0, ".mhd": 0.0, ".nrrd": 1e-12, ".nhdr": 1e-12, ".dcm": 1e-8}


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".mhd", ".nhdr", ".dcm"])
def test_a_file_reads_back_as_written_and_lands_where_nifti_puts_it(ending, direction, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 3000, size=(12, 10, 7)).astype(np.int16)
    spacing, origin, rot = (0.7, 0.85, 2.5), (-112.34567, 45.6789, -7.25), DIRECTIONS[direction]
    path = tmp_path / f"scan{ending}"
    write_itk(itk_image(data, spacing, origin, rot), path)

    image = open_image(path, "scan")
    np.testing.assert_array_equal(image.read(dtype=None), data)
    assert image.read(dtype=None).dtype == np.int16 and image.shape == data.shape
    tol = TOLERANCE[ending]
    # the affine maps an index to SimpleITK's physical point, LPS turned into RAS
    expected = np.eye(4)
    expected[:3, :3] = LPS @ rot @ np.diag(spacing)
    expected[:3, 3] = LPS @ np.asarray(origin)
    np.testing.assert_allclose(image.affine, expected, rtol=0, atol=tol * 1000)
    np.testing.assert_allclose(image.zooms, spacing, rtol=0, atol=tol * 10)

    # SimpleITK's own NIfTI writer does the LPS -> RAS turn independently: nibabel reading that file
    # must give the same RAS array and the same geometry as reading this format
    nifti = tmp_path / "same.nii.gz"
    sitk.WriteImage(image_from_series(path) if ending == ".dcm" else sitk.ReadImage(str(path)), str(nifti))
    ras, geometry = read_volume(path, "scan", dtype=None)
    ras_nifti, geometry_nifti = read_volume(nifti, "scan", dtype=None)
    np.testing.assert_array_equal(ras, ras_nifti)
    assert geometry.axcodes == geometry_nifti.axcodes and geometry.shape == geometry_nifti.shape
    np.testing.assert_allclose(geometry.affine, geometry_nifti.affine, atol=1e-4)  # NIfTI stores float32
    np.testing.assert_allclose(geometry.spacing, geometry_nifti.spacing, atol=1e-5)


def image_from_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def itk_grid_of(path) -> tuple:
    image = image_from_series(path) if str(path).endswith(".dcm") else sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".mhd", ".nhdr", ".dcm"])
def test_a_volume_written_beside_its_input_keeps_the_inputs_grid_exactly(ending, tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 4, size=(9, 11, 6)).astype(np.uint8)
    source = tmp_path / "in" / f"case{ending}"
    source.parent.mkdir()
    write_itk(itk_image(data, (0.6, 0.6, 3.0), (10.5, -20.25, 33.125), DIRECTIONS["permuted"]), source)
    ras, geometry = read_volume(source, "case", dtype=None)
    out = tmp_path / "out" / f"case{ending}"
    before = locale.setlocale(locale.LC_ALL)
    write_volume(ras, geometry, out, reference=source)
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's writer leaves "C": Python's text files turn ASCII
    assert itk_grid_of(out) == itk_grid_of(source)  # every number identical
    again, geometry_again = read_volume(out, "case", dtype=None)
    np.testing.assert_array_equal(again, ras)
    assert geometry_again == geometry
    # nothing else in the folder: a detached header's data file and nothing half-written
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == {".mhd": ["case.mhd", "case.zraw"], ".nhdr": ["case.nhdr", "case.raw.gz"]}.get(ending, [out.name])
    # without a reference the grid comes from the geometry alone: equal to float64 rounding
    # (DICOM: to the 16 characters of its decimal strings)
    alone = tmp_path / "alone" / f"case{ending}"
    write_volume(ras, geometry, alone)
    size, spacing, origin, direction = itk_grid_of(alone)
    size0, spacing0, origin0, direction0 = itk_grid_of(source)
    assert size == size0
    np.testing.assert_allclose(spacing, spacing0, rtol=1e-12 if ending != ".dcm" else 1e-9)
    np.testing.assert_allclose(origin, origin0, atol=1e-9)
    np.testing.assert_allclose(direction, direction0, atol=1e-12 if ending != ".dcm" else 1e-9)


# ---------------------------------------------------------------- a dataset in each format


def make_dataset(root, ending: str, num_cases: int = 4):
    """The synthetic phantoms (four orientations, 1 x 1 x 2.5 mm) tilted by an oblique rotation and
    written by SimpleITK in `ending`, in nnU-Net v2's raw layout with `file_ending`."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    tilt = rotation(0.12, -0.2)
    for i in range(num_cases):
        image, label, affine = make_case(0, i, SHAPE)
        linear = LPS @ tilt @ np.asarray(affine)[:3, :3]  # the tilt in RAS world, then into LPS
        spacing = np.linalg.norm(linear, axis=0)
        origin = LPS @ tilt @ np.asarray(affine)[:3, 3]
        pixels = np.rint(image * 100).astype(np.int16)  # DICOM holds integers
        write_itk(itk_image(pixels, spacing, origin, linear / spacing), root / "imagesTr" / f"phantom_{i:03d}_0000{ending}")
        write_itk(itk_image(label.astype(np.uint8), spacing, origin, linear / spacing),
                  root / "labelsTr" / f"phantom_{i:03d}{ending}")
    meta = {"name": "PhantomITK", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
            "numTraining": num_cases, "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


class SignNet(torch.nn.Module):
    """Foreground where the (normalised) first channel is positive: fed a label map as its image,
    it gives that label's foreground back, so any misplaced or flipped voxel shows."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        fg = (x[:, :1] > 0).float()
        return torch.cat([1 - fg, fg], 1) * self.scale


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".dcm"])
def test_a_dataset_in_the_format_validates_preprocesses_and_predicts_in_its_own_format(
        ending, tmp_path, dask_client, one_torch_thread):
    from pipeline import stages
    from pipeline.data.dataset import CaseFiles, LabelMap, read_case
    from pipeline.data.validation import check_dataset
    from pipeline.inference.predictor import ModelSpec, Predictor, predict_case
    from pipeline.preprocessing.store import open_store
    from pipeline.workdir import Workdir

    root = make_dataset(tmp_path / "ds", ending)
    report = check_dataset(root, workers=1)
    assert report.ok, report.problems
    dataset = stages.load_dataset(root)
    assert dataset.file_ending == ending and len(dataset.cases) == 4
    case = read_case(dataset, "phantom_001")  # the phantoms' RAS voxels, whatever the format
    _, label, _ = make_case(0, 1, SHAPE)
    assert case.label.sum() > 0 and np.count_nonzero(case.label) == np.count_nonzero(label)

    wd = Workdir.at(tmp_path / "W")
    plans = stages.plan(dataset, wd.root, client=dask_client, progress=False)
    pre = stages.preprocess(dataset, wd.root, config=CONFIG, client=dask_client, progress=False)
    assert not pre.failed
    store = open_store(wd.store).config(plans.configuration(CONFIG).data_identifier)
    assert sorted(store.case_ids()) == dataset.case_ids
    assert store.meta("phantom_001").geometry == case.geometry

    save_untrained_model(wd, plans)
    out = tmp_path / "pred"
    stages.predict(wd.root, root / "imagesTr", out, config=CONFIG, tta=False, progress=False)
    for c in dataset.cases:
        written = out / f"{c.case_id}{ending}"
        assert itk_grid_of(written) == itk_grid_of(c.images[0])  # the input's grid, number for number
        assert set(np.unique(open_image(written).read(None)).tolist()) <= {0, 1, 2}
    assert sorted(p.name for p in out.iterdir()) == [f"{c}{ending}" for c in dataset.case_ids]
    summary = stages.evaluate(out, root, tmp_path / "eval", progress=False)  # scored against the labels
    assert sorted(c["case"] for c in summary["cases"]) == dataset.case_ids

    # voxel for voxel: the label fed in as the image comes back in the file's own axis order
    predictor = Predictor(SignNet(), plans, CONFIG, LabelMap((0, 1)), spec=ModelSpec((), tta=False))
    label_file = root / "labelsTr" / f"phantom_002{ending}"
    written = tmp_path / "sign" / f"phantom_002{ending}"
    predicted, _ = predict_case(predictor, CaseFiles("phantom_002", (label_file,), None), written)
    reference = open_image(label_file).read(None)
    np.testing.assert_array_equal(predicted, (reference > 0).astype(predicted.dtype))
    np.testing.assert_array_equal(open_image(written).read(None), predicted)
    assert itk_grid_of(written) == itk_grid_of(label_file)


def test_a_truncated_mha_is_bad_input_naming_the_case(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", ".mha", num_cases=2)
    image = root / "imagesTr" / "phantom_001_0000.mha"
    uncompressed = sitk.ReadImage(str(image))
    sitk.WriteImage(uncompressed, str(image), useCompression=False)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    capsys.readouterr()
    assert main(["validate", str(root)]) == 2
    assert main(["preprocess", str(root), "--workdir", str(tmp_path / "W"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "phantom_001" in line]
    assert len(lines) >= 2 and all("imagesTr/phantom_001_0000.mha: truncated (its header declares" in line
                                   for line in lines), err
    assert all("phantom_000" not in line for line in err.splitlines())
    assert not (tmp_path / "W" / "store.zarr").exists()


def test_both_layouts_take_the_formats_and_a_dicom_series_is_one_folder(tmp_path):
    from pipeline.data.dataset import scan_dataset
    from pipeline.errors import BadInputError
    from pipeline.inference.predict import group_input_files

    nnunet = make_dataset(tmp_path / "nn", ".dcm", num_cases=2)
    msd = tmp_path / "msd"
    shutil.copytree(nnunet, msd)
    for p in (msd / "imagesTr").iterdir():
        p.rename(p.with_name(p.name.replace("_0000", "")))
    (msd / "dataset.json").write_text(json.dumps({
        "name": "PhantomITK", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "training": [{"image": f"./imagesTr/phantom_00{i}.dcm", "label": f"./labelsTr/phantom_00{i}.dcm"}
                     for i in range(2)]}))
    for root in (nnunet, msd):
        dataset, problems = scan_dataset(root)
        assert problems == [] and dataset.case_ids == ["phantom_000", "phantom_001"]
        assert dataset.file_ending == ".dcm"
    cases = group_input_files(msd / "imagesTr", 1)
    assert [c.case_id for c in cases] == ["phantom_000", "phantom_001"]
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(msd / "imagesTr" / "phantom_001.nrrd"))
    with pytest.raises(BadInputError, match=r"phantom_001: phantom_001\.dcm and phantom_001\.nrrd are two images of one"):
        group_input_files(msd / "imagesTr", 1)

    bad = json.loads((nnunet / "dataset.json").read_text()) | {"file_ending": ".png"}
    (nnunet / "dataset.json").write_text(json.dumps(bad))
    _, problems = scan_dataset(nnunet)
    assert any("file_ending '.png' is not supported" in p.message for p in problems)


def test_without_simpleitk_the_error_names_the_file_and_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(path))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # `import SimpleITK` now raises ImportError
    with pytest.raises(SegPipeError, match=r'case7: \S*scan\.nrrd is a \.nrrd image.*pip install "seg-pipeline\[itk\]"'):
        open_image(path, "case7")
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), nifti)
    assert open_image(nifti).shape == (4, 4, 4)  # NIfTI never needs it


def test_itk_files_and_dicom_series_are_read_from_a_bucket(bucket, tmp_path):
    from pipeline.storage import as_path

    local = tmp_path / "local"
    local.mkdir()
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    for name in ("a.mhd", "b.dcm", "c.nrrd"):
        write_itk(itk_image(data, (0.5, 0.75, 2.0), (1, 2, 3), DIRECTIONS["oblique"]), local / name)
    remote = as_path(f"{bucket}/images")
    remote.fs.put(str(local) + "/", remote.path, recursive=True)
    for name in ("a.mhd", "b.dcm", "c.nrrd"):
        image = ItkFile(remote / name, "remote")
        np.testing.assert_array_equal(image.read(None), data)
        np.testing.assert_array_equal(image.affine, open_image(local / name).affine)
    ras, geometry = read_volume(remote / "a.mhd", dtype=None)
    write_volume(ras, geometry, remote / "out" / "a.mhd", reference=remote / "a.mhd")
    assert sorted(p.name for p in (remote / "out").iterdir()) == ["a.mhd", "a.zraw"]
    np.testing.assert_array_equal(open_image(remote / "out" / "a.mhd").read(None), data)


def test_a_detached_header_may_not_reach_outside_its_folder_or_miss_its_data(tmp_path):
    from pipeline.errors import BadInputError

    (tmp_path / "ds").mkdir()
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(tmp_path / "secret.mhd"))
    header = (tmp_path / "secret.mhd").read_text()
    (tmp_path / "ds" / "escape.mhd").write_text(header.replace("= secret.raw", "= ../secret.raw"))
    with pytest.raises(BadInputError, match=r"c1: ds/escape\.mhd names the data file \.\./secret\.raw, outside its own"):
        open_image(tmp_path / "ds" / "escape.mhd", "c1")
    (tmp_path / "ds" / "lost.mhd").write_text(header.replace("= secret.raw", "= lost.raw"))
    with pytest.raises(BadInputError, match=r"c2: ds/lost\.mhd names the data file lost\.raw, which is missing"):
        open_image(tmp_path / "ds" / "lost.mhd", "c2")


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_a_case_stored_with_permuted_axes_is_pictured_over_its_own_image(ending, tmp_path):
    """`read_volume` gives RAS arrays: the picture code must not reorient them a second time (for a
    file whose axes are permuted that made the image's shape differ from the label's: no picture)."""
    from pipeline.data.nifti import geometry_from
    from pipeline.evaluation.pictures import draw_case

    label = np.zeros((6, 8, 10), np.uint8)
    label[2:4, 3:6, 4:8] = 1
    image = label.astype(np.float32) * 100 + 5
    affine = np.array([[0.0, 0, 2, 0], [1, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])  # file axes (y, z, x) of RAS
    geometry = geometry_from(affine, label.shape, (1.0, 1.5, 2.0))
    ras = lambda a: np.transpose(a, (2, 0, 1))  # noqa: E731 - file (y, z, x) -> RAS (x, y, z)
    for name, data in (("image", image), ("label", label), ("pred", label)):
        write_volume(ras(data), geometry, tmp_path / f"{name}{ending}")
    row = {"case": "c", "metrics": {"1": {"dice": 1.0}}}
    png = draw_case(row, tmp_path / f"pred{ending}", tmp_path / f"label{ending}", tmp_path / f"image{ending}",
                    {1: "organ"}, tmp_path / "c.png")
    assert png is not None and (tmp_path / "c.png").stat().st_size > 0
