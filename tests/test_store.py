"""The Zarr store: chunks are patches, only complete cases are visible, runs resume and never overlap,
stores from other plans are refused, and corruption is found."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import zarr

import pipeline.preprocessing.preprocess as preprocessing
from pipeline.data.dataset import load_dataset, read_case
from pipeline.errors import SegPipeError
from pipeline.planning.fingerprint import compute_fingerprint
from pipeline.planning.planner import plan_experiment
from pipeline.preprocessing.preprocess import preprocess_case, run_preprocessing
from pipeline.preprocessing.store import StoreLock, config_attrs, open_store, verify_store

CONFIG = "3d_fullres"


@pytest.fixture(scope="module")
def hippo(hippocampus):
    ds = load_dataset(hippocampus)
    ds = dataclasses.replace(ds, cases=ds.cases[:3])
    plans = plan_experiment(compute_fingerprint(ds, progress=False), ds)
    return ds, plans


@pytest.fixture(scope="module")
def built(hippo, tmp_path_factory):
    """A store with three complete hippocampus cases (copied by tests that damage it)."""
    ds, plans = hippo
    path = tmp_path_factory.mktemp("store") / "store.zarr"
    report = run_preprocessing(ds, plans, CONFIG, path, progress=False)
    assert not report.failed, report
    return path


def copy_store(built, tmp_path):
    path = tmp_path / "store.zarr"
    shutil.copytree(built, path)
    return path


def test_chunks_are_the_patch_size(hippo, built, tmp_path):
    ds, plans = hippo
    patch = plans.configuration(CONFIG).patch_size
    cs = open_store(built, "r").config(CONFIG)
    for cid in cs.case_ids():
        assert cs.image(cid).chunks == (1, *patch)
        assert cs.label(cid).chunks == tuple(patch)
    assert cs.attrs["patch_size"] == patch and cs.attrs["plans_hash"] == plans.hash(CONFIG)
    # 2d: one slice of one channel per chunk
    run_preprocessing(ds, plans, "2d", tmp_path / "s.zarr", progress=False)
    cs2 = open_store(tmp_path / "s.zarr", "r").config(plans.configuration("2d").data_identifier)
    patch2 = plans.configuration("2d").patch_size
    cid = cs2.case_ids()[0]
    assert cs2.image(cid).chunks == (1, 1, *patch2) and cs2.label(cid).chunks == (1, *patch2)


def test_stored_case_matches_the_preprocessed_arrays(hippo, built):
    ds, plans = hippo
    cs = open_store(built, "r").config(CONFIG, plans.hash(CONFIG))
    cid = ds.cases[0].case_id
    pre = preprocess_case(read_case(ds, cid), plans, CONFIG, ds.label_map)
    image = cs.image(cid)
    assert image.dtype == np.float16 and cs.attrs["image_dtype"] == "float16"
    np.testing.assert_allclose(image[...], pre.image, atol=4e-3)  # float16 rounding, see store.py
    np.testing.assert_array_equal(cs.label(cid)[...], pre.label)
    np.testing.assert_array_equal(cs.locations(cid), pre.locations)
    assert cs.meta(cid) == pre.meta
    # a patch read touches only its chunks and equals the same window of the whole array
    window = (slice(None), slice(3, 3 + 20), slice(5, 5 + 30), slice(2, 2 + 25))
    np.testing.assert_array_equal(image[window], image[...][window])


def test_resume_recomputes_nothing_that_is_complete(hippo, built, tmp_path, monkeypatch):
    ds, plans = hippo
    path = copy_store(built, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    calls = []
    real = preprocessing.preprocess_case
    monkeypatch.setattr(preprocessing, "preprocess_case", lambda *a, **k: calls.append(a) or real(*a, **k))
    report = run_preprocessing(ds, plans, CONFIG, path, progress=False)
    assert report.done == [] and report.skipped == [c.case_id for c in ds.cases] and calls == []
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()} == before


def test_a_case_whose_raw_files_changed_is_redone_and_a_mere_copy_is_not(hippo, built, tmp_path):
    ds, plans = hippo
    data = tmp_path / "data"  # a copy of the raw files: new modification times, same content
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for c in ds.cases:
        shutil.copy(c.images[0], data / "imagesTr" / c.images[0].name)
        shutil.copy(c.label, data / "labelsTr" / c.label.name)
    moved = dataclasses.replace(ds, root=data, cases=tuple(
        dataclasses.replace(c, images=(data / "imagesTr" / c.images[0].name,), label=data / "labelsTr" / c.label.name)
        for c in ds.cases))
    path = copy_store(built, tmp_path)
    report = run_preprocessing(moved, plans, CONFIG, path, progress=False)
    assert report.changed == [] and report.done == [] and len(report.skipped) == 3

    victim = moved.cases[2]  # its label edited after preprocessing: the stored case is stale
    import nibabel as nib

    img = nib.load(str(victim.label))
    edited = np.asarray(img.dataobj).copy()
    edited[edited == 2] = 1
    nib.save(nib.Nifti1Image(edited, img.affine, img.header), str(victim.label))
    report = run_preprocessing(moved, plans, CONFIG, path, progress=False)
    assert report.changed == [victim.case_id] and report.done == [victim.case_id]
    assert "raw files changed" in str(report)
    stored = open_store(path, "r").config(CONFIG).label(victim.case_id)[...]
    assert 2 not in np.unique(stored) and 1 in np.unique(stored)
    assert run_preprocessing(moved, plans, CONFIG, path, progress=False).changed == []  # and now it is current


def test_incomplete_cases_are_invisible_and_redone(hippo, built, tmp_path):
    ds, plans = hippo
    path = copy_store(built, tmp_path)
    cs = open_store(path, "a").config(CONFIG, plans.hash(CONFIG))
    victim = ds.cases[1].case_id
    # a writer killed after the arrays but before `complete`, and one killed before any metadata
    group = zarr.open_group(str(path / CONFIG / "cases" / victim), mode="r+")
    group.update_attributes({"complete": False})
    (path / CONFIG / "cases" / "ghost" / "image" / "c").mkdir(parents=True)
    assert victim not in cs.case_ids() and "ghost" not in cs.case_ids()
    assert cs.incomplete_case_ids() == ["ghost", victim]
    with pytest.raises(KeyError, match=victim):
        cs.image(victim)
    report = run_preprocessing(ds, plans, CONFIG, path, progress=False)
    assert report.deleted_incomplete == ["ghost", victim] and report.done == [victim]
    assert cs.case_ids() == sorted(c.case_id for c in ds.cases) and not (path / CONFIG / "cases" / "ghost").exists()


def test_a_concurrent_run_is_refused(hippo, built, tmp_path):
    ds, plans = hippo
    path = copy_store(built, tmp_path)
    with StoreLock(str(path) + ".lock"):  # held by this (live) process
        with pytest.raises(SegPipeError, match=f"another preprocessing run \\(pid {os.getpid()}"):
            run_preprocessing(ds, plans, CONFIG, path, progress=False)
    assert not os.path.exists(str(path) + ".lock")


def test_a_stale_lock_of_a_dead_process_is_taken_over(hippo, built, tmp_path):
    ds, plans = hippo
    path = copy_store(built, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "store.zarr.lock"
    lock.write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}"}}')
    report = run_preprocessing(ds, plans, CONFIG, path, progress=False)
    assert len(report.skipped) == 3 and not lock.exists()


def test_a_store_from_other_plans_is_refused(hippo, built, tmp_path):
    ds, plans = hippo
    other = dataclasses.replace(plans, configurations=dict(plans.configurations))
    other.configurations[CONFIG] = dataclasses.replace(plans.configuration(CONFIG), spacing=[1.2, 1.2, 1.2])
    with pytest.raises(SegPipeError, match="other plans.*fresh workdir"):
        run_preprocessing(ds, other, CONFIG, copy_store(built, tmp_path), progress=False)
    with pytest.raises(SegPipeError, match="no preprocessed data for 'nope'"):
        open_store(built, "r").config("nope")


def test_verify_store_finds_corrupt_and_missing_chunks(hippo, built, tmp_path):
    ds, _ = hippo
    assert verify_store(built) == []
    path = copy_store(built, tmp_path)
    cid_a, cid_b = ds.cases[0].case_id, ds.cases[2].case_id
    chunk = next((path / CONFIG / "cases" / cid_a / "image").glob("c.*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    chunk.write_bytes(bytes(data))
    next((path / CONFIG / "cases" / cid_b / "label").glob("c.*")).unlink()
    problems = verify_store(path)
    assert {p.case for p in problems} == {cid_a, cid_b}
    assert any("image chunk" in p.message and "checksum" in p.message.lower() for p in problems if p.case == cid_a)
    assert any("label: 1 of 1 chunk(s) missing" in p.message for p in problems if p.case == cid_b)


def test_chunk_files_lie_flat_in_each_array_folder_and_older_nested_stores_still_read(hippo, built, tmp_path,
                                                                                      monkeypatch):
    """A case is 4 folders (itself and its 3 arrays): chunk files are `c.0.0.0.0`, not `c/0/0/0/0`,
    whose folders cost the file system more than the writing (store.CHUNK_KEY_ENCODING). A store
    written before with "/" reads the same, and its missing chunks are still named."""
    from pipeline.preprocessing import store as store_module
    from pipeline.preprocessing.store import StoreDamageError

    ds, plans = hippo
    cid = ds.cases[0].case_id
    case_dir = built / CONFIG / "cases" / cid
    assert sorted(p.relative_to(case_dir).as_posix() for p in case_dir.rglob("*") if p.is_dir()) == \
        ["image", "label", "locations"]
    assert [p.name for p in (case_dir / "image").iterdir() if p.name != "zarr.json"] == ["c.0.0.0.0"]

    monkeypatch.setattr(store_module, "CHUNK_KEY_ENCODING", {"name": "default", "separator": "/"})
    old = tmp_path / "old.zarr"
    assert not run_preprocessing(ds, plans, CONFIG, old, progress=False).failed
    monkeypatch.undo()
    assert (old / CONFIG / "cases" / cid / "image" / "c" / "0" / "0" / "0" / "0").is_file()
    new, before = open_store(built, "r").config(CONFIG), open_store(old, "r").config(CONFIG)
    assert before.case_ids() == new.case_ids() and verify_store(old) == []
    for case in new.case_ids():
        np.testing.assert_array_equal(before.image(case)[...], new.image(case)[...])
        np.testing.assert_array_equal(before.label(case)[...], new.label(case)[...])
    (old / CONFIG / "cases" / cid / "image" / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreDamageError, match=rf"case {cid}: its image array .* \(chunk c/0/0/0/0 is missing\)"):
        np.asarray(open_store(old, "r").config(CONFIG).image(cid)[...])
    assert [p.case for p in verify_store(old)] == [cid]


def test_works_on_fsspec_urls(hippo):
    ds, plans = hippo
    url = f"memory://segpipe-test-{os.getpid()}/store.zarr"
    store = open_store(url, "a", dataset_name=ds.name)
    cs = store.config(CONFIG, plans.hash(CONFIG), create=True, **config_attrs(plans, CONFIG))
    cid = ds.cases[0].case_id
    pre = preprocess_case(read_case(ds, cid), plans, CONFIG, ds.label_map)
    cs.write_case(cid, pre)
    again = open_store(url, "r").config(CONFIG, plans.hash(CONFIG))
    assert again.case_ids() == [cid]
    np.testing.assert_array_equal(again.label(cid)[...], pre.label)
    assert verify_store(url) == []


def test_a_folder_that_is_not_a_store_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(SegPipeError, match="not a seg-pipeline store"):
        open_store(tmp_path / "other.zarr", "a")
    with pytest.raises(SegPipeError, match="no store at"):
        open_store(tmp_path / "missing.zarr", "r")
