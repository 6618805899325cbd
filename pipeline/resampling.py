"""Resampling to a target shape with nnU-Net v2's conventions, on scipy.ndimage.

* Sample grid: output voxel o reads input coordinate ``(o + 0.5) * n_in / n_out - 0.5`` per axis
  (align_corners=False, edges repeated) - what nnU-Net's skimage ``resize(mode='edge')`` does, so the
  new shape comes from `compute_new_shape` and the same call undoes it on export.
* Images: spline order 3. Labels: every class is a one-hot channel resampled with order 1, the
  output voxel takes the argmax. Ties go to the foreground class (the higher one among classes),
  which reproduces nnU-Net's per-class ``>= 0.5`` overwrite wherever one class reaches 0.5 (ties
  are everywhere when downsampling by 2); where none does (junctions of three or more classes)
  nnU-Net falls back to background, the argmax keeps the strongest class. A class present in
  the input that no output voxel wins (a structure thinner than the new voxel) is *rescued* at the
  output voxel where its interpolated weight peaks, so no declared label is lost by resampling.
* Implementation: one axis at a time with scipy's own 1D interpolation weights (`_axis_weights`),
  which reproduces ``affine_transform``/skimage ``resize`` to float32 rounding (checked against
  nnU-Net's ``resample_data_or_seg``: max difference 6e-7) at 12 instead of 64 taps per voxel for
  cubic splines: 256^3 -> 270x278x240 takes 2.9 CPU-s per case instead of 10.4.
* Anisotropic data (max/min spacing > threshold, default 3): the low-resolution axis is resampled
  separately - in-plane per slice with the normal order, then along that axis with ``order_z``
  (nnU-Net's default 0: nearest slice), because interpolating across thick slices smears structures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.ndimage import affine_transform, find_objects, spline_filter1d

ANISOTROPY_THRESHOLD = 3.0


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's rounding: round(shape * spacing / new_spacing), at least 1 voxel."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def separate_z_axis(current_spacing: Sequence[float], new_spacing: Sequence[float],
                    threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis to resample on its own (nnU-Net's rule), or None.

    The current spacing decides first, then the target; the low-resolution axis must be unique
    (spacings like (0.24, 1.25, 1.25) have two coarse axes and are resampled jointly).
    """
    for spacing in (current_spacing, new_spacing):
        spacing = np.asarray(spacing, dtype=float)
        if spacing.max() / spacing.min() > threshold:
            axes = np.flatnonzero(spacing == spacing.max())
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _grid(n_in: int, n_out: int) -> tuple[float, float]:
    """(scale, offset): output index o samples input coordinate scale * o + offset."""
    scale = n_in / n_out
    return scale, 0.5 * scale - 0.5


# scipy prefilters a 'nearest'-mode spline on the input edge-padded by 12 voxels (_prepad_for_spline_filter)
SPLINE_PAD = 12


@lru_cache(maxsize=256)
def _axis_weights(n_in: int, n_out: int, order: int) -> sparse.csr_matrix:
    """The interpolation matrix of one axis, exactly as scipy.ndimage evaluates it.

    Order <= 1: (n_out, n_in), applied to the samples. Order > 1: (n_out, n_in + 2 * SPLINE_PAD),
    applied to the spline coefficients of the edge-padded axis, as ``affine_transform`` does.
    Column i is scipy's own response to a unit impulse at i, so applying these along each axis in
    turn reproduces ``affine_transform`` with a diagonal matrix: a tensor-product spline is
    separable, and so are its prefilter and padding.
    """
    scale, off = _grid(n_in, n_out)
    pad = SPLINE_PAD if order > 1 else 0
    n = n_in + 2 * pad
    columns = np.empty((n_out, n), dtype=np.float64)
    impulse = np.zeros(n)
    for i in range(n):
        impulse[i] = 1.0
        columns[:, i] = affine_transform(impulse, [scale], off + pad, output_shape=(n_out,), order=order,
                                         mode="nearest", prefilter=False)
        impulse[i] = 0.0
    columns[np.abs(columns) < 1e-12] = 0.0
    return sparse.csr_matrix(columns.astype(np.float32))


def _along(weights: sparse.csr_matrix, x: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(x, axis, 0)
    flat = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
    out = np.asarray(weights @ flat, dtype=np.float32).reshape((weights.shape[0], *moved.shape[1:]))
    return np.moveaxis(out, 0, axis)


def _zoom(vol: np.ndarray, full_in: Sequence[int], full_out: Sequence[int], order: int,
          in_lo: Sequence[int], out_lo: Sequence[int], out_len: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    """Resample `vol` (a crop of a full_in volume starting at in_lo) along `axes` only.

    Returns the region of the full_out result starting at out_lo with out_len voxels on the
    resampled axes; the other axes are kept as they are. One axis at a time (separable): a cubic
    spline costs 3 x 4 taps per voxel instead of the 4^3 of ``affine_transform``, same values to
    float32 rounding.
    """
    out = vol.astype(np.float32, copy=False)
    if order == 0:
        for d in axes:  # nearest: index arithmetic, no rounding surprises at .5
            scale, off = _grid(full_in[d], full_out[d])
            idx = np.floor(scale * (np.arange(out_len[d]) + out_lo[d]) + off + 0.5).astype(np.int64) - in_lo[d]
            out = np.take(out, np.clip(idx, 0, vol.shape[d] - 1), axis=d)
        return out
    if order > 1 and (any(in_lo[d] for d in axes) or any(vol.shape[d] != full_in[d] for d in axes)):
        raise ValueError("spline orders above 1 need the whole axis (the prefilter is global)")
    # shrink first: later passes then run over fewer voxels
    for d in sorted(axes, key=lambda d: full_out[d] / full_in[d]):
        weights = _axis_weights(int(full_in[d]), int(full_out[d]), order)
        if order > 1:
            widths = [(SPLINE_PAD, SPLINE_PAD) if a == d else (0, 0) for a in range(out.ndim)]
            out = spline_filter1d(np.pad(out, widths, mode="edge"), order, axis=d, output=np.float32, mode="nearest")
            weights = weights[out_lo[d]:out_lo[d] + out_len[d]]
        else:
            weights = weights[out_lo[d]:out_lo[d] + out_len[d], in_lo[d]:in_lo[d] + vol.shape[d]]
        out = _along(weights, out, d)
    return np.ascontiguousarray(out)


def _resample_region(vol: np.ndarray, full_in: Sequence[int], full_out: Sequence[int], order: int,
                     axis: int | None, order_z: int, in_lo: Sequence[int], out_lo: Sequence[int],
                     out_len: Sequence[int]) -> np.ndarray:
    """One spatial volume (or a crop of it) to the matching output region, jointly or z-separately."""
    dims = list(range(vol.ndim))
    changed = [d for d in dims if full_in[d] != full_out[d]]
    if axis is None or axis not in changed:
        return _zoom(vol, full_in, full_out, order, in_lo, out_lo, out_len, changed)
    plane = [d for d in changed if d != axis]
    if plane:
        slices = []
        for k in range(vol.shape[axis]):  # per slice: no interpolation across thick slices
            sl = np.take(vol, k, axis=axis)
            sub = [d if d < axis else d - 1 for d in plane]
            f_in = [full_in[d] for d in dims if d != axis]
            f_out = [full_out[d] for d in dims if d != axis]
            i_lo = [in_lo[d] for d in dims if d != axis]
            o_lo = [out_lo[d] for d in dims if d != axis]
            o_len = [out_len[d] for d in dims if d != axis]
            slices.append(_zoom(sl, f_in, f_out, order, i_lo, o_lo, o_len, sub))
        vol = np.stack(slices, axis=axis)
    return _zoom(vol, full_in, full_out, order_z, in_lo, out_lo, out_len, [axis])


def resample_image(data: np.ndarray, new_shape: Sequence[int], order: int = 3, axis: int | None = None,
                   order_z: int = 0) -> np.ndarray:
    """(C, *spatial) float -> float32 (C, *new_shape). `axis`: see `separate_z_axis`."""
    new_shape = tuple(int(s) for s in new_shape)
    spatial = data.shape[1:]
    if tuple(spatial) == new_shape:
        return data.astype(np.float32, copy=True)
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    zeros = [0] * len(spatial)
    for c in range(data.shape[0]):
        out[c] = _resample_region(data[c], spatial, new_shape, order, axis, order_z, zeros, zeros, new_shape)
    return out


def _out_range(b0: int, b1: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Output indices whose sample can see input voxels [b0, b1) under linear/nearest interpolation."""
    scale, off = _grid(n_in, n_out)
    lo = 0 if b0 == 0 else max(0, math.floor((b0 - 1 - off) / scale))
    hi = n_out if b1 == n_in else min(n_out, math.ceil((b1 - off) / scale) + 1)
    return lo, max(hi, lo + 1)


def _in_range(o0: int, o1: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Input voxels that samples o0..o1-1 read under linear/nearest interpolation."""
    scale, off = _grid(n_in, n_out)
    lo = math.floor(scale * o0 + off) - 1
    hi = math.ceil(scale * (o1 - 1) + off) + 2
    return max(0, lo), min(n_in, hi)


def _nearest_output(x: float, n_in: int, n_out: int) -> int:
    """The output index whose sample lies nearest input coordinate x."""
    scale, off = _grid(n_in, n_out)
    return min(n_out - 1, max(0, int(round((x - off) / scale))))


def resample_label(label: np.ndarray, new_shape: Sequence[int], order: int = 1, axis: int | None = None,
                   order_z: int = 0) -> np.ndarray:
    """Contiguous class indices (*spatial) -> (*new_shape), same dtype; one-hot, argmax, rescue.

    Each class is resampled only inside its bounding box (plus the interpolation footprint), so
    41 TotalSegmentator classes cost about as much as the volume once. Background is never
    resampled: with order <= 1 the weights sum to one, so its weight is 1 - sum(foreground).
    """
    new_shape = tuple(int(s) for s in new_shape)
    shape = label.shape
    if tuple(shape) == new_shape:
        return label.copy()
    if order > 1 or (axis is not None and order_z > 1):
        raise ValueError("label resampling supports order <= 1 (weights must sum to one)")
    if label.size and int(label.min()) < 0:
        raise ValueError("label indices must be non-negative")
    best = np.zeros(new_shape, dtype=np.float32)  # highest foreground weight so far
    total = np.zeros(new_shape, dtype=np.float32)  # sum of foreground weights
    winner = np.zeros(new_shape, dtype=label.dtype)
    peaks: dict[int, tuple[float, tuple[int, ...]]] = {}
    boxes = find_objects(label.astype(np.int32, copy=False)) if label.size else []
    for c, box in enumerate(boxes, start=1):
        if box is None:
            continue
        out_lo, out_hi, in_lo, in_hi = [], [], [], []
        for d, sl in enumerate(box):
            if shape[d] == new_shape[d]:  # axis not resampled: output region = input box
                o0, o1 = i0, i1 = sl.start, sl.stop
            else:
                o0, o1 = _out_range(sl.start, sl.stop, shape[d], new_shape[d])
                i0, i1 = _in_range(o0, o1, shape[d], new_shape[d])
            out_lo.append(o0), out_hi.append(o1), in_lo.append(i0), in_hi.append(i1)
        crop = tuple(slice(a, b) for a, b in zip(in_lo, in_hi))
        mask = (label[crop] == c).astype(np.float32)
        out_len = [b - a for a, b in zip(out_lo, out_hi)]
        weight = _resample_region(mask, shape, new_shape, order, axis, order_z, in_lo, out_lo, out_len)
        region = tuple(slice(a, b) for a, b in zip(out_lo, out_hi))
        total[region] += weight
        wins = (weight >= best[region]) & (weight > 0)  # ties: the higher class, as nnU-Net's overwrite order
        best[region][wins] = weight[wins]
        winner[region][wins] = c
        flat = int(np.argmax(weight))
        peak = float(weight.flat[flat])
        if peak > 0:
            pos = tuple(int(i) + o for i, o in zip(np.unravel_index(flat, weight.shape), out_lo))
        else:  # thinner than the sample spacing: the output voxel nearest the box centre
            pos = tuple(_nearest_output((sl.start + sl.stop - 1) / 2, shape[d], n) for d, (sl, n) in enumerate(zip(box, new_shape)))
        peaks[c] = (peak, pos)
    fg = (best > 0) & (best >= 1.0 - total)  # a tie with background goes to the class (nnU-Net: >= 0.5)
    out = np.where(fg, winner, np.zeros((), dtype=label.dtype)).astype(label.dtype, copy=False)
    present = np.bincount(out.ravel(), minlength=len(boxes) + 1) if out.size else np.zeros(1, int)
    for c in sorted((c for c in peaks if present[c] == 0), key=lambda c: peaks[c][0]):
        out[peaks[c][1]] = c  # rescue: a class in the input is never dropped
    return out
