"""Where Dask and Ray work runs, and whether it can see the files it is given.

Stages take a `distributed.Client` (or None to run in this process), so they stay plain functions;
this module decides which client to hand them. Dask defaults to a loopback LocalCluster, or an
existing scheduler; Ray to a local instance on 127.0.0.1, or an existing cluster.

Beyond one machine, workers get plans and absolute paths, never open handles, and open the files
themselves, so every node must see the dataset and the workdir at the same path (a shared
filesystem) or the store at an object-store URL (cluster/README.md). `check_ray_nodes_see` and
`check_dask_workers_see` run a small check on every node / worker before the work starts, so a node
that cannot see a path fails at once with a message naming the node and the path, instead of
failing case by case - or, worse, writing cases nobody else can read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import distributed

# A single case must not take the machine down: each worker is capped, and Dask's nanny
# restarts a worker that passes the limit (the task is then reported failed with its case id).
DEFAULT_MEMORY_LIMIT = "4GiB"


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and SLURM set), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_workers() -> int:
    """Local Dask workers and the local Ray's CPUs: one per CPU of this process."""
    return cpu_count()


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the duration of the block: an already-initialised session is used as it is (and left
    running); `address` joins a cluster; otherwise a local Ray starts on 127.0.0.1 without a
    dashboard, with `num_cpus` (default: this process's CPUs), and stops at the end."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    common = dict(include_dashboard=False, configure_logging=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        prepare_ray_address(address)
        ray.init(address=address, **common)
    else:
        keep_local_ray_on_loopback()
        ray.init(num_cpus=num_cpus or default_workers(), _node_ip_address="127.0.0.1", **common)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def dask_client(workers: int | None = None, address: str | None = None,
                memory_limit: str | None = DEFAULT_MEMORY_LIMIT) -> Iterator["distributed.Client"]:
    """A Client on `address`, or on a fresh LocalCluster (processes, one thread each, 127.0.0.1)."""
    import dask
    from distributed import Client, LocalCluster

    if address:
        with Client(address, timeout="30s") as client:
            yield client
        return
    with dask.config.set({"distributed.worker.daemon": False, "distributed.admin.tick.limit": "10s"}):
        cluster = LocalCluster(
            n_workers=workers or default_workers(),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            # no dashboard; the scheduler's small HTTP server (health, metrics) still starts, so give
            # it a free loopback port rather than 8787, which another cluster may hold (a warning)
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            memory_limit=memory_limit,
            silence_logs=40,
            preload=[__name__],  # dask_setup below: Ctrl-C is the driver's to handle
        )
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()


def dask_setup(worker) -> None:
    """Dask preload hook, run in each local worker process as it starts (and restarts): ignore SIGINT.

    Ctrl-C in a terminal signals the whole foreground process group, workers included; they would
    die printing a KeyboardInterrupt traceback each. The driver alone handles it - it leaves the
    `dask_client` block, which closes the cluster and its workers - and exits 130.
    """
    import logging
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(_drop_heartbeat_race)


def _drop_heartbeat_race(record: logging.LogRecord) -> bool:
    """Drop the traceback a worker logs when a heartbeat meets the scheduler closing at shutdown.

    The scheduler lives in the driver and closes with the cluster; a heartbeat already in flight then
    fails with CommClosedError and distributed logs it at ERROR with a full traceback - noise after a
    run that ended normally (or with a clean, reported error). A worker truly cut off from its
    scheduler is closed by distributed anyway, and the driver reports the lost tasks.
    """
    return not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")


def keep_local_ray_on_loopback() -> None:
    """Make the Ray this process is about to start listen on 127.0.0.1 only (call before `ray.init`).

    Ray turns `_node_ip_address="127.0.0.1"` into the machine's outward address
    (`ray._private.services.resolve_ip_for_localhost`) unless multi-node clusters are disabled, and
    then its GCS, raylet, agents and workers listen on every interface. With clusters disabled -
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read into `ray_constants` at import, so it is set on the
    imported module too - the node address is loopback and every Ray listener binds to it
    (tests/test_security.py checks the sockets). Only for a Ray started here: a driver joining a
    cluster at `--ray-address` needs its outward address, unless that cluster lives on this
    machine's loopback (`prepare_ray_address`).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by Ray's own processes
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def prepare_ray_address(address: str | None) -> None:
    """Call before `ray.init(address=...)`: a cluster on this machine's loopback is joined over loopback.

    Ray rewrites a 127.0.0.1 address to the machine's outward address (see
    `keep_local_ray_on_loopback`), where a cluster bound to loopback (cluster/local/two_nodes.sh)
    does not listen. `auto` looks at RAY_ADDRESS, which Ray sets inside a job.
    """
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else (address or "")
    host = target.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        keep_local_ray_on_loopback()


# ---------------------------------------------------------------- asking Ray for resources


def describe_bundle(bundle: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in bundle.items() if v)


def wait_for_resources(bundle: dict, count: int, timeout_s: float, what: str) -> None:
    """Block until the connected Ray cluster can place `count` x `bundle` (e.g. 2 x {CPU: 4, GPU: 1}).

    A pending placement group is what Ray's autoscaler (`ray up`, KubeRay) scales up for, so on an
    elastic cluster - a head with 0 CPUs, workers at min 0 - this is the request that starts the
    nodes; here it only waits, then frees the reservation for the work to take. Raises SegPipeError
    after `timeout_s` saying what it waited for and what the cluster has.
    """
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline.errors import SegPipeError

    bundle = {k: float(v) for k, v in bundle.items() if v}
    log = logging.getLogger("segpipe")
    start = time.monotonic()
    group = placement_group([dict(bundle) for _ in range(count)], strategy="SPREAD", name=f"segpipe-wait-{os.getpid()}")
    try:
        ready, _ = ray.wait([group.ready()], timeout=min(2.0, timeout_s))
        if not ready:  # not placeable now: say so once, then wait for nodes to join
            log.info("waiting up to %.0f s for %s: %d x {%s} (the cluster has %s now; an autoscaler adds nodes "
                     "for this request)", timeout_s, what, count, describe_bundle(bundle),
                     describe_bundle(ray.cluster_resources()) or "nothing")
            ready, _ = ray.wait([group.ready()], timeout=max(0.0, timeout_s - (time.monotonic() - start)))
        if not ready:
            raise SegPipeError(
                f"waited {timeout_s:.0f} s for {what}: {count} x {{{describe_bundle(bundle)}}}, but the Ray cluster "
                f"has {describe_bundle(ray.cluster_resources()) or 'no resources'} "
                f"({describe_bundle(ray.available_resources()) or 'nothing'} free). Start or autoscale nodes with "
                "these resources, lower --num-workers / --cpus-per-worker, or raise --resources-timeout-s")
        log.info("%s: resources ready after %.0f s", what, time.monotonic() - start)
    finally:
        remove_placement_group(group)


def assigned_cpus(default: int | None = None) -> int:
    """The CPUs Ray assigned to this task, actor or Train worker (its `num_cpus`), which is what its
    torch threads and loader processes should use - not the host's core count, which in a pod with
    an 8-CPU limit on a 64-core node would start 63 loader processes. Outside Ray: `default` or the
    process's CPUs."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    return default or cpu_count()


# ---------------------------------------------------------------- can every node see the paths?

SHARED_PATHS_HINT = ("every node needs the dataset and the workdir at the same path (a shared filesystem: NFS, EFS, "
                     "Lustre, a Kubernetes volume), and a store URL must name storage every node reaches "
                     "(s3://, gs://; not memory://); see cluster/README.md")


@dataclass(frozen=True)
class SharedPath:
    """A path the workers must see. `need`: 'read' (exists), 'write' (a folder a file can be created
    in) or 'store' (a seg-pipeline Zarr store: its zarr.json exists). Local paths or fsspec URLs."""

    what: str  # how messages name it: "store", "run folder", ...
    path: str
    need: str = "read"


def _local(path: str) -> str | None:
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if "://" in path else path


def path_problems(paths: Sequence[SharedPath]) -> list[str]:
    """What this process cannot do with `paths` ('the store /w/store.zarr: does not exist here'); [] when all is well."""
    problems = []
    for p in paths:
        local = _local(p.path)
        try:
            problem = _local_problem(local, p.need) if local is not None else _url_problem(p.path, p.need)
        except Exception as exc:  # noqa: BLE001 - a missing fsspec backend, credentials...: still one line
            problem = f"cannot be checked ({type(exc).__name__}: {exc})"
        if problem:
            problems.append(f"the {p.what} {p.path}: {problem}")
    return problems


def _local_problem(path: str, need: str) -> str | None:
    if not os.path.isabs(path):
        return "is a relative path (workers may run in another folder or on another machine)"
    if not os.path.exists(path):
        return "does not exist here"
    if need == "store" and not os.path.isfile(os.path.join(path, "zarr.json")):
        return "exists but holds no Zarr store here (no zarr.json)"
    if need == "write":
        try:
            fd, probe = tempfile.mkstemp(prefix=".segpipe-probe-", dir=path)
        except OSError as exc:
            return f"is not writable here ({exc.strerror or exc})"
        os.close(fd)
        os.unlink(probe)
    elif not os.access(path, os.R_OK):
        return "is not readable here"
    return None


def _url_problem(url: str, need: str) -> str | None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if need == "store":
        return None if fs.exists(root.rstrip("/") + "/zarr.json") else "holds no Zarr store seen from here (no zarr.json)"
    if need == "read" and not fs.exists(root):
        return "does not exist seen from here"
    return None  # object stores have no folders to test for writing without leaving litter


def whereami() -> dict:
    """This process's host and pid, and its Ray node when it runs inside Ray."""
    here = {"host": socket.gethostname(), "pid": os.getpid()}
    if "ray" in sys.modules:  # never import Ray into a Dask worker just to ask
        import ray

        if ray.is_initialized():
            here["node_id"] = ray.get_runtime_context().get_node_id()
            here["node_ip"] = ray.util.get_node_ip_address()
    return here


def _probe(paths: Sequence[SharedPath]) -> dict:
    return {**whereami(), "problems": path_problems(paths)}


def _raise_if_blind(checked: list[dict], kind: str) -> None:
    lines = [f"{kind} {r['where']} cannot see {problem}" for r in checked for problem in r["problems"]]
    lines += [f"{kind} {r['where']}: {r['error']}" for r in checked if r.get("error")]
    if lines:
        from pipeline.errors import SegPipeError

        raise SegPipeError("\n".join([*lines, SHARED_PATHS_HINT]))


def check_ray_nodes_see(paths: Sequence[SharedPath], timeout_s: float = 120.0) -> list[dict]:
    """Run `path_problems` on every alive node of the connected Ray cluster (a task pinned to each).

    Returns one record per node ({node_id, node_ip, host, pid, where, problems: []}); raises SegPipeError
    naming every node that cannot see a path, or that did not answer within `timeout_s`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(list(paths)):
            node_id for node_id in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    checked = []
    for ref in ready:
        node_id = refs[ref]
        try:
            record = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - e.g. seg-pipeline not installed on that node
            record = {"node_id": node_id, "node_ip": nodes[node_id], "problems": [],
                      "error": f"the check failed there ({type(exc).__name__}: {exc})"}
        checked.append(record)
    for ref in late:
        ray.cancel(ref, force=True)
        checked.append({"node_id": refs[ref], "node_ip": nodes[refs[ref]], "problems": [],
                        "error": f"did not run the check within {timeout_s:.0f}s (is seg-pipeline installed there?)"})
    for r in checked:
        r["where"] = f"{r.get('node_ip', '?')} (node {r['node_id'][:12]}, host {r.get('host', '?')})"
    _raise_if_blind(checked, "Ray node")
    return checked


def check_dask_workers_see(client, paths: Sequence[SharedPath]) -> list[dict]:
    """Run `path_problems` on every worker of a Dask client; SegPipeError naming each worker that cannot see a path."""
    results = client.run(_probe, list(paths), on_error="return")
    checked = []
    for address, record in sorted(results.items()):
        if isinstance(record, BaseException):
            record = {"problems": [], "error": f"the check failed there ({type(record).__name__}: {record})"}
        record["where"] = f"{address} (host {record.get('host', '?')})"
        record["address"] = address
        checked.append(record)
    _raise_if_blind(checked, "Dask worker")
    return checked
