"""The 3D cascade on the training side: the previous stage's segmentations as extra input channels.

nnU-Net v2's `3d_cascade_fullres` is `3d_fullres` whose input gains one channel per foreground
class holding the segmentation `3d_lowres` made of the case (`ConfigurationPlan.previous_stage`).
It trains on *cross-validated* segmentations - each case predicted by the `3d_lowres` fold that did
not train on it - so the network learns to correct the mistakes the first stage makes on unseen
cases, not to copy a first stage that has memorised them.

Where they live (`Workdir.next_stage_predictions`): one Zarr group beside the previous stage's run
folders, `W/runs/3d_lowres/predicted_next_stage/3d_cascade_fullres.zarr/`, holding per case
`cases/<case_id>` (class indices in the cascade's padded store frame, so a patch of the store
and of the segmentation share coordinates; chunks = the patch size, so a patch reads a few chunks,
never a case). A case's `complete` attribute is written last, with the fold and the model file it
was predicted with: an interrupted run redoes only what is missing, a retrained fold redoes its
cases. The fill value is a class index no segmentation holds, so a chunk that has gone missing
reads as damage, never as background. `pipeline.inference.previous_stage` writes them.

In a batch the segmentation travels through the spatial augmentation together with the label
(one integer map, `label + K * previous`, resampled nearest as labels are), then becomes one-hot
channels after the intensity augmentations (they never see noise or gamma), perturbed as nnU-Net
does (`augment_previous_stage`): random morphological operators (p 0.4 per sample, 0.5 per class,
a ball of radius 1-8 voxels) and the removal of a random connected component (p 0.2 per sample,
0.5 per class, components under 15 % of the patch), so the second stage does not trust the first
blindly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
import zarr
from scipy import ndimage

from pipeline.errors import BadInputError, SegPipeError
from pipeline.planning.plans import Plans
from pipeline.preprocessing.store import StoreDamageError, label_compressors
from pipeline.storage import STORAGE_OPTIONS, as_path, is_url, url_of
from pipeline.workdir import MODEL_FINAL, Workdir

NEXT_STAGE_VERSION = 1

# nnU-Net v2's cascade augmentation (nnUNetTrainer.get_training_transforms, is_cascaded)
P_BINARY_OPERATOR = 0.4  # per sample
P_REMOVE_COMPONENT = 0.2  # per sample
P_PER_CLASS = 0.5
STREL_RADIUS = (1.0, 8.0)  # ball radius in voxels, drawn uniformly
MAX_COMPONENT_FRACTION = 0.15  # only components smaller than this share of the patch are removed
OPERATORS = ("dilation", "erosion", "closing", "opening")


def num_input_channels(plans: Plans, config: str) -> int:
    """The network's input channels: the image's, plus one per foreground class for a cascade stage."""
    extra = len(plans.label_values) - 1 if plans.configuration(config).previous_stage else 0
    return len(plans.channels) + extra


# ---------------------------------------------------------------- the stored segmentations


def segmentation_dtype(num_classes: int) -> tuple[str, int]:
    """(dtype, fill value): the fill is no class index, so an absent chunk is recognisable."""
    return ("uint8", 255) if num_classes < 255 else ("int16", 32767)


def model_stamp(run_dir: str | os.PathLike) -> str:
    """A digest of a fold's final model file: segmentations made by another model are redone."""
    return hashlib.sha256(as_path(run_dir).joinpath(MODEL_FINAL).read_bytes()).hexdigest()[:16]


def _open(path, mode: str):
    target = url_of(path) if is_url(path) else os.fspath(path)
    options = {"storage_options": STORAGE_OPTIONS} if is_url(path) else {}
    return zarr.open_group(target, mode=mode, **options)


class NextStageSegmentations:
    """One cascade stage's stored previous-stage segmentations (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = path
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, create_with: dict | None = None) -> NextStageSegmentations:
        """Open for reading, or with `create_with` (the root attributes) open-or-create for writing;
        a group made for other plans or another previous stage is refused."""
        exists = as_path(path).joinpath("zarr.json").exists()
        if not exists and create_with is None:
            raise SegPipeError(f"no previous-stage segmentations at {path}")
        if not exists:
            group = _open(path, "a")
            group.attrs.update({"segpipe_next_stage": NEXT_STAGE_VERSION, **create_with})
            return cls(path, group)
        group = _open(path, "r" if create_with is None else "r+")
        if group.attrs.get("segpipe_next_stage") != NEXT_STAGE_VERSION:
            raise SegPipeError(f"{path} is not a seg-pipeline previous-stage store of version {NEXT_STAGE_VERSION}: "
                               "delete it, then re-run the cascade's `segpipe train`")
        if create_with is not None:
            stale = {k: (group.attrs.get(k), v) for k, v in create_with.items() if group.attrs.get(k) != v}
            if stale:
                raise SegPipeError(f"{path} was made for other plans ({', '.join(f'{k} {a} != {b}' for k, (a, b) in stale.items())}): "
                                   "delete it and re-run the cascade's `segpipe train` to predict them again")
        return cls(path, group)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def completed(self) -> dict[str, dict]:
        """case id -> the attributes (fold, model) of each complete segmentation."""
        if "cases" not in self.group:
            return {}
        out = {}
        for name, array in self.group["cases"].arrays():
            attrs = dict(array.attrs)
            if attrs.get("complete") is True:
                out[name] = attrs
        return out

    def write(self, case_id: str, seg: np.ndarray, chunks: Sequence[int], **attrs) -> None:
        """Write one case's segmentation; `complete` (with `attrs`) is set only after every chunk is."""
        dtype, fill = segmentation_dtype(int(self.group.attrs["num_classes"]))
        cases = self.group.require_group("cases")
        array = cases.create_array(case_id, shape=seg.shape, dtype=dtype, chunks=tuple(int(c) for c in chunks),
                                   fill_value=fill, compressors=label_compressors(), overwrite=True,
                                   config={"write_empty_chunks": True})
        array[...] = seg.astype(dtype, copy=False)
        array.attrs.update({**attrs, "complete": True})

    def array(self, case_id: str) -> zarr.Array:
        """The case's segmentation (lazily read), or an error naming the case and the command that makes it."""
        arr = self._arrays.get(case_id)
        if arr is None:
            try:
                arr = self.group[f"cases/{case_id}"]
            except KeyError:
                arr = None
            if not isinstance(arr, zarr.Array) or arr.attrs.get("complete") is not True:
                raise BadInputError(f"no {self.group.attrs.get('previous_stage')} segmentation of this case in "
                                    f"{self.path}: `segpipe train --config {self.group.attrs.get('configuration')}` "
                                    "makes the missing ones", case_id)
            self._arrays[case_id] = arr
        return arr

    def check_patch(self, case_id: str, values: np.ndarray) -> None:
        """A read patch holding the fill value came from a missing chunk: damage, never background."""
        if values.size and int(values.max()) >= int(self.group.attrs["num_classes"]):
            raise StoreDamageError(f"case {case_id}: its previous-stage segmentation in {self.path} is damaged (a chunk "
                               f"is missing or holds class indices >= {self.group.attrs['num_classes']}); delete "
                               f"{self.path}/cases/{case_id} and re-run the cascade's `segpipe train` to predict it again")


def previous_stage_inputs(workdir: Workdir, plans: Plans, config: str, case_ids: Sequence[str]) -> dict:
    """What a cascade's samplers need (`PatchSpec` fields), after checking every case has its
    segmentation; {} for a configuration without a previous stage. Missing ones: BadInputError (exit 2)
    naming the cases and the command that makes them."""
    previous = plans.configuration(config).previous_stage
    if previous is None:
        return {}
    path = workdir.next_stage_predictions(previous, config)
    make = f"`segpipe train --workdir {workdir.root} --config {config}` predicts them with the trained {previous} folds"
    try:
        store = NextStageSegmentations.open(path)
    except SegPipeError:
        raise BadInputError(f"{config} trains on {previous}'s cross-validated segmentations, and {path} holds "
                            f"none: {make}") from None
    missing = sorted(set(case_ids) - set(store.completed()))
    if missing:
        raise BadInputError(f"{len(missing)} case(s) have no {previous} segmentation in {path} "
                            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): {make}")
    return {"previous_stage": str(path), "num_classes": len(plans.label_values)}


# ---------------------------------------------------------------- in the batch


def combine_labels(label: torch.Tensor, previous: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One integer map carrying both, so spatial augmentation moves them identically (nearest)."""
    return label + num_classes * previous


def split_labels(combined: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    return combined % num_classes, combined // num_classes


def one_hot_foreground(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *sp) class indices -> (B, K-1, *sp) float32, one channel per foreground class."""
    classes = torch.arange(1, num_classes, device=seg.device).view(1, -1, *([1] * (seg.ndim - 1)))
    return (seg.unsqueeze(1) == classes).float()


def binary_operation(mask: np.ndarray, operator: str, radius: float) -> np.ndarray:
    """Morphology with a Euclidean ball of `radius` voxels, through distance transforms (exact for a
    ball, linear in the patch size whatever the radius). The patch border is not a boundary: nothing
    erodes from it, as with nnU-Net's zero-padded convolution."""
    def dilate(m: np.ndarray) -> np.ndarray:
        if not m.any() or m.all():
            return m.copy()
        return ndimage.distance_transform_edt(~m) <= radius

    def erode(m: np.ndarray) -> np.ndarray:
        return ~dilate(~m)

    if operator == "dilation":
        return dilate(mask)
    if operator == "erosion":
        return erode(mask)
    if operator == "closing":
        return erode(dilate(mask))
    if operator == "opening":
        return dilate(erode(mask))
    raise ValueError(f"unknown operator {operator!r}")


def random_binary_operator_(onehot: np.ndarray, rng: np.random.Generator, p_per_class: float = P_PER_CLASS,
                            radius: tuple[float, float] = STREL_RADIUS) -> list[tuple[int, str, float]]:
    """nnU-Net's ApplyRandomBinaryOperatorTransform on one sample's one-hot channels (C, *sp), in
    place: classes in random order, each with `p_per_class` one of dilation/erosion/closing/opening;
    voxels a class gains are taken from the others (one-hot stays exclusive). Returns what it did."""
    done = []
    for c in rng.permutation(onehot.shape[0]):
        if rng.random() >= p_per_class:
            continue
        operator = OPERATORS[rng.integers(len(OPERATORS))]
        r = float(rng.uniform(*radius))
        before = onehot[c] > 0
        after = binary_operation(before, operator, r)
        gained = after & ~before
        if gained.any():
            onehot[:, gained] = 0
        onehot[c] = after
        done.append((int(c), operator, r))
    return done


def remove_random_component_(onehot: np.ndarray, rng: np.random.Generator, p_per_class: float = P_PER_CLASS,
                             max_fraction: float = MAX_COMPONENT_FRACTION) -> list[tuple[int, int]]:
    """nnU-Net's RemoveRandomConnectedComponentFromOneHotEncodingTransform on one sample (C, *sp), in
    place: per class (random order, `p_per_class`), one random connected component (26-connected)
    smaller than `max_fraction` of the patch is erased. Returns (class channel, voxels removed)."""
    done = []
    structure = ndimage.generate_binary_structure(onehot.ndim - 1, onehot.ndim - 1)
    for c in rng.permutation(onehot.shape[0]):
        if rng.random() >= p_per_class:
            continue
        mask = onehot[c] > 0
        if not mask.any():
            continue
        components, n = ndimage.label(mask, structure)
        sizes = np.bincount(components.ravel())[1:]
        small = np.flatnonzero(sizes < mask.size * max_fraction) + 1
        if small.size:
            pick = int(small[rng.integers(small.size)])
            onehot[c][components == pick] = 0
            done.append((int(c), int(sizes[pick - 1])))
    return done


def augment_previous_stage(onehot: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The cascade's perturbation of a batch of one-hot segmentations (B, C, *sp), per sample."""
    out = onehot.numpy().copy()
    for sample in out:
        if rng.random() < P_BINARY_OPERATOR:
            random_binary_operator_(sample, rng)
        if rng.random() < P_REMOVE_COMPONENT:
            remove_random_component_(sample, rng)
    return torch.from_numpy(out)


def previous_stage_input(image: torch.Tensor, combined: torch.Tensor, num_classes: int, rng: np.random.Generator,
                         augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(image with the one-hot previous-stage channels appended, label) from an augmented batch whose
    label carries both (`combine_labels`)."""
    label, previous = split_labels(combined, num_classes)
    onehot = one_hot_foreground(previous, num_classes)
    if augment:
        onehot = augment_previous_stage(onehot, rng)
    return torch.cat([image, onehot.to(image.dtype)], dim=1), label
