"""Sliding-window inference: window placement, Gaussian weighting, mirroring TTA, Zarr accumulation,
and the whole path from raw NIfTI files to label maps in the input's exact geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import zarr

from pipeline.inference import (
    compute_steps,
    gaussian_importance_map,
    mirror_axes_combinations,
    sliding_window_predict,
    window_slices,
)

torch.set_num_threads(1)


class ThresholdNet(torch.nn.Module):
    """A position-wise 'segmenter': class k where the first channel lies in [k, k+1). Any window
    misplaced, missed or mis-weighted shows up as wrong voxels in the result."""

    def __init__(self, num_classes: int = 3, dims: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.scale = torch.nn.Parameter(torch.tensor(8.0))  # a parameter, so the device is known

    def forward(self, x):
        label = x[:, 0].floor().clamp(0, self.num_classes - 1).long()
        return torch.nn.functional.one_hot(label, self.num_classes).movedim(-1, 1).float() * self.scale


def _volume(shape, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, size=shape)
    image = (label + rng.uniform(0.05, 0.95, size=shape)).astype(np.float32)[None]
    return image, label


def _conv_net(dims: int, channels: int, classes: int, symmetric: bool, seed: int = 0):
    torch.manual_seed(seed)
    conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(channels, classes, 3, padding=1)
    if symmetric:  # a kernel equal to all its mirror images makes the net mirror-equivariant
        with torch.no_grad():
            w = conv.weight
            axes = range(2, 2 + dims)
            conv.weight.copy_(sum(torch.flip(w, c) for r in range(dims + 1) for c in itertools.combinations(axes, r)))
    return conv


# ---------------------------------------------------------------- window geometry


def test_steps_follow_nnunet_rule():
    # nnU-Net's own example: 110 voxels, patch 64, step 0.5 -> starts 0, 23, 46
    assert compute_steps([110], [64], 0.5) == [[0, 23, 46]]
    assert compute_steps([64, 65, 128], [64, 64, 64], 0.5) == [[0], [0, 1], [0, 32, 64]]
    with pytest.raises(ValueError):
        compute_steps([10], [16], 0.5)


def test_windows_cover_every_voxel_with_half_patch_overlap():
    spatial, patch = (37, 50, 29), (16, 24, 16)
    cover = np.zeros(spatial, dtype=int)
    for w in window_slices(spatial, patch, 0.5):
        assert [s.stop - s.start for s in w] == list(patch)
        cover[w] += 1
    assert cover.min() >= 1
    starts = compute_steps(spatial, patch, 0.5)
    assert all(np.diff(s).max() <= p // 2 + 1 for s, p in zip(starts, patch))


def test_2d_windows_slide_over_every_slice_of_the_first_axis():
    windows = window_slices((5, 40, 30), (32, 16), 0.5)
    assert sorted({w[0] for w in windows}) == list(range(5))
    assert len(windows) == 5 * 2 * 3


def test_gaussian_map_is_peaked_symmetric_positive_with_sigma_an_eighth_of_the_patch():
    patch = (32, 48, 40)
    g = gaussian_importance_map(patch)
    assert g.shape == patch and g.dtype == np.float32
    centre = tuple(p // 2 for p in patch)
    assert g[centre] == pytest.approx(1.0) and g.max() == pytest.approx(1.0)
    assert g.min() > 0
    # sigma = patch / 8 along each axis: one sigma from the centre the weight is exp(-1/2)
    for axis, p in enumerate(patch):
        off = list(centre)
        off[axis] += p // 8
        assert g[tuple(off)] == pytest.approx(np.exp(-0.5), rel=1e-4)
    # symmetric about the centre (patch sizes even: compare the part that has a mirror image)
    inner = g[1:, 1:, 1:]
    for axes in [(0,), (1,), (2,), (0, 1, 2)]:
        np.testing.assert_allclose(inner, np.flip(inner, axes), rtol=1e-5)
    assert not g.flags.writeable


def test_mirror_combinations():
    assert len(mirror_axes_combinations(3)) == 8 and mirror_axes_combinations(3)[0] == ()
    assert len(mirror_axes_combinations(2)) == 4
    assert set(mirror_axes_combinations(2)) == {(), (2,), (3,), (2, 3)}


# ---------------------------------------------------------------- sliding window


@pytest.mark.parametrize("accumulate", ["memory", "zarr"])
def test_sliding_window_reproduces_a_positionwise_segmentation_exactly(accumulate, tmp_path):
    image, label = _volume((37, 45, 29))  # no axis divisible by the patch
    probs = sliding_window_predict(ThresholdNet(), torch.from_numpy(image), (16, 24, 12), 3, tta_mirror=True,
                                   batch_size=3, accumulate=accumulate, zarr_dir=tmp_path)
    probs = np.asarray(probs[...])
    assert probs.shape == (3, 37, 45, 29)
    np.testing.assert_array_equal(probs.argmax(0), label)
    # every window agrees on every voxel, so the Gaussian-weighted mean is that softmax exactly
    expected = torch.softmax(torch.nn.functional.one_hot(torch.from_numpy(label), 3).movedim(-1, 0).float() * 8, 0)
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_image_smaller_than_the_patch_is_padded_and_cropped_back():
    image, label = _volume((10, 30, 7), seed=1)
    probs = sliding_window_predict(ThresholdNet(), image, (16, 24, 12), 3, tta_mirror=False)
    assert probs.shape == (3, 10, 30, 7)
    np.testing.assert_array_equal(probs.argmax(0), label)


def test_2d_patch_predicts_slice_by_slice():
    image, label = _volume((6, 41, 23), seed=2)
    probs = sliding_window_predict(ThresholdNet(dims=2), image, (16, 16), 3, tta_mirror=True, batch_size=4)
    assert probs.shape == (3, 6, 41, 23)
    np.testing.assert_array_equal(probs.argmax(0), label)


def test_tta_of_a_mirror_equivariant_net_equals_no_tta():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 30, 26, 21)).astype(np.float32)
    net = _conv_net(3, 2, 4, symmetric=True)
    with_tta = sliding_window_predict(net, image, (16, 16, 16), 4, tta_mirror=True)
    without = sliding_window_predict(net, image, (16, 16, 16), 4, tta_mirror=False)
    np.testing.assert_allclose(with_tta, without, atol=1e-5)


@pytest.mark.parametrize("dims", [3, 2])
def test_tta_averages_the_softmax_over_all_mirrorings(dims):
    rng = np.random.default_rng(4)
    patch = (12,) * dims
    image = rng.normal(size=(1, *patch)).astype(np.float32) if dims == 3 else rng.normal(size=(1, 1, *patch)).astype(np.float32)
    net = _conv_net(dims, 1, 3, symmetric=False)
    got = sliding_window_predict(net, image, patch, 3, tta_mirror=True)
    x = torch.from_numpy(image if dims == 3 else image[:, 0])[None]
    combos = mirror_axes_combinations(dims)
    with torch.no_grad():
        expected = sum(torch.flip(torch.softmax(net(torch.flip(x, c)), 1), c) for c in combos) / len(combos)
        plain = torch.softmax(net(x), 1)
    expected = expected[0].numpy() if dims == 3 else expected[0].numpy()[:, None]
    np.testing.assert_allclose(got, expected, atol=1e-6)  # one window: the Gaussian weight cancels
    assert not np.allclose(got, plain[0].numpy() if dims == 3 else plain[0].numpy()[:, None], atol=1e-3)


def test_zarr_accumulation_equals_memory_accumulation(tmp_path):
    rng = np.random.default_rng(5)
    image = rng.normal(size=(1, 35, 28, 19)).astype(np.float32)
    net = _conv_net(3, 1, 3, symmetric=False)
    mem = sliding_window_predict(net, image, (16, 16, 8), 3, accumulate="memory", tta_mirror=False)
    disk = sliding_window_predict(net, image, (16, 16, 8), 3, accumulate="auto", zarr_threshold_bytes=0,
                                  zarr_dir=tmp_path, tta_mirror=False)
    assert isinstance(disk, zarr.Array) and isinstance(mem, np.ndarray)
    np.testing.assert_allclose(disk[...], mem, rtol=1e-6, atol=1e-7)
    assert len(list(tmp_path.iterdir())) == 1
    del disk
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []  # the temporary array goes with its last reference
