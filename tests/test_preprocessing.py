"""Preprocessing is undone exactly by export, keeps every label, and runs the same on Dask as in-process."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import affine_transform, binary_fill_holes

from pipeline.data import dataset as dataset_module
from pipeline.data.dataset import case_batches, load_dataset, read_case
from pipeline.errors import BadInputError
from pipeline.inference.export import restore_label, restore_probabilities, write_prediction
from pipeline.planning.fingerprint import compute_fingerprint
from pipeline.planning.planner import plan_experiment
from pipeline.planning.plans import ChannelNormalization
from pipeline.preprocessing import preprocess as preprocess_module
from pipeline.preprocessing.normalization import nonzero_mask, normalize_channel
from pipeline.preprocessing.preprocess import preprocess_case, run_preprocessing
from pipeline.preprocessing.resampling import resample_image, resample_label
from pipeline.preprocessing.store import open_store


def subset(dataset, case_ids):
    return dataclasses.replace(dataset, cases=tuple(dataset.case(c) for c in case_ids))


def planned(dataset, config="3d_fullres", **changes):
    """The real planner's plans; `changes` override fields of `config` (e.g. a coarser spacing)."""
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    if changes:
        plans.configurations[config] = dataclasses.replace(plans.configuration(config), **changes)
    return plans


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def assert_round_trip(case, plans, label_map, min_dice, config="3d_fullres"):
    pre = preprocess_case(case, plans, config, label_map)
    back = restore_label(pre.label, pre.meta, label_map)
    assert back.shape == case.label.shape
    for value in label_map.values[1:]:
        if (case.label == value).any():
            assert dice(back == value, case.label == value) > min_dice, (case.case_id, value)
    return pre, back


@pytest.fixture(scope="module")
def hippo4(hippocampus):
    ds = load_dataset(hippocampus)
    return subset(ds, [c.case_id for c in ds.cases[:4]])


def test_hippocampus_round_trip_restores_the_original_labels(hippo4, tmp_path):
    plans = planned(hippo4)
    for case_files in hippo4.cases:
        case = read_case(hippo4, case_files)
        pre, back = assert_round_trip(case, plans, hippo4.label_map, 0.99)
        assert pre.image.shape[1:] == pre.label.shape
        assert all(s >= p for s, p in zip(pre.label.shape, plans.configuration("3d_fullres").patch_size))
    # the written prediction sits exactly where the input label does
    out = tmp_path / "pred.nii.gz"
    write_prediction(back, pre.meta.geometry, out, case_files.images[0])
    written, reference = nib.load(str(out)), nib.load(str(case_files.label))
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(reference.dataobj))
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)


def test_hippocampus_round_trip_through_a_finer_grid(hippo4):
    plans = planned(hippo4, spacing=[0.7, 0.7, 0.7])
    case = read_case(hippo4, hippo4.cases[0])
    pre, _ = assert_round_trip(case, plans, hippo4.label_map, 0.99)
    assert pre.meta.shape_after_resample == [round(n / 0.7) for n in pre.meta.shape_after_crop]


def test_spinal_cord_round_trip_in_each_orientation(spinalcord):
    ds = load_dataset(spinalcord)
    plans = planned(ds)  # 1 mm isotropic: the T1w (RAS) and T2 (PSR) cases are not resampled
    for cid in ("sct_t1w", "sct_t2"):
        case = read_case(ds, cid)
        _, back = assert_round_trip(case, plans, ds.label_map, 0.99)
        np.testing.assert_array_equal(back, case.label)


def test_anisotropic_t2star_round_trip_resamples_the_thick_axis_separately(spinalcord):
    ds = subset(load_dataset(spinalcord), ["sct_t2s"])  # LAS, 0.5 x 0.5 x 7.5 mm
    case = read_case(ds, "sct_t2s")
    plans = planned(ds)
    assert plans.transpose_forward[0] == 2  # the 7.5 mm axis first, as nnU-Net
    assert_round_trip(case, plans, ds.label_map, 0.99)
    # 3 mm slices: the thick axis is upsampled on its own, nearest-slice (order_z 0), and undone exactly
    plans = planned(ds, spacing=[3.0, 0.5, 0.5])
    pre, _ = assert_round_trip(case, plans, ds.label_map, 0.99)
    assert pre.meta.separate_z_axis == 0 and pre.meta.shape_after_resample[0] == round(9 * 7.5 / 3.0)


def test_downsampling_the_thin_grey_matter_is_lossy_but_keeps_it(spinalcord):
    """At the dataset's 1 mm plan the 0.5 mm in-plane grey matter loses detail (Dice ~0.77 back on the
    original grid): information is lost, not misplaced - geometry is exact in the tests above."""
    ds = load_dataset(spinalcord)
    case = read_case(ds, "sct_t2s")
    pre, back = assert_round_trip(case, planned(ds), ds.label_map, 0.7)
    assert pre.meta.class_voxels[1] > 0 and (back == 1).any()


def test_every_totalsegmentator_label_survives_resampling(totalseg):
    ds = load_dataset(totalseg)
    case = read_case(ds, ds.cases[0])
    index = ds.label_map.to_index(case.label)
    present = set(np.unique(index).tolist())
    assert len(present) == 42  # background + 41 non-contiguous classes (values up to 117)
    plans = planned(ds, spacing=[4.5, 4.5, 4.5])  # coarser than the 3 mm data: small organs shrink
    pre = preprocess_case(case, plans, "3d_fullres", ds.label_map)
    assert set(np.unique(pre.label).tolist()) == present  # none lost, none invented
    assert pre.meta.class_voxels == np.bincount(pre.label.ravel(), minlength=42).tolist()
    # every foreground class has oversampling locations, each pointing at a voxel of its class
    locs = pre.locations
    assert set(np.unique(locs[:, 0]).tolist()) == present - {0}
    np.testing.assert_array_equal(pre.label[tuple(locs[:, 1:].T)], locs[:, 0])
    # the dataset's own (non-contiguous) values come back on export
    back = restore_label(pre.label, pre.meta, ds.label_map)
    assert set(np.unique(back).tolist()) == set(np.unique(case.label).tolist())


def test_probabilities_are_restored_to_the_original_grid(spinalcord):
    ds = load_dataset(spinalcord)
    case = read_case(ds, "sct_t2")
    pre = preprocess_case(case, planned(ds, spacing=[0.8, 0.8, 0.8]), "3d_fullres", ds.label_map)
    onehot = np.stack([pre.label == k for k in range(2)]).astype(np.float32)
    probs = restore_probabilities(onehot, pre.meta)
    assert probs.shape == (2, *case.label.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert dice(probs.argmax(0) == 1, case.label == 1) > 0.97


def test_probabilities_of_many_classes_are_restored_channels_at_once_with_the_same_bits(totalseg):
    # the CT dataset's 42 classes, back from a 3 mm plan onto its own grid: in threads, as one by one
    ds = load_dataset(totalseg)
    case = read_case(ds, ds.cases[0].case_id)
    pre = preprocess_case(case, planned(ds, spacing=[2.0, 2.0, 2.0]), "3d_fullres", ds.label_map)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(42), size=pre.label.shape).astype(np.float32)
    probs = np.moveaxis(probs, -1, 0)
    one = restore_probabilities(probs, pre.meta)
    np.testing.assert_array_equal(restore_probabilities(probs, pre.meta, threads=2), one)
    assert one.shape == (42, *case.label.shape)


def test_ct_is_clipped_and_scaled_with_the_dataset_statistics(totalseg):
    ds = load_dataset(totalseg)
    plans = planned(ds)  # 3 mm: no resampling, so values are exactly the normalised intensities
    norm = plans.normalization[0]
    assert norm.scheme == "ct"
    case = read_case(ds, ds.cases[0])
    pre = preprocess_case(case, plans, "3d_fullres", ds.label_map)
    inside = pre.image[(slice(None), *[slice(a, a + n) for (a, _), n in zip(pre.meta.pad, pre.meta.shape_after_resample)])]
    lo, hi = (norm.lower - norm.mean) / norm.std, (norm.upper - norm.mean) / norm.std
    assert inside.min() >= lo - 1e-5 and inside.max() <= hi + 1e-5
    assert np.isclose(inside.max(), hi, atol=1e-5)  # bright bone is clipped at the 99.5th percentile


def test_zscore_normalises_per_image_and_within_the_nonzero_mask(hippo4):
    case = read_case(hippo4, hippo4.cases[0])
    pre = preprocess_case(case, planned(hippo4), "3d_fullres", hippo4.label_map)
    inside = pre.image[(slice(None), *[slice(a, a + n) for (a, _), n in zip(pre.meta.pad, pre.meta.shape_after_resample)])]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    assert (pre.image[:, : pre.meta.pad[0][0]] == 0).all()  # padding is 0
    # with the mask rule, statistics come from the masked voxels and the rest is set to 0
    channel = case.image[0]
    mask = channel > np.percentile(channel, 30)
    out = normalize_channel(channel, ChannelNormalization("zscore", use_nonzero_mask=True), mask)
    assert (out[~mask] == 0).all()
    assert abs(out[mask].mean()) < 1e-4 and abs(out[mask].std() - 1) < 1e-3


def test_a_case_without_label_preprocesses_to_the_same_image(hippo4):
    plans = planned(hippo4)
    case = read_case(hippo4, hippo4.cases[1])
    train = preprocess_case(case, plans, "3d_fullres", hippo4.label_map)
    infer = preprocess_case(dataclasses.replace(case, label=None), plans, "3d_fullres", hippo4.label_map)
    np.testing.assert_array_equal(train.image, infer.image)
    assert infer.label is None and infer.locations.shape == (0, 4)
    assert dataclasses.replace(infer.meta, class_voxels=train.meta.class_voxels) == train.meta


def test_2d_configuration_pads_only_the_slice_plane(hippo4):
    plans = planned(hippo4, config="2d", patch_size=[64, 64])
    case = read_case(hippo4, hippo4.cases[0])
    pre = preprocess_case(case, plans, "2d", hippo4.label_map)
    assert pre.meta.pad[0] == [0, 0]
    assert pre.label.shape[0] == pre.meta.shape_after_resample[0] and pre.label.shape[1:] == (64, 64)


def test_undeclared_label_value_is_bad_input_naming_the_case(hippo4):
    case = read_case(hippo4, hippo4.cases[0])
    label = case.label.copy()
    label[0, 0, 0] = 7
    with pytest.raises(BadInputError, match=case.case_id + ".*7"):
        preprocess_case(dataclasses.replace(case, label=label), planned(hippo4), "3d_fullres", hippo4.label_map)


def test_separable_resampling_equals_scipys_spline_on_nnunets_grid(hippo4):
    """nnU-Net resizes with skimage (scipy zoom, align_corners=False, edge mode); ours must match it."""
    image = read_case(hippo4, hippo4.cases[0]).image
    for new_shape in ((50, 30, 41), (17, 80, 35)):
        scale = [n / m for n, m in zip(image.shape[1:], new_shape)]
        reference = affine_transform(image[0], scale, [0.5 * s - 0.5 for s in scale], output_shape=new_shape,
                                     order=3, mode="nearest")
        ours = resample_image(image, new_shape, order=3)[0]
        np.testing.assert_allclose(ours, reference, atol=1e-5 * np.abs(reference).max())
        linear = affine_transform(image[0], scale, [0.5 * s - 0.5 for s in scale], output_shape=new_shape,
                                  order=1, mode="nearest")
        np.testing.assert_allclose(resample_image(image, new_shape, order=1)[0], linear,
                                   atol=1e-5 * np.abs(linear).max())


def test_resampling_keeps_constants_and_undoes_integer_upsampling():
    rng = np.random.default_rng(0)
    const = np.full((1, 9, 10, 4), 2.5, np.float32)
    np.testing.assert_allclose(resample_image(const, (13, 7, 12), order=3, axis=2), 2.5, atol=1e-5)
    # three classes in structures at least 2 voxels thick: x2 and x3 then back is exact
    coarse = (rng.random((6, 7, 3)) > 0.5) * rng.integers(1, 4, (6, 7, 3))
    label = np.kron(coarse, np.ones((2, 2, 2))).astype(np.uint8)
    for factor in (2, 3):
        up = resample_label(label, [n * factor for n in label.shape])
        np.testing.assert_array_equal(resample_label(up, label.shape), label)
    # separate thick axis with order_z 0: every output slice is a copy of a resampled input slice
    image = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
    out = resample_image(image, (16, 16, 9), order=3, axis=2, order_z=0)
    for k in range(9):
        assert any(np.allclose(out[0, :, :, k], out[0, :, :, j]) for j in (1, 4, 7))


# ---------------------------------------------------------------- the dataset run


def copy_case_dataset(hippocampus: Path, root: Path, case_ids, broken: str | None = None) -> Path:
    """A small Decathlon-layout copy of real cases; `broken` gets a truncated image file."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = json.loads((hippocampus / "dataset.json").read_text())
    meta["training"] = []
    for cid in case_ids:
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(hippocampus / sub / f"{cid}.nii.gz", root / sub / f"{cid}.nii.gz")
        meta["training"].append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    if broken:
        path = root / "imagesTr" / f"{broken}.nii.gz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_a_broken_case_is_reported_by_id_while_the_others_finish(hippocampus, tmp_path):
    ids = [c.case_id for c in load_dataset(hippocampus).cases[:3]]
    ds = load_dataset(copy_case_dataset(hippocampus, tmp_path / "raw", ids, broken=ids[1]))
    plans = planned(subset(load_dataset(hippocampus), ids))
    report = run_preprocessing(ds, plans, "3d_fullres", tmp_path / "store.zarr", progress=False)
    assert report.done == [ids[0], ids[2]]
    assert [p.case for p in report.failed] == [ids[1]]
    assert "cannot read voxels" in report.failed[0].message
    assert ids[1] in str(report) and json.loads(json.dumps(report.to_json()))["failed"][0]["case"] == ids[1]
    assert open_store(tmp_path / "store.zarr", "r").config("3d_fullres").case_ids() == [ids[0], ids[2]]


def test_dask_gives_the_same_store_as_in_process(hippo4, dask_client, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "TASKS_PER_WORKER", 1)  # two tasks of two cases each: batches
    plans = planned(hippo4)
    local = run_preprocessing(hippo4, plans, "3d_fullres", tmp_path / "local.zarr", progress=False)
    remote = run_preprocessing(hippo4, plans, "3d_fullres", tmp_path / "dask.zarr", client=dask_client, progress=False)
    assert not local.failed and not remote.failed and sorted(remote.done) == sorted(local.done)
    a = open_store(tmp_path / "local.zarr", "r").config("3d_fullres")
    b = open_store(tmp_path / "dask.zarr", "r").config("3d_fullres")
    assert a.case_ids() == b.case_ids() == sorted(c.case_id for c in hippo4.cases)
    for cid in a.case_ids():
        np.testing.assert_array_equal(a.image(cid)[...], b.image(cid)[...])
        np.testing.assert_array_equal(a.label(cid)[...], b.label(cid)[...])
        np.testing.assert_array_equal(a.locations(cid), b.locations(cid))
        assert a.meta(cid) == b.meta(cid)


def test_small_cases_travel_in_batches_and_a_large_one_alone(hippocampus, monkeypatch):
    ds = load_dataset(hippocampus)
    ids = [c.case_id for c in ds.cases]
    batches = case_batches(ds, ids, workers=2)
    assert [c for b in batches for c in b] == ids  # every case once, in order
    assert len(batches) >= 2 * dataset_module.TASKS_PER_WORKER  # both workers kept busy to the end
    assert max(len(b) for b in batches) > 1 and max(len(b) for b in batches) <= dataset_module.BATCH_CASES
    monkeypatch.setattr(dataset_module, "BATCH_BYTES", 1)  # every case is "large" now
    assert case_batches(ds, ids[:5], workers=1) == [[c] for c in ids[:5]]
    assert case_batches(ds, [], workers=2) == []


def test_the_nonzero_mask_fills_holes_as_nnunet_on_the_whole_array():
    rng = np.random.default_rng(3)
    for trial in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 12, 3))
        image = np.zeros((1, *shape), dtype=np.float32)
        box = tuple(slice(int(rng.integers(0, n)), None) for n in shape)  # masks away from the border too
        image[(0, *box)] = rng.random(image[(0, *box)].shape) < rng.uniform(0.3, 0.95)
        np.testing.assert_array_equal(nonzero_mask(image), binary_fill_holes(image[0] != 0), err_msg=str(trial))


def _heartbeat_filter_installed() -> bool:
    import logging

    from pipeline.parallel import _drop_heartbeat_race

    return _drop_heartbeat_race in logging.getLogger("distributed.worker").filters


def test_a_dask_worker_stays_quiet_when_shutdown_races_its_heartbeat(dask_client, caplog):
    """CI once printed a CommClosedError traceback from a heartbeat in flight as the cluster closed."""
    import logging

    from pipeline.parallel import _drop_heartbeat_race

    assert all(dask_client.run(_heartbeat_filter_installed).values())

    logger = logging.getLogger("distributed.worker.test")
    logger.addFilter(_drop_heartbeat_race)
    try:
        with caplog.at_level(logging.ERROR, logger="distributed.worker.test"):
            logger.error("Failed to communicate with scheduler during heartbeat.", exc_info=OSError("closed"))
            logger.error("Compute Failed: a real task error")
    finally:
        logger.removeFilter(_drop_heartbeat_race)
    assert [r.getMessage() for r in caplog.records] == ["Compute Failed: a real task error"]


class SlowToSend:
    """A task result whose pickling, i.e. sending it from its worker, takes `seconds`: a fetch that stays in flight."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __reduce__(self):
        import time

        time.sleep(self.seconds)
        return float, (self.seconds,)


class Kept(list):
    """A logging handler that keeps the records (distributed's and Tornado's loggers do not propagate to caplog)."""

    def __init__(self, *names: str):
        super().__init__()
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = self.append
        self.loggers = [logging.getLogger(name) for name in names]

    def __enter__(self):
        for logger in self.loggers:
            logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self.handler)


def test_ctrl_c_in_a_results_loop_leaves_no_fetch_for_the_closing_client_to_cut_off(dask_client):
    """tests/test_faults.py's Ctrl-C once printed a CommClosedError traceback (logger tornado.application)
    and the scheduler's "Couldn't gather keys": as_completed(with_results=True) was still fetching a
    finished task's result, in a task on the client's loop, when the client closed its connections.
    `results_of` fetches only what the caller asks for, and a task's error is a value, not a raise."""
    import signal
    import threading
    import time

    from distributed import Client, as_completed, wait

    from pipeline.parallel import results_of

    with Kept("tornado.application", "distributed") as logged:
        with pytest.raises(KeyboardInterrupt):
            with Client(dask_client.scheduler.address, set_as_default=False) as client:
                first = client.submit(float, 1.0, pure=False)
                slow = client.submit(SlowToSend, 1.0, pure=False)
                wait([first, slow])
                completed = as_completed([first], loop=client.loop)
                for future, value in results_of(completed):
                    assert (future, value) == (first, 1.0)
                    completed.add(slow)  # finished: with_results=True would start fetching it at once
                    raise KeyboardInterrupt  # Ctrl-C while the caller handles a result
        time.sleep(1.0)  # the client has closed; a fetch it cut off has failed by now, the worker is free

        # Ctrl-C while the caller waits for a result being fetched: distributed's sync cancels the fetch.
        # Python's own SIGINT handler for the duration: an imported library may have replaced it
        # (dask_jobqueue's runner exits on SIGINT), and the CLI's users get the default one.
        handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                with Client(dask_client.scheduler.address, set_as_default=False) as client:
                    slow = client.submit(SlowToSend, 2.0, pure=False)
                    wait([slow])
                    ctrl_c = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
                    ctrl_c.start()
                    for _ in results_of(as_completed([slow], loop=client.loop)):
                        pass
            ctrl_c.join()
        finally:
            signal.signal(signal.SIGINT, handler)
        time.sleep(2.0)
    assert [r.getMessage() for r in logged if r.levelno >= logging.ERROR] == []

    with Client(dask_client.scheduler.address, set_as_default=False) as client:  # a task's error is a value
        completed = as_completed([client.submit(int, "x"), client.submit(int, "1")], loop=client.loop)
        outcomes = sorted((repr(value) for _, value in results_of(completed)))
    assert outcomes == ["1", "ValueError(\"invalid literal for int() with base 10: 'x'\")"]


def _lose_batches_holding(case_id: str | None) -> None:
    """Run on each Dask worker: a task whose batch holds `case_id` fails as when its worker was lost for good
    (KilledWorker: every worker that ran it died, e.g. over its memory limit); None restores the real task."""
    from types import SimpleNamespace

    from distributed.scheduler import KilledWorker

    real = getattr(preprocess_module, "real_preprocess_batch", preprocess_module.preprocess_batch)
    preprocess_module.real_preprocess_batch = real

    def lost(dataset, case_ids, *args):
        if case_id in case_ids:
            raise KilledWorker(f"preprocess-{case_id}", SimpleNamespace(address="tcp://127.0.0.1:1"), 3)
        return real(dataset, case_ids, *args)

    preprocess_module.preprocess_batch = real if case_id is None else lost


def test_a_batch_whose_worker_was_lost_is_retried_case_by_case_so_only_its_bad_case_fails(
        synthetic_dataset, dask_client, tmp_path, monkeypatch):
    """Dask reports such a task as an exception; as_completed(with_results=True, raise_errors=False) handed
    it over as a (type, exception, traceback) tuple, which the retry never recognised."""
    monkeypatch.setattr(dataset_module, "TASKS_PER_WORKER", 1)  # 4 cases, 2 workers: two batches of two
    ds = load_dataset(synthetic_dataset)
    ds = subset(ds, [c.case_id for c in ds.cases[:4]])
    ids = sorted(c.case_id for c in ds.cases)
    bad = ids[1]
    dask_client.run(_lose_batches_holding, bad)
    try:
        report = run_preprocessing(ds, planned(ds), "3d_fullres", tmp_path / "store.zarr", client=dask_client,
                                   progress=False)
    finally:
        dask_client.run(_lose_batches_holding, None)
    assert sorted(report.done) == [i for i in ids if i != bad]
    assert [p.case for p in report.failed] == [bad] and "KilledWorker" in report.failed[0].message
    assert open_store(tmp_path / "store.zarr", "r").config("3d_fullres").case_ids() == sorted(report.done)


# ---------------------------------------------------------------- nnU-Net's label resampling rule (issue 3)


def test_label_ties_follow_nnunets_rule_at_multi_class_junctions():
    """Halving a grid samples every output voxel midway between input voxels, so classes tie. nnU-Net
    (batchgenerators 0.25.5 resize_segmentation) keeps the highest interpolated indicator; a tie goes to
    the nearest-neighbour label (the upper voxel: .5 rounds up) if it is tied, else to the lowest label.
    (keep_classes=False: a 1-voxel output would otherwise get our rescue of the class that lost.)"""

    def halve(label, new_shape):
        return resample_label(label, new_shape, keep_classes=False)

    # a two-class boundary: both samples are 0.5/0.5 ties, each won by its upper voxel
    np.testing.assert_array_equal(halve(np.array([[[0, 1, 1, 0]]], np.uint8), (1, 1, 2)), [[[1, 0]]])
    # a 2x2 junction of two classes on the diagonals: the nearest voxel (1, 1) decides, not the larger class
    np.testing.assert_array_equal(halve(np.array([[[1, 2], [2, 1]]], np.uint8), (1, 1, 1)), [[[1]]])
    np.testing.assert_array_equal(halve(np.array([[[2, 1], [1, 2]]], np.uint8), (1, 1, 1)), [[[2]]])
    # a 2x2x2 junction of three classes (C order): 1 and 2 weigh 3/8 each, 3 weighs 2/8 but is the
    # nearest voxel - it lost, so the lowest tied class wins; with background in place of 1, background
    block = np.array([1, 2, 1, 2, 2, 1, 3, 3], np.uint8).reshape(2, 2, 2)
    np.testing.assert_array_equal(halve(block, (1, 1, 1)), [[[1]]])
    block[block == 1] = 0
    np.testing.assert_array_equal(halve(block, (1, 1, 1)), [[[0]]])
    # no tie: the strongest class wins even where it is not the nearest voxel
    block = np.array([1, 1, 1, 2, 2, 3, 1, 3], np.uint8).reshape(2, 2, 2)
    np.testing.assert_array_equal(halve(block, (1, 1, 1)), [[[1]]])


def _per_label_reference(label, new_shape, axis=None):
    """nnU-Net's rule spelled out with scipy's zoom (what skimage resize calls): one order-1 zoom per
    label, clipped to [0, 1], argmax; exact ties to the nearest-neighbour label if tied, else the lowest.
    With a separate axis: that rule per slice, then the nearest slice along the axis."""
    from scipy.ndimage import zoom

    def resize(x, shape, order):
        return zoom(x, [m / n for n, m in zip(x.shape, shape)], order=order, mode="nearest", grid_mode=True)

    if axis is not None:
        plane = [n for d, n in enumerate(new_shape) if d != axis]
        slices = [_per_label_reference(np.take(label, k, axis=axis), plane) for k in range(label.shape[axis])]
        stacked = np.stack(slices, axis=axis)
        return resize(stacked, new_shape, 0)
    classes = np.unique(label)
    scores = np.stack([np.clip(resize((label == c).astype(float), new_shape, 1), 0, 1) for c in classes])
    nearest = resize(label, new_shape, 0)
    top = scores == scores.max(axis=0)
    lowest = classes[np.argmax(top, axis=0)]
    nearest_tied = np.take_along_axis(top, np.searchsorted(classes, nearest)[None], axis=0)[0]
    return np.where(nearest_tied, nearest, lowest).astype(label.dtype)


def test_label_resampling_equals_the_per_label_rule_on_random_junctions():
    """Ours decides only boundary voxels, from the 2^k voxels each sample reads; the result must be the
    per-label rule's, voxel for voxel, jointly and with a separate thick axis, up and down."""
    rng = np.random.default_rng(3)
    for i in range(12):
        shape = tuple(int(n) for n in rng.integers(4, 11, 3))
        label = np.kron(rng.integers(0, 4, tuple(-(-n // 2) for n in shape)), np.ones((2, 2, 2), int))
        label = (label[tuple(slice(0, n) for n in shape)] if i % 2 else rng.integers(0, 4, shape)).astype(np.uint8)
        new_shape = tuple(max(1, round(n * f)) for n, f in zip(shape, rng.choice([0.5, 0.7, 1.0, 1.5, 2.0], 3)))
        axis = [None, 0, 2][i % 3]
        ours = resample_label(label, new_shape, 1, axis, 0, keep_classes=False)
        np.testing.assert_array_equal(ours, _per_label_reference(label, new_shape, axis), err_msg=f"{shape}->{new_shape}")


# ---------------------------------------------------------------- background outside the nonzero region (issue 14)


def _marked_reference(label, outside, new_shape, axis=None):
    """nnU-Net's preprocessing of the labels: background outside the nonzero region marked -1
    (crop_to_nonzero), the per-label rule over all classes -1 included, then -1 read as background."""
    marked = label.astype(np.int16)
    marked[outside & (label == 0)] = -1
    return np.maximum(_per_label_reference(marked, new_shape, axis), 0).astype(label.dtype)


def test_background_outside_the_nonzero_region_competes_as_a_class_of_its_own():
    """A sample reading structure 1 (1/2), background (1/4) and outside (1/4): nnU-Net's -1 splits the
    background score, so 1 wins; counted as one background class the two would tie it at 1/2 and the
    nearest voxel (background) would win - the cause of the 291 CT voxels that differed from nnU-Net."""
    label = np.array([[[1, 1], [0, 0]]], np.uint8)
    outside = np.array([[[False, False], [False, True]]])
    assert resample_label(label, (1, 3, 3), keep_classes=False)[0, 1, 1] == 0
    np.testing.assert_array_equal(resample_label(label, (1, 3, 3), keep_classes=False, outside=outside),
                                  [[[1, 1, 1], [0, 1, 0], [0, 0, 0]]])
    rng = np.random.default_rng(14)
    for i in range(8):
        shape = tuple(int(n) for n in rng.integers(4, 10, 3))
        label = rng.integers(0, 4, shape).astype(np.uint8)
        outside = rng.random(shape) < 0.4
        new_shape = tuple(max(1, round(n * f)) for n, f in zip(shape, rng.choice([0.5, 0.7, 1.5, 2.0], 3)))
        axis = [None, 2][i % 2]
        ours = resample_label(label, new_shape, 1, axis, 0, keep_classes=False, outside=outside)
        np.testing.assert_array_equal(ours, _marked_reference(label, outside, new_shape, axis), err_msg=f"{shape}->{new_shape}")


def test_preprocessing_resamples_labels_with_the_outside_of_the_nonzero_region_apart(hippo4):
    """A case whose image is zero in a corner touching the border (outside the filled nonzero mask,
    as the air-free edge of a CT field of view) with structures of random labels along that edge:
    the preprocessed labels equal nnU-Net's rule with that corner marked -1, voxel for voxel."""
    case = read_case(hippo4, hippo4.cases[0])
    image, label = case.image.copy(), np.zeros_like(case.label)
    x, y, z = np.indices(label.shape)
    corner = x + y < 16
    image[:, corner] = 0
    band = (x + y >= 16) & (x + y < 22)
    label[band] = np.random.default_rng(0).integers(0, 3, int(band.sum()))
    case = dataclasses.replace(case, image=image, label=label)
    plans = planned(hippo4, spacing=[0.7, 0.7, 0.7])
    pre = preprocess_case(case, plans, "3d_fullres", hippo4.label_map)
    tf = list(plans.transpose_forward)
    image_t, label_t = np.transpose(image, [0, *[t + 1 for t in tf]]), np.transpose(label, tf)
    mask = nonzero_mask(image_t)
    crop = tuple(slice(int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[0]),
                       int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[-1]) + 1) for d in range(3))
    new_shape = tuple(pre.meta.shape_after_resample)
    unpad = tuple(slice(a, a + n) for (a, _), n in zip(pre.meta.pad, new_shape))
    expected = _marked_reference(label_t[crop], ~mask[crop], new_shape, pre.meta.separate_z_axis)
    np.testing.assert_array_equal(pre.label[unpad], expected)
    merged = resample_label(label_t[crop], new_shape, 1, pre.meta.separate_z_axis, keep_classes=False)
    assert (merged != expected).any(), "the case must have voxels where merging outside into background differs"


def test_local_dask_workers_are_forked_only_from_a_driver_without_grpc_or_torch():
    """Forking a process whose gRPC channels (Ray) or torch threads are live can hang child or parent."""
    import os
    import subprocess
    import sys

    code = ("import sys; from pipeline.parallel import local_start_method as m; a = m(); "
            "import torch; print(a, m())")
    env = {k: v for k, v in os.environ.items() if k != "SEGPIPE_DASK_START_METHOD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == (["fork", "spawn"] if sys.platform.startswith("linux") else ["spawn", "spawn"])
    env["SEGPIPE_DASK_START_METHOD"] = "forkserver"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["forkserver", "forkserver"]
