"""Sliding-window inference: window placement, Gaussian weighting, mirroring TTA, Zarr accumulation,
and the whole path from raw NIfTI files to label maps in the input's exact geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import zarr

from pipeline.inference.sliding_window import (
    compute_steps,
    gaussian_importance_map,
    mirror_axes_combinations,
    sliding_window_predict,
    window_slices,
)


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


class SignNet(ThresholdNet):
    """Foreground where the (normalised) first channel is positive."""

    def __init__(self):
        super().__init__(num_classes=2)

    def forward(self, x):
        fg = (x[:, :1] > 0).float()
        return torch.cat([1 - fg, fg], 1) * self.scale


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


@pytest.mark.parametrize("accumulate", ["memory", "zarr"])
def test_2d_patch_predicts_slice_by_slice(accumulate, tmp_path):
    image, label = _volume((6, 41, 23), seed=2)
    probs = sliding_window_predict(ThresholdNet(dims=2), image, (16, 16), 3, tta_mirror=True, batch_size=4,
                                   accumulate=accumulate, zarr_dir=tmp_path)
    assert probs.shape == (3, 6, 41, 23)
    np.testing.assert_array_equal(np.asarray(probs[...]).argmax(0), label)


def test_tta_of_a_mirror_equivariant_net_equals_no_tta():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 30, 26, 21)).astype(np.float32)
    net = _conv_net(3, 2, 4, symmetric=True)
    # float32 (amp=False): the equality is the averaging's, not a precision's (mixed is the default on a bf16 CPU)
    with_tta = sliding_window_predict(net, image, (16, 16, 16), 4, tta_mirror=True, amp=False)
    without = sliding_window_predict(net, image, (16, 16, 16), 4, tta_mirror=False, amp=False)
    np.testing.assert_allclose(with_tta, without, atol=1e-5)


@pytest.mark.parametrize("dims", [3, 2])
def test_tta_averages_the_logits_over_all_mirrorings_as_nnunet(dims):
    rng = np.random.default_rng(4)
    patch = (12,) * dims
    image = rng.normal(size=(1, *patch)).astype(np.float32) if dims == 3 else rng.normal(size=(1, 1, *patch)).astype(np.float32)
    net = _conv_net(dims, 1, 3, symmetric=False)
    got = sliding_window_predict(net, image, patch, 3, tta_mirror=True, amp=False)  # against float32 arithmetic
    x = torch.from_numpy(image if dims == 3 else image[:, 0])[None]
    combos = mirror_axes_combinations(dims)
    with torch.no_grad():
        expected = torch.softmax(sum(torch.flip(net(torch.flip(x, c)), c) for c in combos) / len(combos), 1)
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


# ---------------------------------------------------------------- real data, end to end

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import nibabel as nib  # noqa: E402

from pipeline.cli import main as cli_main  # noqa: E402
from pipeline.data.dataset import CaseFiles, LabelMap, load_dataset  # noqa: E402
from pipeline.errors import BadInputError, SegPipeError  # noqa: E402
from pipeline.inference.predict import group_input_files, predict_folder  # noqa: E402
from pipeline.inference.predictor import ModelSpec, Predictor, predict_case  # noqa: E402
from pipeline.workdir import Workdir  # noqa: E402

CONFIG = "3d_lean"  # the smallest real topology: the tests run on 2 CPU cores


def make_model(workdir, dataset_path, num_cases=2, config=CONFIG, favour_class=None, fold="0"):
    """A model folder as training leaves it, holding an untrained network built from a real plan."""
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment

    dataset = load_dataset(dataset_path)
    dataset = dataclasses.replace(dataset, cases=dataset.cases[:num_cases])
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    wd = Workdir.at(workdir)
    plans.save(wd.plans)
    save_untrained_model(wd, plans, config, fold, favour_class)
    return wd, plans


def save_untrained_model(wd, plans, config=CONFIG, fold="0", favour_class=None):
    """A run folder as training leaves it, holding an untrained network of the plan's topology at a
    quarter of its width: the same patch and strides, four times faster on a CPU. Prediction only
    needs the model file, and these tests check where the labels land, not how good they are."""
    from pipeline.training.loop import save_model_file
    from pipeline.training.model import build_network

    conf = plans.configurations[config]
    conf.features_per_stage = [max(4, f // 4) for f in plans.configuration(config).features_per_stage]
    run_dir = wd.run_dir(config, fold)
    plans.save(run_dir / "plans.json")
    torch.manual_seed(0)
    net = build_network(plans.configuration(config), len(plans.channels), len(plans.label_values))
    if favour_class is not None:  # make one class win wherever the image is (outside it is background)
        with torch.no_grad():
            net.seg_layers[-1].bias[favour_class] = 1e4
    save_model_file(run_dir / "model_final.pt", net, configuration=config, epoch=0, ema_dice=None,
                    num_input_channels=len(plans.channels), num_classes=len(plans.label_values),
                    label_values=list(plans.label_values), plans_hash=plans.hash(config))


def link_inputs(folder, paths, channel_suffix=False):
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        stem = p.name[: -len(".nii.gz")]
        os.symlink(p, folder / (f"{stem}_0000.nii.gz" if channel_suffix else p.name))
    return folder


# header fields a label map legitimately changes: its data type and intensity scaling
_DTYPE_FIELDS = {"datatype", "bitpix", "scl_slope", "scl_inter", "cal_min", "cal_max", "glmin", "glmax", "vox_offset"}


def assert_same_geometry(out_path, in_path):
    out, ref = nib.load(out_path), nib.load(in_path)
    assert out.shape == ref.shape[:3]
    np.testing.assert_array_equal(out.affine, ref.affine)
    for key in ref.header.keys():
        if key in _DTYPE_FIELDS or key == "dim" or key == "pixdim":
            continue
        np.testing.assert_array_equal(out.header[key], ref.header[key], err_msg=f"header field {key}")
    np.testing.assert_array_equal(out.header["pixdim"][:4], ref.header["pixdim"][:4])
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)


@pytest.fixture(scope="module")
def sct_model(tmp_path_factory, spinalcord):
    return make_model(tmp_path_factory.mktemp("sct_model"), spinalcord, num_cases=3)


@pytest.fixture(scope="module")
def hippo_model(tmp_path_factory, hippocampus):
    return make_model(tmp_path_factory.mktemp("hippo_model"), hippocampus, num_cases=2)


# RAS, PSR, LAS (0.5 x 0.5 x 7.5 mm); "zarr": the out-of-memory path (chunked argmax, label restored alone)
@pytest.mark.parametrize("case,accumulate", [("sct_t1w", "memory"), ("sct_t2", "memory"), ("sct_t2s", "memory"),
                                             ("sct_t2", "zarr"), ("sct_t2s", "zarr")])
def test_prediction_lands_on_the_input_grid_in_its_own_orientation(case, accumulate, sct_model, spinalcord, tmp_path):
    # Feed the reference label in as the image and segment it by thresholding: the prediction must
    # come back as that label, voxel for voxel in the file's own axis order, through preprocessing
    # (reorient, transpose, crop, normalise, resample), sliding window and export.
    wd, plans = sct_model
    label_file = spinalcord / "labelsTr" / f"{case}.nii.gz"
    predictor = Predictor(SignNet(), plans, CONFIG, LabelMap((0, 1)), spec=ModelSpec((), accumulate=accumulate))
    (tmp_path / "in").mkdir()
    os.symlink(label_file, tmp_path / "in" / f"{case}.nii.gz")
    files = CaseFiles(case, (tmp_path / "in" / f"{case}.nii.gz",), None)
    with_probs = accumulate == "memory"
    label, probs = predict_case(predictor, files, tmp_path / "out" / f"{case}.nii.gz", save_probabilities=with_probs)
    reference = np.asarray(nib.load(label_file).dataobj)
    assert label.shape == reference.shape
    if case == "sct_t2s":
        # resampled to 1 mm in-plane and back, the thin gray-matter mask blurs (Dice ~0.76), but any
        # axis left flipped would score far lower
        dice = lambda a, b: 2 * np.sum((a == 1) & (b == 1)) / (np.sum(a == 1) + np.sum(b == 1))  # noqa: E731
        assert dice(label, reference) > 0.7
        assert all(dice(label, np.flip(reference, axis)) < 0.5 for axis in range(3))
    else:
        np.testing.assert_array_equal(label, reference)
    written = nib.load(tmp_path / "out" / f"{case}.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), label)
    assert_same_geometry(tmp_path / "out" / f"{case}.nii.gz", label_file)
    if not with_probs:
        assert probs is None and not (tmp_path / "out" / f"{case}.npz").exists()
        return
    npz = np.load(tmp_path / "out" / f"{case}.npz")
    assert npz["probabilities"].dtype == np.float16 and list(npz["labels"]) == [0, 1]
    assert npz["probabilities"].shape == (2, *nib.as_closest_canonical(written).shape)
    np.testing.assert_allclose(npz["probabilities"].astype(np.float32), probs, atol=1e-3)


def test_predict_folder_writes_every_case_in_the_inputs_geometry_and_resumes(sct_model, hippo_model, spinalcord,
                                                                          hippocampus, tmp_path):
    wd, plans = hippo_model
    images = sorted((hippocampus / "imagesTr").iterdir())[:2] + [spinalcord / "imagesTr" / "sct_t2.nii.gz"]
    inputs = link_inputs(tmp_path / "in", images)
    out = tmp_path / "out"
    report = predict_folder(wd, inputs, out, config=CONFIG, tta=False, progress=False)
    ids = [p.name[: -len(".nii.gz")] for p in images]
    assert report.predicted == sorted(ids) and report.skipped == [] and report.failed == []
    for p in images:
        assert_same_geometry(out / p.name, p)
        values = set(np.unique(np.asarray(nib.load(out / p.name).dataobj)).tolist())
        assert values <= {0, 1, 2}
    assert sorted(f.name for f in out.iterdir()) == sorted(p.name for p in images)  # no temporary leftovers
    assert "predicted 3 case(s)" in str(report) and report.to_json()["seconds_per_case"].keys() == set(ids)

    # resume: written cases are skipped; a removed one is redone
    stamp = (out / images[0].name).stat().st_mtime_ns
    (out / images[1].name).unlink()
    again = predict_folder(wd, inputs, out, config=CONFIG, tta=False, progress=False)
    assert again.predicted == [ids[1]] and sorted(again.skipped) == sorted([ids[0], ids[2]])
    assert (out / images[0].name).stat().st_mtime_ns == stamp


def test_tta_and_channel_suffixed_inputs(hippo_model, hippocampus, tmp_path):
    wd, _ = hippo_model
    image = sorted((hippocampus / "imagesTr").iterdir())[0]
    inputs = link_inputs(tmp_path / "in", [image], channel_suffix=True)  # CASE_0000.nii.gz (nnU-Net v2)
    report = predict_folder(wd, inputs, tmp_path / "out", config=CONFIG, tta=True, save_probabilities=True,
                            progress=False)
    case = image.name[: -len(".nii.gz")]
    assert report.predicted == [case] and report.tta
    assert_same_geometry(tmp_path / "out" / image.name, image)
    npz = np.load(tmp_path / "out" / f"{case}.npz")
    probs = npz["probabilities"].astype(np.float32)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=5e-3)
    label_ras = np.asarray(nib.as_closest_canonical(nib.load(tmp_path / "out" / image.name)).dataobj)
    assert np.mean(npz["labels"][probs.argmax(0)] == label_ras) > 0.99  # float16 rounding may flip near-ties


def test_non_contiguous_label_values_are_written_back(tmp_path, totalseg):
    values = load_dataset(totalseg).label_map.values
    last = len(values) - 1
    assert values[last] > last  # non-contiguous: TotalSegmentator's values run up to 117
    wd, plans = make_model(tmp_path / "w", totalseg, num_cases=1, favour_class=last)
    image = totalseg / "imagesTr" / "totalseg_ct_sm.nii.gz"
    inputs = link_inputs(tmp_path / "in", [image])
    predict_folder(wd, inputs, tmp_path / "out", config=CONFIG, tta=False, progress=False)
    written = np.asarray(nib.load(tmp_path / "out" / image.name).dataobj)
    assert set(np.unique(written).tolist()) <= set(values)
    assert values[last] in written  # the last training index came back as the dataset's own value
    assert_same_geometry(tmp_path / "out" / image.name, image)


def test_missing_model_names_the_training_command(hippo_model, hippocampus, tmp_path):
    wd, _ = hippo_model
    inputs = link_inputs(tmp_path / "in", sorted((hippocampus / "imagesTr").iterdir())[:1])
    with pytest.raises(SegPipeError, match=r"segpipe train --workdir .* --config 3d_lean --fold 3"):
        predict_folder(wd, inputs, tmp_path / "out", config=CONFIG, fold="3", progress=False)
    with pytest.raises(SegPipeError, match=r"--fold 1"):
        predict_folder(wd, inputs, tmp_path / "out", config=CONFIG, fold="0,1", progress=False)
    assert cli_main(["predict", "--workdir", str(wd.root), str(inputs), str(tmp_path / "out"),
                     "--config", CONFIG, "--fold", "3"]) == 1
    assert not (tmp_path / "out").exists()


def test_wrong_channel_count_is_bad_input_naming_the_case(hippo_model, hippocampus, tmp_path):
    wd, _ = hippo_model
    image = sorted((hippocampus / "imagesTr").iterdir())[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    os.symlink(image, inputs / "two_0000.nii.gz")
    os.symlink(image, inputs / "two_0001.nii.gz")
    img = nib.load(image)
    four_d = np.stack([np.asarray(img.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(four_d, img.affine), inputs / "fourd.nii.gz")
    with pytest.raises(BadInputError) as err:
        group_input_files(inputs, 1)
    assert {p.case for p in err.value.problems} == {"two", "fourd"}
    assert "expects 1 channel" in str(err.value)
    code = cli_main(["predict", "--workdir", str(wd.root), str(inputs), str(tmp_path / "out"), "--config", CONFIG])
    assert code == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_input_grouping(tmp_path, hippocampus):
    image = sorted((hippocampus / "imagesTr").iterdir())[0]
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b.nii.gz", "scan_2019.nii.gz", ".hidden.nii.gz"):
        os.symlink(image, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BadInputError) as err:  # b and scan_2019 have one channel, the model two
        group_input_files(tmp_path, 2)
    assert {p.case for p in err.value.problems} == {"b", "scan_2019"}
    (tmp_path / "a_0001.nii.gz").unlink()
    cases = {c.case_id: c for c in group_input_files(tmp_path, 1)}
    assert sorted(cases) == ["a", "b", "scan_2019"]
    assert [p.name for p in cases["a"].images] == ["a_0000.nii.gz"]


def test_ray_workers_predict_like_the_sequential_path(ray_session, hippo_model, hippocampus, tmp_path):
    wd, _ = hippo_model
    images = sorted((hippocampus / "imagesTr").iterdir())[:2]
    inputs = link_inputs(tmp_path / "in", images)
    report = predict_folder(wd, inputs, tmp_path / "ray", config=CONFIG, tta=False, num_workers=2, progress=False)
    assert report.workers == 2 and sorted(report.predicted) == sorted(p.name[:-7] for p in images)
    assert ray_session.is_initialized()  # the session's Ray is reused, not shut down
    predict_folder(wd, inputs, tmp_path / "seq", config=CONFIG, tta=False, progress=False)
    for p in images:
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "ray" / p.name).dataobj),
                                      np.asarray(nib.load(tmp_path / "seq" / p.name).dataobj))


def test_fold_ensemble_averages_the_logits_as_nnunet(tmp_path):
    from pipeline.inference.predictor import _Ensemble

    rng = np.random.default_rng(6)
    image = rng.normal(size=(1, 30, 22, 17)).astype(np.float32)
    a, b = _conv_net(3, 1, 3, symmetric=False, seed=1), _conv_net(3, 1, 3, symmetric=False, seed=2)
    both = sliding_window_predict(_Ensemble([a, b]), image, (16, 16, 8), 3, tta_mirror=False)
    each = [sliding_window_predict(n, image, (16, 16, 8), 3, tta_mirror=False) for n in (a, b)]
    # log-probabilities are the logits less a per-voxel constant, which the softmax cancels
    mean_log = (np.log(each[0]) + np.log(each[1])) / 2
    expected = np.exp(mean_log - mean_log.max(0)) / np.exp(mean_log - mean_log.max(0)).sum(0)
    np.testing.assert_allclose(both, expected, atol=1e-5)
    assert not np.allclose(both, (each[0] + each[1]) / 2, atol=1e-4)  # not the mean probability


def test_ensemble_of_folds_and_postprocessing_rule_beside_the_model(hippo_model, hippocampus, tmp_path):
    import shutil

    from scipy import ndimage

    from pipeline.inference.postprocessing import PostprocessingRule, keep_largest

    wd = Workdir.at(tmp_path / "w")
    shutil.copytree(hippo_model[0].root, wd.root)
    image = sorted((hippocampus / "imagesTr").iterdir())[1]
    inputs = link_inputs(tmp_path / "in", [image])
    read = lambda d: np.asarray(nib.load(tmp_path / d / image.name).dataobj)  # noqa: E731
    predict_folder(wd, inputs, tmp_path / "single", config=CONFIG, tta=False, progress=False)

    shutil.copytree(wd.run_dir(CONFIG, "0"), wd.run_dir(CONFIG, "1"))  # the same weights twice
    report = predict_folder(wd, inputs, tmp_path / "pair", config=CONFIG, fold="0,1", tta=False, progress=False)
    assert report.folds == ["0", "1"]
    np.testing.assert_array_equal(read("pair"), read("single"))

    single = read("single")
    components = lambda a: ndimage.label(a, np.ones((3, 3, 3)))[1]  # noqa: E731
    assert components(single == 2) > 1  # the untrained net leaves specks
    rule = PostprocessingRule(labels=(1, 2), keep_largest_per_class=(2,))
    rule.save(wd.run_dir(CONFIG, "0") / "postprocessing.json")
    predict_folder(wd, inputs, tmp_path / "post", config=CONFIG, fold="0", tta=False, progress=False)
    np.testing.assert_array_equal(read("post"), keep_largest(single, [2]))
    assert components(read("post") == 2) == 1


# ---------------------------------------------------------------- cross-validation


def test_evaluate_cv_predicts_each_fold_with_its_own_model_pools_the_scores_and_keeps_the_rule(hippocampus, tmp_path,
                                                                                               capsys, monkeypatch):
    from pipeline.inference.predictor import POSTPROCESSING_FILE

    wd = Workdir.at(tmp_path / "W")
    cases = sorted(load_dataset(hippocampus).case_ids)[:5]
    folds = [{"train": [c for c in cases if c != v], "val": [v]} for v in cases]
    wd.root.mkdir()
    wd.splits.write_text(json.dumps({"seed": None, "cases": cases, "folds": folds, "all": folds[0]}))
    favour = {str(k): 1 + k % 2 for k in range(5)}  # fold k's model paints its cases with one class
    for fold, cls in favour.items():
        make_model(wd.root, hippocampus, favour_class=cls, fold=fold)
        (wd.run_dir(CONFIG, fold) / "metrics.csv").write_text(
            f"epoch,train_loss,val_loss,val_dice_1,val_dice_2,ema_dice,lr,seconds\n1,1,1,0.5,0.5,0.1,0.01,9\n"
            f"2,0.9,0.9,0.{fold}1,0.{fold}3,0.2,0.005,9\n")
    import pipeline.inference.predict as predict_module

    real, precisions = predict_module.predict_folder, []
    monkeypatch.setattr(predict_module, "predict_folder",
                        lambda *a, **k: precisions.append(k.get("precision")) or real(*a, **k))
    assert cli_main(["evaluate-cv", str(hippocampus), "--workdir", str(wd.root), "--no-tta", "--json",
                     "--precision", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == CONFIG and report["folds"] == list(favour) and report["num_cases"] == 5
    assert precisions == ["fp32"] * 5  # every fold's validation cases in float32: the same scores on every CPU

    for fold, case in zip(favour, cases):  # each case by its own fold's model, and only there
        pred = wd.run_dir(CONFIG, fold) / "validation" / f"{case}.nii.gz"
        # with its class probabilities, which `segpipe find-best` averages into ensembles
        assert sorted(p.name for p in pred.parent.iterdir() if p.is_file()) == [pred.name, f"{case}.npz"]
        assert set(np.unique(np.asarray(nib.load(pred).dataobj)).tolist()) <= {0, favour[fold]}
        assert_same_geometry(pred, hippocampus / "imagesTr" / f"{case}.nii.gz")
    out = wd.root / "crossval" / CONFIG
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert sorted(c["case"] for c in summary["cases"]) == cases
    assert report["foreground_dice"] == pytest.approx(summary["foreground_mean"]["dice"])
    for f, case in zip(report["per_fold"], cases):  # per fold: that fold's rows of the pooled summary
        row = next(c for c in summary["cases"] if c["case"] == case)
        assert f["cases"] == 1 and f["dice"] == {v: row["metrics"][v]["dice"] for v in ("1", "2")}
        assert f["pseudo_dice"] == {"1": float(f"0.{f['fold']}1"), "2": float(f"0.{f['fold']}3")}
    for name in ("crossval.md", "crossval.json", "crossval.png", POSTPROCESSING_FILE):
        assert (out / name).is_file(), name
    assert "training pseudo-Dice" in (out / "crossval.md").read_text()

    # the rule decided on the pooled folds is kept beside every fold's model, and prediction uses it
    rule = json.loads((out / POSTPROCESSING_FILE).read_text())
    assert rule["num_cases"] == 5 and rule["labels"] == [1, 2]
    for fold in favour:
        assert json.loads((wd.run_dir(CONFIG, fold) / POSTPROCESSING_FILE).read_text()) == rule
    assert Predictor.load(wd, CONFIG, "3").rule is not None
    assert Predictor.load(wd, CONFIG, "3", postprocess=False).rule is None

    # re-running keeps the predictions already written
    first = wd.run_dir(CONFIG, "0") / "validation" / f"{cases[0]}.nii.gz"
    stamp = first.stat().st_mtime_ns
    assert cli_main(["evaluate-cv", str(hippocampus), "--workdir", str(wd.root), "--no-tta", "--folds", "0,1",
                     "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["folds"] == ["0", "1"] and again["num_cases"] == 2 and first.stat().st_mtime_ns == stamp


def test_evaluate_cv_without_a_trained_fold_says_how_to_train_one(hippocampus, tmp_path, capsys):
    assert cli_main(["evaluate-cv", str(hippocampus), "--workdir", str(tmp_path / "W")]) == 1
    assert "segpipe train" in capsys.readouterr().err
