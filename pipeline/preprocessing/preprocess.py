"""Preprocessing: one case at a time as a plain function, a whole dataset on Dask into the Zarr store.

`preprocess_case` follows nnU-Net v2's DefaultPreprocessor step by step - transpose to the store
axis order, crop to the nonzero region, normalise, resample to the target spacing - and then does
two things nnU-Net leaves to its data loader: it pads to at least the patch size (centred, with 0,
as nnU-Net pads at sampling time; stored padded so that every patch-sized read stays inside the
array and the chunk grid = patch grid holds for small cases too) and samples foreground locations
for oversampling. Everything needed to undo it is recorded in
`CaseMeta` (see `pipeline.inference.export`).

`run_preprocessing` runs one task per case on a Dask client (or in-process when client is None):
the worker reads its case, preprocesses it and writes it to the store itself - one writer per case
array, nothing large travels through the scheduler - and returns a small summary. Complete cases
are skipped, leftovers of interrupted runs are deleted and redone, complete cases that fail the
store's cheap structural check (an array's metadata or a chunk file missing, shapes or dtypes that
disagree with the case's record: `ConfigStore.check_cases`) are redone, and a lock file refuses a
second run on the same store. A chunk that is there but corrupt is found only by reading it:
`segpipe verify --repair` does, and deletes such cases for the next run to redo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.dataset import CaseData, Dataset, LabelMap, case_batches, case_files, cases_of, read_case
from pipeline.errors import BadInputError, Problem, SegPipeError
from pipeline.planning.plans import ChannelNormalization, ConfigurationPlan, Plans
from pipeline.preprocessing.case_meta import CaseMeta
from pipeline.preprocessing.normalization import nonzero_mask, normalize
from pipeline.preprocessing.resampling import (
    ANISOTROPY_THRESHOLD,
    compute_new_shape,
    resample_image,
    resample_label,
    separate_z_axis,
)
from pipeline.preprocessing.store import config_attrs, open_store  # forked Dask workers inherit it: ~0.1 CPU-s each
from pipeline.storage import as_path, stat, url_of

log = logging.getLogger("segpipe.preprocessing")

# nnU-Net's foreground sampling: up to 10,000 voxels per class, but at least 1% of the class.
MAX_LOCATIONS_PER_CLASS = 10_000
MIN_LOCATION_COVERAGE = 0.01


@dataclass
class PreprocessedCase:
    case_id: str
    image: np.ndarray  # float32 (C, *spatial), store axis order, padded
    label: np.ndarray | None  # contiguous class indices (*spatial), or None (inference)
    locations: np.ndarray  # int32 (N, 1 + ndim): class index, then coordinates in the padded array
    meta: CaseMeta


class StageTimes:
    """Seconds spent in each named stage of one or more cases; handed to `preprocess_case`,
    `preprocess_and_write` and `ConfigStore.write_case` by benchmarks/profile_preprocess.py to
    see where a case's time goes. Without one (the default) the stages are not timed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def untimed(stage: str) -> contextlib.AbstractContextManager:
    """The stage clock used when nobody profiles: nothing is measured."""
    return contextlib.nullcontext()


StageClock = Callable[[str], contextlib.AbstractContextManager]


def channel_normalizations(plans: Plans, conf: ConfigurationPlan) -> list[ChannelNormalization]:
    """The plan-level per-channel statistics, with the configuration's scheme / mask choices on top."""
    norms = []
    for c, norm in enumerate(plans.normalization):
        updates: dict[str, Any] = {}
        if conf.normalization_schemes is not None and c < len(conf.normalization_schemes):
            updates["scheme"] = conf.normalization_schemes[c]
        if conf.use_mask_for_norm is not None and c < len(conf.use_mask_for_norm):
            updates["use_nonzero_mask"] = bool(conf.use_mask_for_norm[c])
        norms.append(dataclasses.replace(norm, **updates))
    return norms


def target_spacing(conf: ConfigurationPlan, spacing_before: list[float]) -> list[float]:
    """The configuration's spacing; 2d configurations keep the first (slicing) axis as it is (nnU-Net)."""
    spacing = [float(s) for s in conf.spacing]
    if len(spacing) < len(spacing_before):
        spacing = [float(s) for s in spacing_before[: len(spacing_before) - len(spacing)]] + spacing
    return spacing


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """Half-open bounding box of a boolean mask; the whole array when the mask is empty."""
    if not mask.any():
        return [[0, int(n)] for n in mask.shape]
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def pad_to(shape: tuple[int, ...], patch: list[int]) -> list[list[int]]:
    """[[before, after], ...] so every axis is at least the patch (centred, as nnU-Net's pad_nd_image).

    A 2d patch covers the last two axes; the first (slicing) axis is never padded.
    """
    full = [1] * (len(shape) - len(patch)) + list(patch)
    pad = []
    for n, p in zip(shape, full):
        extra = max(0, int(p) - int(n))
        pad.append([extra // 2, extra - extra // 2])
    return pad


def sample_locations(label: np.ndarray, num_classes: int, seed: int, ignore_index: int | None = None) -> np.ndarray:
    """Rows (class_index, *coords) for a bounded random sample of each foreground class's voxels.

    With an ignore label (`ignore_index`) its voxels are never a row (no patch is centred on them),
    and background gets rows too (class 0): annotated background, where the sampler centres the
    patches it does not force onto foreground, so sparse scribbles are seen (as nnU-Net v2 does).
    """
    wanted = [c for c in range(0 if ignore_index is not None else 1, num_classes) if c != ignore_index]
    flat = np.flatnonzero(label) if ignore_index is None else np.flatnonzero(label != ignore_index)
    if flat.size == 0:
        return np.zeros((0, 1 + label.ndim), dtype=np.int32)
    classes = label.ravel()[flat]
    order = np.argsort(classes, kind="stable")
    flat, classes = flat[order], classes[order]
    starts = np.searchsorted(classes, wanted)
    ends = np.searchsorted(classes, wanted, side="right")
    rng = np.random.default_rng(seed)
    rows = []
    for c, s, e in zip(wanted, starts, ends):
        n = int(e - s)
        if n == 0:
            continue
        k = min(n, max(min(MAX_LOCATIONS_PER_CLASS, n), int(np.ceil(n * MIN_LOCATION_COVERAGE))))
        pick = np.sort(rng.choice(n, size=k, replace=False)) + s
        coords = np.stack(np.unravel_index(flat[pick], label.shape), axis=1)
        rows.append(np.concatenate([np.full((k, 1), c), coords], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 1 + label.ndim), dtype=np.int32)


def case_seed(case_id: str) -> int:
    """A seed that depends on the case only, so any worker samples the same locations."""
    return zlib.crc32(case_id.encode())


def preprocess_case(case: CaseData, plans: Plans, config_name: str, label_map: LabelMap,
                    clock: StageClock = untimed) -> PreprocessedCase:
    """Transpose, crop to nonzero, normalise, resample, pad; sample foreground locations; record the undo.

    `clock` (a `StageTimes`) times each stage for benchmarks/profile_preprocess.py."""
    cid = case.case_id
    conf = plans.configuration(config_name)
    if conf.spacing is None or conf.patch_size is None:
        raise SegPipeError(f"configuration {config_name!r} has no spacing or patch size (re-run `segpipe plan`)")
    tf = list(plans.transpose_forward)
    if any(float(s) <= 0 or not np.isfinite(s) for s in case.spacing):
        raise BadInputError(f"voxel spacing {tuple(case.spacing)} must be positive", cid)
    with clock("reorient"):
        if not np.isfinite(case.image).all():
            raise BadInputError("image contains NaN or infinite values", cid)
        shape_ras = [int(s) for s in case.image.shape[1:]]
        image = np.transpose(case.image, [0, *[t + 1 for t in tf]])
        label = None
        if case.label is not None:
            try:
                label = label_map.to_index(np.transpose(case.label, tf))
            except ValueError as exc:
                raise BadInputError(f"label: {exc}", cid) from None
        spacing_before = [float(case.spacing[t]) for t in tf]

    # crop to the nonzero region (any channel), as nnU-Net; the filled mask also drives zscore masking
    with clock("crop"):
        mask = nonzero_mask(image)
        box = bbox_of(mask)
        crop = tuple(slice(a, b) for a, b in box)
        image, mask = image[(slice(None), *crop)], mask[crop]
        if label is not None:
            label = label[crop]
    crop_ras = [None] * len(tf)
    for i, t in enumerate(tf):
        crop_ras[t] = box[i]
    shape_after_crop = [int(s) for s in image.shape[1:]]

    with clock("normalise"):
        image = normalize(image, channel_normalizations(plans, conf), mask)

    spacing_after = target_spacing(conf, spacing_before)
    new_shape = compute_new_shape(shape_after_crop, spacing_before, spacing_after)
    threshold = conf.anisotropy_threshold if conf.anisotropy_threshold is not None else ANISOTROPY_THRESHOLD
    axis = separate_z_axis(spacing_before, spacing_after, threshold)
    order_z = conf.order_z if conf.order_z is not None else 0
    image_order = conf.image_order if conf.image_order is not None else 3
    label_order = conf.label_order if conf.label_order is not None else 1
    with clock("resample image"):
        image = resample_image(image, new_shape, image_order, axis, order_z)
    if label is not None:
        with clock("resample labels"):
            # outside the nonzero region background is its own class while resampling, as in nnU-Net
            label = resample_label(label, new_shape, label_order, axis, order_z, outside=~mask)

    with clock("pad"):
        pad = pad_to(new_shape, list(conf.patch_size))
        if any(a or b for a, b in pad):
            image = np.pad(image, [[0, 0], *pad], mode="constant", constant_values=0)
            if label is not None:
                label = np.pad(label, pad, mode="constant", constant_values=0)
        image = np.ascontiguousarray(image, dtype=np.float32)

    num_classes = label_map.num_classes
    with clock("foreground locations"):
        if label is not None:
            class_voxels = np.bincount(label.ravel(), minlength=num_classes).tolist()
            locations = sample_locations(label, num_classes, case_seed(cid), label_map.ignore_index)
        else:
            class_voxels, locations = [], np.zeros((0, 1 + len(new_shape)), dtype=np.int32)
    with clock("metadata"):
        meta = CaseMeta(
            case_id=cid, geometry=case.geometry, shape_ras=shape_ras, transpose_forward=tf, crop_bbox=crop_ras,
            shape_after_crop=shape_after_crop, spacing_before=spacing_before, spacing_after=spacing_after,
            shape_after_resample=list(new_shape), pad=pad, class_voxels=class_voxels, separate_z_axis=axis,
            order_z=order_z,
        )
    return PreprocessedCase(cid, image, label, locations, meta)


# ---------------------------------------------------------------- the dataset on Dask


@dataclass
class PreprocessReport:
    store: str
    configuration: str
    data_identifier: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete before this run
    failed: list[Problem] = field(default_factory=list)
    deleted_incomplete: list[str] = field(default_factory=list)  # leftovers of interrupted runs, redone
    changed: list[str] = field(default_factory=list)  # complete, but the raw files changed since: redone
    damaged: list[Problem] = field(default_factory=list)  # complete, but failing the structural check: redone
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["failed"] = [{"case": p.case, "message": p.message} for p in self.failed]
        d["damaged"] = [{"case": p.case, "message": p.message} for p in self.damaged]
        return d

    def __str__(self) -> str:
        lines = [f"preprocessed {len(self.done)} case(s) for {self.configuration} into {self.store} "
                 f"in {self.seconds:.1f}s; {len(self.skipped)} already complete, {len(self.failed)} failed"]
        if self.deleted_incomplete:
            lines.append(f"redid {len(self.deleted_incomplete)} incomplete case(s) left by an interrupted run")
        redone = [p for p in self.damaged if p.case in self.done]
        if redone:
            lines.append(f"redid {len(redone)} damaged case(s): {', '.join(p.case for p in redone[:5])}"
                         f"{' ...' if len(redone) > 5 else ''}")
        lines.extend(f"  damaged, not in this dataset (`segpipe verify --repair` deletes it): {p.message}"
                     for p in self.damaged if p.case not in self.done and p.case not in {f.case for f in self.failed})
        if self.changed:
            lines.append(f"redid {len(self.changed)} case(s) whose raw files changed since they were stored: "
                         f"{', '.join(self.changed[:5])}{' ...' if len(self.changed) > 5 else ''}")
        lines.extend(f"  failed {p}" for p in self.failed)
        return "\n".join(lines)


def _file_key(dataset: Dataset, path: Path) -> str:
    try:
        return str(as_path(path).relative_to(dataset.root))
    except ValueError:
        return str(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with as_path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_stamps(dataset: Dataset, case_id: str) -> dict[str, list]:
    """file (relative to the dataset) -> [size, mtime_ns, sha256] of each raw file of the case."""
    out = {}
    for path in case_files(dataset, case_id):
        size, mtime_ns = stat(path)
        out[_file_key(dataset, path)] = [size, mtime_ns, _sha256(path)]
    return out


def source_changed(dataset: Dataset, case_id: str, stored: dict) -> bool:
    """Whether the case's raw files differ from the stamps it was preprocessed from.

    Size and modification time settle it when they match (no file is read); a copied dataset has
    new times, so then the content hash decides and an unchanged copy is not redone. A case stored
    without stamps (an older store) counts as unchanged.
    """
    if not stored:
        return False
    files = {_file_key(dataset, p): p for p in case_files(dataset, case_id)}
    if set(files) != set(stored):
        return True
    for key, path in files.items():
        size, mtime, digest = stored[key]
        try:
            now_size, now_mtime = stat(path)
        except OSError:
            return True
        if now_size != size:
            return True
        if now_mtime != mtime and _sha256(path) != digest:
            return True
    return False


def open_config_store(store_path: str, plans: Plans, config_name: str):
    """The configuration group of the store a task writes into (it exists: `run_preprocessing` made it)."""
    conf = plans.configuration(config_name)
    return open_store(store_path, "a").config(conf.data_identifier, plans.hash(config_name))


def preprocess_and_write(dataset: Dataset, case_id: str, plans: Plans, config_name: str, store_path: str,
                         clock: StageClock = untimed, config_store=None) -> dict:
    """One case: read, preprocess and write it; a small JSON-able summary comes back.

    Failures come back as data rather than exceptions: exceptions with custom constructors do not
    survive pickling intact, and the message must name the case. `clock`: see `StageTimes`;
    `config_store`: the configuration group when the caller has it open already (`preprocess_batch`).
    """
    start = time.perf_counter()
    try:
        with clock("read and decompress"):
            case = read_case(dataset, case_id)
        if case.label is None:
            raise BadInputError("training case has no label file", case_id)
        pre = preprocess_case(case, plans, config_name, plans.label_map(), clock)
        with clock("hashing"):
            source = source_stamps(dataset, case_id)  # the files were just read: hashing them is cheap
        with clock("metadata"):
            cs = config_store if config_store is not None else open_config_store(store_path, plans, config_name)
        cs.write_case(case_id, pre, source, clock)
    except BadInputError as exc:
        return {"case_id": case_id, "ok": False, "message": "; ".join(p.message for p in exc.problems)}
    except SegPipeError as exc:
        return {"case_id": case_id, "ok": False, "message": str(exc)}
    except MemoryError:
        return {"case_id": case_id, "ok": False, "message": "out of memory preprocessing this case"}
    except Exception as exc:  # a bug or an unreadable store: still one line, other cases go on
        return {"case_id": case_id, "ok": False, "message": f"{type(exc).__name__}: {exc}"}
    return {"case_id": case_id, "ok": True, "shape": list(pre.image.shape), "seconds": time.perf_counter() - start}


def _config_store_or_none(store_path: str, plans: Plans, config_name: str):
    try:
        return open_config_store(store_path, plans, config_name)
    except Exception:  # noqa: BLE001 - each case then tries itself and reports the error with its id
        return None


def preprocess_batch(dataset: Dataset, case_ids: list[str], plans: Plans, config_name: str, store_path: str) -> list[dict]:
    """One Dask task: `preprocess_and_write` for each case of a batch, the store opened once for all."""
    cs = _config_store_or_none(store_path, plans, config_name)
    return [preprocess_and_write(dataset, cid, plans, config_name, store_path, config_store=cs) for cid in case_ids]


def run_preprocessing(dataset: Dataset, plans: Plans, config: str, store_path, client=None,
                      progress: bool = True) -> PreprocessReport:
    """Preprocess every training case not yet complete in the store; per-case failures are reported, not raised."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    conf = plans.configuration(config)
    if plans.label_map() != dataset.label_map:
        raise BadInputError(f"the plans declare labels {plans.label_map().to_json()} but the dataset "
                            f"declares {dataset.label_map.to_json()}: re-run `segpipe plan`")
    store_path = url_of(store_path)  # absolute: workers may run elsewhere than this cwd
    store = open_store(store_path, "a", dataset_name=plans.dataset_name)
    report = PreprocessReport(str(store_path), config, conf.data_identifier)
    with store.lock():
        cs = store.config(conf.data_identifier, plans.hash(config), create=True, **config_attrs(plans, config))
        report.deleted_incomplete = cs.delete_incomplete()
        stored = cs.sources()  # the complete cases, with the stamps of the files they were made from
        complete = set(stored)
        report.changed = [c.case_id for c in dataset.cases
                          if c.case_id in complete and source_changed(dataset, c.case_id, stored[c.case_id])]
        if report.changed:
            log.warning("%d case(s) changed since they were preprocessed and are redone (%s); the fingerprint "
                        "and plans still describe the earlier files: re-plan if the dataset changed much",
                        len(report.changed), ", ".join(report.changed[:5]))
        complete -= set(report.changed)
        # a complete case whose arrays are missing or inconsistent (a deleted label/zarr.json, a lost
        # chunk file) is redone: cheap, no chunk is read
        damaged = cs.check_cases(sorted(complete))
        report.damaged = [Problem(case_id, message) for case_id, message in damaged.items()]
        if damaged:
            log.warning("%d damaged case(s) in the store are redone: %s", len(damaged), "; ".join(damaged.values()))
        complete -= set(damaged)
        todo = [c.case_id for c in dataset.cases if c.case_id not in complete]
        report.skipped = [c.case_id for c in dataset.cases if c.case_id in complete]
        bar = tqdm(total=len(todo), desc=f"preprocess {config}", unit="case", disable=not progress or not todo)
        results = []
        if client is None:
            cs = _config_store_or_none(str(store_path), plans, config) if todo else None
            for case_id in todo:
                results.append(preprocess_and_write(dataset, case_id, plans, config, str(store_path), config_store=cs))
                bar.update()
        else:
            from pipeline.parallel import SharedPath, check_dask_workers_see

            # a worker that cannot see the store would write cases nobody else reads: stop here, naming it
            check_dask_workers_see(client, [SharedPath("dataset", str(dataset.root)),
                                            SharedPath("store", str(store_path), "store")])
            workers = max(1, sum(client.nthreads().values()))
            results = _run_batches(client, dataset, case_batches(dataset, todo, workers), plans, config,
                                   str(store_path), bar)
        bar.close()
    order = {cid: i for i, cid in enumerate(todo)}
    for r in sorted(results, key=lambda r: order[r["case_id"]]):
        if r["ok"]:
            report.done.append(r["case_id"])
        else:
            report.failed.append(Problem(r["case_id"], r["message"]))
    report.seconds = time.perf_counter() - start
    return report


def _run_batches(client, dataset: Dataset, batches: list[list[str]], plans: Plans, config: str, store_path: str,
                 bar) -> list[dict]:
    """Each batch as one Dask task; a batch whose task fails (its worker died, e.g. over its memory
    limit) is retried one case per task, so a single bad case fails alone and names itself."""
    from distributed import as_completed

    from pipeline.parallel import results_of

    stamp = time.time_ns()
    pending = {client.submit(preprocess_batch, cases_of(dataset, batch), batch, plans, config, store_path,
                             key=f"preprocess-{config}-{batch[0]}-{len(batch)}-{stamp}", pure=False): batch
               for batch in batches}
    results: list[dict] = []
    done = as_completed(list(pending))
    for future, value in results_of(done):  # not with_results=True: see results_of
        batch = pending.pop(future)
        future.release()
        if not isinstance(value, BaseException):
            results.extend(value)
            bar.update(len(value))
            continue
        if len(batch) > 1:
            for case_id in batch:
                retry = client.submit(preprocess_batch, cases_of(dataset, [case_id]), [case_id], plans, config,
                                      store_path, key=f"preprocess-{config}-{case_id}-retry-{stamp}", pure=False)
                pending[retry] = [case_id]
                done.add(retry)
            continue
        results.append({"case_id": batch[0], "ok": False,
                        "message": f"the Dask worker failed on this case, e.g. over its memory limit "
                                   f"({type(value).__name__}: {value})"})
        bar.update()
    return results
