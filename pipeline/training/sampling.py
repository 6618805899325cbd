"""Training and validation batches streamed from the Zarr store, as nnU-Net's data loader makes them.

Each batch draws its cases at random (with replacement) from the fold's case list and crops one
patch per case (augmented as a batch, in the loader); the last third of every batch
(`OVERSAMPLE_FOREGROUND`, nnU-Net's 0.33 and its "last XX percent" rule) is centred on a stored
foreground location of a random class present in the case, so rare structures are seen. A patch may extend beyond the image (nnU-Net pads): only
the part inside is read, the rest is 0 in the image and background in the label. Reading a zarr
slice decodes only the chunks the slice touches, so a patch costs a few chunk reads, never a case.

Determinism without shared state: every batch has a key (stream, rank, epoch, iteration) from
which its own random generator is seeded. DataLoader worker `w` of `n` makes batches `w, w+n, ...`
of the stream and the DataLoader returns them round-robin, so the batches a rank sees are the same
whatever the number of loader workers (and a resumed run at epoch `e` sees what it would have seen).

Damage: a stored case writes every chunk, so a chunk that is not there is damage, never "empty".
Before its first batch a sampler runs the store's cheap structural check (`ConfigStore.check_cases`:
one listing and the arrays' metadata per case, no chunk read) over its cases and refuses a damaged
one by name; after that, every array it reads raises on a chunk that has gone missing (the store
opens them so) or fails its checksum, naming the case and the array (`StoreDamageError`, exit 2).

Memory: a sampler holds the batch it is filling and nothing else (no case cache; the store is
opened lazily inside the worker, so only paths are pickled). The prefetchers hold at most their
queue depth of finished batches: `num_workers * prefetch_factor` for the DataLoader, `depth` for
the thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

TRAIN_STREAM = 0
VAL_STREAM = 1
OVERSAMPLE_FOREGROUND = 0.33  # nnU-Net's oversample_foreground_percent


def local_batch_size(global_batch: int, rank: int, world_size: int) -> int:
    """This rank's share of the configured (global) batch: nnU-Net's DDP split, the remainder to the first ranks."""
    if global_batch < world_size:
        raise ValueError(f"batch size {global_batch} cannot be shared by {world_size} workers (at least one sample each)")
    return global_batch // world_size + (1 if rank < global_batch % world_size else 0)


def foreground_slots(global_batch: int, oversample: float = OVERSAMPLE_FOREGROUND, rank: int = 0,
                     world_size: int = 1) -> tuple[bool, ...]:
    """Which samples of this rank's batch are centred on foreground.

    nnU-Net forces the last `batch - round(batch * (1 - p))` positions of a batch; under data
    parallelism the positions of the global batch are dealt out to the ranks in order, so the
    global batch has the same share of foreground patches as a single-worker batch.
    """
    start = sum(local_batch_size(global_batch, r, world_size) for r in range(rank))
    first_forced = round(global_batch * (1 - oversample))
    return tuple(start + j >= first_forced for j in range(local_batch_size(global_batch, rank, world_size)))


@dataclass(frozen=True)
class PatchSpec:
    """What a sampler needs, as plain values (it is pickled to every loader worker and Ray worker)."""

    store_path: str
    data_identifier: str
    case_ids: tuple[str, ...]
    patch_size: tuple[int, ...]  # what the network sees: 3 axes, or 2 for the 2d configuration
    slots: tuple[bool, ...]  # per sample of a batch: centred on foreground?
    seed: int = 12345
    rank: int = 0
    augmentation: dict | None = None  # AugmentationConfig.to_json(); None = no augmentation (validation)
    plans_hash: str | None = None  # checked against the store group when given
    # sparse labels (an ignore label): patches not forced onto foreground are centred on an annotated
    # voxel (stored class-0 rows included) instead of anywhere, so they are not mostly "ignore"
    annotated_centres: bool = False
    previous_stage: str | None = None  # cascade: the previous stage's segmentations, read as extra channels
    num_classes: int = 0  # with previous_stage: one extra channel per foreground class

    def __post_init__(self):
        if not self.case_ids:
            raise ValueError("a sampler needs at least one case")

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def is_2d(self) -> bool:
        return len(self.patch_size) == 2

    def crop_size(self) -> tuple[int, ...]:
        """The patch read from the store: larger than `patch_size` when rotation/scaling needs the margin."""
        if self.augmentation is None:
            return tuple(self.patch_size)
        from pipeline.training.augmentation import (
            AugmentationConfig,
            initial_patch_size,
        )

        return tuple(initial_patch_size(self.patch_size, AugmentationConfig.from_json(self.augmentation)))


def patch_bbox(shape: Sequence[int], patch: Sequence[int], final_patch: Sequence[int], rng: np.random.Generator,
               center: Sequence[int] | None = None) -> list[int]:
    """Lower corner of a patch in a case of `shape` (nnU-Net's `get_bbox`), possibly outside the image.

    Random corners range so that the final (centre-cropped) patch can reach every border voxel; a
    `center` (a foreground voxel) puts the patch's centre on it, clipped only at the lower bound.
    """
    lbs, ubs = [], []
    for size, p, fp in zip(shape, patch, final_patch):
        need = p - fp
        if need + size < p:
            need = p - size
        lbs.append(-(need // 2))
        ubs.append(size + need // 2 + need % 2 - p)
    if center is None:
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lbs, ubs)]
    return [max(lo, int(c) - p // 2) for lo, c, p in zip(lbs, center, patch)]


def choose_center(locations: np.ndarray, force_fg: bool, rng: np.random.Generator) -> np.ndarray | None:
    """A patch centre from a case's stored locations (rows (class_index, *coords)), or None for a random patch.

    Foreground: a random foreground class present, then a random voxel of it (nnU-Net's rule; class
    0 rows, stored only for sparse labels, never count). Otherwise any annotated voxel. Ignored
    voxels are never stored (`preprocessing.sample_locations`), so never a centre.
    """
    if force_fg:
        locations = locations[locations[:, 0] > 0]
    if not len(locations):
        return None
    if not force_fg:
        return locations[rng.integers(len(locations)), 1:]
    rows = locations[locations[:, 0] == rng.choice(np.unique(locations[:, 0]))]
    return rows[rng.integers(len(rows)), 1:]


def read_patch(array, lower: Sequence[int], size: Sequence[int], out: np.ndarray) -> None:
    """Copy the part of `array[..., lower:lower+size]` inside the array into `out` (already zeroed).

    `array` is anything sliceable (a zarr array: only the touched chunks are read); leading axes
    of `array` beyond the spatial ones (channels) are taken whole.
    """
    spatial = array.shape[-len(size):]
    src, dst = [], []
    for lo, n, dim in zip(lower, size, spatial):
        a, b = max(lo, 0), min(lo + n, dim)
        if b <= a:
            return  # the patch lies entirely outside the image: all padding
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    lead = (slice(None),) * (array.ndim - len(size))
    out[lead + tuple(dst)] = array[lead + tuple(src)]


class BatchSampler:
    """Makes one batch from its key; holds the store handle (opened lazily, so workers never inherit
    one) and nothing per case."""

    def __init__(self, spec: PatchSpec):
        self.spec = spec
        self.crop = spec.crop_size()
        self._group = None  # the store's ConfigStore, opened on first use in the process that reads
        self._checked = False  # the structural check of the spec's cases, before the first batch
        self._reading = "image"  # the array being read, for the error message
        self._channels: int | None = None
        self._augmenter = None
        self._previous = None  # the cascade's previous-stage segmentations, opened on first use
        if spec.augmentation is not None or self.crop != tuple(spec.patch_size):
            from pipeline.training.augmentation import AugmentationConfig, Augmenter

            config = None if spec.augmentation is None else AugmentationConfig.from_json(spec.augmentation)
            self._augmenter = Augmenter(config, spec.patch_size)

    @property
    def group(self):
        if self._group is None:
            from pipeline.preprocessing.store import open_store

            self._group = open_store(self.spec.store_path, "r").config(self.spec.data_identifier,
                                                                      plans_hash=self.spec.plans_hash)
        return self._group

    @property
    def previous(self):
        if self._previous is None:
            from pipeline.training.cascade import NextStageSegmentations

            self._previous = NextStageSegmentations.open(self.spec.previous_stage)
        return self._previous

    def check(self) -> None:
        """Refuse damaged cases of the spec before any is read (`ConfigStore.check_cases`)."""
        from pipeline.preprocessing.store import StoreDamageError

        damaged = self.group.check_cases(self.spec.case_ids)
        if damaged:
            lines = list(damaged.values())
            more = f"\n... and {len(lines) - 5} more damaged case(s)" if len(lines) > 5 else ""
            raise StoreDamageError("\n".join(lines[:5]) + more)
        self._checked = True

    def _sample_one(self, case_id: str, force_fg: bool, rng: np.random.Generator,
                    image_out: np.ndarray, label_out: np.ndarray, previous_out: np.ndarray | None = None) -> None:
        try:
            self._read_one(case_id, force_fg, rng, image_out, label_out, previous_out)
        except (ValueError, RuntimeError, OSError) as exc:
            # zarr's crc32c codec raises ValueError on a flipped bit or a truncated chunk; zstd a
            # RuntimeError on junk. Name the case and the array, so a corrupt store stops training with
            # a fix instead of an anonymous error. (A missing chunk raises StoreDamageError itself.)
            from pipeline.preprocessing.store import StoreDamageError, damage_message

            raise StoreDamageError(damage_message(
                f"{self.spec.store_path}/{self.spec.data_identifier}", case_id, self._reading,
                f"corrupt or unreadable chunk: {type(exc).__name__}: {exc}")) from exc

    def _read_one(self, case_id: str, force_fg: bool, rng: np.random.Generator,
                  image_out: np.ndarray, label_out: np.ndarray, previous_out: np.ndarray | None = None) -> None:
        self._reading = "image"
        image = self.group.image(case_id)
        self._reading = "label"
        label = self.group.label(case_id)
        shape = label.shape
        # 2d: a patch (1, h, w) through the volume, as nnU-Net's 2d loader picks a slice
        crop = (1, *self.crop) if self.spec.is_2d else self.crop
        final = (1, *self.spec.patch_size) if self.spec.is_2d else self.spec.patch_size
        center = None
        if force_fg or self.spec.annotated_centres:
            self._reading = "locations"
            center = choose_center(self.group.locations(case_id), force_fg, rng)
            # a case without any foreground falls back to a random patch, as in nnU-Net
        lower = patch_bbox(shape, crop, final, rng, center)
        image_at, label_at = (image_out[:, None], label_out[None]) if self.spec.is_2d else (image_out, label_out)
        self._reading = "image"
        read_patch(image, lower, crop, image_at)
        self._reading = "label"
        read_patch(label, lower, crop, label_at)
        if previous_out is not None:  # the cascade's extra input, at the same coordinates
            self._reading = "previous-stage segmentation"
            read_patch(self.previous.array(case_id), lower, crop, previous_out)
            self.previous.check_patch(case_id, previous_out)

    def batch(self, key: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for `key`: image float32 (B, C, *patch), label int64 (B, *patch)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.spec.seed, *key]))
        if not self._checked:
            self.check()
        if self._channels is None:
            self._channels = int(self.group.image(self.spec.case_ids[0]).shape[0])
        b = self.spec.batch_size
        image = np.zeros((b, self._channels, *self.crop), dtype=np.float32)
        label = np.zeros((b, *self.crop), dtype=np.int64)
        previous = np.zeros((b, *self.crop), dtype=np.int64) if self.spec.previous_stage else None
        cases = rng.integers(len(self.spec.case_ids), size=b)
        for j, (case, force_fg) in enumerate(zip(cases, self.spec.slots)):
            self._sample_one(self.spec.case_ids[case], force_fg, rng, image[j], label[j],
                             None if previous is None else previous[j])
        image_t, label_t = torch.from_numpy(image), torch.from_numpy(label)
        if previous is not None:
            from pipeline.training.cascade import combine_labels

            label_t = combine_labels(label_t, torch.from_numpy(previous), self.spec.num_classes)
        if self._augmenter is not None:
            image_t, label_t = self._augmenter(image_t, label_t, rng)
        if previous is not None:
            from pipeline.training.cascade import previous_stage_input

            image_t, label_t = previous_stage_input(image_t, label_t, self.spec.num_classes, rng,
                                                    augment=self.spec.augmentation is not None)
        return image_t, label_t


class TrainBatches(IterableDataset):
    """The endless training stream of one rank from `start_epoch`: batch `i` of epoch `e` has key
    (TRAIN_STREAM, rank, e, i). Split over DataLoader workers by position."""

    def __init__(self, spec: PatchSpec, iterations_per_epoch: int, start_epoch: int = 0):
        self.spec = spec
        self.iterations_per_epoch = iterations_per_epoch
        self.start_epoch = start_epoch

    def keys(self) -> Iterator[tuple[int, ...]]:
        for epoch in itertools.count(self.start_epoch):
            for it in range(self.iterations_per_epoch):
                yield (TRAIN_STREAM, self.spec.rank, epoch, it)

    def __iter__(self):
        return _iterate(self.spec, self.keys())


class ValidationBatches(IterableDataset):
    """The same `num_batches` batches every time it is iterated (no augmentation): batch `i` has key
    (VAL_STREAM, i); rank `r` of `world_size` makes batches r, r + world_size, ..."""

    def __init__(self, spec: PatchSpec, num_batches: int, world_size: int = 1):
        self.spec = spec
        self.num_batches = num_batches
        self.world_size = world_size

    def keys(self) -> Iterator[tuple[int, ...]]:
        for i in range(self.spec.rank, self.num_batches, self.world_size):
            yield (VAL_STREAM, i)

    def __len__(self) -> int:
        return len(range(self.spec.rank, self.num_batches, self.world_size))

    def __iter__(self):
        return _iterate(self.spec, self.keys())


def _iterate(spec: PatchSpec, keys: Iterator[tuple[int, ...]]):
    info = get_worker_info()
    if info is not None:
        keys = itertools.islice(keys, info.id, None, info.num_workers)
    sampler = BatchSampler(spec)
    for key in keys:
        yield sampler.batch(key)


class ThreadPrefetcher:
    """Runs an iterable in a background thread, at most `depth` items ahead (bounded queue).

    Zarr decompression and most torch kernels release the GIL, so one thread overlaps loading with
    the training step without a second process and its copy of the interpreter.
    """

    _DONE = object()

    def __init__(self, iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self, it) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put_final(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put_final(exc)

    def _put_final(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


def batch_iterator(dataset: IterableDataset, prefetch: str = "thread", num_workers: int = 1, depth: int = 2,
                   pin_memory: bool = False):
    """An iterator over `dataset`'s batches with background prefetch.

    `thread`: one producer thread, `depth` batches queued. `process`: a DataLoader with
    `num_workers` processes, `depth` batches each (prefetch_factor). `none`: in the caller.
    Callers close it with `close_iterator` (threads stop, processes exit).
    """
    if prefetch == "none" or num_workers == 0:
        return iter(dataset)
    if prefetch == "thread":
        return ThreadPrefetcher(dataset, depth)
    if prefetch == "process":
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=depth,
                            pin_memory=pin_memory, persistent_workers=False)
        return iter(loader)
    raise ValueError(f"unknown prefetch mode {prefetch!r} (thread | process | none)")


def close_iterator(it) -> None:
    if isinstance(it, ThreadPrefetcher):
        it.close()
    elif hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
