"""A damaged store never trains silently and is repaired (issue 13, defects 1, 6 and 12).

A stored case writes every chunk, so a chunk file that is missing is damage, never "empty": zarr
would read it as the fill value (zeros). Every reader of the store - the ConfigStore arrays, the
samplers training and validation use, `segpipe verify` - refuses a missing or truncated chunk, a
missing array (its zarr.json, or the whole `locations` folder) naming the case and the array;
`preprocess` redoes a case whose arrays or chunk files are missing (a cheap structural check on
resume) and `segpipe verify --repair` deletes a case with a corrupt chunk so that the next
`preprocess` redoes it, until the store equals a clean one. A folder at `W/store.zarr` that is not
a seg-pipeline store (a user's files) is refused, never adopted.

The store is small (5 phantom cases, 16x32x32 patches: 8 image and 8 label chunks a case); readers
run in this process (`pipeline.cli.main` for `verify`), except `preprocess` and `train` in the slow
end-to-end test, which run the real CLI as a subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_bad_input import CONFIG, make_workdir, run_cli, store_checksums

from pipeline.cli import main
from pipeline.data.dataset import load_dataset
from pipeline.errors import BadInputError
from pipeline.planning.plans import Plans
from pipeline.preprocessing.preprocess import run_preprocessing
from pipeline.preprocessing.store import StoreDamageError, open_store, verify_store
from pipeline.training.sampling import (
    BatchSampler,
    PatchSpec,
    TrainBatches,
    ValidationBatches,
    batch_iterator,
    close_iterator,
)
from pipeline.training.splits import kfold_splits

NUM_CASES = 5  # fold 0 of 5: 4 training cases, 1 validation case
ARRAYS = ("image", "label", "locations")


def _tiny(plans) -> None:
    conf = plans.configurations[CONFIG]
    conf.patch_size, conf.batch_size = [16, 32, 32], 2
    conf.strides, conf.kernel_sizes = [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3
    conf.features_per_stage = [4, 8, 16]
    for other in plans.configurations.values():  # 3d_lean inherits the 3-stage strides: 3 stages too
        if other.inherits_from == CONFIG and other.features_per_stage is not None:
            other.features_per_stage = [4, 8, 16]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(dataset, workdir, checksums of its clean store, fold 0's split); copied by every test."""
    from pipeline.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("store_damage")
    dataset = make_demo_dataset(root / "Phantom", num_cases=NUM_CASES, seed=4)
    wd = make_workdir(root / "W", dataset, plans_edit=_tiny)
    cases = open_store(wd.store, "r").config(CONFIG).case_ids()
    assert len(cases) == NUM_CASES
    return dataset, wd.root, store_checksums(wd.store), kfold_splits(cases)[0]


@pytest.fixture
def work(clean, tmp_path):
    """A copy of the clean workdir: (dataset, workdir, store, clean checksums, fold 0)."""
    dataset, workdir, checksums, fold0 = clean
    wd = tmp_path / "W"
    shutil.copytree(workdir, wd)
    return dataset, wd, wd / "store.zarr", checksums, fold0


def _case_dir(store: Path, case: str) -> Path:
    return store / CONFIG / "cases" / case


def _chunk_files(store: Path, case: str) -> list[Path]:
    return sorted(p for a in ARRAYS for p in (_case_dir(store, case) / a).glob("c.*"))


def _array_of(store: Path, chunk: Path) -> str:
    return chunk.relative_to(store).parts[3]


def _truncate(chunk: Path) -> None:
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 2])


def _read_all(store: Path, case: str, array: str):
    cs = open_store(store, "r").config(CONFIG)
    return cs.locations(case) if array == "locations" else np.asarray(getattr(cs, array)(case)[...])


def _whole_case_sampler(store: Path, case: str) -> BatchSampler:
    """A sampler whose first patch is the whole case (patch = its shape) and whose second is centred
    on a stored foreground location: one batch reads every chunk of the case."""
    shape = open_store(store, "r").config(CONFIG).label(case).shape
    return BatchSampler(PatchSpec(str(store), CONFIG, (case,), tuple(shape), slots=(False, True)))


def _verify(store: Path, capsys, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["verify", str(store), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _preprocess_in_process(dataset: Path, wd: Path):
    return run_preprocessing(load_dataset(dataset), Plans.load(wd / "plans.json"), CONFIG, wd / "store.zarr",
                             client=None, progress=False)


def _named(case: str, array: str) -> str:
    return rf"case {case}: its {array} array in \S+/{CONFIG}/cases/{case} is damaged"


# ---------------------------------------------------------------- defect 1: a missing chunk is damage


def test_a_missing_chunk_is_refused_by_every_reader_naming_the_case_and_the_array(work, capsys, reliability):
    dataset, wd, store, clean_sums, fold0 = work
    victim = fold0["train"][0]
    chunk = _case_dir(store, victim) / "image" / "c.0.1.0.0"
    chunk.unlink()
    reliability["faults"] += 1

    # the arrays ConfigStore hands out (what export/inference from the store would read): no zeros
    with pytest.raises(StoreDamageError, match=_named(victim, "image") + r" \(chunk c\.0\.1\.0\.0 is missing\)"):
        _read_all(store, victim, "image")
    assert StoreDamageError.exit_code == 2
    # the structural check names it without reading a chunk
    damaged = open_store(store, "r").config(CONFIG).check_cases()
    assert list(damaged) == [victim] and re.search(_named(victim, "image") + r" \(1 of 8 chunk\(s\) missing",
                                                   damaged[victim])

    # training's stream, as a training worker reads it (thread prefetch), and validation's
    spec = PatchSpec(str(store), CONFIG, tuple(fold0["train"]), (16, 32, 32), slots=(False, True))
    batches = batch_iterator(TrainBatches(spec, iterations_per_epoch=2), "thread")
    try:
        with pytest.raises(StoreDamageError, match=_named(victim, "image")):
            next(batches)
    finally:
        close_iterator(batches)
    val_spec = PatchSpec(str(store), CONFIG, (victim,), (16, 32, 32), slots=(False, True))
    with pytest.raises(StoreDamageError, match=_named(victim, "image")):
        next(iter(ValidationBatches(val_spec, num_batches=1)))

    rc, out, err = _verify(store, capsys)
    assert rc == 2 and "Traceback" not in err
    assert re.search(rf"error {victim}: {CONFIG}/cases/{victim}/image: 1 of 8 chunk\(s\) missing \(\[0, 1, 0, 0\]\)", err)
    assert len([line for line in err.splitlines() if line.strip()]) == 2, err  # the problem, then the count

    # preprocess redoes the case on resume: the store ends equal to the clean one
    report = _preprocess_in_process(dataset, wd)
    assert report.done == [victim] and [p.case for p in report.damaged] == [victim] and not report.failed
    assert "redid 1 damaged case(s): " + victim in str(report)
    assert store_checksums(store) == clean_sums
    assert _verify(store, capsys)[0] == 0


# ---------------------------------------------------------------- defect 6: missing array metadata


@pytest.mark.parametrize("damage", ["image/zarr.json", "label/zarr.json", "locations/zarr.json", "locations",
                                    "label shape", "image dtype"])
def test_a_case_missing_an_array_is_named_by_readers_and_redone_by_preprocess(work, capsys, reliability, damage):
    dataset, wd, store, clean_sums, fold0 = work
    victim = fold0["train"][1]
    case = _case_dir(store, victim)
    array = damage.split("/")[0].split(" ")[0]
    if damage == "locations":
        shutil.rmtree(case / "locations")
    elif damage == "label shape":  # metadata that disagrees with the case's record
        meta = json.loads((case / "label" / "zarr.json").read_text())
        meta["shape"][0] -= 1
        (case / "label" / "zarr.json").write_text(json.dumps(meta))
    elif damage == "image dtype":
        meta = json.loads((case / "image" / "zarr.json").read_text())
        meta["data_type"] = "float32"
        (case / "image" / "zarr.json").write_text(json.dumps(meta))
    else:
        (case / damage).unlink()
    reliability["faults"] += 1

    damaged = open_store(store, "r").config(CONFIG).check_cases()
    assert list(damaged) == [victim] and re.search(_named(victim, array), damaged[victim]), damaged
    # what `train`'s workers read: the case and array named, never KeyError: 'label'
    spec = PatchSpec(str(store), CONFIG, tuple(fold0["train"]), (16, 32, 32), slots=(False, True))
    with pytest.raises(StoreDamageError, match=_named(victim, array)):
        BatchSampler(spec).batch((0, 0, 0, 0))
    if "/" in damage or damage == "locations":
        with pytest.raises(StoreDamageError, match=_named(victim, array) + rf" \(no {array}/zarr.json\)"):
            _read_all(store, victim, array)

    rc, _, err = _verify(store, capsys)
    assert rc == 2 and victim in err and "Traceback" not in err

    report = _preprocess_in_process(dataset, wd)
    assert report.done == [victim] and [p.case for p in report.damaged] == [victim]
    assert store_checksums(store) == clean_sums


def test_verify_repair_deletes_the_damaged_cases_and_preprocess_redoes_them(work, capsys, reliability):
    dataset, wd, store, clean_sums, fold0 = work
    corrupt, missing = fold0["train"][2], fold0["val"][0]
    _truncate(_case_dir(store, corrupt) / "label" / "c.1.0.1")
    (_case_dir(store, missing) / "locations" / "c.0.0").unlink()
    reliability["faults"] += 2
    # a truncated chunk is there: only reading it finds it (the sampler names case and array)
    assert list(open_store(store, "r").config(CONFIG).check_cases()) == [missing]
    with pytest.raises(StoreDamageError, match=_named(corrupt, "label") + r" \(corrupt or unreadable chunk: "
                                               r"ValueError: .*checksum"):
        _whole_case_sampler(store, corrupt).batch((1, 0))

    rc, out, err = _verify(store, capsys, "--repair", "--json")
    report = json.loads(out)
    assert rc == 0 and report["ok"] and sorted(report["deleted"]) == sorted(
        f"{CONFIG}/cases/{c}" for c in (corrupt, missing)), out
    assert len(report["problems"]) == 2 and not report["unrepaired"]
    assert not _case_dir(store, corrupt).exists() and not _case_dir(store, missing).exists()
    assert _verify(store, capsys)[0] == 0  # what is left is sound

    rc, out, err = _verify(store, capsys, "--repair")
    assert rc == 0 and out.strip() == f"{store}: ok (every chunk read, nothing to repair)"
    report = _preprocess_in_process(dataset, wd)
    assert sorted(report.done) == sorted([corrupt, missing]) and not report.damaged
    assert store_checksums(store) == clean_sums


# ---------------------------------------------------------------- the fault test: every chunk of one case


@pytest.mark.slow
def test_every_chunk_of_a_case_missing_or_truncated_is_refused_and_repaired(work, capsys, reliability):
    """Each chunk of one case deleted, then truncated, in turn: the ConfigStore arrays (missing), the
    structural check (missing), a sampler reading the whole case and `verify` refuse it naming the case
    and the array; `preprocess` (missing) or `verify --repair` + `preprocess` (truncated) restore the
    clean store byte for byte."""
    dataset, wd, store, clean_sums, fold0 = work
    victim = fold0["train"][0]
    chunks = _chunk_files(store, victim)
    assert len(chunks) == 8 + 8 + 1
    for chunk in chunks:
        array = _array_of(store, chunk)
        key = chunk.relative_to(_case_dir(store, victim) / array).as_posix()
        for fault in ("missing", "truncated"):
            where = f"{fault} {array}/{key}"
            if fault == "missing":
                chunk.unlink()
                with pytest.raises(StoreDamageError, match=_named(victim, array) + f" \\(chunk {key} is missing\\)"):
                    _read_all(store, victim, array)
                assert list(open_store(store, "r").config(CONFIG).check_cases()) == [victim], where
                expected = _named(victim, array)
            else:
                _truncate(chunk)
                expected = _named(victim, array) + r" \(corrupt or unreadable chunk: ValueError: .*checksum"
            reliability["faults"] += 1
            with pytest.raises(StoreDamageError, match=expected):
                _whole_case_sampler(store, victim).batch((1, 0))

            rc, _, err = _verify(store, capsys)
            assert rc == 2 and re.search(rf"^error {victim}: {CONFIG}/cases/{victim}/{array}", err, re.M), (where, err)

            if fault == "truncated":
                rc, out, _ = _verify(store, capsys, "--repair")
                assert rc == 0 and f"deleted 1 damaged case(s) from {store}: {CONFIG}/cases/{victim}" in out, where
            report = _preprocess_in_process(dataset, wd)
            assert report.done == [victim] and not report.failed, (where, report)
            assert store_checksums(store) == clean_sums, where


# ---------------------------------------------------------------- defect 12: a folder that is not a store


def test_a_folder_that_is_not_a_store_is_refused_not_adopted(work, capsys, reliability):
    dataset, wd, store, _, _ = work
    shutil.rmtree(store)
    store.mkdir()
    (store / "notes.txt").write_text("my notes")
    reliability["bad_inputs"] += 1
    for mode in ("a", "r"):
        with pytest.raises(BadInputError, match=rf"{re.escape(str(store))} is a folder that is not a seg-pipeline "
                                                r"store \(it holds notes.txt\)"):
            open_store(store, mode)
    rc, _, err = _verify(store, capsys)
    assert rc == 2 and "is a folder that is not a seg-pipeline store" in err and "Traceback" not in err
    with pytest.raises(BadInputError, match="not a seg-pipeline store"):
        _preprocess_in_process(dataset, wd)
    assert sorted(p.name for p in store.iterdir()) == ["notes.txt"] and (store / "notes.txt").read_text() == "my notes"

    # an empty folder is adopted (a user may make it), and so is no folder at all
    (store / "notes.txt").unlink()
    open_store(store, "a")
    assert (store / "zarr.json").is_file()


def test_preprocess_refuses_a_folder_that_is_not_a_store_through_the_cli(work, tmp_path, reliability):
    dataset, wd, store, _, _ = work
    shutil.rmtree(store)
    store.mkdir()
    (store / "holiday.jpg").write_bytes(b"\xff\xd8 a user's picture")
    reliability["bad_inputs"] += 1
    run = run_cli("preprocess", dataset, "--workdir", wd, "--workers", "1", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"{store} is a folder that is not a seg-pipeline store (it holds holiday.jpg)" in run.stderr
    assert [p.name for p in store.iterdir()] == ["holiday.jpg"]


# ---------------------------------------------------------------- the same in a bucket


@pytest.mark.slow
def test_a_damaged_store_in_a_bucket_is_refused_and_repaired(work, bucket, capsys, reliability):
    import s3fs

    dataset, wd, local_store, clean_sums, fold0 = work
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    url = f"{bucket}/W/store.zarr"
    fs.put(str(local_store), url.removeprefix("s3://"), recursive=True)
    missing, no_label = fold0["train"][0], fold0["train"][1]
    fs.rm(f"{url}/{CONFIG}/cases/{missing}/image/c.0.0.1.0".removeprefix("s3://"))
    fs.rm(f"{url}/{CONFIG}/cases/{no_label}/label/zarr.json".removeprefix("s3://"))
    reliability["faults"] += 2

    with pytest.raises(StoreDamageError, match=_named(missing, "image") + r" \(chunk c\.0\.0\.1\.0 is missing\)"):
        np.asarray(open_store(url, "r").config(CONFIG).image(missing)[...])
    damaged = open_store(url, "r").config(CONFIG).check_cases()
    assert sorted(damaged) == sorted([missing, no_label])
    spec = PatchSpec(url, CONFIG, tuple(fold0["train"]), (16, 32, 32), slots=(False, True))
    with pytest.raises(StoreDamageError, match=rf"case ({missing}|{no_label})"):
        BatchSampler(spec).batch((0, 0, 0, 0))
    rc, _, err = _verify(url, capsys)
    assert rc == 2 and missing in err and no_label in err

    report = run_preprocessing(load_dataset(dataset), Plans.load(wd / "plans.json"), CONFIG, url, progress=False)
    assert sorted(report.done) == sorted([missing, no_label]) and not report.failed
    assert verify_store(url) == []
    back = wd.parent / "from_bucket"
    fs.get(url.removeprefix("s3://"), str(back), recursive=True)
    assert store_checksums(back) == clean_sums

    # a prefix holding someone else's objects is not adopted either
    fs.pipe(f"{bucket}/other/store.zarr/readme.txt".removeprefix("s3://"), b"not a store")
    with pytest.raises(BadInputError, match="is a folder that is not a seg-pipeline store"):
        open_store(f"{bucket}/other/store.zarr", "a")


# ---------------------------------------------------------------- through the real CLI, train included


@pytest.mark.slow
def test_train_refuses_a_damaged_store_and_preprocess_and_verify_repair_restore_it(work, tmp_path, reliability):
    """The CLI end to end: a missing chunk and a missing label/zarr.json stop `train` before it trains
    (exit 2, both cases named), `preprocess` redoes them; a truncated chunk of the validation case stops
    `train` when validation reads it; `verify --repair` deletes that case, `preprocess` redoes it, and
    the store equals the clean one."""
    dataset, wd, store, clean_sums, fold0 = work
    missing, no_label = fold0["train"][0], fold0["train"][1]
    val_case = fold0["val"][0]
    (_case_dir(store, missing) / "image" / "c.0.0.0.0").unlink()
    (_case_dir(store, no_label) / "label" / "zarr.json").unlink()
    # the validation batch's foreground slot reads the validation case's locations: deterministic
    _truncate(_case_dir(store, val_case) / "locations" / "c.0.0")
    reliability["faults"] += 3
    train = ("train", "--workdir", wd, "--config", CONFIG, "--fold", "0", "--epochs", "1",
             "--iterations-per-epoch", "2", "--val-iterations", "1", "--num-workers", "1")

    run = run_cli(*train, cwd=tmp_path, timeout=400)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "KeyError" not in run.stderr, run.stderr
    assert re.search(_named(missing, "image") + r" \(1 of 8 chunk\(s\) missing", run.stderr), run.stderr
    assert re.search(_named(no_label, "label") + r" \(no label/zarr.json\)", run.stderr), run.stderr
    assert not (wd / "runs" / CONFIG / "fold_0" / "model_final.pt").exists()

    verify = run_cli("verify", store, cwd=tmp_path)
    assert verify.returncode == 2 and all(c in verify.stderr for c in (missing, no_label, val_case)), verify.stderr

    pre = run_cli("preprocess", dataset, "--workdir", wd, "--workers", "1", "--json", cwd=tmp_path, timeout=300)
    assert pre.returncode == 0, pre.stderr
    report = json.loads(pre.stdout)
    assert sorted(report["done"]) == sorted([missing, no_label]), report
    assert sorted(d["case"] for d in report["damaged"]) == sorted([missing, no_label])

    run = run_cli(*train, cwd=tmp_path, timeout=400)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert re.search(_named(val_case, "locations") + r" \(corrupt or unreadable chunk: ValueError: .*checksum",
                     run.stderr), run.stderr

    repair = run_cli("verify", store, "--repair", cwd=tmp_path)
    assert repair.returncode == 0 and f"deleted 1 damaged case(s) from {store}: {CONFIG}/cases/{val_case}" in repair.stdout
    pre = run_cli("preprocess", dataset, "--workdir", wd, "--workers", "1", "--json", cwd=tmp_path, timeout=300)
    assert pre.returncode == 0 and json.loads(pre.stdout)["done"] == [val_case], pre.stderr
    shutil.rmtree(wd / "runs", ignore_errors=True)
    assert {k: v for k, v in store_checksums(store).items()} == clean_sums
    assert run_cli("verify", store, cwd=tmp_path).returncode == 0
