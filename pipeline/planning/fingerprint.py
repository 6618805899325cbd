"""The dataset fingerprint: what the planner needs to know about every case, and nothing more.

Per case (one Dask task each, reading ONE case and returning a few kilobytes): RAS spacing and
shape, the shape after cropping to the nonzero region of all channels (as nnU-Net crops before
planning), voxel counts per label value, and foreground intensity statistics per channel. Dataset
wide: per-channel foreground intensity properties (mean, std, median, min, max, 0.5th and 99.5th
percentiles) that CT normalisation clips and scales with.

Intensity sampling follows nnU-Net v2's rule in spirit, with a fixed memory bound: every case
contributes the same number of foreground voxels (a case with a small foreground is repeated, so it is
not under-represented; nnU-Net draws with replacement, we draw whole copies plus a remainder without
replacement, which has the same weights and less noise), and that number is a fixed budget divided by the number of
cases. nnU-Net's budget is 1e8 voxels (400 MB per channel in the main process); ours is
`INTENSITY_SAMPLE_BUDGET`, so the main process holds at most that many samples per channel whatever
the case count (208 hippocampus cases get 9,615 each, close to nnU-Net's 10,000 default per case).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.data.dataset import CaseFiles, Dataset, read_case
from pipeline.errors import BadInputError, Problem, SegPipeError
from pipeline.storage import as_path, write_json_atomic

SCHEMA_VERSION = 1
INTENSITY_SAMPLE_BUDGET = 2_000_000  # foreground intensities kept per channel for the whole dataset
MAX_SAMPLES_PER_CASE = 200_000  # a one-case dataset needs no more to pin its percentiles
PERCENTILES = (0.5, 50.0, 99.5)


def samples_per_case(num_cases: int) -> int:
    """How many foreground intensities each case contributes: the budget shared equally."""
    return max(1, min(MAX_SAMPLES_PER_CASE, INTENSITY_SAMPLE_BUDGET // max(num_cases, 1)))


@dataclass
class IntensityStats:
    """Foreground intensity statistics of one channel; None where there is no foreground."""

    mean: float | None = None
    std: float | None = None
    median: float | None = None
    min: float | None = None
    max: float | None = None
    percentile_00_5: float | None = None
    percentile_99_5: float | None = None
    count: int = 0  # foreground voxels (per case) or samples (dataset) the values come from

    @classmethod
    def of(cls, values: np.ndarray, count: int | None = None) -> IntensityStats:
        if values.size == 0:
            return cls(count=0)
        lo, med, hi = np.percentile(values, PERCENTILES)
        return cls(
            mean=float(np.mean(values, dtype=np.float64)),
            std=float(np.std(values, dtype=np.float64)),
            median=float(med),
            min=float(np.min(values)),
            max=float(np.max(values)),
            percentile_00_5=float(lo),
            percentile_99_5=float(hi),
            count=int(values.size if count is None else count),
        )


@dataclass
class CaseFingerprint:
    case_id: str
    spacing: list[float]  # RAS axis order (project frame), mm
    shape: list[int]  # RAS shape after reorientation
    shape_after_crop: list[int]  # RAS shape of the bounding box of the nonzero region of all channels
    crop_bbox: list[list[int]]  # RAS, [[lo, hi), ...]
    axcodes: list[str]  # orientation of the file as stored, e.g. ["P", "S", "R"]
    class_voxels: dict[str, int]  # label value (as str) -> voxel count in the whole label
    intensity: list[IntensityStats]  # per channel, over the foreground (label > 0) inside the crop

    @property
    def relative_size_after_crop(self) -> float:
        return float(np.prod(self.shape_after_crop, dtype=np.float64) / np.prod(self.shape, dtype=np.float64))

    @classmethod
    def from_json(cls, d: dict) -> CaseFingerprint:
        d = dict(d)
        d["intensity"] = [IntensityStats(**s) for s in d["intensity"]]
        return cls(**d)


@dataclass
class Fingerprint:
    dataset_name: str
    channels: list[str]
    label_values: list[int]
    cases: list[CaseFingerprint]
    foreground_intensity_properties: list[IntensityStats]  # per channel, from the pooled samples
    samples_per_case: int = 0
    schema_version: int = SCHEMA_VERSION

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.float64)

    @property
    def median_relative_size_after_crop(self) -> float:
        return float(np.median([c.relative_size_after_crop for c in self.cases]))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Fingerprint:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SegPipeError(
                f"fingerprint.json has schema version {version}; this seg-pipeline reads {SCHEMA_VERSION} "
                "(re-run `segpipe fingerprint`)")
        d = dict(d)
        d["cases"] = [CaseFingerprint.from_json(c) for c in d["cases"]]
        d["foreground_intensity_properties"] = [IntensityStats(**s) for s in d["foreground_intensity_properties"]]
        return cls(**d)

    def hash(self) -> str:
        """A digest of the whole fingerprint; plans record it so stale plans can be spotted."""
        blob = json.dumps(self.to_json(), sort_keys=True, default=float).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fingerprint:
        path = as_path(path)
        if not path.is_file():
            raise SegPipeError(f"{path} not found: run `segpipe fingerprint` first")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SegPipeError(f"{path} is not valid JSON ({exc}): re-run `segpipe fingerprint`") from None
        return cls.from_json(data)


# ------------------------------------------------------------------ one case (runs on a worker)


@dataclass
class CaseOutcome:
    """What a task sends back: the case's fingerprint and its intensity sample, or the problem."""

    index: int
    case: CaseFingerprint | None = None
    samples: list[np.ndarray] | None = None  # per channel, float32, `samples_per_case` long (or empty)
    problem: Problem | None = None


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Bounding box of the voxels nonzero in any channel (image is channels-first).

    nnU-Net fills holes in this mask first; holes lie inside the mask, so the box is the same.
    An all-zero image keeps its full extent.
    """
    mask = np.any(image != 0, axis=0)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(mask.shape[axis])])
    return bbox


def _case_seed(case_id: str) -> int:
    """A seed fixed by the case id: the same sample whichever worker reads it, in whatever order."""
    return zlib.crc32(case_id.encode())


def sample_indices(population: int, size: int, seed: int) -> np.ndarray:
    """`size` indices into `population`, every index used equally often give or take one.

    Like nnU-Net's draw with replacement, a case with few foreground voxels still contributes
    `size` values (equal weight per case), but whole copies plus a draw without replacement for
    the remainder has a smaller variance than independent draws.
    """
    rng = np.random.default_rng(seed)
    copies, rest = divmod(size, population)
    parts = [np.arange(population)] * copies + [rng.choice(population, rest, replace=False)]
    return np.concatenate(parts)


def _value_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct label values and their voxel counts (bincount: no sort of a whole CT volume)."""
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi >= 1 << 16:
        return np.unique(label, return_counts=True)
    counts = np.bincount(label.ravel().astype(np.intp, copy=False), minlength=hi + 1)
    values = np.flatnonzero(counts)
    return values, counts[values]


def fingerprint_case(dataset: Dataset, case: CaseFiles, index: int, num_samples: int) -> CaseOutcome:
    """Read one case and summarise it. Never raises for bad data: the problem comes back named."""
    try:
        return CaseOutcome(index, *_fingerprint_case(dataset, case, num_samples))
    except BadInputError as exc:
        message = "; ".join(p.message for p in exc.problems)
        return CaseOutcome(index, problem=Problem(case.case_id, message))
    except MemoryError:
        return CaseOutcome(index, problem=Problem(case.case_id, "out of memory reading this case"))
    except Exception as exc:  # anything else is reported against the case, not as a crash
        return CaseOutcome(index, problem=Problem(case.case_id, f"{type(exc).__name__}: {exc}"))


def _fingerprint_case(dataset: Dataset, case: CaseFiles, num_samples: int):
    cid = case.case_id
    if case.label is None:
        raise BadInputError("has no label file: a training case needs one", cid)
    data = read_case(dataset, case)
    image, label = data.image, data.label
    if not np.isfinite(image).all():
        raise BadInputError("image contains NaN or infinite values", cid)

    values, counts = _value_counts(label)
    undeclared = sorted(set(values.tolist()) - set(dataset.labels))
    if undeclared:
        raise BadInputError(f"label values {undeclared[:10]} are not declared in dataset.json", cid)

    bbox = nonzero_bbox(image)
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    foreground = label[crop] > 0
    n_fg = int(np.count_nonzero(foreground))
    pick = sample_indices(n_fg, num_samples, _case_seed(cid)) if n_fg else None
    stats, samples = [], []
    for channel in image:
        fg = channel[crop][foreground]
        stats.append(IntensityStats.of(fg))
        samples.append(fg[pick].astype(np.float32) if n_fg else np.empty(0, np.float32))

    fp = CaseFingerprint(
        case_id=cid,
        spacing=[float(s) for s in data.spacing],
        shape=[int(s) for s in label.shape],
        shape_after_crop=[hi - lo for lo, hi in bbox],
        crop_bbox=bbox,
        axcodes=list(data.geometry.axcodes),
        class_voxels={str(int(v)): int(n) for v, n in zip(values, counts)},
        intensity=stats,
    )
    return fp, samples


# ------------------------------------------------------------------ the whole dataset


def compute_fingerprint(dataset: Dataset, client=None, progress: bool = True) -> Fingerprint:
    """Fingerprint every case: one Dask task per case on `client`, or in this process when None.

    Results are consumed as they complete and each task's future is released at once, so the main
    process holds only the small per-case summaries and the bounded intensity sample. Every failing
    case is collected; then a BadInputError names them all.
    """
    from tqdm.auto import tqdm

    cases = list(dataset.cases)
    if not cases:
        raise BadInputError("the dataset has no training cases")
    n, k = len(cases), samples_per_case(len(cases))
    # Tasks get a dataset description without the case list: shipping every path to every task
    # would make the task graph grow with the square of the case count.
    slim = dataclasses.replace(dataset, cases=(), raw_json={})
    channels = dataset.num_channels
    pooled = np.zeros((channels, n, k), dtype=np.float32)
    has_samples = np.zeros(n, dtype=bool)
    results: list[CaseFingerprint | None] = [None] * n
    problems: list[Problem] = []

    def consume(outcome: CaseOutcome) -> None:
        if outcome.problem is not None:
            problems.append(outcome.problem)
            return
        results[outcome.index] = outcome.case
        if outcome.samples and outcome.samples[0].size:
            pooled[:, outcome.index] = np.stack(outcome.samples)
            has_samples[outcome.index] = True

    bar = tqdm(total=n, desc="fingerprint", unit="case", disable=not progress)
    try:
        if client is None:
            for i, case in enumerate(cases):
                consume(fingerprint_case(slim, case, i, k))
                bar.update()
        else:
            from distributed import as_completed

            from pipeline.parallel import results_of

            run = uuid.uuid4().hex[:8]
            futures = client.map(fingerprint_case, [slim] * n, cases, range(n), [k] * n,
                                 key=[f"fingerprint-{c.case_id}-{run}" for c in cases])
            case_of = {f.key: c.case_id for f, c in zip(futures, cases)}
            completed = as_completed(futures)
            del futures  # as_completed holds them until yielded; we drop each after use
            for future, value in results_of(completed):
                if isinstance(value, BaseException):  # the worker died (e.g. killed for memory) or was lost
                    problems.append(Problem(case_of[future.key], f"task failed ({type(value).__name__}: {value}); "
                                                                 "the case may be too large for a worker"))
                else:
                    consume(value)
                future.release()
                bar.update()
    finally:
        bar.close()
    if problems:
        raise BadInputError(sorted(problems, key=lambda p: p.case or ""))

    sample = pooled[:, has_samples].reshape(channels, -1)
    properties = [IntensityStats.of(sample[c]) for c in range(channels)]
    for c, prop in enumerate(properties):  # min/max: exact over every foreground voxel, not the sample
        per_case = [r.intensity[c] for r in results if r.intensity[c].count]
        if per_case:
            prop.min = min(s.min for s in per_case)
            prop.max = max(s.max for s in per_case)
    return Fingerprint(
        dataset_name=dataset.name,
        channels=list(dataset.channels),
        label_values=sorted(dataset.labels),
        cases=results,
        foreground_intensity_properties=properties,
        samples_per_case=k,
    )
