"""Which prediction goes with which reference, and reading a pair onto one grid.

Shared by scoring (`metrics`), pictures and the post-processing decision: each reads cases the
same way, so a file one of them accepts the others accept too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from nibabel.orientations import inv_ornt_aff

from pipeline.data.dataset import scan_dataset
from pipeline.data.files import image_files, strip_ending
from pipeline.data.images import read_volume
from pipeline.data.nifti import Geometry
from pipeline.errors import BadInputError, Problem
from pipeline.parallel import cpu_count
from pipeline.storage import as_path

log = logging.getLogger("segpipe.evaluation")

# Prediction and reference grids may differ by float32 rounding of the affine; more than this
# fraction of the smallest voxel size (in any affine entry) means they are not the same grid.
AFFINE_TOLERANCE = 1e-2
MAX_WORKERS = 8

# ---------------------------------------------------------------- finding cases


def label_files(folder: Path) -> dict[str, Path]:
    """CASE -> file for every image directly in `folder` (hidden temp files skipped)."""
    found: dict[str, Path] = {}
    problems = []
    for path in image_files(folder):
        case = strip_ending(path.name)
        if case in found:
            problems.append(Problem(case, f"two files for one case in {folder}: {found[case].name} and {path.name}"))
        found[case] = path
    if problems:
        raise BadInputError(problems)
    return found


def _labels_of(dataset) -> dict[int, str]:
    """The scored foreground labels: not background, not the ignore label."""
    return {v: n for v, n in sorted(dataset.labels.items()) if v != 0 and v != dataset.ignore_value}


def reference_label_map(ref_dir: str | os.PathLike):
    """The `LabelMap` of the dataset.json at `ref_dir` or above it (regions, ignore label), or None."""
    ref_dir = as_path(ref_dir)
    for folder in (ref_dir, ref_dir.parent):
        if (folder / "dataset.json").is_file():
            dataset, _ = scan_dataset(folder)
            return dataset.label_map if dataset is not None else None
    return None


def find_references(ref_dir: str | os.PathLike) -> tuple[dict[str, Path], dict[int, str] | None]:
    """Reference label files by case, and the foreground labels {value: name} when a dataset.json says.

    `ref_dir` is a dataset folder (Decathlon or nnU-Net v2 layout) or a folder of CASE.nii.gz label
    files; a label folder inside a dataset (its labelsTr/) takes the names from the dataset.json above it.
    """
    ref_dir = as_path(ref_dir)
    if not ref_dir.is_dir():
        raise BadInputError(f"reference folder {ref_dir} does not exist")
    if (ref_dir / "dataset.json").is_file():
        dataset, problems = scan_dataset(ref_dir)
        if dataset is None:
            raise BadInputError(problems)
        refs = {c.case_id: c.label for c in dataset.cases if c.label is not None}
        labels_dir = ref_dir / "labelsTr"
        if labels_dir.is_dir():  # nnU-Net layout lists only cases with every channel: take all labels
            for case, path in label_files(labels_dir).items():
                refs.setdefault(case, path)
        return refs, _labels_of(dataset)
    refs = label_files(ref_dir)
    labels = None
    if (ref_dir.parent / "dataset.json").is_file():
        dataset, _ = scan_dataset(ref_dir.parent)
        if dataset is not None:
            labels = _labels_of(dataset)
    return refs, labels


def pair_cases(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike
               ) -> tuple[list[tuple[str, Path, Path]], dict[int, str] | None]:
    """(case, prediction, reference) for every prediction file, and the dataset's labels if known."""
    pred_dir = as_path(pred_dir)
    if not pred_dir.is_dir():
        raise BadInputError(f"prediction folder {pred_dir} does not exist")
    preds = label_files(pred_dir)
    if not preds:
        raise BadInputError(f"no prediction files (CASE.nii.gz, CASE.mha, ...) in {pred_dir}")
    refs, labels = find_references(ref_dir)
    missing = [Problem(c, f"prediction {p.name} has no reference label in {ref_dir}") for c, p in preds.items()
               if c not in refs]
    if missing:
        raise BadInputError(missing)
    unpredicted = len(set(refs) - set(preds))
    if unpredicted:
        log.info("%d reference case(s) have no prediction and are not evaluated", unpredicted)
    return [(c, p, refs[c]) for c, p in preds.items()], labels


# ---------------------------------------------------------------- reading


def _as_labels(data: np.ndarray, case: str, what: str) -> np.ndarray:
    """A label volume as the smallest integer type that holds it; fractional or negative values are bad input."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadInputError(f"{what} has {data.ndim} dimensions (shape {data.shape}); expected a 3D label volume", case)
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.array_equal(np.rint(data), data):
            raise BadInputError(f"{what} holds non-integer values: not a label volume", case)
    lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if lo < 0:
        raise BadInputError(f"{what} holds negative label value {lo}", case)
    dtype = np.uint8 if hi <= 255 else np.int16 if hi <= 32767 else np.int32
    return data.astype(dtype, copy=False)


def _ras_affine(g: Geometry) -> np.ndarray:
    """The affine of the array after reorientation to RAS: what both files must agree on."""
    return np.asarray(g.affine) @ inv_ornt_aff(g.ornt, g.shape)


def load_pair(case: str, pred_path: Path, ref_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Prediction and reference label arrays in RAS on one grid, and its voxel spacing (mm)."""
    pred, pg = read_volume(pred_path, case, dtype=None)
    ref, rg = read_volume(ref_path, case, dtype=None)
    pred = _as_labels(pred, case, f"prediction {pred_path.name}")
    ref = _as_labels(ref, case, f"reference {ref_path.name}")
    if pred.shape != ref.shape:
        raise BadInputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape} (RAS order)", case)
    pa, ra = _ras_affine(pg), _ras_affine(rg)
    diff = float(np.abs(pa - ra).max())
    if diff > AFFINE_TOLERANCE * min(rg.spacing):
        raise BadInputError(
            f"prediction and reference are on different grids (affines differ by up to {diff:.4g} mm):\n"
            f"  prediction {np.round(pa[:3], 4).tolist()}\n  reference  {np.round(ra[:3], 4).tolist()}", case)
    return pred, ref, tuple(float(s) for s in rg.spacing)


def mask_ignored(pred: np.ndarray, ref: np.ndarray, ignore_value: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays with background where the reference is the ignore label: those voxels score nowhere."""
    if ignore_value is None:
        return pred, ref
    ignored = ref == ignore_value
    if not ignored.any():
        return pred, ref
    return np.where(ignored, 0, pred).astype(pred.dtype), np.where(ignored, 0, ref).astype(ref.dtype)


def default_workers() -> int:
    return max(1, min(MAX_WORKERS, cpu_count()))


def map_cases(fn, items: Sequence, num_workers: int | None = None, progress: bool = True, desc: str = "cases"):
    """fn(*item) for every item on a thread pool (one case in memory per worker), results in item order.

    Threads suffice: reading (zlib), numpy and scipy's distance transform release the GIL. Every
    case's bad input is collected and raised together, so one run shows every problem.
    """
    from tqdm import tqdm

    results: list = [None] * len(items)
    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=num_workers or default_workers()) as pool:
        futures = {pool.submit(fn, *item): i for i, item in enumerate(items)}
        with tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False) as bar:
            for fut in as_completed(futures):
                try:
                    results[futures[fut]] = fut.result()
                except BadInputError as exc:
                    problems.extend(exc.problems)
                bar.update(1)
    if problems:
        raise BadInputError(problems)
    return results
