"""Per-channel intensity normalisation, nnU-Net v2's schemes.

* ``ct``: clip to the dataset-wide foreground [0.5, 99.5] percentiles, then subtract the
  dataset-wide foreground mean and divide by its std (from the fingerprint, via the plans). CT
  intensities are physical (HU), so one transform for the whole dataset keeps them comparable.
* ``zscore``: per-image mean/std (MRI intensities have no absolute scale). With
  ``use_nonzero_mask`` the statistics come from the nonzero region only and everything outside it
  is set to 0: for skull-stripped or cropped acquisitions the zero background would otherwise
  dominate the statistics.
* ``none``: cast only.

Normalisation runs before resampling (as nnU-Net): the nonzero mask is exact on the original grid.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

from pipeline.errors import SegPipeError
from pipeline.planning.plans import ChannelNormalization

EPS = 1e-8


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled (nnU-Net's `create_nonzero_mask`).

    Holes are filled inside the mask's bounding box only, and not at all when the box is full (a
    CT is nonzero everywhere): a background voxel outside the box reaches the array's border
    along an axis, so no hole lies outside it - same mask, a fraction of the work on large volumes."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return mask
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    inner = mask[tuple(box)]
    if not inner.all():
        mask[tuple(box)] = binary_fill_holes(inner)
    return mask


def normalize_channel(channel: np.ndarray, norm: ChannelNormalization, mask: np.ndarray | None = None) -> np.ndarray:
    """One channel (spatial array) -> float32 normalised copy. `mask` is used by zscore with use_nonzero_mask."""
    x = np.array(channel, dtype=np.float32, copy=True)
    scheme = norm.scheme.lower()
    if scheme == "ct":
        if None in (norm.mean, norm.std, norm.lower, norm.upper):
            raise SegPipeError("CT normalisation needs mean, std, lower and upper in the plans (re-run `segpipe plan`)")
        np.clip(x, norm.lower, norm.upper, out=x)
        x -= np.float32(norm.mean)
        x /= np.float32(max(float(norm.std), EPS))
        return x
    if scheme == "zscore":
        if norm.use_nonzero_mask and mask is not None and mask.any() and not mask.all():
            values = x[mask]
            mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
            out = np.zeros_like(x)
            out[mask] = (values - np.float32(mean)) / np.float32(max(std, EPS))
            return out
        # no mask, or one covering every voxel: the same statistics and arithmetic, without the gathers
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        x -= np.float32(mean)
        x /= np.float32(max(std, EPS))
        return x
    if scheme == "none":
        return x
    raise SegPipeError(f"unknown normalisation scheme {norm.scheme!r} (known: ct, zscore, none)")


def normalize(image: np.ndarray, norms: list[ChannelNormalization], mask: np.ndarray | None = None) -> np.ndarray:
    """(C, *spatial) -> float32 (C, *spatial), channel c normalised by `norms[c]`."""
    if len(norms) != image.shape[0]:
        raise SegPipeError(f"plans describe {len(norms)} channel(s) but the image has {image.shape[0]}")
    out = np.empty(image.shape, dtype=np.float32)
    for c, norm in enumerate(norms):
        out[c] = normalize_channel(image[c], norm, mask)
    return out
