"""The 3D cascade at prediction: the previous stage runs first, its segmentation becomes input channels.

For a configuration with a `previous_stage` (`3d_cascade_fullres`), a case is preprocessed for the
previous stage (`3d_lowres`), segmented by it, and the segmentation is carried into the cascade's
store frame (`to_next_stage_frame`); its one-hot foreground channels are appended to the image the
cascade's network reads. The same mapping makes the training inputs
(`pipeline.inference.previous_stage`), so training and prediction see the segmentation the same way.

Both stages crop the same nonzero box of the same raw image and differ only in spacing, so the
previous stage's store frame maps onto the cascade's by removing its padding, resampling the label
map (nnU-Net's label rule: one-hot, linear, argmax) to the cascade's resampled shape, and padding as
the cascade pads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from pipeline.errors import BadInputError, SegPipeError
from pipeline.preprocessing.case_meta import CaseMeta
from pipeline.preprocessing.resampling import ANISOTROPY_THRESHOLD, resample_label, separate_z_axis
from pipeline.storage import as_path
from pipeline.workdir import model_file


def previous_stage_run_dirs(run_dirs: Sequence[str | os.PathLike], previous: str, checkpoint: str = "final") -> list[str]:
    """The previous stage's run folders for the same folds (W/runs/<previous>/fold_<k> beside
    W/runs/<config>/fold_<k>), or BadInputError naming the command that trains the missing ones."""
    out, missing = [], []
    for run_dir in run_dirs:
        run_dir = as_path(run_dir)
        other = run_dir.parent.parent / previous / run_dir.name
        if not model_file(other, checkpoint).is_file():
            missing.append(run_dir.name.removeprefix("fold_"))
        out.append(str(other))
    if missing:
        workdir = as_path(run_dirs[0]).parent.parent.parent
        commands = "; ".join(f"`segpipe train --workdir {workdir} --config {previous} --fold {f}`" for f in missing)
        raise BadInputError(f"the cascade runs {previous} first, and fold(s) {', '.join(missing)} of {previous} are not "
                            f"trained: {commands}")
    return out


def to_next_stage_frame(seg: np.ndarray, previous: CaseMeta, following: CaseMeta,
                        threshold: float | None = None) -> np.ndarray:
    """Class indices in the previous stage's padded store frame -> the following stage's padded frame."""
    if previous.crop_bbox != following.crop_bbox or previous.transpose_forward != following.transpose_forward:
        raise SegPipeError(f"{following.case_id}: the two cascade stages cropped or transposed the case differently "
                           f"({previous.crop_bbox} vs {following.crop_bbox}); preprocess both from the same plans")
    if list(seg.shape) != previous.shape_padded:
        raise SegPipeError(f"{following.case_id}: previous-stage segmentation of shape {seg.shape}, expected "
                           f"{tuple(previous.shape_padded)}")
    region = tuple(slice(a, n - b) for (a, b), n in zip(previous.pad, seg.shape))
    seg = np.ascontiguousarray(seg[region])
    axis = separate_z_axis(previous.spacing_after, following.spacing_after,
                           ANISOTROPY_THRESHOLD if threshold is None else threshold)
    seg = resample_label(seg, following.shape_after_resample, 1, axis, following.order_z)
    if any(a or b for a, b in following.pad):
        seg = np.pad(seg, following.pad, mode="constant", constant_values=0)
    return seg


def segment(predictor, image: np.ndarray) -> np.ndarray:
    """The predictor's class indices of a preprocessed image (its store frame), slab by slab when its
    probabilities come back as a Zarr array."""
    probabilities = predictor.store_probabilities(image)
    dtype = predictor.label_map.index_dtype
    to_index = predictor.label_map.probabilities_to_index  # softmax argmax, or regions painted in order
    if isinstance(probabilities, np.ndarray):
        return to_index(probabilities).astype(dtype)
    out = np.empty(probabilities.shape[1:], dtype=dtype)
    step = probabilities.chunks[1]
    for start in range(0, out.shape[0], step):
        out[start:start + step] = to_index(np.asarray(probabilities[:, start:start + step]))
    return out


def one_hot_channels(seg: np.ndarray, num_classes: int, dtype=np.float32) -> np.ndarray:
    """(K-1, *spatial): one channel per foreground class, as the cascade's network reads them."""
    out = np.zeros((num_classes - 1, *seg.shape), dtype=dtype)
    for c in range(1, num_classes):
        out[c - 1][seg == c] = 1
    return out


def cascade_input(previous, case, meta: CaseMeta, image: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The cascade network's input for `case` (a CaseData): `image` (the case preprocessed for the
    cascade, `meta` its record) with the previous stage's one-hot segmentation appended. `previous`
    is the previous stage's loaded Predictor."""
    from pipeline.preprocessing.preprocess import preprocess_case

    pre = preprocess_case(case, previous.plans, previous.config_name, previous.label_map)
    seg = segment(previous, pre.image)
    seg = to_next_stage_frame(seg, pre.meta, meta, threshold)
    channels = one_hot_channels(seg, previous.label_map.num_classes, image.dtype)
    return np.concatenate([image, channels], axis=0)
