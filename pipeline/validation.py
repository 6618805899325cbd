"""Check a raw dataset before any stage runs, reporting every problem at once; nothing is written.

Two passes, so that a dataset of 1,000 cases is cheap to check:

1. Headers only (`nib.load` is lazy): missing or unreadable files, forged shapes (refused from the
   file size by `nifti.load_header` before anything is allocated), dimensionality and channel
   count against dataset.json, image/label shapes, and spacing, direction and origin agreement
   between a case's files within a tolerance.
2. Voxels, one case at a time per worker thread (memory bounded by `workers` cases): the whole
   gzip stream is decompressed with its CRC checked (nibabel reads only the bytes it needs, so a
   corrupt tail would pass), then NaN/Inf image voxels, non-integer, negative and undeclared
   label values. Decompression releases the GIL, so a few threads overlap usefully.

Errors are what would make a later stage fail or silently learn the wrong thing. Warnings are
legal but worth a look, and never fail validation: an empty label (background only: nnU-Net
accepts it, and a patient without a lesion is a real case), a constant image (suspicious, but
valid input), `numTraining` disagreeing with the cases found.
"""

from __future__ import annotations

import gzip
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from .dataset import LAYOUT_MSD, CaseFiles, Dataset, scan_dataset
from .errors import BadInputError, Problem
from .nifti import load_header

# Files of one case must agree this closely to be treated as voxel-aligned. Header values are
# float32, so exact equality is too strict; a label off by 1% of a voxel is not a real mismatch.
SPACING_RTOL = 1e-3  # relative, per axis
DIRECTION_ATOL = 1e-3  # on unit direction cosines
ORIGIN_TOL_VOXELS = 0.01  # fraction of the smallest voxel edge

# Measured on the 208 hippocampus cases (benchmarks/results, report of the validation task):
# two threads beat one; more threads than cores only add contention.
DEFAULT_WORKERS = 2
PROGRESS_MIN_CASES = 50  # below this the check takes a moment and a bar is noise


@dataclass
class ValidationReport:
    dataset: str
    num_cases: int
    problems: list[Problem] = field(default_factory=list)  # errors: the dataset must be fixed
    warnings: list[Problem] = field(default_factory=list)  # legal, but worth a look
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset, "num_cases": self.num_cases, "ok": self.ok, "seconds": round(self.seconds, 3),
            "problems": [str(p) for p in self.problems], "warnings": [str(w) for w in self.warnings],
        }


def validate_dataset(path: str | os.PathLike, *, workers: int | None = None, progress: bool | None = None,
                     check_voxels: bool = True) -> list[Problem]:
    """Every error in the dataset (an empty list when it is fine to use); writes nothing."""
    return check_dataset(path, workers=workers, progress=progress, check_voxels=check_voxels).problems


def check_dataset(path: str | os.PathLike, *, workers: int | None = None, progress: bool | None = None,
                  check_voxels: bool = True) -> ValidationReport:
    """Errors and warnings for the dataset at `path`.

    `workers`: threads reading voxels (default DEFAULT_WORKERS; 1 reads in this thread).
    `progress`: None shows a bar on stderr for many cases when stderr is a terminal; False never.
    `check_voxels=False` stops after the header pass (fast; misses NaNs, label values, corrupt data).
    """
    start = time.perf_counter()
    dataset, problems = scan_dataset(path)
    report = ValidationReport(str(path), len(dataset.cases) if dataset else 0, list(problems))
    if dataset is None:
        report.seconds = time.perf_counter() - start
        return report
    raw_n = dataset.raw_json.get("numTraining")
    if dataset.layout == LAYOUT_MSD and isinstance(raw_n, int) and raw_n != len(dataset.cases):
        report.warnings.append(Problem(None, f"numTraining is {raw_n} but 'training' lists {len(dataset.cases)} cases"))

    workers = max(1, workers or DEFAULT_WORKERS)
    check = partial(check_case, dataset, check_voxels=check_voxels)
    with _progress_bar(len(dataset.cases), progress) as bar:
        if workers == 1 or len(dataset.cases) < 2:
            results = []
            for case in dataset.cases:
                results.append(check(case))
                bar.update()
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="validate") as pool:
                results = []
                for result in pool.map(check, dataset.cases):  # in case order, so the report is stable
                    results.append(result)
                    bar.update()
    for errors, warnings in results:
        report.problems.extend(errors)
        report.warnings.extend(warnings)
    report.seconds = time.perf_counter() - start
    return report


def _progress_bar(total: int, progress: bool | None):
    from tqdm import tqdm

    if progress is None:
        progress = total >= PROGRESS_MIN_CASES and sys.stderr.isatty()
    return tqdm(total=total, desc="validate", unit="case", file=sys.stderr, disable=not progress, leave=False)


def check_case(dataset: Dataset, case: CaseFiles, check_voxels: bool = True) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) for one case: headers first, voxels only when the headers are sound."""
    try:
        headers, errors = _check_headers(dataset, case)
        if headers is None or errors or not check_voxels:
            return errors, []
        return _check_voxels(dataset, case, *headers)
    except BadInputError as exc:
        return exc.problems, []


# ---------------------------------------------------------------- pass 1: headers


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 3 spatial dims of a 3D file or of a 4D file with one channel."""
    return tuple(shape[:3])


def _affine_problem(img: nib.Nifti1Image, name: str) -> str | None:
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return f"{name} has a singular or non-finite affine; its position in space is undefined"
    if len(zooms) == 3 and (not np.all(np.isfinite(zooms)) or np.any(zooms <= 0)):
        return f"{name} declares voxel size {tuple(float(z) for z in zooms)}; expected positive values"
    return None


def geometry_mismatch(a: nib.Nifti1Image, b: nib.Nifti1Image) -> str | None:
    """How two voxel-aligned files' geometries differ beyond the tolerances, or None."""
    za = np.asarray(a.header.get_zooms()[:3], dtype=np.float64)
    zb = np.asarray(b.header.get_zooms()[:3], dtype=np.float64)
    if not np.allclose(za, zb, rtol=SPACING_RTOL, atol=0):
        return f"spacing {_fmt(zb)} differs from {_fmt(za)}"
    aa, ab = np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64)
    da = aa[:3, :3] / np.linalg.norm(aa[:3, :3], axis=0)
    db = ab[:3, :3] / np.linalg.norm(ab[:3, :3], axis=0)
    if not np.allclose(da, db, rtol=0, atol=DIRECTION_ATOL):
        return f"affine direction (orientation {''.join(nib.aff2axcodes(ab))}) differs from {''.join(nib.aff2axcodes(aa))}"
    tol = ORIGIN_TOL_VOXELS * float(min(za.min(), zb.min()))
    if not np.allclose(aa[:3, 3], ab[:3, 3], rtol=0, atol=tol):
        return f"affine origin {_fmt(ab[:3, 3])} differs from {_fmt(aa[:3, 3])} (beyond {tol:.3g} mm)"
    return None


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _check_headers(dataset: Dataset, case: CaseFiles):
    """((image headers, label header), errors) from the headers alone; (None, errors) if a file is unusable."""
    cid = case.case_id
    errors: list[Problem] = []
    images = []
    for path in case.images:
        try:
            images.append(load_header(path, cid))
        except BadInputError as exc:
            errors.extend(exc.problems)
    label = None
    if case.label is not None:
        try:
            label = load_header(case.label, cid)
        except BadInputError as exc:
            errors.extend(exc.problems)
    if errors:
        return None, errors

    n = dataset.num_channels
    for path, img in zip(case.images, images):
        if (msg := _affine_problem(img, path.name)) is not None:
            errors.append(Problem(cid, msg))
        shape = tuple(int(s) for s in img.shape)
        if case.four_d:
            if len(shape) != 4 or shape[3] != n:
                have = f"{shape[3]} channel(s)" if len(shape) == 4 else f"{len(shape)} dimensions"
                errors.append(Problem(cid, f"channel count mismatch: {path.name} has {have} (shape {shape}); "
                                           f"dataset.json declares {n} channels, expected a 4D image with them last"))
        elif len(shape) == 4 and shape[3] != 1:
            errors.append(Problem(cid, f"channel count mismatch: {path.name} is 4D with {shape[3]} channels "
                                       f"(shape {shape}); dataset.json declares {n} channel(s), one 3D file each"))
        elif len(shape) not in (3, 4):
            errors.append(Problem(cid, f"{path.name} is {len(shape)}D (shape {shape}); this is a 3D dataset, "
                                       "expected a 3D volume"))
    if errors:
        return None, errors

    first_path, first = case.images[0], images[0]
    for path, img in zip(case.images[1:], images[1:]):
        if _spatial(img.shape) != _spatial(first.shape):
            errors.append(Problem(cid, f"channel {path.name} shape {_spatial(img.shape)} differs from "
                                       f"{first_path.name} shape {_spatial(first.shape)}"))
        elif (msg := geometry_mismatch(first, img)) is not None:
            errors.append(Problem(cid, f"channel {path.name} {msg} of {first_path.name}"))

    if label is not None:
        lname = f"label {case.label.name}"
        lshape = tuple(int(s) for s in label.shape)
        if (msg := _affine_problem(label, lname)) is not None:
            errors.append(Problem(cid, msg))
        elif len(lshape) not in (3, 4) or (len(lshape) == 4 and lshape[3] != 1):
            errors.append(Problem(cid, f"{lname} has shape {lshape}; expected a 3D volume"))
        elif lshape[:3] != _spatial(first.shape):
            errors.append(Problem(cid, f"shape mismatch: {lname} shape {lshape[:3]} differs from image shape "
                                       f"{_spatial(first.shape)}"))
        elif (msg := geometry_mismatch(first, label)) is not None:
            errors.append(Problem(cid, f"{lname} {msg} of the image"))
    return (images, label), errors


# ---------------------------------------------------------------- pass 2: voxels


def read_voxels(img: nib.Nifti1Image, path: Path, case: str) -> np.ndarray:
    """All voxels of a file (scaling applied), reading the gzip stream to its end to check its CRC."""
    try:
        raw = Path(path).read_bytes()
        if Path(path).name.endswith(".gz"):
            raw = gzip.decompress(raw)
        return np.asanyarray(type(img).from_bytes(raw).dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise BadInputError(f"cannot read voxels of {Path(path).name}: truncated or corrupt "
                            f"({type(exc).__name__}: {exc})", case) from None


def _check_voxels(dataset: Dataset, case: CaseFiles, images, label) -> tuple[list[Problem], list[Problem]]:
    cid = case.case_id
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for path, img in zip(case.images, images):
        data = read_voxels(img, path, cid)
        if data.dtype.kind not in "biuf":
            errors.append(Problem(cid, f"{path.name} has unsupported data type {data.dtype}"))
            continue
        if data.dtype.kind == "f":
            nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
            if nan or inf:
                errors.append(Problem(cid, f"{path.name} holds {nan} NaN and {inf} Inf voxel(s)"))
                continue
        lo, hi = data.min(), data.max()
        if lo == hi:
            warnings.append(Problem(cid, f"{path.name} is constant (every voxel is {float(lo):g})"))
        del data
    if label is not None:
        errors.extend(_label_problems(read_voxels(label, case.label, cid), dataset, case, warnings))
    return errors, warnings


def _label_problems(data: np.ndarray, dataset: Dataset, case: CaseFiles, warnings: list[Problem]) -> list[Problem]:
    cid, name = case.case_id, f"label {case.label.name}"
    if data.dtype.kind not in "biuf":
        return [Problem(cid, f"{name} has unsupported data type {data.dtype}")]
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            return [Problem(cid, f"{name} holds {int((~finite).sum())} NaN/Inf voxel(s)")]
        off = data != np.rint(data)
        if off.any():
            example = float(data[off].flat[0])
            return [Problem(cid, f"{name} holds non-integer values (e.g. {example!r}); labels must be whole numbers")]
    lo, hi = float(data.min()), float(data.max())
    if lo < 0:
        return [Problem(cid, f"{name} holds negative values (min {lo:g}); labels must be 0 or positive")]
    if hi <= 2**16:
        present = np.flatnonzero(np.bincount(data.astype(np.int64, copy=False).ravel()))
    else:
        present = np.unique(data).astype(np.int64)
    declared = set(dataset.labels)
    undeclared = [int(v) for v in present if int(v) not in declared]
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:10]) + (", ..." if len(undeclared) > 10 else "")
        return [Problem(cid, f"{name} holds label values not declared in dataset.json: {shown} "
                             f"(declared: {', '.join(str(v) for v in sorted(declared))})")]
    if hi == 0:
        warnings.append(Problem(cid, f"{name} is empty (background only)"))
    return []
