"""Undo preprocessing: a store-frame prediction back onto the original image grid.

The steps of `preprocessing.preprocess_case` are reverted in reverse order (as nnU-Net's export):
remove the pad, resample to the cropped original shape (the same sample grid and the same
separate low-resolution-axis rule, so the voxel centres line up), put the crop back into a
background volume, transpose back to RAS; `pipeline.data.images.write_volume` then restores the file's
own orientation, grid and header, in its format.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.data.dataset import LabelMap
from pipeline.data.images import write_volume
from pipeline.data.nifti import Geometry
from pipeline.errors import SegPipeError
from pipeline.preprocessing.case_meta import CaseMeta
from pipeline.preprocessing.resampling import resample_image, resample_label


def _meta(meta: CaseMeta | dict) -> CaseMeta:
    return meta if isinstance(meta, CaseMeta) else CaseMeta.from_json(meta)


def _unpad(array: np.ndarray, meta: CaseMeta, lead: int) -> np.ndarray:
    """Accept the padded store-frame array or one already unpadded; return the unpadded one."""
    spatial = list(array.shape[lead:])
    if spatial == meta.shape_padded:
        region = tuple(slice(a, n - b) for (a, b), n in zip(meta.pad, spatial))
        return array[(slice(None),) * lead + region]
    if spatial == list(meta.shape_after_resample):
        return array
    raise SegPipeError(f"{meta.case_id}: prediction shape {tuple(spatial)} matches neither the padded store "
                       f"shape {tuple(meta.shape_padded)} nor the resampled shape {tuple(meta.shape_after_resample)}")


def _store_full_shape(meta: CaseMeta) -> list[int]:
    return [meta.shape_ras[t] for t in meta.transpose_forward]


def _crop_region(meta: CaseMeta) -> tuple[slice, ...]:
    return tuple(slice(*meta.crop_bbox[t]) for t in meta.transpose_forward)


def _to_ras(array: np.ndarray, meta: CaseMeta, lead: int) -> np.ndarray:
    tf = meta.transpose_forward
    backward = [tf.index(i) for i in range(len(tf))]
    return np.ascontiguousarray(np.transpose(array, [*range(lead), *[b + lead for b in backward]]))


def restore_label(index_array: np.ndarray, meta: CaseMeta | dict, label_map: LabelMap) -> np.ndarray:
    """Training indices in the store frame -> the dataset's label values on the RAS grid of the original case."""
    meta = _meta(meta)
    index = _unpad(np.asarray(index_array), meta, 0)
    if index.size and (int(index.min()) < 0 or int(index.max()) >= label_map.num_classes):
        raise SegPipeError(f"{meta.case_id}: class indices outside 0..{label_map.num_classes - 1}")
    index = resample_label(index.astype(label_map.index_dtype, copy=False), meta.shape_after_crop, 1,
                           meta.separate_z_axis, meta.order_z)
    full = np.zeros(_store_full_shape(meta), dtype=index.dtype)
    full[_crop_region(meta)] = index
    return label_map.to_values(_to_ras(full, meta, 0))


def restore_probabilities(probs: np.ndarray, meta: CaseMeta | dict, background_channel: bool = True,
                          threads: int = 1) -> np.ndarray:
    """(K, *store-frame) probabilities -> (K, *RAS shape) float32 on the original grid.

    Resampled with order 1 (in-plane; `order_z` along a separate low-resolution axis), `threads`
    channels at once. Outside the crop the image was zero, so there channel 0 (background) is 1 and
    the others 0; region outputs (`background_channel=False`: every channel a foreground region) are
    all 0 there.
    """
    meta = _meta(meta)
    probs = _unpad(np.asarray(probs, dtype=np.float32), meta, 1)
    probs = resample_image(probs, meta.shape_after_crop, order=1, axis=meta.separate_z_axis, order_z=meta.order_z,
                           threads=threads)
    full = np.zeros((probs.shape[0], *_store_full_shape(meta)), dtype=np.float32)
    if background_channel:
        full[0] = 1.0
    full[(slice(None), *_crop_region(meta))] = probs
    return _to_ras(full, meta, 1)


def write_prediction(label_ras_values: np.ndarray, geometry: Geometry | dict, out_path: str | os.PathLike,
                     reference_image_path: str | os.PathLike | None = None) -> None:
    """Write a RAS label volume in `out_path`'s format, in the original orientation, grid and header (atomically)."""
    geometry = geometry if isinstance(geometry, Geometry) else Geometry.from_json(geometry)
    label = np.asarray(label_ras_values)
    if tuple(label.shape) != tuple(geometry.ras_shape):
        raise SegPipeError(f"prediction shape {label.shape} differs from the image's {geometry.ras_shape}")
    write_volume(label, geometry, out_path, reference_image_path)
