"""Shared fixtures: the real datasets (skipped with a message where ../shared is absent), one Dask
cluster and one Ray instance for the whole session (starting them costs seconds)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEGPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real dataset {name} not found at {path} (it lives in ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    return shared_dataset("Task04_Hippocampus")


@pytest.fixture(scope="session")
def spinalcord() -> Path:
    return shared_dataset("SCT_spinalcord")


@pytest.fixture(scope="session")
def totalseg() -> Path:
    return shared_dataset("TotalSegmentator_CT")


@pytest.fixture(scope="session")
def dask_client():
    """One loopback LocalCluster (2 processes, 1 thread each) shared by every test that needs Dask."""
    from pipeline.parallel import dask_client as make_client

    with make_client(workers=2) as client:
        yield client


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance on 127.0.0.1, no dashboard, shut down at the end of the session."""
    import ray

    from pipeline.parallel import keep_local_ray_on_loopback

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    keep_local_ray_on_loopback()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    import psutil

    started = [p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]  # GCS, raylet, workers
    ray.shutdown()
    # a worker normally exits once its raylet is gone; one still alive a while later (a Ray Train
    # controller was seen outliving the session) is ended by PID: only processes this session started
    _, alive = psutil.wait_procs(started, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _is_ray_process(proc) -> bool:
    import psutil

    try:
        cmd = " ".join(proc.cmdline())
        return proc.name() in ("raylet", "gcs_server") or cmd.startswith("ray::") or "/ray/" in cmd
    except psutil.Error:
        return False


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """The embedded phantom dataset (small, seeded), made once per session."""
    from pipeline.data.synthetic import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("synthetic") / "Phantom", num_cases=8, seed=0)


# ---------------------------------------------------------------- reliability tally (issue 9)

RELIABILITY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def reliability(pytestconfig) -> dict:
    """Counts the reliability tests add to: bad inputs tried, faults injected, cases/checkpoints lost."""
    return pytestconfig.stash.setdefault(RELIABILITY, {"bad_inputs": 0, "faults": 0, "lost": 0})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(RELIABILITY, None)
    if counts:
        terminalreporter.write_line(f"reliability: {counts['bad_inputs']} bad inputs tried, {counts['faults']} faults "
                                    f"injected, {counts['lost']} cases/checkpoints lost")


@pytest.fixture
def one_torch_thread():
    """Small convolutions run faster on one thread than on two contended cores (and it leaves one for the rest)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- object storage (issue 12)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto's standalone server) on 127.0.0.1, started for the session and
    stopped by its PID. Yields the environment a client needs (endpoint and dummy credentials, the
    way a user's cluster gets them: from the environment) and applies it to this process, so Dask
    and Ray workers started afterwards inherit it."""
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto", reason="moto[server] (a test dependency) is needed for the local S3 server")
    pytest.importorskip("s3fs", reason="s3fs (the [s3] extra) is needed for s3:// URLs")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the local S3 server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket for one test: its `s3://` URL."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    fs.mkdir(name)
    return f"s3://{name}"
