"""Sliding-window inference: a network over a whole (preprocessed) volume, one patch-sized window at a time.

The network only ever sees patches of the training size. Windows overlap by half a patch
(nnU-Net's `compute_steps_for_sliding_window` rule) and every window's softmax is weighted by a
Gaussian importance map, because a U-Net is least reliable at a patch border where it lacks
context. Mirroring test-time augmentation averages the softmax over every combination of flipped
axes. The weighted sums live in memory, or, for a volume whose accumulators would not fit in RAM,
in a temporary Zarr array chunked by patch, so one huge case never takes the machine down, or, on
a GPU, on the device. Windows (and their mirrored copies) of consecutive images share forward
batches (`sliding_window_stream`), so a folder of small cases keeps the network's batches full.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from pipeline.console import progress_bar
from pipeline.precision import uses_mixed_precision

log = logging.getLogger("segpipe.predict")

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


def sigmoid_(logits: np.ndarray) -> np.ndarray:
    """Sigmoid of every value, in place (region-based models: independent outputs). SciPy's expit
    saturates to 0 and 1 where exp(-x) would overflow (and warn) for large negative logits."""
    from scipy.special import expit

    return expit(logits, out=logits)


NONLINEARITIES = {"softmax": softmax_, "sigmoid": sigmoid_}


class _MemoryAccumulator:
    """Gaussian-weighted logits of the windows; `result` turns their weighted mean into probabilities."""

    def __init__(self, num_classes: int, spatial: Sequence[int], nonlinearity: str = "softmax"):
        self.activate = NONLINEARITIES[nonlinearity]
        self.sums = np.zeros((num_classes, *spatial), dtype=np.float32)
        self.weights = np.zeros(tuple(spatial), dtype=np.float32)

    def add(self, index: tuple, weighted: np.ndarray, weight: np.ndarray) -> None:
        self.sums[(slice(None), *index)] += weighted
        self.weights[index] += weight

    def result(self) -> np.ndarray:
        np.divide(self.sums, self.weights[None], out=self.sums)
        for row in range(self.sums.shape[1]):  # row by row: temporaries stay one row in size
            self.activate(self.sums[:, row])
        return self.sums


class _ZarrAccumulator:
    """Weighted sums over a slab of the first axis in memory; finished rows go to a Zarr array.

    Windows come ordered by their start on the first axis (`window_slices`), so once a window
    starts at row s no later one touches rows before s: those are normalised and written out
    (uncompressed, chunked by patch, one writer: this process) and the slab moves on. Memory is
    (K + 1) x patch[0] x the other axes (one slice for 2d patches), whatever the first axis' length.
    """

    def __init__(self, num_classes: int, spatial: Sequence[int], patch_size: Sequence[int], directory: str,
                 nonlinearity: str = "softmax"):
        self.activate = NONLINEARITIES[nonlinearity]
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
        self.probs[:, self.lo:self.lo + n] = self.activate(self.slab[:, :n] / self.slab_weights[None, :n])
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


def network_logits(network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = network(batch)
    if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution head comes first
        out = out[0]
    return out


# Voxels of network input per forward pass. On a CPU a larger batch costs the same CPU seconds per
# window (measured: benchmarks/results/profile_predict.md, 8 mirrorings per pass vs 1) but holds
# its activations at once (3d_fullres hippocampus: ~900 MiB at 8 vs ~350 at 2), so a CPU batches
# little; a GPU needs bigger batches to fill. At most 8 (a window's 3d mirrorings); the last batch
# of a stream is filled up with zeros.
BATCH_VOXELS = {"cpu": 2**18, "cuda": 2**21}
MAX_BATCH = 8


def auto_batch_size(patch_size: Sequence[int], device: str | torch.device, mirrored: bool = False) -> int:
    """Network inputs (windows x mirrored copies) per forward pass for this patch on this device.

    With mirroring on a CPU, a patch past the budget still goes two per pass (a window and its
    mirrored copy, so no pass is padded with zeros): oneDNN's kernels run a batch of two about 1.25x
    faster per window than a batch of one (the CT plan's 32x112x128 patch: 1.36 vs 1.70 s per window
    on 2 cores), for about a quarter more activation memory."""
    kind = torch.device(device).type
    budget = BATCH_VOXELS.get(kind, BATCH_VOXELS["cpu"])
    size = max(1, min(MAX_BATCH, budget // int(np.prod(patch_size))))
    return 2 if size == 1 and mirrored and kind == "cpu" else size


# Forward passes in flight at once on a CPU, each on its own thread with cores // lanes torch threads.
# oneDNN's 3D convolutions on small windows leave part of a second core idle, while two passes side by
# side, each single-threaded, keep both busy (`segpipe predict`, one lane vs two, interleaved on 2
# cores: 1.14x on 60 hippocampus cases without mirroring, 1.02x with). The price is a second batch of
# activations, so lanes are only used while all the windows in flight stay within CPU_LANE_VOXELS
# (twice a CPU pass's budget: with the in-place inference norm, about 1.2x the memory one pass took
# before): small patches get two lanes, a large CT patch (one window per pass already) keeps one.
CPU_LANES = 2
CPU_LANE_VOXELS = 2 * BATCH_VOXELS["cpu"]


def auto_lanes(device: str | torch.device, patch_size: Sequence[int] = (), per_forward: int = 1) -> int:
    """Concurrent forward passes: on a CPU with at least CPU_LANES torch threads, CPU_LANES when their
    windows fit CPU_LANE_VOXELS; else 1 (a GPU runs one stream of batches; one core gains nothing)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() < CPU_LANES:
        return 1
    in_flight = CPU_LANES * per_forward * int(np.prod(patch_size, dtype=np.int64))
    return CPU_LANES if in_flight <= CPU_LANE_VOXELS else 1


class _DeviceAccumulator:
    """The weighted sums as tensors on the network's device (nnU-Net's and MONAI's GPU path): windows
    never travel back to the host; only the finished probabilities do, once."""

    takes_tensors = True

    def __init__(self, num_classes: int, spatial: Sequence[int], device: torch.device, nonlinearity: str = "softmax"):
        self.sigmoid = nonlinearity == "sigmoid"
        self.sums = torch.zeros((num_classes, *spatial), dtype=torch.float32, device=device)
        self.weights = torch.zeros(tuple(spatial), dtype=torch.float32, device=device)

    def add(self, index: tuple, weighted: torch.Tensor, weight: torch.Tensor) -> None:
        self.sums[(slice(None), *index)] += weighted
        self.weights[index] += weight

    def result(self) -> np.ndarray:
        self.sums /= self.weights[None]
        del self.weights
        out = np.empty(tuple(self.sums.shape), dtype=np.float32)
        for row in range(self.sums.shape[1]):  # row by row: temporaries on the device stay one row in size
            row_probs = torch.sigmoid(self.sums[:, row]) if self.sigmoid else torch.softmax(self.sums[:, row], dim=0)
            out[:, row] = row_probs.cpu().numpy()
        del self.sums
        return out


def device_accumulator_fits(num_classes: int, spatial: Sequence[int], device: torch.device) -> bool:
    """Whether the accumulators fit in half the device memory free now (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return accumulator_bytes(num_classes, spatial) < free // 2


@dataclasses.dataclass
class _OpenImage:
    """One image of a stream while its windows go through the network."""

    key: object
    data: np.ndarray  # (C, *spatial) float32, padded to at least the patch
    crop: tuple[slice, ...]
    padded: bool
    windows: list[tuple]
    acc: object
    tmp: str | None
    todo: int  # windows not yet accumulated
    bar: object


def sliding_window_stream(
    network: torch.nn.Module,
    images: Iterable[tuple[object, torch.Tensor | np.ndarray]],
    patch_size: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    tta_mirror: bool = True,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    accumulate: str = "auto",
    zarr_threshold_bytes: int | None = None,
    zarr_dir: str | os.PathLike | None = None,
    progress: bool = False,
    amp: bool | None = None,
    nonlinearity: str = "softmax",
    lanes: int | None = None,
) -> Iterator[tuple[object, np.ndarray]]:
    """(key, probabilities) for each (key, image) of `images`, in order: `sliding_window_predict`
    over a stream of images, whose windows and mirrored copies are packed into shared forward
    batches of `batch_size` network inputs (None: `auto_batch_size`), across image boundaries, so
    small cases (one window each) still fill a batch. An image is pulled from `images` only when
    the batch needs its windows, and its probabilities are yielded as soon as its last window is
    in: a producer (reading and preprocessing) and a consumer (export) can run beside it.

    Each window's logits are averaged over its mirrorings, weighted by the Gaussian and added
    to its image's accumulator, exactly as `sliding_window_predict` does for one image.
    `accumulate`: "memory" (NumPy), "device" (tensors on the network's device), "zarr" (disk), or
    "auto" (zarr past `zarr_threshold_bytes`, by default a quarter of the RAM available now; else
    device on CUDA when it fits, else memory). `amp`: autocast the forward passes (None: what
    "auto" means on this device, `uses_mixed_precision`).
    `nonlinearity` turns the averaged logits into probabilities: "softmax" (classes) or "sigmoid"
    (regions, `LabelMap.nonlinearity`). `lanes`: forward passes run at once, each on its own thread
    with torch threads // lanes intra-op threads (None: `auto_lanes`); their logits are accumulated
    in submission order, so the result does not depend on which pass finishes first.
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}")
    patch_size = tuple(int(p) for p in patch_size)
    if device is None:
        param = next(iter(network.parameters()), None)
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    if accumulate not in ("auto", "memory", "device", "zarr"):
        raise ValueError(f"accumulate must be 'memory', 'device', 'zarr' or 'auto', got {accumulate!r}")
    mirror = mirror_axes_combinations(len(patch_size)) if tta_mirror else [()]
    per_forward = batch_size or auto_batch_size(patch_size, device, mirrored=tta_mirror)
    lanes = max(1, int(lanes or auto_lanes(device, patch_size, per_forward)))
    amp = uses_mixed_precision(amp, device)
    gaussian = gaussian_importance_map(patch_size)
    gaussian_dev = torch.tensor(gaussian, device=device)
    opened: list[_OpenImage] = []  # images with windows in flight, in stream order

    def open_image(key, image) -> _OpenImage:
        data = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        data = data.astype(np.float32, copy=False)
        if data.ndim - 1 not in (len(patch_size), len(patch_size) + 1):
            raise ValueError(f"image of shape {data.shape} does not match patch {patch_size}")
        original = data.shape[1:]
        data, crop = pad_to_patch(data, patch_size)
        spatial = data.shape[1:]
        windows = window_slices(spatial, patch_size, step)
        mode = accumulate
        if mode == "auto":
            threshold = zarr_threshold_bytes if zarr_threshold_bytes is not None else \
                int(available_memory() * ZARR_RAM_FRACTION)
            mode = "zarr" if accumulator_bytes(num_classes, spatial) > threshold else \
                "device" if device_accumulator_fits(num_classes, spatial, device) else "memory"
        tmp = None
        if mode == "memory":
            acc = _MemoryAccumulator(num_classes, spatial, nonlinearity)
        elif mode == "device":
            acc = _DeviceAccumulator(num_classes, spatial, device, nonlinearity)
        else:
            tmp = tempfile.mkdtemp(prefix="segpipe_sw_", dir=zarr_dir)
            acc = _ZarrAccumulator(num_classes, spatial, patch_size, tmp, nonlinearity)
        bar = progress_bar(len(windows), progress, desc="windows", unit="win", leave=False)
        return _OpenImage(key, data, crop, data.shape[1:] != original, windows, acc, tmp, len(windows), bar)

    def jobs() -> Iterator[tuple[_OpenImage, int, tuple[int, ...]]]:
        for key, image in images:
            item = open_image(key, image)
            opened.append(item)
            for w in range(len(item.windows)):
                for axes in mirror:
                    yield item, w, axes

    pending: dict[tuple[int, int], list] = {}  # (id(image), window) -> [logit sum, mirrorings added]

    def forward(batch: list) -> torch.Tensor:
        """The batch's logits; thread-safe (a lane runs it): reads the images, writes nothing shared."""
        inputs = [item.data[(slice(None), *item.windows[w])] for item, w, _ in batch]
        # always a full batch (zeros fill the last one): a window's logits then depend on nothing but
        # the window - not on its neighbours in the batch - so a case comes out the same alone, in a
        # folder or on a Ray actor (oneDNN's kernels differ, in the last bits, between batch sizes)
        inputs += [np.zeros_like(inputs[0])] * (per_forward - len(inputs))
        x = torch.from_numpy(np.stack(inputs)).to(device)
        for i, (_, _, axes) in enumerate(batch):
            if axes:
                x[i] = torch.flip(x[i], [a - 1 for a in axes])
        with torch.inference_mode(), torch.autocast(device.type, enabled=amp):  # both are per thread
            return network_logits(network, x).float()

    def add_logits(batch: list, logits: torch.Tensor) -> None:
        if logits.shape[1] != num_classes:
            raise ValueError(f"network predicts {logits.shape[1]} classes, expected {num_classes}")
        for i, (item, w, axes) in enumerate(batch):
            out = torch.flip(logits[i], [a - 1 for a in axes]) if axes else logits[i]
            slot = pending.setdefault((id(item), w), [None, 0])
            slot[0] = out if slot[0] is None else slot[0].add_(out)
            slot[1] += 1
            if slot[1] == len(mirror):  # every mirroring in: mean logits, weighted, into the accumulator
                del pending[(id(item), w)]
                weighted = slot[0].div_(len(mirror)) * gaussian_dev
                if getattr(item.acc, "takes_tensors", False):
                    item.acc.add(item.windows[w], weighted, gaussian_dev)
                else:
                    item.acc.add(item.windows[w], weighted.cpu().numpy(), gaussian)
                item.todo -= 1
                item.bar.update(1)

    def finished() -> Iterator[tuple[object, np.ndarray]]:
        while opened and opened[0].todo == 0:
            item = opened.pop(0)
            getattr(item.bar, "close", lambda: None)()
            yield item.key, _finish(item, zarr_dir)

    executor = None
    if lanes > 1:  # each lane thread runs its passes with its share of the torch threads
        per_lane = max(1, torch.get_num_threads() // lanes)
        executor = ThreadPoolExecutor(lanes, thread_name_prefix="segpipe-forward",
                                      initializer=torch.set_num_threads, initargs=(per_lane,))
    inflight: deque[tuple[list, Future]] = deque()  # submitted batches, oldest first

    def submit(batch: list) -> None:
        if executor is None:
            done: Future = Future()
            done.set_result(forward(batch))
            inflight.append((batch, done))
        else:
            inflight.append((batch, executor.submit(forward, batch)))

    def accumulate_oldest() -> None:
        batch, logits = inflight.popleft()
        add_logits(batch, logits.result())

    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            batch = []
            for job in jobs():
                batch.append(job)
                if len(batch) == per_forward:
                    submit(batch)
                    batch = []
                    while len(inflight) >= lanes:
                        accumulate_oldest()
                        yield from finished()
            if batch:
                submit(batch)
            while inflight:
                accumulate_oldest()
                yield from finished()
    finally:
        if executor is not None:  # no pass may still be running on the network once this returns
            executor.shutdown(wait=True, cancel_futures=True)
        network.train(was_training)
        for item in opened:  # stopped early (an error, or the consumer stopped): no temporary left behind
            getattr(item.bar, "close", lambda: None)()
            if item.tmp is not None:
                shutil.rmtree(item.tmp, ignore_errors=True)


def _finish(item: _OpenImage, zarr_dir):
    """The image's probabilities, cropped back where it was padded (a Zarr array for the zarr path)."""
    try:
        result = item.acc.result()
    except BaseException:
        if item.tmp is not None:
            shutil.rmtree(item.tmp, ignore_errors=True)
        raise
    if item.tmp is None:
        return np.ascontiguousarray(result[(slice(None), *item.crop)]) if item.padded else result
    if not item.padded:
        weakref.finalize(result, shutil.rmtree, item.tmp, True)
        return result
    return _crop_zarr(result, item.crop, item.tmp, zarr_dir)


def sliding_window_predict(
    network: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    tta_mirror: bool = True,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    accumulate: str = "auto",
    zarr_threshold_bytes: int | None = None,
    zarr_dir: str | os.PathLike | None = None,
    progress: bool = False,
    nonlinearity: str = "softmax",
    amp: bool | None = None,
    lanes: int | None = None,
):
    """Class probabilities (K, *spatial) float32 for an image (C, *spatial) in the store frame.

    `patch_size` has as many entries as the image has spatial axes (3d), or one fewer (2d: slices
    along the first axis). `batch_size` counts network inputs per forward pass (windows times
    mirrored copies; None: `auto_batch_size`). `accumulate` is "memory", "device", "zarr" or
    "auto" (see `sliding_window_stream`). The memory and device paths return a NumPy array; the
    Zarr path a normalised `zarr.Array` living in a temporary folder (under `zarr_dir` when given)
    that is deleted when the array is garbage collected. `nonlinearity`: "softmax" (classes) or
    "sigmoid" (regions, `LabelMap.nonlinearity`). `lanes`: forward passes at once (`auto_lanes`).
    """
    for _, probs in sliding_window_stream(network, [(None, image)], patch_size, num_classes, step=step,
                                          tta_mirror=tta_mirror, batch_size=batch_size, device=device,
                                          accumulate=accumulate, zarr_threshold_bytes=zarr_threshold_bytes,
                                          zarr_dir=zarr_dir, progress=progress, amp=amp,
                                          nonlinearity=nonlinearity, lanes=lanes):
        return probs
    raise AssertionError("the stream of one image yielded nothing")  # pragma: no cover


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
