"""Patch sampling from the Zarr store and the case splits, on a tiny real store (6 hippocampus cases,
preprocessed with a 16x24x16 patch, so every case spans 3x3x3 chunks and a patch touches a few)."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from pipeline.errors import BadInputError
from pipeline.preprocessing.store import open_store
from pipeline.training.sampling import (
    BatchSampler,
    PatchSpec,
    ThreadPrefetcher,
    TrainBatches,
    ValidationBatches,
    batch_iterator,
    close_iterator,
    foreground_slots,
    local_batch_size,
    patch_bbox,
    read_patch,
)
from pipeline.training.splits import Splits, kfold_splits, load_or_create_splits
from pipeline.workdir import Workdir

TINY_PATCH = [16, 24, 16]


def make_tiny_workdir(root: Path, dataset_path: Path, num_cases: int = 6) -> Workdir:
    """A workdir whose plans train a 3-stage 4..16-feature U-Net on 16x24x16 patches, preprocessed for real."""
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment
    from pipeline.preprocessing.preprocess import run_preprocessing

    wd = Workdir.at(root)
    dataset = load_dataset(dataset_path)
    dataset = dataclasses.replace(dataset, cases=dataset.cases[:num_cases])
    plans = plan_experiment(compute_fingerprint(dataset, client=None, progress=False), dataset)
    full = plans.configurations["3d_fullres"]
    full.patch_size, full.batch_size = list(TINY_PATCH), 4
    full.strides, full.kernel_sizes = [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3
    full.features_per_stage = [4, 8, 16]
    plans.configurations["3d_lean"].features_per_stage = [4, 8, 16]
    plans.configurations["3d_lean"].batch_size = 4
    wd.root.mkdir(parents=True, exist_ok=True)
    plans.save(wd.plans)
    report = run_preprocessing(dataset, plans, "3d_fullres", wd.store, client=None, progress=False)
    assert not report.failed, report
    return wd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, hippocampus) -> Workdir:
    return make_tiny_workdir(tmp_path_factory.mktemp("tiny_hippo"), hippocampus)


def spec_for(wd: Workdir, batch: int = 4, oversample: float = 0.33, **kw) -> PatchSpec:
    cases = tuple(open_store(wd.store, "r").config("3d_fullres").case_ids())
    kw.setdefault("patch_size", tuple(TINY_PATCH))
    return PatchSpec(str(wd.store), "3d_fullres", cases, slots=foreground_slots(batch, oversample), **kw)


# ---------------------------------------------------------------- batches


def test_batches_have_the_network_shapes_and_types(tiny):
    image, label = BatchSampler(spec_for(tiny)).batch((0, 0, 0, 0))
    assert image.shape == (4, 1, *TINY_PATCH) and image.dtype == torch.float32
    assert label.shape == (4, *TINY_PATCH) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= {0, 1, 2}
    assert image.abs().sum() > 0


def test_a_patch_reads_only_the_chunks_it_touches(tiny, monkeypatch):
    """Every chunk fetched from disk lies under the patch: never a whole case (27 chunks) per patch."""
    fetched: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if "/c." in key:
            fetched.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    cs = open_store(tiny.store, "r").config("3d_fullres")
    case = cs.case_ids()[0]
    image = cs.image(case)
    assert image.chunks == (1, *TINY_PATCH) and image.nchunks == 27

    lower = [5, 20, 12]  # spans chunks 0-1 along each of the three axes: 8 of the case's 27
    out = np.zeros((1, *TINY_PATCH), np.float32)
    fetched.clear()
    read_patch(image, lower, TINY_PATCH, out)
    expected = {f"c.0.{a}.{b}.{d}" for a in range(2) for b in range(2) for d in range(2)}
    assert {k.split("/image/", 1)[1] for k in fetched} == expected
    np.testing.assert_array_equal(out, image[:, 5:21, 20:44, 12:28])

    fetched.clear()
    BatchSampler(spec_for(tiny)).batch((0, 0, 0, 1))
    per_array = [k for k in fetched if "/image/" in k]
    assert 4 <= len(per_array) <= 4 * 8  # four patches, at most 2x2x2 chunks each


def test_patches_beyond_the_border_are_padded_with_zeros_and_background():
    volume = np.arange(1, 1 + 6 * 7 * 8, dtype=np.float32).reshape(1, 6, 7, 8)
    out = np.zeros((1, 4, 4, 4), np.float32)
    read_patch(volume, [-2, 5, 3], [4, 4, 4], out)
    np.testing.assert_array_equal(out[:, 2:, :2, :], volume[:, 0:2, 5:7, 3:7])
    assert (out[:, :2] == 0).all() and (out[:, :, 2:] == 0).all()
    outside = np.ones((1, 4, 4, 4), np.float32)
    read_patch(volume, [10, 0, 0], [4, 4, 4], outside)  # nothing inside: left as given (zeros in the sampler)
    assert (outside == 1).all()


def test_patch_corners_follow_nnunet_bounds():
    rng = np.random.default_rng(0)
    corners = np.array([patch_bbox((40, 50), (16, 16), (16, 16), rng) for _ in range(2000)])
    assert corners.min(0).tolist() == [0, 0] and corners.max(0).tolist() == [24, 34]  # inside, every position
    small = np.array([patch_bbox((10,), (16,), (16,), rng) for _ in range(500)])
    assert set(small[:, 0].tolist()) == {-3}  # a case smaller than the patch is centred, padded both sides
    # a foreground centre puts the voxel at the patch centre, clipped only at the lower bound
    assert patch_bbox((40, 50), (16, 16), (16, 16), rng, center=(30, 3)) == [22, 0]


def test_foreground_oversampling_centres_the_last_third_on_foreground(tiny):
    assert foreground_slots(3, 0.33) == (False, False, True)  # nnU-Net: round(3 * 0.67) = 2 random
    assert foreground_slots(4, 0.33) == (False, False, False, True)
    # data parallel: the global batch's positions are dealt to the ranks, so its share is unchanged
    assert foreground_slots(4, 0.33, rank=0, world_size=2) == (False, False)
    assert foreground_slots(4, 0.33, rank=1, world_size=2) == (False, True)
    assert [local_batch_size(5, r, 2) for r in range(2)] == [3, 2]
    with pytest.raises(ValueError):
        local_batch_size(1, 0, 2)

    sampler = BatchSampler(spec_for(tiny, batch=3))
    centre = (slice(None), *(p // 2 for p in TINY_PATCH))
    centre_is_fg = np.zeros(3)
    n = 30
    for i in range(n):
        _, label = sampler.batch((0, 0, 0, i))
        assert label[2].max() > 0, "a forced patch always contains foreground"
        centre_is_fg += (label[centre] > 0).numpy()
    # forced patches are centred on a foreground voxel (shifted only where that would cross the lower
    # border); random ones hit the hippocampus with their centre far less often
    assert centre_is_fg[2] / n > 0.75 and centre_is_fg[:2].max() / n < 0.5, centre_is_fg / n


def test_batches_are_deterministic_per_key_and_differ_across_ranks(tiny):
    a = BatchSampler(spec_for(tiny)).batch((0, 0, 3, 7))
    b = BatchSampler(spec_for(tiny)).batch((0, 0, 3, 7))
    other_rank = BatchSampler(spec_for(tiny, rank=1)).batch((0, 1, 3, 7))
    other_epoch = BatchSampler(spec_for(tiny)).batch((0, 0, 4, 7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], other_rank[0]) and not torch.equal(a[0], other_epoch[0])


def test_training_stream_is_the_same_for_any_number_of_loader_workers(tiny):
    """Batch i of epoch e is the same whether made in-process or by either of two DataLoader processes,
    and a stream restarted at epoch 1 continues exactly where the first epoch left off."""
    from pipeline.training.augmentation import AugmentationConfig

    spec = spec_for(tiny, augmentation=AugmentationConfig.light().to_json())  # random mirroring
    inline = [b for _, b in zip(range(6), TrainBatches(spec, iterations_per_epoch=3))]
    loader = DataLoader(TrainBatches(spec, iterations_per_epoch=3), batch_size=None, num_workers=2)
    parallel = [b for _, b in zip(range(6), loader)]
    resumed = [b for _, b in zip(range(3), TrainBatches(spec, iterations_per_epoch=3, start_epoch=1))]
    for x, y in zip(inline, parallel):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    for x, y in zip(inline[3:], resumed):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_validation_batches_repeat_and_are_shared_out_over_ranks(tiny):
    spec = spec_for(tiny)
    once = list(ValidationBatches(spec, num_batches=5))
    again = list(ValidationBatches(spec, num_batches=5))
    assert len(once) == 5 and all(torch.equal(x[0], y[0]) for x, y in zip(once, again))
    rank0 = list(ValidationBatches(spec, 5, world_size=2))
    rank1 = list(ValidationBatches(dataclasses.replace(spec, rank=1), 5, world_size=2))
    assert len(rank0) == 3 and len(rank1) == 2
    for i, (img, _) in enumerate(once):
        img_r = (rank0 if i % 2 == 0 else rank1)[i // 2][0]
        assert torch.equal(img, img_r)


def test_augmented_batches_come_out_at_the_network_patch_size(tiny):
    from pipeline.training.augmentation import AugmentationConfig

    aug = AugmentationConfig.for_patch(TINY_PATCH).to_json()
    spec = spec_for(tiny, augmentation=aug)
    assert all(c > p for c, p in zip(spec.crop_size(), TINY_PATCH))  # rotation/scaling margin
    image, label = BatchSampler(spec).batch((0, 0, 0, 0))
    assert image.shape == (4, 1, *TINY_PATCH) and label.shape == (4, *TINY_PATCH)
    assert label.dtype == torch.int64 and set(label.unique().tolist()) <= {0, 1, 2}


def test_2d_patches_are_slices_through_the_volume(tiny):
    spec = spec_for(tiny, patch_size=(24, 16))
    image, label = BatchSampler(spec).batch((0, 0, 0, 0))
    assert image.shape == (4, 1, 24, 16) and label.shape == (4, 24, 16)
    assert label[-1].max() > 0


def test_sampler_memory_stays_within_one_batch_plus_the_queue(tiny):
    """Streaming 15 batches through a 2-deep prefetch queue holds at most the batch being filled (or
    waiting for room), the two queued and the one in use, plus chunk decoding: not the cases it read."""
    spec = spec_for(tiny)
    batch_bytes = 4 * int(np.prod(TINY_PATCH)) * (4 + 8)  # float32 image + int64 label
    cs = open_store(tiny.store, "r").config("3d_fullres")
    cases_bytes = sum(int(np.prod(cs.label(c).shape)) * (2 + 1) for c in cs.case_ids())  # as stored: f16 + u8
    decoding = 8 * int(np.prod(TINY_PATCH)) * (2 + 1) + 350_000  # 2^3 chunks + zarr's own objects
    bound = (1 + 2 + 1) * batch_bytes + decoding
    assert bound + cases_bytes / 2 > 2_000_000  # keeping even half the cases around would break the bound

    BatchSampler(spec).batch((0, 0, 0, 0))  # warm imports and zarr's metadata caches outside the measurement
    tracemalloc.start()
    try:
        it = ThreadPrefetcher(TrainBatches(spec, iterations_per_epoch=10), depth=2)
        for _ in range(15):
            image, label = next(it)
            del image, label
        it.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bound, f"peak {peak / 1e6:.2f} MB > bound {bound / 1e6:.2f} MB"


def test_prefetchers_deliver_in_order_and_stop_cleanly(tiny):
    spec = spec_for(tiny)
    reference = [b for _, b in zip(range(4), TrainBatches(spec, 2))]
    for mode, workers in (("thread", 1), ("process", 1), ("none", 0)):
        it = batch_iterator(TrainBatches(spec, 2), mode, num_workers=workers)
        got = [next(it) for _ in range(4)]
        close_iterator(it)
        assert all(torch.equal(x[0], y[0]) for x, y in zip(reference, got)), mode

    def failing():
        yield 1
        raise RuntimeError("store vanished")

    it = ThreadPrefetcher(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="store vanished"):
        next(it)


# ---------------------------------------------------------------- splits


def test_folds_equal_nnunets_for_the_same_case_ids():
    # generated with nnunetv2.utilities.crossval_split.generate_crossval_split (sklearn KFold, seed 12345)
    ids = [f"case_{i:02d}" for i in range(12)]
    expected_val = [["case_00", "case_03", "case_08"], ["case_07", "case_10", "case_11"], ["case_06", "case_09"],
                    ["case_01", "case_04"], ["case_02", "case_05"]]
    folds = kfold_splits(list(reversed(ids)))
    assert [f["val"] for f in folds] == expected_val
    for f in folds:
        assert sorted(f["train"] + f["val"]) == ids and not set(f["train"]) & set(f["val"])


def test_hippocampus_folds_match_nnunets(hippocampus):
    ids = sorted(p.name[: -len(".nii.gz")] for p in (hippocampus / "labelsTr").glob("*.nii.gz"))
    folds = kfold_splits(ids)
    assert [len(f["val"]) for f in folds] == [42, 42, 42, 41, 41]
    assert folds[0]["val"][:5] == ["hippocampus_035", "hippocampus_037", "hippocampus_038",
                                   "hippocampus_041", "hippocampus_042"]
    assert folds[4]["val"][-3:] == ["hippocampus_373", "hippocampus_376", "hippocampus_394"]


def test_three_cases_still_train_fold_all_and_explain_why_there_are_no_folds(tmp_path):
    splits = load_or_create_splits(tmp_path, ["a", "b", "c"])
    assert splits.folds == [] and sorted(splits.split("all").train) == ["a", "b", "c"]
    with pytest.raises(BadInputError, match="too few for 5 cross-validation folds: train with --fold all"):
        splits.split(0)


def test_splits_file_is_created_once_and_reused(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    first = load_or_create_splits(tmp_path, ids)
    again = load_or_create_splits(Workdir.at(tmp_path), ids + ["c10"])  # a new case does not reshuffle
    assert again.folds == first.folds and (tmp_path / "splits.json").is_file()
    assert again.split(0).val == first.split("0").val
    everything = again.split("all")
    assert sorted(everything.train) == sorted(ids) and len(everything.val) == 1
    with pytest.raises(BadInputError, match="fold 7 does not exist"):
        again.split(7)
    with pytest.raises(BadInputError, match="not in the store"):
        again.split(0, available=ids[:5])


def test_holdout_split_keeps_test_cases_out_of_training(tmp_path):
    ids = [f"c{i:02d}" for i in range(20)]
    splits = load_or_create_splits(tmp_path, ids, holdout_test_cases=4)
    h = splits.split("holdout")
    assert len(h.test) == 4 and not set(h.test) & set(h.train + h.val)
    assert sorted(h.train + h.val + h.test) == ids and len(h.val) == 3
    assert json.loads((tmp_path / "splits.json").read_text())["holdout"]["test"] == list(h.test)
    assert Splits.from_json(json.loads((tmp_path / "splits.json").read_text())).test_cases() == list(h.test)
    with pytest.raises(BadInputError):
        Splits.create(ids, holdout_test_cases=19)
