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

import itertools
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

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


class _MemoryAccumulator:
    def __init__(self, num_classes: int, spatial: Sequence[int]):
        self.probs = np.zeros((num_classes, *spatial), dtype=np.float32)
        self.weights = np.zeros(tuple(spatial), dtype=np.float32)

    def add(self, index: tuple, weighted: np.ndarray, weight: np.ndarray) -> None:
        self.probs[(slice(None), *index)] += weighted
        self.weights[index] += weight

    def result(self) -> np.ndarray:
        np.divide(self.probs, self.weights[None], out=self.probs)
        return self.probs


class _ZarrAccumulator:
    """Weighted sums in uncompressed Zarr arrays on local disk (one writer: this process)."""

    def __init__(self, num_classes: int, spatial: Sequence[int], patch_size: Sequence[int], directory: str):
        import zarr
        from zarr.storage import LocalStore

        chunks = (1,) * (len(spatial) - len(patch_size)) + tuple(patch_size)
        self.directory = directory
        root = zarr.open_group(LocalStore(directory), mode="w")
        self.probs = root.create_array("probabilities", shape=(num_classes, *spatial), chunks=(num_classes, *chunks),
                                       dtype="float32", fill_value=0.0, compressors=None)
        self.weights = root.create_array("weights", shape=tuple(spatial), chunks=chunks, dtype="float32",
                                         fill_value=0.0, compressors=None)
        self.chunks = chunks

    def add(self, index: tuple, weighted: np.ndarray, weight: np.ndarray) -> None:
        full = (slice(None), *index)
        self.probs[full] = self.probs[full] + weighted
        self.weights[index] = self.weights[index] + weight

    def result(self):
        """Normalise in place, one chunk at a time; the returned Zarr array reads like a NumPy one."""
        for block in itertools.product(*(range(0, s, c) for s, c in zip(self.weights.shape, self.chunks))):
            index = tuple(slice(b, b + c) for b, c in zip(block, self.chunks))
            self.probs[(slice(None), *index)] = self.probs[(slice(None), *index)] / self.weights[index][None]
        return self.probs


# ---------------------------------------------------------------- the sliding window


def _forward(network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = network(batch)
    if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution head comes first
        out = out[0]
    return out


def _predict_batch(network, batch: torch.Tensor, mirror: list[tuple[int, ...]], amp: bool) -> torch.Tensor:
    """Softmax of the network, averaged over the mirrored copies of the batch (float32)."""
    total = None
    for axes in mirror:
        x = torch.flip(batch, axes) if axes else batch
        with torch.autocast(batch.device.type, enabled=amp):
            logits = _forward(network, x)
        probs = torch.softmax(logits.float(), dim=1)
        if axes:
            probs = torch.flip(probs, axes)
        total = probs if total is None else total.add_(probs)
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
    device = torch.device(device) if device is not None else next(network.parameters()).device
    data = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    data = data.astype(np.float32, copy=False)
    if data.ndim - 1 not in (len(patch_size), len(patch_size) + 1):
        raise ValueError(f"image of shape {data.shape} does not match patch {patch_size}")
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
    gaussian_dev = torch.from_numpy(np.ascontiguousarray(gaussian)).to(device)
    mirror = mirror_axes_combinations(len(patch_size)) if tta_mirror else [()]
    amp = device.type == "cuda"
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode(), _progress(len(windows), progress) as bar:
            for start in range(0, len(windows), batch_size):
                chunk = windows[start:start + batch_size]
                batch = np.stack([data[(slice(None), *w)] for w in chunk])
                probs = _predict_batch(network, torch.from_numpy(batch).to(device), mirror, amp)
                if probs.shape[1] != num_classes:
                    raise ValueError(f"network predicts {probs.shape[1]} classes, expected {num_classes}")
                weighted = (probs * gaussian_dev).cpu().numpy()
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

    full = (slice(None), *crop)
    if tmp is None:
        return result[full] if any(c.start or c.stop != s for c, s in zip(crop, spatial)) else result
    if all(c.start == 0 and c.stop == s for c, s in zip(crop, spatial)):
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


def _progress(total: int, enabled: bool, desc: str = "windows"):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="win", leave=False)
