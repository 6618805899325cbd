"""Augmentation: nnU-Net's transforms, batched; labels stay labels, seeds reproduce, validation passes through."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.training.augmentation import (
    AugmentationConfig,
    Augmenter,
    contrast_,
    gamma,
    gaussian_blur,
    initial_patch_size,
    mirror,
    rotation_matrix,
    simulate_low_resolution,
    spatial_transform,
)

EVERYTHING = AugmentationConfig(p_rotation=1, p_scale=1, p_noise=1, p_blur=1, p_blur_per_channel=1, p_brightness=1,
                                p_contrast=1, p_lowres=1, p_lowres_per_channel=1, p_gamma=1, p_gamma_inverted=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(shape=(4, 2, 12, 16, 10), values=(0, 5, 117), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    label = rng.choice(np.array(values, dtype=np.uint8), size=(shape[0], *shape[2:]))
    return image, label


def test_labels_keep_their_values_under_every_transform():
    image, label = batch()  # non-contiguous values, as TotalSegmentator's before mapping
    out_image, out_label = Augmenter(EVERYTHING)(image, label, np.random.default_rng(0))
    assert out_label.dtype == np.uint8 and set(np.unique(out_label)) <= {0, 5, 117}
    assert out_image.shape == image.shape and out_image.dtype == np.float32 and np.isfinite(out_image).all()


def test_real_hippocampus_case_keeps_its_labels(hippocampus):
    from pipeline.data.dataset import load_dataset, read_case

    dataset = load_dataset(hippocampus)
    case = read_case(dataset, dataset.case_ids[0])
    config = AugmentationConfig.for_patch(case.label.shape)
    for seed in range(3):
        image, label = Augmenter(config).augment_sample(case.image, case.label, np.random.default_rng(seed))
        assert image.shape == case.image.shape and set(np.unique(label)) <= set(np.unique(case.label))


def test_same_seed_same_output_other_seed_other_output():
    image, label = batch()
    aug = Augmenter(EVERYTHING)
    a = aug(image, label, np.random.default_rng(7))
    b = aug(image, label, np.random.default_rng(7))
    c = aug(image, label, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


def test_disabled_augmentation_returns_the_input_untouched():
    image, label = batch()
    kept = image.copy(), label.copy()
    out_image, out_label = Augmenter(None)(image, label, np.random.default_rng(0))
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)
    out_image[:] = 0
    assert np.array_equal(image, kept[0]) and np.array_equal(label, kept[1])  # copies, not views


def test_inputs_are_never_modified_and_torch_stays_torch():
    image, label = batch()
    t_image, t_label = torch.from_numpy(image.copy()), torch.from_numpy(label.copy())
    out_image, out_label = Augmenter(EVERYTHING)(t_image, t_label[:, None], np.random.default_rng(0))
    assert isinstance(out_image, torch.Tensor) and out_label.shape == (4, 1, 12, 16, 10)
    assert np.array_equal(t_image.numpy(), image) and np.array_equal(t_label.numpy(), label)


def test_light_preset_only_mirrors():
    image, label = batch(seed=3)
    out_image, out_label = Augmenter(AugmentationConfig.light())(image, label, np.random.default_rng(1))
    flipped_any = False
    for i in range(len(image)):
        matches = [axes for n in range(4) for axes in itertools.combinations((-3, -2, -1), n)
                   if np.array_equal(np.flip(image[i], axes), out_image[i])
                   and np.array_equal(np.flip(label[i], axes), out_label[i])]
        assert matches, f"sample {i} is not a mirror image of the input"
        flipped_any |= matches[0] != ()
    assert flipped_any


def test_mirroring_is_an_involution():
    image = torch.randn(2, 1, 5, 6, 7)
    for axes in ([-1], [-3, -1], [-3, -2, -1]):
        assert torch.equal(mirror(mirror(image, axes), axes), image)
        assert not torch.equal(mirror(image, axes), image)


def test_identity_matrix_resamples_to_the_input_and_crops_larger_inputs_centrally():
    image, label = (torch.from_numpy(a) for a in batch((2, 1, 12, 16, 10)))
    eye = torch.eye(3).expand(2, 3, 3)
    out_image, out_label = spatial_transform(image, label, eye, (12, 16, 10))
    assert torch.allclose(out_image, image, atol=1e-5) and torch.equal(out_label, label)
    out_image, out_label = spatial_transform(image, label, eye, (6, 8, 4))
    assert torch.allclose(out_image, image[..., 3:9, 4:12, 3:7], atol=1e-5)
    assert torch.equal(out_label, label[..., 3:9, 4:12, 3:7])


def test_quarter_turns_equal_rot90_on_non_cubic_patches():
    """Exact voxel permutations check the axis order and the normalised-coordinate conjugation."""
    image, label = (torch.from_numpy(a) for a in batch((1, 1, 4, 8, 6)))
    m = np.eye(3)
    m[1:, 1:] = rotation_matrix([np.pi / 2], 2)  # in the plane of the last two axes: 8 x 6 -> 6 x 8
    out_image, out_label = spatial_transform(image, label, torch.from_numpy(m)[None], (4, 6, 8))
    assert torch.allclose(out_image, torch.rot90(image, -1, dims=(3, 4)), atol=1e-5)
    assert torch.equal(out_label, torch.rot90(label, -1, dims=(2, 3)))
    m = rotation_matrix([0, 0, np.pi / 2], 3)  # about the last axis: 4 x 8 -> 8 x 4
    out_image, _ = spatial_transform(image, None, torch.from_numpy(m)[None], (8, 4, 6))
    assert torch.allclose(out_image, torch.rot90(image, -1, dims=(2, 3)), atol=1e-5)


def test_scale_below_one_zooms_in():
    image = torch.zeros(1, 1, 17, 17, 17)
    image[..., 6:11, 6:11, 6:11] = 1  # a 5-voxel cube in the middle
    out, _ = spatial_transform(image, None, torch.eye(3)[None] * 0.5, (17, 17, 17))
    assert (out > 0.5).sum() == pytest.approx(10**3, rel=0.35)


def test_blur_matches_scipy_with_per_axis_sigmas():
    x = torch.randn(2, 9, 10, 11)
    sig = np.array([[0.5, 0.8, 1.0], [1.0, 0.6, 0.7]])
    out = gaussian_blur(x, torch.from_numpy(sig))
    for row in range(2):
        ref = ndimage.gaussian_filter(x[row].numpy(), sig[row], mode="nearest", truncate=4.0)
        assert np.allclose(out[row].numpy(), ref, atol=2e-3)


def test_intensity_transforms_keep_what_nnunet_keeps():
    x = torch.randn(2, 8, 8, 8) * 3 + 1
    lo, hi = x.flatten(1).amin(1), x.flatten(1).amax(1)
    y = contrast_(x.clone(), [1.25, 0.75])
    assert (y.flatten(1).amin(1) >= lo - 1e-6).all() and (y.flatten(1).amax(1) <= hi + 1e-6).all()
    for invert in (False, True):
        g = gamma(x, torch.tensor([0.7, 1.5]), invert=invert)
        assert torch.allclose(g.flatten(1).mean(1), x.flatten(1).mean(1), atol=1e-4)
        assert torch.allclose(g.flatten(1).std(1), x.flatten(1).std(1), rtol=1e-4)
        assert not torch.allclose(g, x)
    assert torch.allclose(simulate_low_resolution(x[0], 1.0), x[0])
    low = simulate_low_resolution(x[0], 0.5, ignore_axes=(0,))
    assert low.shape == x[0].shape and not torch.allclose(low, x[0])


def test_two_dimensional_batches():
    image, label = batch((3, 1, 24, 20), values=(0, 1, 2))
    config = AugmentationConfig.for_patch([24, 20])
    out_image, out_label = Augmenter(config)(image, label, np.random.default_rng(0))
    assert out_image.shape == image.shape and set(np.unique(out_label)) <= {0, 1, 2}
    out_image, out_label = Augmenter(EVERYTHING)(image, label, np.random.default_rng(0))
    assert set(np.unique(out_label)) <= {0, 1, 2}


def test_per_configuration_rules_follow_nnunet():
    assert AugmentationConfig.for_patch([40, 56, 40]).rotation_degrees == (-30.0, 30.0)
    aniso = AugmentationConfig.for_patch([8, 192, 160])  # the coarse axis first (store order)
    assert aniso.dummy_2d and aniso.rotation_degrees == (-180.0, 180.0)
    assert AugmentationConfig.for_patch([56, 40]).rotation_degrees == (-180.0, 180.0)
    assert AugmentationConfig.for_patch([512, 128]).rotation_degrees == (-15.0, 15.0)
    assert AugmentationConfig.from_json(aniso.to_json()) == aniso


def test_initial_patch_size_leaves_room_for_rotation_and_zoom():
    config = AugmentationConfig()
    big = initial_patch_size([40, 56, 40], config)
    assert all(b >= p / 0.7 for b, p in zip(big, [40, 56, 40]))
    assert initial_patch_size([40, 56, 40], AugmentationConfig.light()) == [40, 56, 40]
    aniso = initial_patch_size([8, 192, 160], AugmentationConfig.for_patch([8, 192, 160]))
    assert aniso[0] == 8 and min(aniso[1:]) > 192


def test_larger_input_is_cropped_to_the_patch():
    image, label = batch((3, 1, 30, 30, 30), values=(0, 1))
    out_image, out_label = Augmenter(EVERYTHING, patch_size=[16, 20, 12])(image, label, np.random.default_rng(0))
    assert out_image.shape == (3, 1, 16, 20, 12) and out_label.shape == (3, 16, 20, 12)
    out_image, out_label = Augmenter(None, patch_size=[16, 20, 12])(image, label, np.random.default_rng(0))
    assert np.array_equal(out_label, label[:, 7:23, 5:25, 9:21])
    with pytest.raises(ValueError, match="smaller than the patch"):
        Augmenter(None, patch_size=[40, 20, 12])(image, label, np.random.default_rng(0))
