"""Dask on Ray: preprocessing on a Ray-only cluster uses every node. `parallel.dask_on_ray` starts the
Dask scheduler in the driver and one `dask worker` per Ray actor, spread over the nodes; the stages'
Dask code runs on them unchanged. Here on a loopback Ray cluster (tests/loopback_ray.py): a head with
0 CPUs, as on real clusters, and two 1-CPU nodes. Each driver runs in a subprocess of its own, so the
session's local Ray (conftest's `ray_session`) is never the one joined."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback_ray import LoopbackRayCluster

# where a block's workers ran: name (ray-<node id>-<k>) and the pids of the worker, its nanny and their ancestors
DRIVER = r'''
import contextlib, json, logging, os, sys, time

from distributed import Client, get_worker
from distributed.security import Security

from pipeline import parallel, stages
from pipeline.errors import SegPipeError

address, dataset, workdir = sys.argv[1:4]
logging.basicConfig(level=logging.WARNING)
logging.getLogger("segpipe").setLevel(logging.INFO)
blocks, real = [], parallel.dask_on_ray


def ancestors():
    chain, pid = [], os.getpid()
    while pid > 1:
        chain.append(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return chain


def record(client, start):
    names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    blocks.append({"start_s": start, "workers": [{"name": names[a], "chain": c} for a, c in client.run(ancestors).items()]})


def slow(i):
    time.sleep(0.5)
    return get_worker().name


# 1. a node is missing: the block starts with the one worker Ray could place; the test then adds the
#    node, whose worker joins and takes some of the tasks queued before it came
start = time.monotonic()
with parallel.dask_on_ray(address, workers=2, start_timeout_s=120) as client:
    up = time.monotonic() - start
    first = len(client.nthreads())
    print("READY", flush=True)
    futures, deadline = [], time.monotonic() + 180
    while len(client.nthreads()) < 2 and time.monotonic() < deadline:  # keep 6 tasks waiting for a worker
        if sum(not f.done() for f in futures) < 6:
            futures += client.map(slow, range(len(futures), len(futures) + 6), pure=False)
        time.sleep(0.05)
    done_by = client.gather(futures)  # every task here was submitted before the client saw the 2nd worker
    record(client, up)
    scheduler = client.scheduler.address
    try:  # a client with a key of its own (anyone else on the network) is turned away
        Client(scheduler, security=Security.temporary(), timeout=3).close()
        stranger = "connected"
    except Exception as exc:
        stranger = type(exc).__name__
    probes = client.run(parallel.whereami)  # what check_dask_workers_see runs on each worker


@contextlib.contextmanager
def recording(*args, **kwargs):
    start = time.monotonic()
    with real(*args, **kwargs) as client:
        record(client, time.monotonic() - start)
        yield client


# 2. the stage, on both nodes now
parallel.dask_on_ray = recording  # stages.dask_session looks it up when called
report = stages.preprocess(stages.load_dataset(dataset), workdir, "3d_lean", ray_address=address, progress=False)

# 3. a worker that cannot start is reported as soon as it ended, with its output, not after the timeout
start = time.monotonic()
try:
    with real(address, workers=1, memory_limit="lots", start_timeout_s=120):
        broken = "started?!"
except SegPipeError as exc:
    broken = f"{time.monotonic() - start:.1f} {exc}"
print(json.dumps({"broken": broken, "blocks": blocks, "first": first, "done_by": done_by, "probes": len(probes), "done": report.done,
                  "failed": [str(p) for p in report.failed], "scheduler": scheduler, "stranger": stranger}))
'''

FAILING = r'''
import sys, time
from pipeline.errors import SegPipeError
from pipeline.parallel import dask_on_ray

start = time.monotonic()
try:
    with dask_on_ray(sys.argv[1], workers=2, start_timeout_s=5):
        print("started?!")
except SegPipeError as exc:
    print(f"{time.monotonic() - start:.1f}")
    print(exc)
'''


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    with LoopbackRayCluster(head_cpus=0) as c:
        yield c


def _python(cluster: LoopbackRayCluster, script: str, *args, cwd: Path, timeout: float = 240):
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=cluster.env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_the_cli_runs_dask_stages_on_ray_unless_workers_or_a_scheduler_are_given():
    from pipeline.cli import _dask, build_parser

    parser = build_parser()
    assert _dask(parser.parse_args(["preprocess", "D", "--workdir", "W", "--ray-address", "auto"])) == \
        {"workers": None, "dask_address": None, "ray_address": "auto"}
    assert _dask(parser.parse_args(["fingerprint", "D", "--workdir", "W"]))["ray_address"] is None
    # run/demo: training's --ray-address places preprocessing too, unless Dask is told otherwise
    assert _dask(parser.parse_args(["run", "D", "--ray-address", "auto"]))["ray_address"] == "auto"
    assert _dask(parser.parse_args(["demo", "--ray-address", "auto", "--workers", "2"])) == \
        {"workers": 2, "dask_address": None, "ray_address": None}
    with pytest.raises(SystemExit):  # one place for the Dask workers
        parser.parse_args(["plan", "D", "--workdir", "W", "--workers", "2", "--ray-address", "auto"])


def test_a_worker_count_below_one_is_refused_before_joining_ray():
    from pipeline.errors import BadInputError
    from pipeline.parallel import dask_on_ray

    with pytest.raises(BadInputError, match="at least 1, got 0"):
        with dask_on_ray("127.0.0.1:9", workers=0):
            pass


def test_a_ray_cluster_without_cpus_fails_after_the_timeout_naming_what_it_waited_for(cluster, tmp_path):
    assert set(cluster.procs) == {"head"}, "runs before the nodes join (file order)"
    result = _python(cluster, FAILING, cluster.address, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seconds, message = result.stdout.split("\n", 1)
    assert "waited 5 s for Dask workers on the Ray cluster: 2 x {1 CPU} Ray actor(s), one `dask worker` each" in message
    assert "none joined (0 of 2 actor(s) placed). The Ray cluster has 0 CPU on 1 node(s) (0 free)" in message
    assert 5 <= float(seconds) < 30


@pytest.mark.slow
def test_dask_workers_run_on_every_ray_node_join_late_and_preprocess_the_dataset(cluster, synthetic_dataset, tmp_path):
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.plans import Plans
    from pipeline.preprocessing.store import open_store

    nodes = {cluster.add_node("node1", cpus=1)[:8]: cluster.procs["node1"].pid}
    start = time.monotonic()
    with open(tmp_path / "driver.err", "w") as err:  # a file: a full stderr pipe would block the driver
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, synthetic_dataset, tmp_path / "W"],
                                  env=cluster.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        ready = driver.stdout.readline()
        if ready.strip() == "READY":  # the work started on node1's worker: a node joins, as an autoscaler adds one
            node2 = cluster.add_node("node2", cpus=1)
            nodes[node2[:8]] = cluster.procs["node2"].pid
        stdout, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    seconds = time.monotonic() - start
    stderr = (tmp_path / "driver.err").read_text()
    assert driver.returncode == 0 and ready.strip() == "READY", (ready + stdout)[-2000:] + stderr[-4000:]
    out = json.loads(stdout.strip().splitlines()[-1])

    # the first block started with the one worker Ray could place; node2's worker joined later and took
    # some of the 40 queued tasks
    assert "1 of 2 Dask worker(s) joined" in stderr and "1 wait for Ray resources and join as nodes come" in stderr
    assert out["first"] == 1
    late = [n for n in out["done_by"] if n.split("-")[1] != next(iter(nodes))]
    assert late and len(late) < len(out["done_by"]), out["done_by"]

    # then both blocks (that one, and preprocess's own) had a worker on each Ray node: named after the node,
    # and a descendant of that node's processes (node -> raylet -> actor -> nanny -> worker)
    assert "2 of 2 Dask worker(s) joined" in stderr and "(on 2 Ray node(s))" in stderr
    assert len(out["blocks"]) == 2 and out["probes"] == 2
    assert out["scheduler"].startswith("tls://127.0.0.1:") and out["stranger"].endswith("CommClosedError"), out
    for block in out["blocks"]:
        on = {w["name"].split("-")[1]: w["chain"] for w in block["workers"]}
        assert set(on) == set(nodes), (on, nodes)
        assert all(nodes[node] in chain for node, chain in on.items())
        assert block["start_s"] < 60

    # every case preprocessed into the store
    ids = load_dataset(synthetic_dataset).case_ids
    assert sorted(out["done"]) == sorted(ids) and len(ids) == 8 and out["failed"] == []
    data_id = Plans.load(tmp_path / "W" / "plans.json").configuration("3d_lean").data_identifier
    assert len(open_store(tmp_path / "W" / "store.zarr", "r").config(data_id).case_ids()) == 8

    # a worker that cannot start (here: a memory limit it cannot read) fails the block at once, saying why
    seconds_broken, broken = out["broken"].split(" ", 1)
    assert "none joined, and the 1 started ended:" in broken and "exited with code 1" in broken, broken
    assert "Could not interpret 'lots' as a byte unit" in broken and float(seconds_broken) < 60

    # no worker or nanny it started outlived its block
    started = {w["chain"][i] for b in out["blocks"] for w in b["workers"] for i in (0, 1)}
    assert len(started) == 8 and not [pid for pid in started if _alive(pid)]
    print(f"dask_on_ray start-up: {[round(b['start_s'], 1) for b in out['blocks']]} s, the late worker took "
          f"{len(late)} of {len(out['done_by'])} queued tasks; driver {seconds:.0f} s")
