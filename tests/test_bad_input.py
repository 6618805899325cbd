"""Bad input through the real command line: `segpipe preprocess BROKEN --workdir W` on a workdir whose
store already holds a good result must exit 2 with one line naming the case and the problem, print
no traceback, stay small in memory, and leave every byte of the store as it was.

Each broken dataset is a copy of a 4-case synthetic phantom dataset (always available) with one
defect; the prepared workdir is made once per module and copied for each defect. Two legal oddities
are accepted rather than refused (they are validation warnings, not errors):

* a constant image: the warning is printed by `preprocess` too, and the case is stored as an
  all-zero normalised image (z-score of a constant is 0, not NaN: std is floored at 1e-8);
* an empty label (background only): a patient without the structure is a real case.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main  # imported here, not under capsys: cli binds sys.stderr at import
from pipeline.preprocessing.store import open_store, verify_store
from pipeline.workdir import Workdir

NUM_CASES = 4
VICTIM = "phantom_001"
NEW_CASE = "phantom_004"
CONFIG = "3d_fullres"
# The CLI imports numpy, nibabel, scipy and zarr (~100-200 MB); a forged header declares 32 GiB.
MAX_RSS_MB = 400


# ---------------------------------------------------------------- running the real CLI


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float  # largest VmHWM of the CLI process and its descendants

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cli_env() -> dict:
    env = dict(os.environ, NO_COLOR="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def run_cli(*args, cwd: Path, timeout: float = 120) -> CliRun:
    """`segpipe ARGS` as a subprocess, with the peak RSS of its own process tree."""
    out, err = cwd / ".cli_stdout", cwd / ".cli_stderr"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd,
                                stdout=fo, stderr=fe, env=cli_env())
        sampler = _PeakSampler(proc.pid)
        sampler.start()
        try:
            status, _ = _wait4(proc, timeout)  # reaps it
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            sampler.stop = True
            sampler.join()
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    return CliRun(rc, out.read_text(), err.read_text(), sampler.peak_kb / 1024)


class _PeakSampler(threading.Thread):
    """Largest VmHWM of the process and its descendants while it runs.

    Not wait4's ru_maxrss: Linux carries the parent's high-water mark through fork and exec, so a
    child of a large pytest process would report the pytest process's peak, not its own.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stop = pid, 0, False

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                tasks = list(Path(f"/proc/{pid}/task").glob("*/children"))
            except OSError:  # the process ended meanwhile
                continue
            for task in tasks:
                try:
                    todo.extend(int(c) for c in task.read_text().split())
                except OSError:
                    pass
        return pids

    def run(self) -> None:
        while not self.stop:
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except (OSError, ValueError):
                    pass
            time.sleep(0.01)


def _wait4(proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.02)


def store_checksums(store: Path) -> dict[str, str]:
    """sha256 of every file under the store, by relative path."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def lost_cases(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Cases of the first store with any file missing or changed in the second."""
    return {rel.split("/")[2] for rel, digest in before.items()
            if rel.count("/") >= 3 and rel.split("/")[1] == "cases" and after.get(rel) != digest}


# ---------------------------------------------------------------- the prepared workdir


def make_workdir(root: Path, dataset: Path, plans_edit=None) -> Workdir:
    """fingerprint + plan + preprocess in this process (faster than a CLI with a Dask cluster)."""
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment
    from pipeline.preprocessing.preprocess import run_preprocessing

    wd = Workdir.at(root)
    wd.root.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(dataset)
    fp = compute_fingerprint(ds, client=None, progress=False)
    fp.save(wd.fingerprint)
    plans = plan_experiment(fp, ds)
    if plans_edit is not None:
        plans_edit(plans)
    plans.save(wd.plans)
    report = run_preprocessing(ds, plans, CONFIG, wd.store, client=None, progress=False)
    assert not report.failed, report
    return wd


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pipeline.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("bad_input")
    dataset = make_demo_dataset(root / "Phantom", num_cases=NUM_CASES, seed=0)
    wd = make_workdir(root / "W", dataset)
    assert open_store(wd.store, "r").config(CONFIG).case_ids() == [f"phantom_{i:03d}" for i in range(NUM_CASES)]
    return dataset, wd.root


@pytest.fixture
def copies(prepared, tmp_path):
    """(dataset copy to break, workdir copy, a folder outside the dataset)."""
    dataset, workdir = prepared
    ds, wd = tmp_path / "ds", tmp_path / "W"
    shutil.copytree(dataset, ds, symlinks=True)
    shutil.copytree(workdir, wd, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return ds, wd, outside


# ---------------------------------------------------------------- ways to break a dataset


def _image(ds: Path, case: str = VICTIM) -> Path:
    return ds / "imagesTr" / f"{case}.nii.gz"


def _label(ds: Path, case: str = VICTIM) -> Path:
    return ds / "labelsTr" / f"{case}.nii.gz"


def _edit(path: Path, edit, dtype=None, affine_edit=None) -> None:
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    data = edit(data.astype(dtype or data.dtype))
    affine = img.affine.copy()
    if affine_edit is not None:
        affine_edit(affine)
    out = nib.Nifti1Image(data, affine)
    out.set_data_dtype(data.dtype)
    nib.save(out, path)


def _meta(ds: Path) -> dict:
    return json.loads((ds / "dataset.json").read_text())


def _set_meta(ds: Path, meta: dict) -> None:
    (ds / "dataset.json").write_text(json.dumps(meta, indent=1))


def truncated(ds, outside):
    raw = _image(ds).read_bytes()
    _image(ds).write_bytes(raw[: len(raw) // 2])


def corrupt_gzip(ds, outside):
    raw = bytearray(_image(ds).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the header still parses; the gzip CRC does not match
    _image(ds).write_bytes(bytes(raw))


def text_file(ds, outside):
    _image(ds).write_text("this is not a NIfTI image\n")


def shape_mismatch(ds, outside):
    _edit(_label(ds), lambda a: a[:, :-3])


def affine_mismatch(ds, outside):
    _edit(_label(ds), lambda a: a, affine_edit=lambda aff: aff.__setitem__((0, 3), aff[0, 3] + 5.0))


def undeclared_label(ds, outside):
    _edit(_label(ds), lambda a: np.where(a == 2, 7, a).astype(a.dtype))


def float_label(ds, outside):
    _edit(_label(ds), lambda a: np.where(a == 1, 1.0000001, a), dtype=np.float64)


def negative_label(ds, outside):
    _edit(_label(ds), lambda a: np.where(a == 2, -1, a), dtype=np.int16)


def nan_voxels(ds, outside):
    _edit(_image(ds), lambda a: np.where(np.arange(a.size).reshape(a.shape) % 97 == 0, np.nan, a), dtype=np.float32)


def inf_voxels(ds, outside):
    def edit(a):
        a[3, 4, 5] = np.inf
        return a
    _edit(_image(ds), edit, dtype=np.float32)


def image_2d(ds, outside):
    _edit(_image(ds), lambda a: np.ascontiguousarray(a[:, :, a.shape[2] // 2]))


def wrong_channels(ds, outside):
    _edit(_image(ds), lambda a: np.stack([a, a], axis=-1))


def missing_label_file(ds, outside):
    _label(ds).unlink()


def duplicate_case(ds, outside):
    meta = _meta(ds)
    meta["training"].append(dict(meta["training"][1]))
    meta["numTraining"] = len(meta["training"])
    _set_meta(ds, meta)


def escaping_path(ds, outside):
    shutil.copy(_image(ds), outside / f"{VICTIM}.nii.gz")
    meta = _meta(ds)
    meta["training"][1]["image"] = f"../outside/{VICTIM}.nii.gz"
    _set_meta(ds, meta)


def symlink_outside(ds, outside):
    target = outside / f"{VICTIM}.nii.gz"
    shutil.move(_image(ds), target)  # a perfectly good file, but outside the dataset folder
    _image(ds).symlink_to(target)


def labels_not_an_object(ds, outside):
    meta = _meta(ds)
    meta["labels"] = ["background", "organ", "lesion"]
    _set_meta(ds, meta)


def training_not_a_list(ds, outside):
    meta = _meta(ds)
    meta["training"] = {"image": "./imagesTr/phantom_000.nii.gz"}
    _set_meta(ds, meta)


def image_path_not_a_string(ds, outside):
    meta = _meta(ds)
    meta["training"][1]["image"] = 17
    _set_meta(ds, meta)


def invalid_json(ds, outside):
    (ds / "dataset.json").write_text('{"name": "Phantom", "labels": {"0": "background",')


def forged_huge_shape(ds, outside):
    """A 1 KB .nii.gz whose header declares 2048^3 float32 (32 GiB): refused from the file size."""
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.float32)
    header.set_qform(nib.load(_label(ds)).affine, code=1)
    header.set_sform(nib.load(_label(ds)).affine, code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + np.zeros(256, np.float32).tobytes()
    _image(ds).write_bytes(gzip.compress(raw))


def nnunet_missing_channel(ds, outside):
    """nnU-Net v2 layout with two channels; the victim has only its _0000 file."""
    from pipeline.data.conversion import msd_to_nnunet

    v2 = msd_to_nnunet(ds, ds.parent / "ds_v2")
    shutil.rmtree(ds)
    shutil.move(v2, ds)
    meta = _meta(ds)
    meta["channel_names"] = {"0": "T2", "1": "ADC"}
    _set_meta(ds, meta)
    for path in sorted((ds / "imagesTr").glob("*_0000.nii.gz")):
        if not path.name.startswith(VICTIM):
            shutil.copy(path, path.with_name(path.name.replace("_0000", "_0001")))


def _set_scaling(path: Path, slope: float, inter: float = 0.0) -> None:
    """Rewrite the header's scl_slope / scl_inter in place: the stored voxel values stay as they are."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:120] = struct.pack(nib.load(path).header.endianness + "ff", slope, inter)
    path.write_bytes(gzip.compress(bytes(raw)))


def label_scaled_to_fractions(ds, outside):
    """A uint8 label 0/1/2 with scl_slope 0.5: every stage reads 0/0.5/1, so validation must too."""
    _set_scaling(_label(ds), 0.5)


def image_scaling_overflows(ds, outside):
    """An int16 image with scl_slope 1e38: its voxels scale past float32 (Inf, with a numpy warning)."""
    _edit(_image(ds), lambda a: np.rint(a).astype(np.int16))
    _set_scaling(_image(ds), 1e38)


def zero_voxel_size(ds, outside):
    """pixdim 0 and neither qform nor sform: nibabel would read 1 mm without a word."""
    data = np.asarray(nib.load(_image(ds)).dataobj)
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["pixdim"][1:4] = 0
    header["qform_code"] = header["sform_code"] = 0
    header["vox_offset"] = 352
    _image(ds).write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + data.tobytes(order="F")))


def _to_nnunet(ds: Path) -> None:
    from pipeline.data.conversion import msd_to_nnunet

    v2 = msd_to_nnunet(ds, ds.parent / "ds_v2")
    shutil.rmtree(ds)
    shutil.move(v2, ds)


def duplicate_label_value(ds, outside):
    """nnU-Net v2 labels {"lesion": 2, "core_again": 2}: one class would lose its name in plans.json."""
    _to_nnunet(ds)
    meta = _meta(ds)
    meta["labels"]["core_again"] = 2
    _set_meta(ds, meta)


def duplicate_label_name(ds, outside):
    meta = _meta(ds)
    meta["labels"]["2"] = meta["labels"]["1"]
    _set_meta(ds, meta)


def label_is_a_folder(ds, outside):
    _label(ds).unlink()
    _label(ds).mkdir()


def image_symlink_loop(ds, outside):
    _image(ds).unlink()
    _image(ds).symlink_to(_image(ds).name)  # a link to itself


# (defect, case the line must name, what it must say)
DEFECTS = [
    (truncated, VICTIM, r"cannot read voxels of imagesTr/phantom_001\.nii\.gz: truncated or corrupt"),
    (corrupt_gzip, VICTIM, r"imagesTr/phantom_001\.nii\.gz: truncated or corrupt"),
    (text_file, VICTIM, r"unreadable NIfTI imagesTr/phantom_001\.nii\.gz"),
    (shape_mismatch, VICTIM, r"shape mismatch: label labelsTr/phantom_001\.nii\.gz has shape \(\d+, \d+, \d+\)"),
    (affine_mismatch, VICTIM, r"origin mismatch: label labelsTr/phantom_001\.nii\.gz"),
    (undeclared_label, VICTIM, r"label values not declared in dataset\.json: 7 \(declared: 0, 1, 2\)"),
    (float_label, VICTIM, r"non-integer values \(e\.g\. 1\.0000001\)"),
    (negative_label, VICTIM, r"negative values"),
    (nan_voxels, VICTIM, r"imagesTr/phantom_001\.nii\.gz holds \d+ NaN and 0 Inf voxel"),
    (inf_voxels, VICTIM, r"holds 0 NaN and 1 Inf voxel"),
    (image_2d, VICTIM, r"is 2D .*expected a 3D volume"),
    (wrong_channels, VICTIM, r"channel count mismatch: imagesTr/phantom_001\.nii\.gz is 4D with 2 channels"),
    (missing_label_file, VICTIM, r"missing file labelsTr/phantom_001\.nii\.gz"),
    (duplicate_case, VICTIM, r"duplicate case id \(2 entries\)"),
    (escaping_path, VICTIM, r"image path '\.\./outside/phantom_001\.nii\.gz' escapes the dataset folder"),
    (symlink_outside, VICTIM, r"is a link that points outside the dataset folder"),
    (labels_not_an_object, None, r"'labels' must be a non-empty object"),
    (training_not_a_list, None, r"'training' must be a list"),
    (image_path_not_a_string, "training[1]", r"image path must be a non-empty string, got 17"),
    (invalid_json, None, r"dataset\.json is not valid JSON"),
    (forged_huge_shape, VICTIM, r"declares shape \(2048, 2048, 2048\) \(32\.0 GiB\).*truncated or forged header"),
    (nnunet_missing_channel, VICTIM, r"missing channel file\(s\) phantom_001_0001\.nii\.gz"),
    # issue 13
    (label_scaled_to_fractions, VICTIM, r"label labelsTr/phantom_001\.nii\.gz \(values after its header's scl_slope "
                                        r"0\.5, scl_inter 0\) holds non-integer values \(e\.g\. 0\.5\)"),
    (image_scaling_overflows, VICTIM, r"imagesTr/phantom_001\.nii\.gz: its header's scaling \(scl_slope 1e\+38, "
                                      r"scl_inter 0\) takes \d+ voxel\(s\) beyond the float32 range"),
    (zero_voxel_size, VICTIM, r"imagesTr/phantom_001\.nii\.gz header declares a voxel size of 0 \(pixdim\[1\.\.3\]\) "
                              r"and no qform/sform, so its spacing is undefined: nibabel would silently read it as 1 mm"),
    (duplicate_label_value, None, r"labels 'lesion' and 'core_again' both have value 2"),
    (duplicate_label_name, None, r"labels 1, 2 share the name 'organ'"),
    (label_is_a_folder, VICTIM, r"labelsTr/phantom_001\.nii\.gz is a folder, not a NIfTI file"),
    (image_symlink_loop, VICTIM, r"imagesTr/phantom_001\.nii\.gz is a symbolic link loop"),
]


@pytest.mark.parametrize("defect, case, phrase", DEFECTS, ids=[d[0].__name__ for d in DEFECTS])
def test_bad_input_is_one_line_exit_2_and_the_store_is_untouched(copies, defect, case, phrase, reliability):
    ds, wd, outside = copies
    defect(ds, outside)
    before = store_checksums(wd / "store.zarr")
    reliability["bad_inputs"] += 1

    run = run_cli("preprocess", ds, "--workdir", wd, "--workers", "1", cwd=ds.parent)

    after = store_checksums(wd / "store.zarr")
    reliability["lost"] += len(lost_cases(before, after))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert len(run.error_lines) == 1, run.stderr
    line = run.error_lines[0]
    assert line.startswith(f"error {case}: " if case else "error dataset: "), line
    assert re.search(phrase, line), line
    assert after == before  # not one byte of the earlier result changed, nothing added
    assert not (wd / "store.zarr.lock").exists()
    assert run.peak_rss_mb < MAX_RSS_MB, f"{defect.__name__}: peak RSS {run.peak_rss_mb:.0f} MB"


# ---------------------------------------------------------------- legal oddities are accepted


def _add_case(ds: Path, edit_image=None, edit_label=None) -> None:
    """A fifth case, a copy of phantom_000 with one edit, appended to dataset.json."""
    for folder, edit in (("imagesTr", edit_image), ("labelsTr", edit_label)):
        target = ds / folder / f"{NEW_CASE}.nii.gz"
        shutil.copy(ds / folder / "phantom_000.nii.gz", target)
        if edit is not None:
            _edit(target, edit)
    meta = _meta(ds)
    meta["training"].append({"image": f"./imagesTr/{NEW_CASE}.nii.gz", "label": f"./labelsTr/{NEW_CASE}.nii.gz"})
    meta["numTraining"] = len(meta["training"])
    _set_meta(ds, meta)


@pytest.mark.parametrize("oddity", ["constant_image", "empty_label", "scaled_label"])
def test_a_constant_image_or_an_empty_label_is_a_warning_and_the_case_is_stored(copies, oddity, reliability):
    """... and a label stored 0/2/4 with scl_slope 0.5 is the legal 0/1/2, as every stage reads it."""
    ds, wd, _ = copies
    if oddity == "constant_image":
        _add_case(ds, edit_image=np.zeros_like)
        warning = rf"warning {NEW_CASE}: imagesTr/{NEW_CASE}\.nii\.gz is constant \(every voxel is 0\)"
    elif oddity == "empty_label":
        _add_case(ds, edit_label=np.zeros_like)
        warning = rf"warning {NEW_CASE}: label labelsTr/{NEW_CASE}\.nii\.gz is empty \(background only\)"
    else:
        _add_case(ds, edit_label=lambda a: a * 2)
        _set_scaling(ds / "labelsTr" / f"{NEW_CASE}.nii.gz", 0.5)
        assert set(np.unique(np.asarray(nib.load(ds / "labelsTr" / f"{NEW_CASE}.nii.gz").dataobj.get_unscaled()))) == {0, 2, 4}
        warning = None
    before = store_checksums(wd / "store.zarr")
    reliability["bad_inputs"] += 1

    run = run_cli("preprocess", ds, "--workdir", wd, "--workers", "1", "--json", cwd=ds.parent)

    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert warning is None or re.search(warning, run.stderr), run.stderr
    report = json.loads(run.stdout)
    assert report["done"] == [NEW_CASE] and len(report["skipped"]) == NUM_CASES and not report["failed"]
    after = store_checksums(wd / "store.zarr")
    lost = lost_cases(before, after)
    reliability["lost"] += len(lost)
    assert not lost
    cs = open_store(wd / "store.zarr", "r").config(CONFIG)
    assert NEW_CASE in cs.case_ids()
    assert verify_store(wd / "store.zarr") == []
    if oddity == "constant_image":
        assert not np.asarray(cs.image(NEW_CASE)[...]).any()  # normalised to 0, not NaN
        assert np.asarray(cs.label(NEW_CASE)[...]).any()
    elif oddity == "scaled_label":  # stored exactly as its unscaled copy phantom_000 (same image, labels 0/1/2)
        assert np.array_equal(np.asarray(cs.label(NEW_CASE)[...]), np.asarray(cs.label("phantom_000")[...]))
    else:
        assert not np.asarray(cs.label(NEW_CASE)[...]).any()
        assert cs.locations(NEW_CASE).shape[0] == 0  # no foreground to oversample: random patches


def test_a_workdir_that_cannot_be_a_folder_is_one_line_exit_2(prepared, tmp_path, reliability):
    dataset, _ = prepared
    (tmp_path / "a_file").write_text("")
    reliability["bad_inputs"] += 1
    run = run_cli("preprocess", dataset, "--workdir", tmp_path / "a_file" / "W", "--workers", "1", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    # an argument, not the dataset: no "dataset:" prefix
    assert run.error_lines == [f"error cannot use --workdir {tmp_path / 'a_file' / 'W'}: Not a directory "
                               f"({tmp_path / 'a_file' / 'W' / 'logs'})"]


# ---------------------------------------------------------------- issue 13: arguments, outputs, plans


@pytest.mark.parametrize("workers", ["-1", "0"])
def test_a_worker_count_below_one_is_refused_at_once(prepared, tmp_path, workers, reliability):
    dataset, _ = prepared
    reliability["bad_inputs"] += 1
    start = time.monotonic()
    run = run_cli("preprocess", dataset, "--workdir", tmp_path / "W", "--workers", workers, cwd=tmp_path)
    assert time.monotonic() - start < 25  # Dask used to wait ~30 s for workers that never came
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout
    assert run.error_lines == [f"error --workers must be a whole number of at least 1, got {workers}"]
    assert not (tmp_path / "W" / "store.zarr").exists()


def test_a_predict_output_path_that_is_a_file_is_refused(copies, capsys, reliability):
    ds, wd, outside = copies
    target = outside / "predictions"
    target.write_text("my notes\n")
    reliability["bad_inputs"] += 2
    assert main(["predict", "--workdir", str(wd), str(ds / "imagesTr"), str(target)]) == 2
    assert main(["predict", "--workdir", str(wd), str(ds / "imagesTr"), str(target / "sub")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error output folder {target} cannot be made: it is an existing file, not a folder",
                   f"error output folder {target / 'sub'} cannot be made: {target} is an existing file, not a folder"]
    assert target.read_text() == "my notes\n"


def test_a_multi_line_nibabel_error_prints_as_one_line(prepared, tmp_path, capsys, reliability):
    """nibabel's 'Expected N bytes, got M bytes from FILE\\n - could the file be damaged?' is one error line."""
    dataset, _ = prepared
    pred = tmp_path / "pred"
    pred.mkdir()
    nib.save(nib.load(_label(dataset, "phantom_000")), pred / "phantom_000.nii")  # uncompressed: nibabel reads it
    path = pred / "phantom_000.nii"
    path.write_bytes(path.read_bytes()[:-50])  # short of its voxels, not of its header
    reliability["bad_inputs"] += 1
    assert main(["evaluate", str(pred), str(dataset), "--out", str(tmp_path / "eval")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    assert re.fullmatch(r"error phantom_000: cannot read voxels of pred/phantom_000\.nii \(OSError: Expected \d+ bytes, "
                        r"got \d+ bytes from .*phantom_000\.nii - could the file be damaged\?\)", err[0]), err


def test_single_slice_cases_say_which_configurations_exist(tmp_path, reliability):
    """Cases of one slice get a 2d configuration only: preprocess's default 3d_fullres is refused
    naming the configurations there are and why, with exit 2 (was exit 1)."""
    from pipeline.data.synthetic import make_demo_dataset

    dataset = make_demo_dataset(tmp_path / "Slices", num_cases=NUM_CASES, seed=0)
    for path in sorted(dataset.glob("*Tr/*.nii.gz")):
        _edit(path, lambda a: np.ascontiguousarray(a[:, :, a.shape[2] // 2:a.shape[2] // 2 + 1]))
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment

    ds = load_dataset(dataset)
    plans = plan_experiment(compute_fingerprint(ds, client=None, progress=False), ds)
    assert list(plans.configurations) == ["2d"]
    wd = Workdir.at(tmp_path / "W")
    wd.root.mkdir()
    plans.save(wd.plans)
    reliability["bad_inputs"] += 1
    run = run_cli("preprocess", dataset, "--workdir", wd.root, "--workers", "1", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(run.error_lines) == 1, run.stderr
    assert re.fullmatch(r"error plans have no configuration '3d_fullres' \(have: 2d\): no 3D configuration: the median "
                        r"image has a single slice along the first store axis .*; choose one of them with --config",
                        run.error_lines[0]), run.error_lines
