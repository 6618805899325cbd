"""One in-memory picture of a labelled dataset, read from either raw layout.

Two layouts are understood:

* Medical Segmentation Decathlon: `dataset.json` with `modality`, `labels` {"0": "background"},
  and a `training` list of {"image", "label"} paths; a multi-channel case is one 4D image whose
  last axis is the channel.
* nnU-Net v2 raw: `dataset.json` with `channel_names`, `labels` {"background": 0}, `file_ending`;
  `imagesTr/CASE_0000.nii.gz` (one file per channel) and `labelsTr/CASE.nii.gz`.

Either layout's images may be in any format `pipeline.data.images` reads (`file_ending` `.mha`,
`.nrrd`, ..., `.dcm` for DICOM series folders; in the Decathlon layout each entry's own ending).

Reading the dataset description touches no voxels; `read_case` loads one case. Label values may be
non-contiguous (TotalSegmentator's 0..117): `LabelMap` maps them to contiguous training indices
and back, so predictions are written with the dataset's own values. The nnU-Net v2 layout may also
declare regions and an `ignore` label (`pipeline.data.labels`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.data.files import IMAGE_ENDINGS, ending_of, strip_ending
from pipeline.data.images import files_of, open_image
from pipeline.data.labels import LabelMap, Region, parse_nnunet_labels
from pipeline.data.nifti import Geometry, to_ras
from pipeline.errors import BadInputError, Problem
from pipeline.storage import absolute, inside, stat

LAYOUT_MSD = "msd"
LAYOUT_NNUNET = "nnunetv2"


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files are. `images` holds one path per channel, or one 4D file (`four_d`)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    four_d: bool = False


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    layout: str
    channels: tuple[str, ...]  # modality / channel name per channel, e.g. ("CT",) or ("T2", "ADC")
    labels: dict[int, str]  # original value -> name, background 0 included
    cases: tuple[CaseFiles, ...]
    file_ending: str = ".nii.gz"
    raw_json: dict = field(default_factory=dict, repr=False, compare=False)
    regions: tuple[Region, ...] = ()  # nnU-Net v2 region-based labels (pipeline.data.labels)
    regions_class_order: tuple[int, ...] = ()
    ignore_value: int | None = None  # the "ignore" label's value, the highest one

    @property
    def label_map(self) -> LabelMap:
        return LabelMap(tuple(sorted(self.labels)), self.regions, self.regions_class_order, self.ignore_value)

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> CaseFiles:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)

@dataclass
class CaseData:
    """One case loaded in the project frame: image (C, X, Y, Z) float32 in RAS, label (X, Y, Z)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None  # original label values
    geometry: Geometry  # of the first channel's file, for export
    spacing: tuple[float, ...]


def _check_path(root: Path, rel: object, case: str, what: str, problems: list[Problem]) -> Path | None:
    if not isinstance(rel, str) or not rel:
        problems.append(Problem(case, f"{what} path must be a non-empty string, got {rel!r}"))
        return None
    path = root.joinpath(*PurePosixPath(rel).parts)  # "./imagesTr/x": no "." segment in an object key
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        problems.append(Problem(case, f"{what} path {rel!r} escapes the dataset folder"))
        return None
    if not inside(root, path):
        problems.append(Problem(case, f"{what} path {rel!r} is a link that points outside the dataset folder"))
        return None
    return path


def _parse_labels_msd(raw: object, problems: list[Problem]) -> dict[int, str]:
    labels: dict[int, str] = {}
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem(None, "dataset.json 'labels' must be a non-empty object like {\"0\": \"background\"}"))
        return labels
    for key, name in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            problems.append(Problem(None, f"dataset.json label key {key!r} is not an integer value"))
            continue
        if value < 0:
            problems.append(Problem(None, f"dataset.json label value {value} is negative"))
            continue
        if value in labels:  # "1" and "01"
            problems.append(Problem(None, f"dataset.json label value {value} is declared twice "
                                          f"({labels[value]!r} and {str(name)!r}): each value must have one name"))
            continue
        labels[value] = str(name)
    _check_unique_names(labels, problems)
    return labels


def _check_unique_names(labels: dict[int, str], problems: list[Problem]) -> None:
    """Two values under one name would merge two classes in plans.json (which maps value -> name)."""
    by_name: dict[str, list[int]] = {}
    for value, name in labels.items():
        by_name.setdefault(name, []).append(value)
    for name, values in by_name.items():
        if len(values) > 1:
            problems.append(Problem(None, f"dataset.json labels {', '.join(map(str, sorted(values)))} share the name "
                                          f"{name!r}: each class needs its own name"))


def _parse_channels(raw: object, key: str, problems: list[Problem]) -> tuple[str, ...]:
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem(None, f"dataset.json '{key}' must be a non-empty object like {{\"0\": \"MRI\"}}"))
        return ()
    try:
        items = sorted(((int(k), str(v)) for k, v in raw.items()))
    except (TypeError, ValueError):
        problems.append(Problem(None, f"dataset.json '{key}' keys must be channel indices 0, 1, ..."))
        return ()
    if [i for i, _ in items] != list(range(len(items))):
        problems.append(Problem(None, f"dataset.json '{key}' keys must be 0..{len(items) - 1}"))
        return ()
    return tuple(v for _, v in items)


def _msd_cases(root: Path, meta: dict, n_channels: int, problems: list[Problem]) -> list[CaseFiles]:
    training = meta.get("training")
    if not isinstance(training, list):
        problems.append(Problem(None, "dataset.json 'training' must be a list of {\"image\", \"label\"} entries"))
        return []
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            problems.append(Problem(f"training[{i}]", "entry must be an object with 'image' and 'label'"))
            continue
        image_rel = entry.get("image")
        case_id = strip_ending(Path(image_rel).name) if isinstance(image_rel, str) else f"training[{i}]"
        image = _check_path(root, image_rel, case_id, "image", problems)
        label = _check_path(root, entry.get("label"), case_id, "label", problems) if "label" in entry else None
        if "label" not in entry:
            problems.append(Problem(case_id, "training entry has no 'label'"))
        if image is None:
            continue
        cases.append(CaseFiles(case_id, (image,), label, four_d=n_channels > 1))
    return cases


def _nnunet_cases(root: Path, channels: int, ending: str, problems: list[Problem]) -> list[CaseFiles]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        problems.append(Problem(None, "imagesTr/ folder is missing"))
        return []
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        m = pattern.match(path.name)
        if not m:
            if path.name.endswith(ending):
                problems.append(Problem(strip_ending(path.name), f"image {path.name} lacks the _XXXX channel suffix"))
            continue
        found.setdefault(m.group(1), {})[int(m.group(2))] = path
    label_ids = {p.name[: -len(ending)] for p in labels_dir.iterdir() if p.name.endswith(ending)} if labels_dir.is_dir() else set()
    cases = []
    for case_id in sorted(set(found) | label_ids):
        files = found.get(case_id, {})
        missing = [c for c in range(channels) if c not in files]
        extra = sorted(c for c in files if c >= channels)
        if missing:
            problems.append(Problem(case_id, f"missing channel file(s) {', '.join(f'{case_id}_{c:04d}{ending}' for c in missing)}"))
        if extra:
            problems.append(Problem(case_id, f"channel file(s) {extra} beyond the {channels} declared in channel_names"))
        label = labels_dir / f"{case_id}{ending}"
        if case_id not in label_ids:
            problems.append(Problem(case_id, f"missing label file labelsTr/{case_id}{ending}"))
        paths = []
        for c in range(channels):
            if c in files:
                if not inside(root, files[c]):
                    problems.append(Problem(case_id, f"{files[c].name} is a link that points outside the dataset folder"))
                else:
                    paths.append(files[c])
        label_ok = case_id in label_ids
        if label_ok and not inside(root, label):
            problems.append(Problem(case_id, f"label {label.name} is a link that points outside the dataset folder"))
            label_ok = False
        if len(paths) == channels and not missing:
            cases.append(CaseFiles(case_id, tuple(paths), label if label_ok else None))
    return cases


def _no_duplicate_keys(problems: list[Problem], pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys without a word: {"1": "core", "1": "edema"}."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            problems.append(Problem(None, f"dataset.json has the key {key!r} twice in one object "
                                          f"(values {out[key]!r} and {value!r}): only one can count"))
        out[key] = value
    return out


def scan_dataset(path: str | os.PathLike) -> tuple[Dataset | None, list[Problem]]:
    """Read the dataset description, collecting every problem found instead of stopping at the first."""
    root = absolute(path)  # case paths travel to workers that may run in another folder (or a URL)
    problems: list[Problem] = []
    if not root.is_dir():
        return None, [Problem(None, f"{root} is not a folder")]
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return None, [Problem(None, f"no dataset.json in {root}")]
    try:
        meta = json.loads(meta_path.read_text(), object_pairs_hook=partial(_no_duplicate_keys, problems))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, [Problem(None, f"dataset.json is not valid JSON ({exc})")]
    except OSError as exc:
        return None, [Problem(None, f"dataset.json cannot be read ({exc})")]
    if not isinstance(meta, dict):
        return None, [Problem(None, "dataset.json must hold a JSON object")]

    if "channel_names" in meta:
        layout = LAYOUT_NNUNET
        channels = _parse_channels(meta["channel_names"], "channel_names", problems)
        declared = parse_nnunet_labels(meta.get("labels"), meta.get("regions_class_order"), problems)
        labels = declared.names
        ending = meta.get("file_ending", ".nii.gz")
        if ending not in IMAGE_ENDINGS:
            problems.append(Problem(None, f"file_ending {ending!r} is not supported (use one of "
                                          f"{', '.join(IMAGE_ENDINGS)}; .dcm: a folder per DICOM series)"))
            ending = ".nii.gz"
        cases = _nnunet_cases(root, len(channels), ending, problems) if channels else []
    elif "modality" in meta:
        layout = LAYOUT_MSD
        channels = _parse_channels(meta["modality"], "modality", problems)
        labels = _parse_labels_msd(meta.get("labels"), problems)
        declared = None
        cases = _msd_cases(root, meta, max(len(channels), 1), problems)
        ending = ending_of(cases[0].images[0].name) if cases else None
        ending = ending or ".nii.gz"  # the first case's: what derived files (cross-validation inputs) are named
    else:
        return None, [Problem(None, "dataset.json lacks 'modality' (Decathlon) or 'channel_names' (nnU-Net v2)")]

    if labels and 0 not in labels:
        problems.append(Problem(None, "dataset.json labels must declare background as value 0"))
    seen: dict[str, int] = {}
    for c in cases:
        seen[c.case_id] = seen.get(c.case_id, 0) + 1
    for case_id, n in seen.items():
        if n > 1:
            problems.append(Problem(case_id, f"duplicate case id ({n} entries)"))
    if not cases and not any(p.case is None for p in problems):
        problems.append(Problem(None, "the dataset has no training cases"))
    name = str(meta.get("name") or root.name)
    if problems and (not channels or not labels):
        return None, problems
    dataset = Dataset(root, name, layout, channels, labels, tuple(cases), ending, meta)
    if declared is not None and (declared.regions or declared.ignore_value is not None):
        dataset = replace(dataset, regions=declared.regions, regions_class_order=declared.regions_class_order,
                          ignore_value=declared.ignore_value)
    return dataset, problems


def load_dataset(path: str | os.PathLike) -> Dataset:
    """The dataset description, or a BadInputError listing every problem with it."""
    dataset, problems = scan_dataset(path)
    if problems or dataset is None:
        raise BadInputError(problems)
    return dataset


def case_files(dataset: Dataset, case_id: str) -> list[Path]:
    """Every file a case is read from: its images' and its label's (`images.files_of`)."""
    case = dataset.case(case_id)
    return [f for p in (*case.images, *([case.label] if case.label is not None else [])) for f in files_of(p)]


def cases_of(dataset: Dataset, case_ids: list[str]) -> Dataset:
    """The dataset with only `case_ids` and without dataset.json's text: what one Dask task needs (a
    task that carried every case would make the task graph grow with the square of the case count)."""
    keep = set(case_ids)
    return replace(dataset, cases=tuple(c for c in dataset.cases if c.case_id in keep), raw_json={})


# A Dask task costs a few ms of CPU to schedule, ship and report - as much as a 40 KB case takes to
# check or preprocess - so small cases travel in batches: up to BATCH_CASES cases or BATCH_BYTES of
# raw files per task, and at least TASKS_PER_WORKER tasks per worker so that the workers stay evenly loaded.
BATCH_CASES = 32
BATCH_BYTES = 32 << 20
TASKS_PER_WORKER = 4


def case_batches(dataset: Dataset, case_ids: list[str], workers: int) -> list[list[str]]:
    """`case_ids` in order, cut into the batches of one Dask task each (a large case travels alone)."""
    if not case_ids:
        return []
    most = max(1, min(BATCH_CASES, -(-len(case_ids) // (TASKS_PER_WORKER * max(1, workers)))))
    batches: list[list[str]] = [[]]
    size = 0
    for case_id in case_ids:
        try:
            nbytes = sum(stat(p)[0] for p in case_files(dataset, case_id))
        except OSError:
            nbytes = 0  # its task reports the problem
        if batches[-1] and (len(batches[-1]) >= most or size + nbytes > BATCH_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(case_id)
        size += nbytes
    return batches


def label_values_problem(data: np.ndarray) -> str | None:
    """What makes these voxels no label map (NaN/Inf, fractions, negatives), naming a real value; None if fine.
    Validation and `read_case` both ask this, about the same values (`nifti.label_dtype`)."""
    if data.dtype.kind not in "biuf":
        return f"has unsupported data type {data.dtype}"
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            return f"holds {int((~finite).sum())} NaN/Inf voxel(s)"
        off = data != np.rint(data)
        if off.any():
            return f"holds non-integer values (e.g. {data[off][0]}): labels must be whole numbers"
    if data.size and data.min() < 0:
        return f"holds negative values (min {float(data.min()):g}): labels must be 0 or positive"
    return None


def read_case(dataset: Dataset, case: CaseFiles | str, with_label: bool = True) -> CaseData:
    """Load one case into the project frame (RAS, channels first), checking its files agree."""
    if isinstance(case, str):
        case = dataset.case(case)
    cid = case.case_id
    arrays, geometry = [], None
    for path in case.images:
        img = open_image(path, cid)
        g = img.geometry
        data = img.read()
        if case.four_d:
            if data.ndim == 3 and dataset.num_channels == 1:
                data = data[..., None]
            if data.ndim != 4 or data.shape[3] != dataset.num_channels:
                raise BadInputError(f"image has shape {data.shape}; expected 4D with {dataset.num_channels} channels last", cid)
            arrays.extend(np.moveaxis(to_ras(data, g), 3, 0))
        else:
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise BadInputError(f"{path.name} has {data.ndim} dimensions (shape {data.shape}); expected a 3D volume", cid)
            arrays.append(to_ras(data, g))
        if geometry is None:
            geometry = g
        elif not geometry.allclose(g):
            raise BadInputError(f"channel {path.name} has a different shape or affine than the first channel", cid)
    image = np.stack(arrays).astype(np.float32, copy=False)
    label = None
    if with_label and case.label is not None:
        limg = open_image(case.label, cid)
        lg = limg.geometry
        if lg.shape != geometry.shape:
            raise BadInputError(f"label shape {lg.shape} differs from image shape {geometry.shape}", cid)
        raw = limg.read(dtype=limg.label_dtype)
        if raw.ndim == 4 and raw.shape[3] == 1:
            raw = raw[..., 0]
        if (problem := label_values_problem(raw)) is not None:
            raise BadInputError(f"label {case.label.name} {problem}", cid)
        rounded = np.rint(raw) if raw.dtype.kind == "f" else raw
        fits = rounded.size == 0 or (rounded.min() >= 0 and rounded.max() <= dataset.label_map.values[-1])
        label = to_ras(rounded.astype(dataset.label_map.value_dtype if fits else np.int32), lg)
    return CaseData(cid, image, label, geometry, geometry.spacing)
