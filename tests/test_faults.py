"""Faults with real processes: a Dask worker SIGKILLed, Ctrl-C, the CLI SIGKILLed, a full disk, a
read-only store, a corrupt chunk, a Ray training worker and then the training driver SIGKILLed.
After each, what was complete before the fault is still there byte for byte, `verify_store` finds
nothing wrong, and re-running the same command finishes the job doing only what was missing.

Every command runs as `python -m pipeline.cli` in a session of its own, so the test can signal it
like a terminal would and afterwards end every process that session left behind (Ray's agents
outlive a SIGKILLed driver by a minute or so; Dask's workers by a few seconds) - by pid, and only
those of sessions started here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import CONFIG, cli_env, lost_cases, make_workdir, run_cli, store_checksums

from pipeline.errors import SegPipeError
from pipeline.preprocessing.store import open_store, verify_store

SLOW_CASES = 8
# Preprocessing to a 3.3x finer grid makes each phantom case take ~0.4 s (idle core), so a fault lands mid-run.
SLOW_SPACING_FACTOR = 0.3


# ---------------------------------------------------------------- processes


class Cli:
    """A `segpipe` command running in its own session (its pid is the session and group id)."""

    def __init__(self, *args, cwd: Path):
        self.out, self.err = cwd / f".out{time.monotonic_ns()}", cwd / f".err{time.monotonic_ns()}"
        with self.out.open("wb") as fo, self.err.open("wb") as fe:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd,
                                         stdout=fo, stderr=fe, env=cli_env(), start_new_session=True)
        self.sid = self.proc.pid

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def session_pids(self) -> list[int]:
        """Live processes of the session (zombies, dead and waiting to be reaped, do not count)."""
        return [pid for pid in _all_pids() if _sid(pid) == self.sid and not _zombie(pid)]

    def children(self, pattern: str) -> list[int]:
        """Processes of this session whose command line matches `pattern` (the CLI itself excluded)."""
        return [pid for pid in self.session_pids() if pid != self.proc.pid and re.search(pattern, _cmdline(pid))]

    def end_session(self) -> None:
        """SIGKILL what is left of the session, pid by pid, and reap the CLI."""
        for _ in range(50):
            left = [pid for pid in self.session_pids() if pid != os.getpid()]
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def sessions():
    """Starts CLIs; whatever they leave running is ended after the test, pass or fail."""
    started: list[Cli] = []

    def start(*args, cwd: Path) -> Cli:
        cli = Cli(*args, cwd=cwd)
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.end_session()


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------------- the store seen from outside


def complete_cases(store: Path) -> set[str]:
    """Cases whose group says complete: true (read from the files, as another process would)."""
    done = set()
    for meta in store.glob(f"{CONFIG}/cases/*/zarr.json"):
        try:
            if json.loads(meta.read_text()).get("attributes", {}).get("complete") is True:
                done.add(meta.parent.name)
        except (OSError, ValueError):
            continue  # being written right now
    return done


def case_files(checksums: dict[str, str], cases: set[str]) -> dict[str, str]:
    return {rel: d for rel, d in checksums.items() if rel.count("/") >= 3 and rel.split("/")[2] in cases}


def assert_nothing_lost(store: Path, before: dict[str, str], reliability: dict) -> None:
    """Every file of a case complete before the fault is unchanged, and the store verifies clean."""
    lost = lost_cases(before, store_checksums(store))
    reliability["lost"] += len(lost)
    assert not lost, f"cases lost or changed: {sorted(lost)}"
    assert verify_store(store) == []


# ---------------------------------------------------------------- preprocessing faults


@pytest.fixture(scope="module")
def slow_template(tmp_path_factory):
    """An 8-case phantom dataset and a workdir with its fingerprint and plans, nothing preprocessed."""
    from pipeline.data.dataset import load_dataset
    from pipeline.data.synthetic import make_demo_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment

    root = tmp_path_factory.mktemp("faults")
    dataset = make_demo_dataset(root / "Phantom", num_cases=SLOW_CASES, seed=1)
    ds = load_dataset(dataset)
    fp = compute_fingerprint(ds, client=None, progress=False)
    plans = plan_experiment(fp, ds)
    conf = plans.configurations[CONFIG]
    conf.spacing = [s * SLOW_SPACING_FACTOR for s in conf.spacing]
    template = root / "W"
    template.mkdir()
    fp.save(template / "fingerprint.json")
    plans.save(template / "plans.json")
    return dataset, template, sorted(c.case_id for c in ds.cases)


@pytest.fixture
def slow(slow_template, tmp_path):
    dataset, template, cases = slow_template
    wd = tmp_path / "W"
    shutil.copytree(template, wd)
    return dataset, wd, cases


def _preprocess(dataset, wd, workers="2"):
    return ("preprocess", dataset, "--workdir", wd, "--workers", workers, "--json")


def _rerun_completes(dataset, wd, cases, cwd) -> dict:
    run = run_cli(*_preprocess(dataset, wd, workers="1"), cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    report = json.loads(run.stdout)
    assert sorted(report["done"] + report["skipped"]) == cases and not report["failed"]
    return report


@pytest.mark.slow
def test_a_sigkilled_dask_worker_loses_no_case(slow, sessions, tmp_path, reliability):
    dataset, wd, cases = slow
    store = wd / "store.zarr"
    cli = sessions(*_preprocess(dataset, wd), cwd=tmp_path)
    wait_for(lambda: complete_cases(store), 120, "the first complete case")
    workers = cli.children(r"multiprocessing\.spawn|pipeline\.cli")  # spawned, or forked from the CLI
    assert len(workers) == 2, workers
    before = case_files(store_checksums(store), complete_cases(store))
    assert len(complete_cases(store)) < len(cases), "preprocessing finished before the fault"
    os.kill(workers[0], signal.SIGKILL)
    reliability["faults"] += 1

    rc = cli.wait(180)
    # Dask's nanny restarts the worker and the scheduler reruns its task; a case that still fails
    # is reported by id (exit 2). Either way no traceback, and the re-run completes the store.
    assert rc in (0, 2), cli.stderr
    assert "Traceback" not in cli.stderr
    report = json.loads(cli.stdout)
    assert all(f["case"] in cases for f in report["failed"])
    assert not (wd / "store.zarr.lock").exists()
    assert_nothing_lost(store, before, reliability)
    _rerun_completes(dataset, wd, cases, tmp_path)
    assert open_store(store, "r").config(CONFIG).case_ids() == cases


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_rerun_does_only_the_missing_cases(slow, sessions, tmp_path, reliability):
    dataset, wd, cases = slow
    store = wd / "store.zarr"
    cli = sessions(*_preprocess(dataset, wd), cwd=tmp_path)
    wait_for(lambda: complete_cases(store), 120, "the first complete case")
    assert len(complete_cases(store)) < len(cases), "preprocessing finished before the fault"
    os.killpg(cli.sid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    reliability["faults"] += 1

    rc = cli.wait(60)
    assert rc == 130, cli.stderr
    assert "interrupted: re-run the same command to resume" in cli.stderr
    assert "Traceback" not in cli.stderr
    assert not (wd / "store.zarr.lock").exists()  # released on the way out
    wait_for(lambda: cli.session_pids() == [], 30, "the Dask workers to exit")
    done = complete_cases(store)
    assert 0 < len(done) < len(cases)
    before = case_files(store_checksums(store), done)
    assert_nothing_lost(store, before, reliability)

    report = _rerun_completes(dataset, wd, cases, tmp_path)
    assert sorted(report["skipped"]) == sorted(done)  # nothing complete is recomputed
    assert sorted(report["done"]) == sorted(set(cases) - done)
    assert_nothing_lost(store, before, reliability)


@pytest.mark.slow
def test_a_sigkilled_cli_leaves_a_stale_lock_the_rerun_takes_over(slow, sessions, tmp_path, reliability):
    dataset, wd, cases = slow
    store = wd / "store.zarr"
    cli = sessions(*_preprocess(dataset, wd), cwd=tmp_path)
    wait_for(lambda: complete_cases(store), 120, "the first complete case")
    os.kill(cli.proc.pid, signal.SIGKILL)  # the driver dies mid-write: no cleanup runs at all
    cli.wait(10)
    cli.end_session()  # its orphaned Dask workers may still be finishing a case; stop them too
    reliability["faults"] += 1

    assert (wd / "store.zarr.lock").exists()  # the dead run's lock (its pid, this host) is stale
    done = complete_cases(store)
    assert 0 < len(done) < len(cases), "preprocessing finished before the fault"
    before = case_files(store_checksums(store), done)
    assert_nothing_lost(store, before, reliability)
    assert open_store(store, "r").config(CONFIG).case_ids() == sorted(done)  # half-written ones are invisible

    report = _rerun_completes(dataset, wd, cases, tmp_path)
    assert sorted(report["skipped"]) == sorted(done)
    assert set(report["deleted_incomplete"]) <= set(cases) - done
    assert not (wd / "store.zarr.lock").exists()
    assert_nothing_lost(store, before, reliability)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A size-limited tmpfs at `path` (root in a sandbox allows it; elsewhere the test is skipped)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not permitted'}): "
                    "the store-path-is-a-file test covers unwritable stores")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


@pytest.mark.slow
def test_a_full_disk_fails_cleanly_keeps_complete_cases_and_resumes(slow, tmp_path, reliability):
    dataset, template, cases = slow
    with tmpfs(tmp_path / "disk", "12m") as disk:  # room for the plans and a few of the ~3-6 MB cases
        wd = disk / "W"
        shutil.copytree(template, wd)
        store = wd / "store.zarr"
        reliability["faults"] += 1
        run = run_cli(*_preprocess(dataset, wd, workers="1"), cwd=tmp_path)

        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr + run.stdout
        report = json.loads(run.stdout)
        assert report["failed"], "the disk did not fill up"
        assert all("No space left on device" in f["message"] for f in report["failed"]), report["failed"]
        done = complete_cases(store)
        assert sorted(report["done"]) == sorted(done)
        before = case_files(store_checksums(store), done)
        assert_nothing_lost(store, before, reliability)

        _remount(disk, "size=256m")  # space freed: the same command finishes the job
        report = _rerun_completes(dataset, wd, cases, tmp_path)
        assert sorted(report["skipped"]) == sorted(done)
        assert_nothing_lost(store, before, reliability)


@contextlib.contextmanager
def read_only(path: Path):
    """`path` made read-only by a read-only bind mount of itself (chmod does not stop root)."""
    bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bound.stderr.strip() or 'not permitted'})")
    try:
        _remount(path, "bind,ro")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_read_only_store_fails_cleanly_and_keeps_what_it_holds(slow, tmp_path, reliability):
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.plans import Plans
    from pipeline.preprocessing.preprocess import run_preprocessing

    dataset, wd, cases = slow
    store = wd / "store.zarr"
    report = run_preprocessing(load_dataset(dataset), Plans.load(wd / "plans.json"), CONFIG, store, client=None,
                               progress=False)
    assert not report.failed
    for case in cases[:2]:  # two cases still to do when the store turns read-only
        shutil.rmtree(store / CONFIG / "cases" / case)
    before = store_checksums(store)

    with read_only(store):  # the store alone: each case still to do fails by name, exit 2
        reliability["faults"] += 1
        run = run_cli(*_preprocess(dataset, wd, workers="1"), cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr + run.stdout
        report = json.loads(run.stdout)
        assert sorted(f["case"] for f in report["failed"]) == cases[:2]
        assert all("Read-only file system" in f["message"] for f in report["failed"]), report["failed"]
        assert sorted(report["skipped"]) == cases[2:]
        assert not (wd / "store.zarr.lock").exists()

    with read_only(wd):  # the whole workdir: one line before anything starts
        reliability["faults"] += 1
        run = run_cli(*_preprocess(dataset, wd, workers="1"), cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert run.error_lines == [f"error cannot use --workdir {wd}: Read-only file system "
                                   f"({wd / 'logs' / 'preprocess.log'})"], run.stderr
    assert store_checksums(store) == before
    assert_nothing_lost(store, before, reliability)


def test_a_store_path_that_is_a_file_fails_cleanly(slow, tmp_path, reliability):
    dataset, wd, _ = slow
    (wd / "store.zarr").write_text("not a folder")
    reliability["faults"] += 1
    run = run_cli(*_preprocess(dataset, wd, workers="1"), cwd=tmp_path)
    assert run.returncode in (1, 2) and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error ") and "store.zarr" in lines[0], run.stderr
    assert (wd / "store.zarr").read_text() == "not a folder"


# ---------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from pipeline.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("integrity")
    dataset = make_demo_dataset(root / "Phantom", num_cases=3, seed=2)
    return make_workdir(root / "W", dataset)


def _flip_a_byte(chunk: Path) -> None:
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    chunk.write_bytes(bytes(raw))


def test_verify_names_the_case_and_array_of_a_corrupt_or_missing_chunk(small_store, tmp_path, reliability):
    store = tmp_path / "store.zarr"
    shutil.copytree(small_store.store, store)
    ok = run_cli("verify", store, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith(f"{store}: ok (3 complete case(s)"), ok.stderr

    _flip_a_byte(store / CONFIG / "cases" / "phantom_001" / "image" / "c.0.0.0.0")
    (store / CONFIG / "cases" / "phantom_002" / "label" / "c.0.0.0").unlink()
    reliability["faults"] += 2
    bad = run_cli("verify", store, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.error_lines
    assert len(lines) == 3, bad.stderr
    assert re.match(r"error phantom_001: 3d_fullres/cases/phantom_001/image chunk \[0, 0, 0, 0\]: unreadable "
                    r"\(.*checksum", lines[0]), lines[0]
    assert re.match(r"error phantom_002: 3d_fullres/cases/phantom_002/label: 1 of \d+ chunk\(s\) missing", lines[1])
    assert lines[2] == f"2 problem(s) in {store}"
    as_json = json.loads(run_cli("verify", store, "--json", cwd=tmp_path).stdout)
    assert not as_json["ok"] and len(as_json["problems"]) == 2

    # a case whose metadata cannot be read is no longer complete: invisible to training, redone by
    # the next preprocess, and named by verify as such
    (store / CONFIG / "cases" / "phantom_000" / "zarr.json").write_text("{garbage")
    reliability["faults"] += 1
    noted = run_cli("verify", store, cwd=tmp_path).error_lines
    assert noted[0] == "note 1 incomplete case(s), invisible to training; `segpipe preprocess` redoes them: " \
                       "3d_fullres/cases/phantom_000", noted


def test_sampling_a_corrupt_chunk_raises_naming_the_case_instead_of_training_on_garbage(small_store, tmp_path,
                                                                                        reliability):
    from pipeline.training.sampling import BatchSampler, PatchSpec, TrainBatches, batch_iterator, close_iterator

    store = tmp_path / "store.zarr"
    shutil.copytree(small_store.store, store)
    cs = open_store(store, "r").config(CONFIG)
    patch = tuple(cs.patch_size)
    image = np.asarray(cs.image("phantom_001")[...])
    # what zarr's crc32c codec does: the read of a flipped chunk raises instead of decoding garbage
    for chunk in (store / CONFIG / "cases" / "phantom_001" / "image").glob("c.*"):
        _flip_a_byte(chunk)
    reliability["faults"] += 1
    with pytest.raises(ValueError, match="checksum"):
        open_store(store, "r").config(CONFIG).image("phantom_001")[...]
    assert image.any()

    spec = PatchSpec(str(store), CONFIG, ("phantom_001",), patch, slots=(False, True))
    with pytest.raises(SegPipeError, match=r"phantom_001.*(corrupt|checksum)"):
        BatchSampler(spec).batch((0, 0, 0, 0))
    batches = batch_iterator(TrainBatches(spec, iterations_per_epoch=2), "thread")  # as a training worker reads
    try:
        with pytest.raises(SegPipeError, match="phantom_001"):
            next(batches)
    finally:
        close_iterator(batches)
    problems = verify_store(store)
    assert problems and {p.case for p in problems} == {"phantom_001"}


# ---------------------------------------------------------------- training faults


TRAIN_EPOCHS = 6
TRAIN_ITERATIONS = 4


@pytest.fixture(scope="module")
def train_workdir(tmp_path_factory):
    """6 phantom cases preprocessed for a 3-stage 4..16-feature U-Net on 16x32x32 patches."""
    from pipeline.data.synthetic import make_demo_dataset

    def tiny(plans):
        conf = plans.configurations[CONFIG]
        conf.patch_size, conf.batch_size = [16, 32, 32], 2
        conf.strides, conf.kernel_sizes = [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3
        conf.features_per_stage = [4, 8, 16]
        plans.configurations["3d_lean"].features_per_stage = [4, 8, 16]  # it inherits the 3-stage strides

    root = tmp_path_factory.mktemp("train_faults")
    dataset = make_demo_dataset(root / "Phantom", num_cases=6, seed=3)
    return make_workdir(root / "W", dataset, plans_edit=tiny)


def _checkpoint_epoch(ray_run: Path) -> int | None:
    """The test looks inside Ray's own record of the run (the product never does: it resumes through
    Ray Train's public API)."""
    try:
        snapshot = json.loads((ray_run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    epoch = ((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch")
    return int(epoch) if epoch is not None else None


def _latest_checkpoint_dir(ray_run: Path) -> Path:
    snapshot = json.loads((ray_run / "checkpoint_manager_snapshot.json").read_text())
    return ray_run / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]


@pytest.mark.slow
def test_training_survives_a_killed_ray_worker_and_a_killed_driver(train_workdir, sessions, tmp_path, reliability):
    """SIGKILL the Ray training worker after a checkpoint: Ray's FailureConfig restarts the worker
    group from it. Then SIGKILL the driver (`segpipe train`) after a later checkpoint: `--resume`
    carries on with the same epoch counter, metrics and optimizer state."""
    wd = train_workdir.root
    ray_run = wd / "runs" / "ray" / f"{CONFIG}_foldall"
    run_dir = wd / "runs" / CONFIG / "fold_all"
    log = run_dir / "training_log.txt"
    train = ("train", "--workdir", wd, "--fold", "all", "--recipe", "lean", "--epochs", TRAIN_EPOCHS,
             "--iterations-per-epoch", TRAIN_ITERATIONS, "--val-iterations", "1", "--checkpoint-every", "1")
    cli = sessions(*train, cwd=tmp_path)

    # 1. a Ray worker dies after the first checkpoint
    wait_for(lambda: (_checkpoint_epoch(ray_run) or 0) >= 1, 240, "the first checkpoint", interval=0.1)
    workers = wait_for(lambda: cli.children(r"^ray::RayTrainWorker"), 30, "the Ray training worker")
    saved = _checkpoint_epoch(ray_run)
    assert cli.proc.poll() is None and saved < TRAIN_EPOCHS - 2, "training went too fast to inject faults"
    os.kill(workers[0], signal.SIGKILL)
    reliability["faults"] += 1
    resumed = wait_for(lambda: re.findall(r"resumed from the checkpoint of epoch (\d+)", log.read_text()),
                       180, "Ray to restart the worker group from the checkpoint", interval=0.2)
    restarted_at = int(resumed[-1])
    reliability["lost"] += int(restarted_at < saved)
    assert restarted_at >= saved

    # 2. the driver dies after a later checkpoint
    wait_for(lambda: (_checkpoint_epoch(ray_run) or 0) > restarted_at, 120, "a checkpoint after the restart",
             interval=0.1)
    saved = _checkpoint_epoch(ray_run)
    assert cli.proc.poll() is None and saved < TRAIN_EPOCHS, "training finished before the driver was killed"
    os.kill(cli.proc.pid, signal.SIGKILL)
    cli.wait(10)
    cli.end_session()  # Ray's processes outlive a SIGKILLed driver
    reliability["faults"] += 1
    assert not (run_dir / "model_final.pt").exists()
    checkpoint = _latest_checkpoint_dir(ray_run)
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == saved

    # 3. --resume continues where the checkpoint left off
    done = run_cli(*train, "--resume", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    match = re.search(r"trained (\d+) epoch\(s\) \(resumed at (\d+)\)", done.stdout)
    assert match and int(match[1]) == TRAIN_EPOCHS, done.stdout
    reliability["lost"] += int(int(match[2]) < saved)
    assert int(match[2]) == saved
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, TRAIN_EPOCHS + 1))  # no epoch lost or repeated
    final = torch.load(run_dir / "model_final.pt", map_location="cpu", weights_only=True)
    assert final["epoch"] == TRAIN_EPOCHS
    # AdamW counts its steps: every epoch's steps exactly once across a worker restart and a resume
    state = torch.load(_latest_checkpoint_dir(ray_run) / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == TRAIN_EPOCHS
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {TRAIN_EPOCHS * TRAIN_ITERATIONS}
    assert verify_store(train_workdir.store) == []
