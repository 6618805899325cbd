"""On-the-fly training augmentation: nnU-Net v2's default pipeline as batched torch operations.

Array-level functions (one per transform, explicit per-sample parameters, no randomness inside
except noise tensors) and `Augmenter`, which draws the parameters from a `numpy.random.Generator`
and applies them to a batch: image (B, C, *spatial) float, label (B, *spatial) integer; numpy or
torch in, the same kind out. `augment_sample` does one (C, *spatial), (*spatial) pair.

Order and defaults follow nnU-Net's `get_training_transforms`: rotation+scaling (one affine grid,
`grid_sample`: linear for the image, nearest for the label) -> Gaussian noise -> Gaussian blur ->
multiplicative brightness -> contrast -> simulated low resolution -> inverted gamma -> gamma ->
mirroring. Factors around 1 are drawn like nnU-Net's BGContrast: below or above 1 with equal odds.

Spatial border choice: nnU-Net crops a larger patch (`initial_patch_size`) so that rotated/zoomed
samples have real data in their corners. `Augmenter(patch_size=...)` does the same when given the
larger input (the output is the centred `patch_size`); given an input of the final size it
transforms the patch itself, and corners that come from outside read as 0 in the image (the
normalised intensity mean) and background in the label. Only the ~36% of samples that are rotated
or scaled are resampled at all; the rest are sliced.

Performance on few CPU cores: transforms run in place on views of the selected samples (Python loops
are per sample, never per voxel); rotation/scaling of all drawn samples is one grid_sample call.
Run it with `torch.set_num_threads(1)` in data-loading workers: on 2 shared cores a batch of 7
hippocampus patches took ~75 ms on one thread and twice that on two (benchmarks/train_step.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Range = tuple[float, float]


@dataclass
class AugmentationConfig:
    """Probabilities are per sample (per channel where noted); defaults are nnU-Net v2's (3d)."""

    p_rotation: float = 0.2
    rotation_degrees: Range = (-30.0, 30.0)  # about every axis (3d), the one axis (2d / dummy 2d)
    p_scale: float = 0.2
    scale_range: Range = (0.7, 1.4)  # multiplies sampling coordinates: < 1 zooms in; same for all axes
    p_noise: float = 0.1
    noise_std: Range = (0.0, 0.1)  # nnU-Net names it 'variance' but draws the standard deviation from it
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    blur_sigma: Range = (0.5, 1.0)  # drawn per channel and axis
    p_brightness: float = 0.15
    brightness_range: Range = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: Range = (0.75, 1.25)
    p_lowres: float = 0.25
    p_lowres_per_channel: float = 0.5
    lowres_zoom: Range = (0.5, 1.0)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma_range: Range = (0.7, 1.5)
    p_mirror: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] | None = None  # spatial axes; None = all
    dummy_2d: bool = False  # anisotropic 3d: rotate/scale in the plane of the last two axes, keep axis 0's resolution

    @classmethod
    def light(cls) -> AugmentationConfig:
        """Mirroring only: the cheap preset for lean CPU runs."""
        return cls(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
                   p_gamma=0, p_gamma_inverted=0)

    @classmethod
    def for_patch(cls, patch_size: Sequence[int], preset: str = "nnunet") -> AugmentationConfig:
        """nnU-Net's per-configuration choices (`configure_rotation_dummyDA_mirroring_and_inital_patch_size`).

        2d: +-180 degrees, or +-15 when the patch is elongated (aspect > 1.5). 3d: +-30 degrees about every
        axis, unless the patch is anisotropic (largest / first axis > 3): then 'dummy 2d', +-180 in-plane.
        `preset="light"` returns mirroring only.
        """
        if preset == "light":
            return cls.light()
        if preset != "nnunet":
            raise ValueError(f"unknown augmentation preset {preset!r} (nnunet | light)")
        patch = list(patch_size)
        if len(patch) == 2:
            deg = 15.0 if max(patch) / min(patch) > 1.5 else 180.0
            return cls(rotation_degrees=(-deg, deg))
        if max(patch) / patch[0] > 3:
            return cls(rotation_degrees=(-180.0, 180.0), dummy_2d=True)
        return cls()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> AugmentationConfig:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


# --------------------------------------------------------------------------------------------------
# Geometry helpers


def rotation_matrix(angles_rad: Sequence[float], dims: int) -> np.ndarray:
    """dims x dims rotation in spatial axis order; 3d composes rotations about axes 0, 1, 2 (Rz Ry Rx)."""
    if dims == 2:
        (a,) = angles_rad
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def initial_patch_size(patch_size: Sequence[int], config: AugmentationConfig) -> list[int]:
    """The patch to crop before augmenting so a rotated/zoomed-in `patch_size` stays inside real data.

    nnU-Net's `get_patch_size`: the bounding box of the patch's corner vector rotated by the largest
    angle about each axis (capped at 90 degrees), divided by the smallest scale.
    """
    patch = np.asarray(patch_size, dtype=float)
    if config.p_rotation <= 0 and config.p_scale <= 0:
        return [int(p) for p in patch_size]
    rot = math.radians(min(90.0, max(abs(a) for a in config.rotation_degrees))) if config.p_rotation > 0 else 0.0
    min_scale = min(config.scale_range) if config.p_scale > 0 else 1.0
    plane = patch[1:] if (config.dummy_2d and len(patch) == 3) else patch
    final = plane.copy()
    if len(plane) == 2:
        final = np.maximum(final, np.abs(rotation_matrix([rot], 2) @ plane))
    else:
        for axis in range(3):
            angles = [0.0, 0.0, 0.0]
            angles[axis] = rot
            final = np.maximum(final, np.abs(rotation_matrix(angles, 3) @ plane))
    final = final / min_scale
    out = final.astype(int).tolist()
    return [int(patch[0])] + out if len(plane) != len(patch) else out


# --------------------------------------------------------------------------------------------------
# Array-level transforms. Intensity transforms take one sample (C, *sp) with per-channel parameters
# and work in place (trailing underscore): on few cores, fresh allocations and advanced indexing
# cost more than the arithmetic, so the composer hands them views of the batch.


def _per_channel(v, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def spatial_transform(image: torch.Tensor, label: torch.Tensor | None, matrices: torch.Tensor,
                      out_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample a batch through per-sample linear maps about the patch centre.

    `matrices` (B, d, d), spatial axis order, voxel units: an output voxel at offset p from the output
    centre reads the input at offset M p from the input centre (so a larger input is centre-cropped).
    Image (B, C, *sp): (tri)linear, zeros outside; label (B, *sp): nearest, background outside.
    """
    dims = image.ndim - 2
    in_shape = torch.tensor(image.shape[2:], dtype=torch.float64)
    out = torch.tensor([float(s) for s in out_shape], dtype=torch.float64)
    m = torch.as_tensor(matrices, dtype=torch.float64)
    # affine_grid works in normalised coordinates with the axes reversed (x = last axis): conjugate M into that frame
    theta_sp = torch.diag(2.0 / in_shape) @ m @ torch.diag(out / 2.0)
    rev = list(range(dims))[::-1]
    theta = theta_sp[:, rev][:, :, rev]
    theta = torch.cat([theta, torch.zeros(theta.shape[0], dims, 1, dtype=theta.dtype)], 2).to(torch.float32)
    grid = F.affine_grid(theta, [image.shape[0], 1, *[int(s) for s in out_shape]], align_corners=False)
    image_out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    label_out = None
    if label is not None:
        lab = F.grid_sample(label.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        label_out = lab[:, 0].round_().to(label.dtype)
    return image_out, label_out


def center_crop(x: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """The centred `out_shape` window of the trailing axes (a view; same centre as `spatial_transform`)."""
    d = len(out_shape)
    lo = [(n - m) // 2 for n, m in zip(x.shape[-d:], out_shape)]
    return x[(...,) + tuple(slice(a, a + m) for a, m in zip(lo, out_shape))]


def gaussian_noise_(image: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std) noise to every voxel of a sample, all channels alike."""
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
    return image.add_(noise, alpha=float(std))


def gaussian_blur(rows: torch.Tensor, sigmas) -> torch.Tensor:
    """Separable Gaussian blur of rows (M, *sp), each with its own sigma per axis (sigmas (M, d)).

    One grouped convolution per axis; kernels truncated at 4 sigma (scipy's default), edges replicated.
    """
    dims = rows.ndim - 1
    conv = F.conv3d if dims == 3 else F.conv2d
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    m = rows.shape[0]
    x = rows.unsqueeze(0)  # (1, M, *sp): rows are the channels of one grouped conv
    for axis in range(dims):
        s = sigmas[:, axis]
        radius = min(int(4 * float(s.max()) + 0.5), x.shape[2 + axis] - 1)
        if radius <= 0:
            continue
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (offsets[None] / s[:, None]) ** 2)
        k = (k / k.sum(1, keepdim=True)).to(rows.dtype)
        shape = [m, 1] + [1] * dims
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), k.reshape(shape), groups=m)
    return x[0]


def multiplicative_brightness_(image: torch.Tensor, factors) -> torch.Tensor:
    """Scale each channel of a sample (C, *sp) by its factor (C,)."""
    return image.mul_(_per_channel(factors, image))


def contrast_(image: torch.Tensor, factors) -> torch.Tensor:
    """Stretch each channel about its mean by its factor (C,), clipped to the channel's original range."""
    flat = image.flatten(1)
    mean = _per_channel(flat.mean(1), image)
    lo, hi = _per_channel(flat.amin(1), image), _per_channel(flat.amax(1), image)
    image.sub_(mean).mul_(_per_channel(factors, image)).add_(mean)
    return torch.clamp(image, lo, hi, out=image)


def gamma(rows: torch.Tensor, gammas, invert: bool = False, retain_stats: bool = True) -> torch.Tensor:
    """Gamma on each row (M, *sp) rescaled to [0, 1], then back; mean and std kept (nnU-Net's GammaTransform)."""
    x = rows.flatten(1)
    if invert:
        x = -x
    mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True)
    lo = x.amin(1, keepdim=True)
    span = x.amax(1, keepdim=True) - lo
    x = ((x - lo) / span.clamp(min=1e-7)).pow_(torch.as_tensor(gammas, dtype=x.dtype)[:, None]).mul_(span).add_(lo)
    if retain_stats:
        x = (x - x.mean(1, keepdim=True)).mul_(std / x.std(1, keepdim=True).clamp(min=1e-7)).add_(mean)
    if invert:
        x = x.neg_()
    return x.reshape(rows.shape)


def simulate_low_resolution(volume: torch.Tensor, zoom: float, ignore_axes: Sequence[int] = ()) -> torch.Tensor:
    """One (*sp) volume downsampled by `zoom` (nearest) and back up (linear): nnU-Net's low-res simulation."""
    shape = tuple(volume.shape)
    small = [s if a in ignore_axes else max(1, round(s * zoom)) for a, s in enumerate(shape)]
    x = F.interpolate(volume[None, None], size=small, mode="nearest-exact")
    x = F.interpolate(x, size=shape, mode="trilinear" if volume.ndim == 3 else "bilinear", align_corners=False)
    return x[0, 0]


def mirror(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Flip along the given axes (use negative indices for trailing spatial axes): an involution."""
    return torch.flip(x, dims=tuple(axes)) if len(axes) else x


# --------------------------------------------------------------------------------------------------
# Composition


def _bg_factor(rng: np.random.Generator, lo_hi: Range, size) -> np.ndarray:
    """nnU-Net's BGContrast: half the draws below 1 (from lo..1), half above (1..hi), when the range straddles 1."""
    lo, hi = lo_hi
    below = rng.uniform(lo, min(1.0, hi), size)
    above = rng.uniform(max(1.0, lo), hi, size)
    pick_below = (rng.random(size) < 0.5) & (lo < 1)
    return np.where(pick_below, below, above)


class Augmenter:
    """Draws nnU-Net's augmentation parameters from `rng` and applies them to a batch.

    Call with image (B, C, *sp) and label (B, *sp), (B, 1, *sp) or None; numpy or torch (the same kind
    comes back; the image as float32, the label in its dtype; inputs are never modified).
    `patch_size`: the output's spatial shape, inputs may be larger (see module docstring); None: the
    input's shape. `config=None` disables augmentation (validation): inputs pass through, centre-cropped
    if larger than `patch_size`. The same rng state gives the same output.
    """

    def __init__(self, config: AugmentationConfig | None, patch_size: Sequence[int] | None = None):
        self.config = config
        self.patch_size = None if patch_size is None else [int(p) for p in patch_size]

    def __call__(self, image, label, rng: np.random.Generator):
        as_numpy = isinstance(image, np.ndarray)
        if as_numpy:  # torch cannot wrap negative strides (np.flip views)
            image, label = np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)
        image_t = torch.as_tensor(image)
        label_t = None if label is None else torch.as_tensor(label)
        squeeze = label_t is not None and label_t.ndim == image_t.ndim  # (B, 1, *sp) label
        if squeeze:
            label_t = label_t[:, 0]
        image_t, label_t = self._apply(image_t, label_t, rng)
        if squeeze:
            label_t = label_t[:, None]
        if as_numpy:
            return image_t.numpy(), None if label_t is None else label_t.numpy()
        return image_t, label_t

    def augment_sample(self, image, label, rng: np.random.Generator):
        """One sample: image (C, *sp), label (*sp) or None."""
        out_image, out_label = self(image[None], None if label is None else label[None], rng)
        return out_image[0], None if out_label is None else out_label[0]

    # ----------------------------------------------------------------------------------------------

    def _apply(self, image: torch.Tensor, label: torch.Tensor | None, rng: np.random.Generator):
        c = self.config
        b, channels = image.shape[:2]
        dims = image.ndim - 2
        out_shape = self.patch_size or list(image.shape[2:])
        if len(out_shape) != dims:
            raise ValueError(f"patch size {out_shape} does not match the {dims} spatial axes of image {tuple(image.shape)}")
        if any(o > i for o, i in zip(out_shape, image.shape[2:])):
            raise ValueError(f"input {tuple(image.shape[2:])} is smaller than the patch {out_shape}")
        if label is not None and tuple(label.shape) != (b, *image.shape[2:]):
            raise ValueError(f"label {tuple(label.shape)} does not match image {tuple(image.shape)}")
        if c is None:
            return (center_crop(image, out_shape).to(torch.float32, copy=True),
                    None if label is None else center_crop(label, out_shape).clone())
        # the torch draws (noise) are seeded from rng, so one numpy Generator makes the whole call reproducible
        gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))

        image, label = self._spatial(image, label, out_shape, rng)  # fresh float32 tensors from here on
        ch = np.arange(channels)

        for i in np.flatnonzero(rng.random(b) < c.p_noise):
            gaussian_noise_(image[i], rng.uniform(*c.noise_std), gen)

        blur = (rng.random(b) < c.p_blur)[:, None] & (rng.random((b, channels)) < c.p_blur_per_channel)
        for i in np.flatnonzero(blur.any(1)):
            sel = ch[blur[i]]
            rows = image[i, sel] if len(sel) < channels else image[i]
            blurred = gaussian_blur(rows, rng.uniform(*c.blur_sigma, size=(len(sel), dims)))
            if len(sel) < channels:
                image[i, sel] = blurred
            else:
                image[i].copy_(blurred)

        for i in np.flatnonzero(rng.random(b) < c.p_brightness):
            multiplicative_brightness_(image[i], _bg_factor(rng, c.brightness_range, channels))

        for i in np.flatnonzero(rng.random(b) < c.p_contrast):
            contrast_(image[i], _bg_factor(rng, c.contrast_range, channels))

        lowres = (rng.random(b) < c.p_lowres)[:, None] & (rng.random((b, channels)) < c.p_lowres_per_channel)
        ignore = (0,) if (c.dummy_2d and dims == 3) else ()
        for i, j in np.argwhere(lowres):
            image[i, j].copy_(simulate_low_resolution(image[i, j], float(rng.uniform(*c.lowres_zoom)), ignore))

        for p, invert in ((c.p_gamma_inverted, True), (c.p_gamma, False)):
            for i in np.flatnonzero(rng.random(b) < p):
                image[i].copy_(gamma(image[i], _bg_factor(rng, c.gamma_range, channels), invert=invert))

        axes = list(range(dims)) if c.mirror_axes is None else list(c.mirror_axes)
        flips = rng.random((b, dims)) < c.p_mirror
        for i in range(b):
            sel = [a for a in axes if flips[i, a]]
            if sel:
                image[i].copy_(mirror(image[i], [a - dims for a in sel]))
                if label is not None:
                    label[i].copy_(mirror(label[i], [a - dims for a in sel]))
        return image, label

    def _spatial(self, image, label, out_shape, rng):
        """Float32 copies of the output patch; the drawn samples rotated/scaled through one grid_sample call."""
        c = self.config
        b = image.shape[0]
        dims = image.ndim - 2
        do_rot = rng.random(b) < c.p_rotation
        do_scale = rng.random(b) < c.p_scale
        plane_only = c.dummy_2d and dims == 3
        n_angles = 1 if (dims == 2 or plane_only) else 3
        angles = np.radians(rng.uniform(*c.rotation_degrees, size=(b, n_angles)))
        scales = rng.uniform(*c.scale_range, size=b)

        image_out = center_crop(image, out_shape).to(torch.float32, copy=True)
        label_out = None if label is None else center_crop(label, out_shape).clone()
        moved = np.flatnonzero(do_rot | do_scale)
        if len(moved) == 0:
            return image_out, label_out
        mats = []
        for i in moved:
            zoom = scales[i] if do_scale[i] else 1.0
            if plane_only:
                r = np.eye(3)
                r[1:, 1:] = rotation_matrix(angles[i] if do_rot[i] else [0.0], 2)
                s = np.diag([1.0, zoom, zoom])
            else:
                r = rotation_matrix(angles[i] if do_rot[i] else [0.0] * n_angles, dims)
                s = np.eye(dims) * zoom
            mats.append(r @ s)
        src = torch.stack([image[i] for i in moved]).to(torch.float32)
        src_label = None if label is None else torch.stack([label[i] for i in moved])
        new_img, new_lab = spatial_transform(src, src_label, torch.from_numpy(np.stack(mats)), out_shape)
        for j, i in enumerate(moved):
            image_out[i].copy_(new_img[j])
            if label_out is not None:
                label_out[i].copy_(new_lab[j])
        return image_out, label_out

