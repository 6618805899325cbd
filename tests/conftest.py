"""Shared fixtures: the real datasets (skipped with a message where ../shared is absent), one Dask
cluster and one Ray instance for the whole session (starting them costs seconds)."""

from __future__ import annotations

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
    ray.shutdown()


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
