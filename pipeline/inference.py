"""Sliding-window inference: a trained U-Net over whole volumes, written back in the input's geometry.

The network only ever sees patches of the training size. Windows overlap by half a patch
(nnU-Net's `compute_steps_for_sliding_window` rule) and every window's softmax is weighted by a
Gaussian importance map, because a U-Net is least reliable at a patch border where it lacks
context. Mirroring test-time augmentation averages the softmax over every combination of flipped
axes. The weighted sums live in memory, or, for a volume whose accumulators would not fit in RAM,
in a temporary Zarr array chunked by patch, so one huge case never takes the machine down.

`predict_case` runs one case from raw files to a NIfTI label map (preprocess with the model's own
plan, slide, restore to the original geometry, map training indices back to the dataset's label
values, post-process); `predict_folder` runs a folder of cases, resumably, in this process or over
Ray workers (`predict_ray.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .errors import BadInputError, SegPipeError
from .workdir import Workdir

log = logging.getLogger("segpipe.predict")

POSTPROCESSING_FILE = "postprocessing.json"  # beside the model; applied when present
OUTPUT_ENDING = ".nii.gz"
CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net v2: CASE_0000 is channel 0 of CASE
# The accumulators ((K + 1) float32 values per voxel) go to disk past this share of available RAM.
ZARR_RAM_FRACTION = 0.25


# ---------------------------------------------------------------- sliding-window geometry


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[list[int]]:
    """Window start positions per axis: as few windows as cover the axis with at most `step` * patch
    between starts, spread evenly so the last window ends on the border (nnU-Net's rule)."""
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the patch {tuple(patch_size)}")
        n = int(math.ceil((size - patch) / (patch * step))) + 1
        stride = (size - patch) / (n - 1) if n > 1 else 0.0
        steps.append([int(round(stride * i)) for i in range(n)])
    return steps


@lru_cache(maxsize=8)
def _gaussian(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    delta = np.zeros(patch_size, dtype=np.float64)
    delta[tuple(p // 2 for p in patch_size)] = 1.0
    g = gaussian_filter(delta, [p * sigma_scale for p in patch_size], order=0, mode="constant", cval=0.0)
    g /= g.max()
    # Beyond the filter's truncation radius the map is 0; a voxel covered only there would divide by 0.
    g[g == 0] = g[g > 0].min()
    g = g.astype(np.float32)
    g.setflags(write=False)
    return g


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Per-voxel weight of a window's prediction: 1 at the patch centre, sigma = patch * sigma_scale,
    strictly positive everywhere (read-only, cached)."""
    return _gaussian(tuple(int(p) for p in patch_size), float(sigma_scale))


def mirror_axes_combinations(ndim: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of an (N, C, *spatial) batch, the empty one (no flip) first:
    8 for 3d patches, 4 for 2d."""
    axes = range(2, 2 + ndim)
    return [c for r in range(ndim + 1) for c in itertools.combinations(axes, r)]


def pad_to_patch(image: np.ndarray, patch_size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad the trailing axes of (C, *spatial) up to the patch where smaller, centred as nnU-Net
    does; returns the padded array and the spatial slices that crop it back."""
    spatial = image.shape[1:]
    lead = len(spatial) - len(patch_size)
    pads, crop = [(0, 0)], []
    for axis, size in enumerate(spatial):
        target = max(size, patch_size[axis - lead]) if axis >= lead else size
        before = (target - size) // 2
        pads.append((before, target - size - before))
        crop.append(slice(before, before + size))
    if all(p == (0, 0) for p in pads):
        return image, tuple(crop)
    return np.pad(image, pads, mode="constant", constant_values=0), tuple(crop)


def window_slices(spatial: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple]:
    """Index tuples (over the spatial axes) of every window. A 2d patch over a 3d volume slides over
    the last two axes of every slice along the first (the store's lowest-resolution axis)."""
    lead = len(spatial) - len(patch_size)
    if lead not in (0, 1):
        raise ValueError(f"patch {tuple(patch_size)} does not fit a volume of {len(spatial)} dimensions")
    steps = compute_steps(spatial[lead:], patch_size, step)
    planes = [(d,) for d in range(spatial[0])] if lead else [()]
    return [
        (*plane, *(slice(s, s + p) for s, p in zip(starts, patch_size)))
        for plane in planes
        for starts in itertools.product(*steps)
    ]


# ---------------------------------------------------------------- accumulators


def available_memory() -> int:
    """Bytes of RAM available now (psutil when present, else sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ray[default]
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def accumulator_bytes(num_classes: int, spatial: Sequence[int]) -> int:
    return (num_classes + 1) * int(np.prod(spatial, dtype=np.int64)) * 4


def softmax_(logits: np.ndarray) -> np.ndarray:
    """Softmax over the first (class) axis, in place."""
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


class _MemoryAccumulator:
    """Gaussian-weighted logits of the windows; `result` turns their weighted mean into probabilities."""


    def __init__(self, num_classes: int, spatial: Sequence[int]):
        self.sums = np.zeros((num_classes, *spatial), dtype=np.float32)
        self.weights = np.zeros(tuple(spatial), dtype=np.float32)

    def add(self, index: tuple, weighted: np.ndarray, weight: np.ndarray) -> None:
        self.sums[(slice(None), *index)] += weighted
        self.weights[index] += weight

    def result(self) -> np.ndarray:
        np.divide(self.sums, self.weights[None], out=self.sums)
        for row in range(self.sums.shape[1]):  # row by row: temporaries stay one row in size
            softmax_(self.sums[:, row])
        return self.sums


class _ZarrAccumulator:
    """Weighted sums over a slab of the first axis in memory; finished rows go to a Zarr array.

    Windows come ordered by their start on the first axis (`window_slices`), so once a window
    starts at row s no later one touches rows before s: those are normalised and written out
    (uncompressed, chunked by patch, one writer: this process) and the slab moves on. Memory is
    (K + 1) x patch[0] x the other axes (one slice for 2d patches), whatever the first axis' length.
    """

    def __init__(self, num_classes: int, spatial: Sequence[int], patch_size: Sequence[int], directory: str):
        import zarr
        from zarr.storage import LocalStore

        chunks = (1,) * (len(spatial) - len(patch_size)) + tuple(patch_size)
        self.shape = tuple(spatial)
        self.depth = chunks[0]
        self.probs = zarr.create_array(LocalStore(directory), shape=(num_classes, *spatial),
                                       chunks=(num_classes, *(min(c, s) for c, s in zip(chunks, spatial))),
                                       dtype="float32", fill_value=0.0, compressors=None)
        self.slab = np.zeros((num_classes, self.depth, *spatial[1:]), dtype=np.float32)
        self.slab_weights = np.zeros((self.depth, *spatial[1:]), dtype=np.float32)
        self.lo = 0  # first-axis row of slab row 0

    def _flush(self, upto: int) -> None:
        """Write rows [lo, upto) out, normalised, and shift the slab to start at `upto`."""
        n = min(upto, self.shape[0]) - self.lo
        if n <= 0:
            return
        self.probs[:, self.lo:self.lo + n] = softmax_(self.slab[:, :n] / self.slab_weights[None, :n])
        keep = self.depth - n
        if keep > 0:
            self.slab[:, :keep] = self.slab[:, n:]
            self.slab_weights[:keep] = self.slab_weights[n:]
        self.slab[:, max(keep, 0):] = 0
        self.slab_weights[max(keep, 0):] = 0
        self.lo += n

    def add(self, index: tuple, weighted: np.ndarray, weight: np.ndarray) -> None:
        first = index[0]
        start = first if isinstance(first, int) else first.start
        if start < self.lo:
            raise ValueError("windows must come ordered by their start on the first axis")
        self._flush(start)
        rows = slice(start - self.lo, start - self.lo + 1) if isinstance(first, int) else \
            slice(start - self.lo, first.stop - self.lo)
        local = (rows, *index[1:])
        if isinstance(first, int):  # a 2d window lacks the first axis
            weighted, weight = weighted[:, None], weight[None]
        self.slab[(slice(None), *local)] += weighted
        self.slab_weights[local] += weight

    def result(self):
        """Everything written and normalised; the returned Zarr array reads like a NumPy one."""
        self._flush(self.shape[0])
        return self.probs


# ---------------------------------------------------------------- the sliding window


def _forward(network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = network(batch)
    if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution head comes first
        out = out[0]
    return out


def _predict_batch(network, batch: torch.Tensor, mirror: list[tuple[int, ...]], amp: bool) -> torch.Tensor:
    """Logits of the network, averaged over the mirrored copies of the batch (float32).

    Logits, not probabilities, are averaged - over mirrors here, over overlapping windows by the
    accumulators, which apply the softmax once at the end - as nnU-Net v2 does, so that our
    predictions from nnU-Net's weights equal its own (benchmarks/predict.py compares them).
    """
    total = None
    for axes in mirror:
        x = torch.flip(batch, axes) if axes else batch
        with torch.autocast(batch.device.type, enabled=amp):
            logits = _forward(network, x).float()
        if axes:
            logits = torch.flip(logits, axes)
        total = logits if total is None else total.add_(logits)
    return total.div_(len(mirror))


def sliding_window_predict(
    network: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    tta_mirror: bool = True,
    batch_size: int = 2,
    device: str | torch.device | None = None,
    accumulate: str = "auto",
    zarr_threshold_bytes: int | None = None,
    zarr_dir: str | os.PathLike | None = None,
    progress: bool = False,
):
    """Class probabilities (K, *spatial) float32 for an image (C, *spatial) in the store frame.

    `patch_size` has as many entries as the image has spatial axes (3d), or one fewer (2d: slices
    along the first axis). `accumulate` is "memory", "zarr" or "auto" (Zarr when the accumulators
    would exceed `zarr_threshold_bytes`, by default a quarter of the RAM available now). The memory
    path returns a NumPy array; the Zarr path a normalised `zarr.Array` living in a temporary
    folder (under `zarr_dir` when given) that is deleted when the array is garbage collected.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if device is None:
        param = next(iter(network.parameters()), None)
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    data = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    data = data.astype(np.float32, copy=False)
    if data.ndim - 1 not in (len(patch_size), len(patch_size) + 1):
        raise ValueError(f"image of shape {data.shape} does not match patch {patch_size}")
    original_spatial = data.shape[1:]
    data, crop = pad_to_patch(data, patch_size)
    spatial = data.shape[1:]
    windows = window_slices(spatial, patch_size, step)

    if accumulate == "auto":
        threshold = zarr_threshold_bytes if zarr_threshold_bytes is not None else int(available_memory() * ZARR_RAM_FRACTION)
        accumulate = "zarr" if accumulator_bytes(num_classes, spatial) > threshold else "memory"
    tmp = None
    if accumulate == "memory":
        acc = _MemoryAccumulator(num_classes, spatial)
    elif accumulate == "zarr":
        tmp = tempfile.mkdtemp(prefix="segpipe_sw_", dir=zarr_dir)
        acc = _ZarrAccumulator(num_classes, spatial, patch_size, tmp)
    else:
        raise ValueError(f"accumulate must be 'memory', 'zarr' or 'auto', got {accumulate!r}")

    gaussian = gaussian_importance_map(patch_size)
    gaussian_dev = torch.tensor(gaussian, device=device)
    mirror = mirror_axes_combinations(len(patch_size)) if tta_mirror else [()]
    amp = device.type == "cuda"
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode(), _progress(len(windows), progress) as bar:
            for start in range(0, len(windows), batch_size):
                chunk = windows[start:start + batch_size]
                batch = np.stack([data[(slice(None), *w)] for w in chunk])
                logits = _predict_batch(network, torch.from_numpy(batch).to(device), mirror, amp)
                if logits.shape[1] != num_classes:
                    raise ValueError(f"network predicts {logits.shape[1]} classes, expected {num_classes}")
                weighted = (logits * gaussian_dev).cpu().numpy()
                for w, pred in zip(chunk, weighted):
                    acc.add(w, pred, gaussian)
                bar.update(len(chunk))
        result = acc.result()
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        network.train(was_training)

    padded = data.shape[1:] != original_spatial
    if tmp is None:
        return np.ascontiguousarray(result[(slice(None), *crop)]) if padded else result
    if not padded:
        weakref.finalize(result, shutil.rmtree, tmp, True)
        return result
    return _crop_zarr(result, crop, tmp, zarr_dir)


def _crop_zarr(padded, crop: tuple[slice, ...], tmp: str, zarr_dir):
    """Only a volume smaller than the patch is padded; copy its (small) crop into a fresh array."""
    import zarr
    from zarr.storage import LocalStore

    out_dir = tempfile.mkdtemp(prefix="segpipe_sw_", dir=zarr_dir)
    data = padded[(slice(None), *crop)]
    out = zarr.create_array(LocalStore(out_dir), shape=data.shape, chunks=padded.chunks[:1] + tuple(
        min(c, s) for c, s in zip(padded.chunks[1:], data.shape[1:])), dtype="float32", compressors=None)
    out[...] = data
    shutil.rmtree(tmp, ignore_errors=True)
    weakref.finalize(out, shutil.rmtree, out_dir, True)
    return out


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, enabled: bool, desc: str = "windows", unit: str = "win"):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=unit != "win")


# ---------------------------------------------------------------- a trained model


@dataclass(frozen=True)
class ModelSpec:
    """Where a predictor loads from and how it predicts: small and picklable, so Ray workers can
    each load the model once from it."""

    run_dirs: tuple[str, ...]  # one per fold; several folds form an ensemble (logits averaged, as nnU-Net)
    checkpoint: str = "final"  # model_<checkpoint>.pt
    tta: bool = True
    step: float = 0.5
    batch_size: int = 2
    device: str | None = None  # None: CUDA when available, else CPU
    accumulate: str = "auto"
    postprocess: bool = True  # apply the postprocessing.json beside the model, when there is one


def parse_folds(fold: str | int | Sequence) -> list[str]:
    """'0', 0, '0,1,2' or ['0', '1'] -> ['0', ...] (duplicates dropped, order kept)."""
    items = fold.split(",") if isinstance(fold, str) else [fold] if isinstance(fold, int) else list(fold)
    folds = [str(f).strip() for f in items if str(f).strip()]
    if not folds:
        raise BadInputError(f"no fold given ({fold!r})")
    return list(dict.fromkeys(folds))


def find_model(workdir, config: str, fold: str | int | Sequence = "0", checkpoint: str = "final") -> list[Path]:
    """The run folders of the requested folds, or a SegPipeError saying which command makes them."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
    run_dirs = []
    for f in parse_folds(fold):
        run_dir = wd.run_dir(config, f)
        model = run_dir / f"model_{checkpoint}.pt"
        train = f"segpipe train --workdir {wd.root}" + (f" --config {config}" if config != "3d_fullres" else "") + f" --fold {f}"
        if not model.is_file():
            if checkpoint == "final" and (run_dir / "model_best.pt").is_file():
                raise SegPipeError(f"fold {f} of {config} has not finished training ({model} is missing, only "
                                   f"model_best.pt): finish it with `{train} --resume`")
            raise SegPipeError(f"no trained model for configuration {config} fold {f} ({model} is missing): "
                               f"train it first with `{train}`")
        if not (run_dir / "plans.json").is_file():
            raise SegPipeError(f"{run_dir / 'plans.json'} is missing beside the model: re-run `{train}`")
        run_dirs.append(run_dir)
    return run_dirs


class _Ensemble(torch.nn.Module):
    """Several folds' networks as one: the mean of their logits, as nnU-Net v2 ensembles folds
    (one pass over the windows for all folds)."""

    def __init__(self, networks: Sequence[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(_forward(net, x).float() for net in self.members) / len(self.members)


class Predictor:
    """A trained model loaded once: plans, label map, network(s), post-processing rule."""

    def __init__(self, network: torch.nn.Module, plans, config_name: str, label_map, rule=None,
                 spec: ModelSpec | None = None):
        self.spec = spec or ModelSpec(run_dirs=())
        self.device = torch.device(self.spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network.to(self.device).eval()
        self.plans = plans
        self.config_name = config_name
        self.config = plans.configuration(config_name)
        self.label_map = label_map
        self.rule = rule

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Predictor:
        from .dataset import LabelMap
        from .training import load_trained_network

        if not spec.run_dirs:
            raise SegPipeError("a model needs at least one run folder")
        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        networks, first = [], None
        for run_dir in spec.run_dirs:
            net, plans, payload = load_trained_network(run_dir, spec.checkpoint, device)
            facts = (payload["configuration"], payload["num_input_channels"], tuple(payload["label_values"]),
                     plans.hash(payload["configuration"]))
            if first is None:
                first, first_plans = facts, plans
            elif facts != first:
                raise SegPipeError(f"{run_dir} was trained with other plans, channels or labels than "
                                   f"{spec.run_dirs[0]}: these folds cannot form an ensemble")
            networks.append(net)
        config_name, channels, label_values, _ = first
        if channels != len(first_plans.channels):
            raise SegPipeError(f"{spec.run_dirs[0]}: the model takes {channels} channel(s) but its plans declare "
                               f"{len(first_plans.channels)}")
        network = networks[0] if len(networks) == 1 else _Ensemble(networks)
        rule = _load_rule(spec.run_dirs) if spec.postprocess else None
        return cls(network, first_plans, config_name, LabelMap(label_values), rule,
                   dataclasses.replace(spec, device=str(device)))

    @classmethod
    def load(cls, workdir, config: str = "3d_fullres", fold: str | int | Sequence = "0", **options) -> Predictor:
        """`options` are ModelSpec fields (checkpoint, tta, step, batch_size, device, accumulate)."""
        checkpoint = options.get("checkpoint", "final")
        run_dirs = find_model(workdir, config, fold, checkpoint)
        return cls.from_spec(ModelSpec(run_dirs=tuple(str(r) for r in run_dirs), **options))

    @property
    def num_channels(self) -> int:
        return len(self.plans.channels)

    def store_probabilities(self, image: np.ndarray, progress: bool = False):
        """Sliding-window probabilities of a preprocessed image (store frame, padded)."""
        s = self.spec
        return sliding_window_predict(self.network, image, self.config.patch_size, self.label_map.num_classes,
                                      step=s.step, tta_mirror=s.tta, batch_size=s.batch_size, device=self.device,
                                      accumulate=s.accumulate, progress=progress)


def _load_rule(run_dirs: Sequence[str]):
    """The post-processing rule beside the model; an ensemble uses one only when every fold agrees."""
    from .postprocessing import PostprocessingRule

    rules = []
    for run_dir in run_dirs:
        path = Path(run_dir) / POSTPROCESSING_FILE
        if not path.is_file():
            return None
        rules.append(PostprocessingRule.load(path))
    steps = {(r.labels, r.keep_largest_foreground, r.keep_largest_per_class) for r in rules}
    if len(steps) != 1:
        log.info("the folds' post-processing rules differ: the ensemble is not post-processed")
        return None
    return rules[0]


# ---------------------------------------------------------------- one case


def input_dataset(plans, root: Path, cases: Sequence = ()):
    """A `Dataset` describing prediction inputs, so `read_case` checks and reads them like training data."""
    from .dataset import Dataset

    return Dataset(root=Path(root), name=plans.dataset_name, layout="predict", channels=tuple(plans.channels),
                   labels={int(k): v for k, v in plans.labels.items()}, cases=tuple(cases))


def predict_case(model, case, output_path: str | os.PathLike | None = None, save_probabilities: bool = False,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One case from raw input to a label map in its own geometry.

    `model` is a run folder (W/runs/<config>/fold_<k>), a ModelSpec or a loaded Predictor; `case`
    a `CaseFiles` (files in the layout of the training data) or a loaded `CaseData`. Returns
    (label, probabilities): the label holds the dataset's own values in the voxel order of the input
    file - the array the written NIfTI holds; probabilities (K, *RAS shape) float32 on the original
    grid, or None unless asked for. With `output_path` (CASE.nii.gz) the label is written there with
    the input's affine and header (atomically), and with `save_probabilities` also CASE.npz.
    """
    from .dataset import CaseData, read_case
    from .export import restore_label, restore_probabilities, write_prediction
    from .nifti import from_ras
    from .postprocessing import apply_postprocessing
    from .preprocessing import preprocess_case

    predictor = _as_predictor(model)
    reference = None
    if not isinstance(case, CaseData):
        reference = case.images[0]
        case = read_case(input_dataset(predictor.plans, Path(reference).parent, [case]), case, with_label=False)
    if case.image.shape[0] != predictor.num_channels:
        raise BadInputError(f"image has {case.image.shape[0]} channel(s); the model expects {predictor.num_channels}",
                            case.case_id)
    case = dataclasses.replace(case, label=None)
    pre = preprocess_case(case, predictor.plans, predictor.config_name, predictor.label_map)
    meta, image = pre.meta, pre.image
    del pre
    store_probs = predictor.store_probabilities(image, progress=progress)
    del image
    label_map = predictor.label_map
    probabilities = None
    if save_probabilities or isinstance(store_probs, np.ndarray):
        probabilities = restore_probabilities(np.asarray(store_probs[...]), meta)
        del store_probs
        label = label_map.to_values(probabilities.argmax(0))
    else:  # too large for memory: argmax chunk by chunk in the store frame, restore the label only
        label = restore_label(_argmax_chunked(store_probs, label_map.index_dtype), meta, label_map)
        del store_probs
    if predictor.rule is not None:
        label = apply_postprocessing(label, predictor.rule)
    if output_path is not None:
        output_path = Path(output_path)
        if save_probabilities:
            save_probabilities_npz(probabilities, label_map.values, _npz_path(output_path))
        write_prediction(label, case.geometry, output_path, reference)
    return from_ras(label, case.geometry), probabilities if save_probabilities else None


def _as_predictor(model) -> Predictor:
    if isinstance(model, Predictor):
        return model
    if isinstance(model, ModelSpec):
        return Predictor.from_spec(model)
    return Predictor.from_spec(ModelSpec(run_dirs=(str(model),)))


def _argmax_chunked(probs, dtype) -> np.ndarray:
    """Argmax over the class axis of a (Zarr) array, one chunk of the spatial axes at a time."""
    spatial = probs.shape[1:]
    chunks = getattr(probs, "chunks", probs.shape)[1:]
    out = np.empty(spatial, dtype=dtype)
    for block in itertools.product(*(range(0, s, c) for s, c in zip(spatial, chunks))):
        index = tuple(slice(b, b + c) for b, c in zip(block, chunks))
        out[index] = np.asarray(probs[(slice(None), *index)]).argmax(0)
    return out


def _npz_path(output_path: Path) -> Path:
    from .dataset import strip_ending

    return output_path.with_name(strip_ending(output_path.name) + ".npz")


def save_probabilities_npz(probabilities: np.ndarray, label_values: Sequence[int], path: Path) -> None:
    """CASE.npz: `probabilities` (K, *RAS shape) float16 on the original grid, `labels` the value of
    each channel. Written under a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, probabilities=probabilities.astype(np.float16),
                            labels=np.asarray(label_values, dtype=np.int32))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- a folder of cases


def _nifti_files(folder: Path) -> list[Path]:
    from .dataset import NIFTI_ENDINGS

    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.name.endswith(NIFTI_ENDINGS) and p.is_file())


def group_input_files(input_dir: str | os.PathLike, num_channels: int, channel_names: Sequence[str] = ()):
    """Group INPUT_DIR's NIfTI files into cases and check each has the model's channel count.

    `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... are one case's channels (nnU-Net v2); any other
    `CASE.nii.gz` is a case on its own (MSD: one channel, or a 4D file with channels last). Every
    problem is collected and raised together as a BadInputError naming the cases.
    """
    from .dataset import CaseFiles, strip_ending
    from .errors import Problem
    from .nifti import load_header

    folder = Path(input_dir)
    if not folder.is_dir():
        raise BadInputError(f"input folder {folder} does not exist")
    files = _nifti_files(folder)
    if not files:
        raise BadInputError(f"input folder {folder} holds no NIfTI images (.nii.gz / .nii)")
    groups: dict[str, dict[int, Path]] = {}
    singles: dict[str, Path] = {}
    for path in files:
        stem = strip_ending(path.name)
        m = CHANNEL_FILE.match(stem)
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = path
        else:
            singles[stem] = path
    for base in [b for b, chans in groups.items() if 0 not in chans]:  # e.g. "scan_2019.nii.gz": not a channel
        for c, path in groups.pop(base).items():
            singles[strip_ending(path.name)] = path

    expected = f"{num_channels} channel(s)" + (f" ({', '.join(channel_names)})" if channel_names else "")
    problems, cases = [], []
    for case_id in sorted(set(groups) | set(singles)):
        if case_id in groups and case_id in singles:
            problems.append(Problem(case_id, f"both {singles[case_id].name} and per-channel files {case_id}_XXXX exist"))
            continue
        if case_id in groups:
            chans = groups[case_id]
            if sorted(chans) != list(range(num_channels)):
                found = ", ".join(p.name for _, p in sorted(chans.items()))
                problems.append(Problem(case_id, f"has channel files {found}; the model expects {expected}: "
                                                 f"{', '.join(f'{case_id}_{c:04d}' for c in range(num_channels))}"))
                continue
            cases.append(CaseFiles(case_id, tuple(chans[c] for c in range(num_channels)), None))
            continue
        path = singles[case_id]
        try:
            shape = load_header(path, case_id).shape
        except BadInputError as exc:
            problems.extend(exc.problems)
            continue
        found = 1 if len(shape) == 3 else shape[3] if len(shape) == 4 else None
        if len(shape) < 3 or found is None:
            problems.append(Problem(case_id, f"{path.name} has shape {tuple(shape)}; expected a 3D volume or 4D with channels last"))
        elif found != num_channels:
            problems.append(Problem(case_id, f"{path.name} has {found} channel(s) (shape {tuple(shape)}); the model expects {expected}"))
        else:
            cases.append(CaseFiles(case_id, (path,), None, four_d=num_channels > 1))
    if problems:
        raise BadInputError(problems)
    return cases


@dataclass
class CaseResult:
    case_id: str
    ok: bool
    seconds: float = 0.0
    message: str = ""


@dataclass
class PredictReport:
    """What `predict_folder` did."""

    output_dir: str
    config: str
    folds: list[str]
    tta: bool
    workers: int
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already written before this run (resume)
    failed: list[dict] = field(default_factory=list)  # {"case", "message"}
    seconds_per_case: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        per = [self.seconds_per_case[c] for c in self.predicted]
        mean = f", {np.mean(per):.1f}s per case" if per else ""
        lines = [f"predicted {len(self.predicted)} case(s) with {self.config} fold {','.join(self.folds)}"
                 f"{' (mirroring TTA)' if self.tta else ''} -> {self.output_dir} in {self.seconds:.1f}s{mean}; "
                 f"{len(self.skipped)} already there, {len(self.failed)} failed"]
        lines.extend(f"  failed {f['case']}: {f['message']}" for f in self.failed)
        return "\n".join(lines)


def predict_one(predictor: Predictor, case, output_dir: str | os.PathLike, save_probabilities: bool,
                progress: bool = False) -> CaseResult:
    """Predict and write one case; bad input comes back as a failed result naming the case."""
    start = time.perf_counter()
    try:
        predict_case(predictor, case, Path(output_dir) / f"{case.case_id}{OUTPUT_ENDING}", save_probabilities, progress)
    except BadInputError as exc:
        return CaseResult(case.case_id, False, time.perf_counter() - start, "; ".join(p.message for p in exc.problems))
    except MemoryError:
        return CaseResult(case.case_id, False, time.perf_counter() - start, "out of memory predicting this case")
    return CaseResult(case.case_id, True, time.perf_counter() - start)


def _is_done(output_dir: Path, case_id: str, save_probabilities: bool) -> bool:
    out = output_dir / f"{case_id}{OUTPUT_ENDING}"  # written last, so it marks the case complete
    return out.is_file() and (not save_probabilities or _npz_path(out).is_file())


def predict_folder(workdir, input_dir, output_dir, config: str = "3d_fullres", fold: str | int | Sequence = "0",
                   tta: bool = True, save_probabilities: bool = False, num_workers: int | None = None,
                   ray_address: str | None = None, progress: bool = True, checkpoint: str = "final",
                   step: float = 0.5, batch_size: int = 2, device: str | None = None,
                   postprocess: bool = True) -> PredictReport:
    """Predict every case of INPUT_DIR into OUTPUT_DIR/CASE.nii.gz, skipping cases already written.

    Several folds ('0,1,2') average their probabilities. The post-processing rule beside the model
    (decided by `segpipe evaluate-cv`) is applied unless `postprocess` is False. With `num_workers` > 1 or a `ray_address`
    the cases are spread over Ray workers, each loading the model once (`pipeline.predict_ray`);
    otherwise they run one after another in this process. Cases with bad input are reported and the
    others still written; the run then ends with a BadInputError listing them (exit 2).
    """
    from .plans import Plans

    start = time.perf_counter()
    wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    folds = parse_folds(fold)
    run_dirs = find_model(wd, config, folds, checkpoint)
    if output_dir.exists() and input_dir.exists() and output_dir.resolve() == input_dir.resolve():
        raise BadInputError("the output folder must differ from the input folder (predictions would mix with images)")
    plans = Plans.load(run_dirs[0] / "plans.json")
    cases = group_input_files(input_dir, len(plans.channels), plans.channels)
    spec = ModelSpec(run_dirs=tuple(str(r) for r in run_dirs), checkpoint=checkpoint, tta=tta, step=step,
                     batch_size=batch_size, device=device, postprocess=postprocess)
    use_ray = bool(ray_address) or (num_workers or 1) > 1
    report = PredictReport(str(output_dir), config, folds, tta, workers=1)
    report.skipped = [c.case_id for c in cases if _is_done(output_dir, c.case_id, save_probabilities)]
    todo = [c for c in cases if c.case_id not in set(report.skipped)]
    output_dir.mkdir(parents=True, exist_ok=True)
    if todo and use_ray:
        from .predict_ray import predict_cases_ray

        results, report.workers = predict_cases_ray(spec, todo, output_dir, save_probabilities, num_workers,
                                                    ray_address, progress)
    elif todo:
        predictor = Predictor.from_spec(spec)
        results = []
        with _progress(len(todo), progress and len(todo) > 1, desc="predict", unit="case") as bar:
            for case in todo:
                results.append(predict_one(predictor, case, output_dir, save_probabilities,
                                           progress=progress and len(todo) == 1))
                bar.update()
    else:
        results = []
    order = {c.case_id: i for i, c in enumerate(todo)}
    for r in sorted(results, key=lambda r: order[r.case_id]):
        if r.ok:
            report.predicted.append(r.case_id)
            report.seconds_per_case[r.case_id] = round(r.seconds, 3)
        else:
            report.failed.append({"case": r.case_id, "message": r.message})
    report.seconds = time.perf_counter() - start
    log.debug("%s", report)
    if report.failed:
        from .errors import Problem

        raise BadInputError([Problem(f["case"], f["message"]) for f in report.failed])
    return report
