"""Check a raw dataset before any stage runs, reporting every problem at once; nothing is written.

Each case is checked in two steps, so that a dataset of 1,000 cases is cheap to check:

1. Headers only (`images.open_image`; a DICOM series is read whole): missing or unreadable files,
   forged shapes (refused from the file size before anything is allocated), dimensionality and channel
   count against dataset.json, image/label shapes, and spacing, direction and origin agreement
   between a case's files within a tolerance. `check_voxels=False` stops here.
2. Voxels, only when the headers are sound: the whole file is read (a NIfTI gzip stream with its
   CRC checked: nibabel reads only the bytes it needs, so a corrupt tail would pass), then NaN/Inf
   image voxels and non-integer, negative or undeclared label values.

Cases are checked one at a time per worker thread, so memory holds at most `workers` cases; given a
Dask client, by its workers instead (batches of cases per task), where the stages after it read them. The
dataset-level problems (dataset.json, paths, duplicates) come from `dataset.scan_dataset`.

Voxel values are read exactly as every later stage reads them (`nifti.array_from`): the header's
scl_slope/scl_inter applied, images as float32, labels as `nifti.label_dtype` says. So a label
stored 0/2/4 with slope 0.5 is the legal 0/1/2, and an image whose slope overflows float32 is
refused here rather than read as Inf later.

Errors are what would make a later stage fail or silently learn the wrong thing. Warnings are
legal but worth a look and never fail validation: an empty label (background only: nnU-Net
accepts it, and a patient without a lesion is a real case), a constant image (suspicious, but
valid input), `numTraining` disagreeing with the cases listed, a case whose spacing is far from
the dataset's median (resampling to the common spacing would merge or stretch its voxels many
times over: `SPACING_SHRINK_WARN`, `SPACING_STRETCH_WARN`). Unlike nnU-Net, which only warns,
an affine mismatch between a case's files is an error: the pipeline assumes they share one voxel
grid, and a label off by a flip or a shift would train the network on misaligned targets.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import accumulate

import nibabel as nib
import numpy as np

from pipeline.data.dataset import (
    LAYOUT_MSD,
    CaseFiles,
    Dataset,
    case_batches,
    label_values_problem,
    scan_dataset,
)
from pipeline.data.images import ImageFile, open_image
from pipeline.data.nifti import display_name
from pipeline.errors import BadInputError, Problem

# Files of one case must agree this closely to count as one voxel grid. Header values are float32,
# so exact equality is too strict; a shift of 1% of a voxel is not a real misalignment.
SPACING_RTOL = 1e-3  # relative, per axis
DIRECTION_ATOL = 1e-3  # on unit direction cosines
ORIGIN_TOL_VOXELS = 0.01  # fraction of the smallest voxel edge

# Reader threads. On the 208 hippocampus cases (benchmarks/validation_speed.py, 2 busy cores) the
# whole check costs ~0.9 s of CPU, two thirds of it nibabel's pure-Python header parsing that
# holds the GIL; file reads, inflation and the numpy scans release it. Two threads cut the best
# wall time from 2.4 s to 1.5 s; four gained little more, and each thread holds one case in memory.
DEFAULT_WORKERS = 2
PROGRESS_MIN_CASES = 50  # below this the check takes a moment and a bar is noise

# Spacing outliers (warnings). Planning resamples every case to one spacing near the dataset's
# median. An axis resampled to more than 4x coarser merges 4 voxels into one: a structure thinner
# than that vanishes (0.1 mm voxels among 1 mm cases). More than 10x finer means the case holds a
# tenth of the detail of the others along that axis (50 mm slices among 2 mm ones). Real datasets
# stay well inside: SCT's 0.5x0.5x7.5 mm T2* among 1 mm cases is 2x and 7.5x.
SPACING_SHRINK_WARN = 4.0
SPACING_STRETCH_WARN = 10.0
SPACING_MIN_CASES = 3  # a median of fewer cases says nothing about which one is odd
RAS_AXES = ("x", "y", "z")


@dataclass
class CaseCheck:
    """One case's errors and warnings, and its grid (RAS) when its headers are sound."""

    errors: list[Problem]
    warnings: list[Problem]
    spacing: tuple[float, ...] | None = None
    shape: tuple[int, ...] | None = None


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
    """Every error in the dataset, in case order (empty when it is fine to use); writes nothing."""
    return check_dataset(path, workers=workers, progress=progress, check_voxels=check_voxels).problems


def check_dataset(path: str | os.PathLike, *, workers: int | None = None, progress: bool | None = None,
                  check_voxels: bool = True, client=None) -> ValidationReport:
    """Errors and warnings for the dataset at `path`.

    `workers`: reader threads (default DEFAULT_WORKERS; 1 checks in this thread).
    `client`: a `distributed.Client` whose workers check the cases instead (batches of cases per
    task, `dataset.case_batches`): the voxels are read where the stages after it read them, in parallel
    over the cluster's nodes, not all through this process. The report is the same either way.
    `progress`: None shows a bar on stderr for many cases when stderr is a terminal; False never; True always.
    `check_voxels=False`: headers only (fast; misses NaNs, label values and corrupt data).
    """
    start = time.perf_counter()
    dataset, problems = scan_dataset(path)
    report = ValidationReport(str(path), len(dataset.cases) if dataset else 0, list(problems))
    if dataset is not None:
        declared = dataset.raw_json.get("numTraining")
        listed = dataset.raw_json.get("training")
        if (dataset.layout == LAYOUT_MSD and isinstance(declared, int) and not isinstance(declared, bool)
                and isinstance(listed, list) and declared != len(listed)):
            # the entries of the list, valid or not: an invalid entry is its own error, not a missing case
            report.warnings.append(Problem(None, f"numTraining is {declared} but 'training' lists "
                                                 f"{len(listed)} entr{'y' if len(listed) == 1 else 'ies'}"))
        check = partial(_check_case, dataset, check_voxels=check_voxels)
        workers = max(1, workers or DEFAULT_WORKERS)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="validate") if workers > 1 and client is None else None
        grids: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {}
        try:
            results = (_checks_on_dask(client, dataset, check_voxels) if client is not None else
                       pool.map(check, dataset.cases) if pool else map(check, dataset.cases))
            with _progress_bar(len(dataset.cases), progress) as bar:
                for case, result in zip(dataset.cases, results):  # in case order: a stable report
                    report.problems.extend(result.errors)
                    report.warnings.extend(result.warnings)
                    if result.spacing is not None:
                        grids[case.case_id] = (result.spacing, result.shape)
                    bar.update()
        finally:
            if pool:  # on Ctrl-C, drop the cases not started instead of checking them all first
                pool.shutdown(wait=True, cancel_futures=True)
        report.warnings.extend(spacing_outliers(grids))
    report.seconds = time.perf_counter() - start
    return report


def check_cases(dataset: Dataset, check_voxels: bool = True) -> list[CaseCheck]:
    """Every case of `dataset`, checked in order: one Dask task of `check_dataset`."""
    return [_check_case(dataset, case, check_voxels) for case in dataset.cases]


def _checks_on_dask(client, dataset: Dataset, check_voxels: bool) -> Iterator[CaseCheck]:
    """The CaseChecks of every case in case order, computed by the client's workers, batch by batch.
    A batch whose worker died (killed over its memory limit, say) fails each of its cases."""
    from distributed import KilledWorker

    from pipeline.parallel import SharedPath, check_dask_workers_see

    # a worker that cannot see the dataset would report every case as missing: stop here, naming it
    check_dask_workers_see(client, [SharedPath("dataset", str(dataset.root))])
    workers = max(1, sum(client.nthreads().values()))
    batches = case_batches(dataset, dataset.case_ids, workers)
    starts = list(accumulate((len(b) for b in batches[:-1]), initial=0))  # each batch's first case
    run = uuid.uuid4().hex[:8]
    # each task gets its cases by position, not by id: a duplicated case id (itself an error) is checked twice
    futures = [client.submit(check_cases, replace(dataset, cases=dataset.cases[start:start + len(batch)], raw_json={}),
                             check_voxels, pure=False, key=f"validate-{start}-{len(batch)}-{run}")
               for start, batch in zip(starts, batches)]
    try:
        for batch, future in zip(batches, futures):
            try:
                checks = future.result()  # on this thread: Ctrl-C cancels it quietly (`parallel.results_of`)
            except KilledWorker as exc:
                checks = [CaseCheck([Problem(case_id, f"its check failed: the Dask worker died ({exc}); "
                                                      "the case may be too large for a worker")], [])
                          for case_id in batch]
            future.release()
            yield from checks
    finally:
        client.cancel([f for f in futures if f.status == "pending"])


def _progress_bar(total: int, progress: bool | None):
    from tqdm import tqdm

    if progress is None:
        progress = total >= PROGRESS_MIN_CASES and sys.stderr.isatty()
    return tqdm(total=total, desc="validate", unit="case", file=sys.stderr, disable=not progress, leave=False)


def check_case(dataset: Dataset, case: CaseFiles, check_voxels: bool = True) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) of one case: headers first, then voxels when the headers are sound."""
    result = _check_case(dataset, case, check_voxels)
    return result.errors, result.warnings


def _check_case(dataset: Dataset, case: CaseFiles, check_voxels: bool = True) -> CaseCheck:
    try:
        headers, errors = _check_headers(dataset, case)
        if headers is None or errors:
            return CaseCheck(errors, [])
        geometry = headers[0][0].geometry
        grid = dict(spacing=geometry.spacing, shape=geometry.ras_shape)
        if not check_voxels:
            return CaseCheck([], [], **grid)
        return CaseCheck(*_check_voxels(dataset, case, *headers), **grid)
    except BadInputError as exc:
        return CaseCheck(exc.problems, [])


def spacing_outliers(grids: dict[str, tuple[tuple[float, ...], tuple[int, ...]]]) -> list[Problem]:
    """Warnings for cases whose spacing is far from the median of `grids` (case -> (RAS spacing,
    RAS shape)): what resampling to the common spacing would do to them, in voxels."""
    if len(grids) < SPACING_MIN_CASES:
        return []
    spacings = np.array([g[0] for g in grids.values()], dtype=np.float64)
    median = np.median(spacings, axis=0)
    if not np.all(median > 0):
        return []
    warnings = []
    for case_id, (spacing, shape) in grids.items():
        s = np.asarray(spacing, dtype=np.float64)
        if not np.all(s > 0):
            continue
        shrink, stretch = median / s, s / median  # > 1: voxels merged / voxels invented per axis
        notes = [f"{shrink[a]:.3g}x coarser along {RAS_AXES[a]} (structures thinner than {shrink[a]:.3g} voxels "
                 "there vanish)" for a in range(len(s)) if shrink[a] > SPACING_SHRINK_WARN]
        notes += [f"{stretch[a]:.3g}x finer along {RAS_AXES[a]} (each voxel becomes {stretch[a]:.3g})"
                  for a in range(len(s)) if stretch[a] > SPACING_STRETCH_WARN]
        if notes:
            resampled = [max(1, round(n * sp / m)) for n, sp, m in zip(shape, s, median)]
            warnings.append(Problem(case_id, f"spacing {_fmt(s)} mm is far from the dataset's median {_fmt(median)} mm: "
                                             f"resampled to it the case becomes {'x'.join(map(str, resampled))} voxels "
                                             f"(from {'x'.join(map(str, shape))}), {'; '.join(notes)}; check its header"))
    return warnings


# ---------------------------------------------------------------- step 1: headers


def geometry_mismatch(reference: ImageFile, other: ImageFile) -> tuple[str, str, str] | None:
    """(what, other's value, reference's value) where two files' voxel grids disagree, or None."""
    za = np.asarray(reference.zooms, dtype=np.float64)
    zb = np.asarray(other.zooms, dtype=np.float64)
    if not np.allclose(za, zb, rtol=SPACING_RTOL, atol=0):
        return "spacing", _fmt(zb) + " mm", _fmt(za) + " mm"
    aa, ab = np.asarray(reference.affine, dtype=np.float64), np.asarray(other.affine, dtype=np.float64)
    da = aa[:3, :3] / np.linalg.norm(aa[:3, :3], axis=0)
    db = ab[:3, :3] / np.linalg.norm(ab[:3, :3], axis=0)
    if not np.allclose(da, db, rtol=0, atol=DIRECTION_ATOL):
        diff = float(np.abs(da - db).max())
        return ("direction", "".join(nib.aff2axcodes(ab)),
                f"{''.join(nib.aff2axcodes(aa))} (direction cosines differ by up to {diff:.3g})")
    tol = ORIGIN_TOL_VOXELS * float(min(za.min(), zb.min()))
    if not np.allclose(aa[:3, 3], ab[:3, 3], rtol=0, atol=tol):
        return "origin", _fmt(ab[:3, 3]) + " mm", f"{_fmt(aa[:3, 3])} mm (tolerance {tol:.3g} mm)"
    return None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in values) + ")"


def _affine_problem(img: ImageFile, name: str) -> str | None:
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return f"{name} has a singular or non-finite affine: its position in space is undefined"
    zooms = np.asarray(img.zooms, dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        return f"{name} declares voxel size {_fmt(zooms)}: expected positive sizes"
    return None


def _channel_problem(img: ImageFile, name: str, case: CaseFiles, n: int) -> str | None:
    shape = tuple(int(s) for s in img.shape)
    if case.four_d:
        if len(shape) == 4 and shape[3] == n:
            return None
        have = f"{shape[3]} channel(s)" if len(shape) == 4 else f"{len(shape)} dimension(s)"
        return (f"channel count mismatch: {name} has {have} (shape {shape}); dataset.json declares {n} "
                "channels, expected a 4D image with them last")
    if len(shape) == 4 and shape[3] != 1:
        return (f"channel count mismatch: {name} is 4D with {shape[3]} channels (shape {shape}); "
                f"dataset.json declares {n} channel(s) of one 3D file each")
    if len(shape) not in (3, 4):
        return f"{name} is {len(shape)}D (shape {shape}); this is a 3D dataset: expected a 3D volume"
    return None


def _check_headers(dataset: Dataset, case: CaseFiles):
    """((image headers, label header or None), errors); (None, errors) when a file cannot be opened."""
    cid = case.case_id
    errors: list[Problem] = []
    images = []
    for path in (*case.images, *([case.label] if case.label is not None else [])):
        try:
            images.append(open_image(path, cid))
        except BadInputError as exc:
            errors.extend(exc.problems)
    if errors:
        return None, errors
    label = images.pop() if case.label is not None else None

    names = [display_name(p) for p in case.images]
    for name, img in zip(names, images):
        for msg in (_affine_problem(img, name), _channel_problem(img, name, case, dataset.num_channels)):
            if msg is not None:
                errors.append(Problem(cid, msg))
    if errors:
        return None, errors

    first = images[0]
    for name, img in zip(names[1:], images[1:]):
        if tuple(img.shape[:3]) != tuple(first.shape[:3]):
            errors.append(Problem(cid, f"shape mismatch: channel {name} has shape {tuple(img.shape[:3])}, "
                                       f"{names[0]} {tuple(first.shape[:3])}"))
        elif (m := geometry_mismatch(first, img)) is not None:
            errors.append(Problem(cid, f"{m[0]} mismatch between channels: {name} has {m[0]} {m[1]}, {names[0]} {m[2]}"))

    if label is not None:
        lname = f"label {display_name(case.label)}"
        lshape = tuple(int(s) for s in label.shape)
        if (msg := _affine_problem(label, lname)) is not None:
            errors.append(Problem(cid, msg))
        elif len(lshape) not in (3, 4) or (len(lshape) == 4 and lshape[3] != 1):
            errors.append(Problem(cid, f"{lname} has shape {lshape}: expected a 3D volume"))
        elif lshape[:3] != tuple(first.shape[:3]):
            errors.append(Problem(cid, f"shape mismatch: {lname} has shape {lshape[:3]}, "
                                       f"the image {tuple(first.shape[:3])}"))
        elif (m := geometry_mismatch(first, label)) is not None:
            errors.append(Problem(cid, f"{m[0]} mismatch: {lname} has {m[0]} {m[1]}, the image {m[2]}"))
    return (images, label), errors


# ---------------------------------------------------------------- step 2: voxels


def _check_voxels(dataset: Dataset, case: CaseFiles, images, label) -> tuple[list[Problem], list[Problem]]:
    cid = case.case_id
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for path, img in zip(case.images, images):
        name = display_name(path)
        if img.dtype.kind not in "biuf":
            errors.append(Problem(cid, f"{name} has unsupported data type {img.dtype}"))
            continue
        data = img.read_checked()  # float32, as preprocessing and prediction read it
        if data.dtype.kind == "f":
            nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
            if nan or inf:
                errors.append(Problem(cid, f"{name} holds {nan} NaN and {inf} Inf voxel(s)"))
                continue
        lo, hi = data.min(), data.max()
        if lo == hi:
            warnings.append(Problem(cid, f"{name} is constant (every voxel is {float(lo):g})"))
    if label is not None:
        name = f"label {display_name(case.label)}"
        if label.dtype.kind not in "biuf":
            errors.append(Problem(cid, f"{name} has unsupported data type {label.dtype}"))
        else:
            data = label.read_checked(dtype=label.label_dtype)
            slope, inter = label.scaling
            if (slope, inter) != (1.0, 0.0):  # say which values: the file holds others
                name += f" (values after its header's scl_slope {slope:g}, scl_inter {inter:g})"
            errors.extend(_label_problems(data, name, dataset, cid, warnings))
    return errors, warnings


def _label_problems(data: np.ndarray, name: str, dataset: Dataset, cid: str, warnings: list[Problem]) -> list[Problem]:
    if (problem := label_values_problem(data)) is not None:
        return [Problem(cid, f"{name} {problem}")]
    hi = float(data.max()) if data.size else 0.0
    if hi <= 2**16:  # counting is linear; np.unique sorts
        present = np.flatnonzero(np.bincount(data.astype(np.int64, copy=False).ravel()))
    else:
        present = np.unique(data).astype(np.int64)
    declared = set(dataset.labels)
    undeclared = [int(v) for v in present if int(v) not in declared]
    if undeclared:
        shown = ", ".join(map(str, undeclared[:10])) + (", ..." if len(undeclared) > 10 else "")
        return [Problem(cid, f"{name} holds label values not declared in dataset.json: {shown} "
                             f"(declared: {', '.join(map(str, sorted(declared)))})")]
    if hi == 0:
        warnings.append(Problem(cid, f"{name} is empty (background only)"))
    return []
