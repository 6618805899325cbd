"""Where Dask and Ray work runs, and whether it can see the files it is given.

Stages take a `distributed.Client` (or None to run in this process), so they stay plain functions;
this module decides which client to hand them. Dask defaults to a loopback LocalCluster, an
existing scheduler, or Dask workers started as Ray actors on the nodes of a Ray cluster
(`dask_on_ray`: a Ray-only cluster spreads preprocessing over every node); Ray to a local instance
on 127.0.0.1, or an existing cluster, whose resources training and prediction wait for
(`wait_for_resources`) rather than size themselves from what is up at that moment.

Beyond one machine, workers get plans and absolute paths or URLs, never open handles, and open the
files themselves, so every node must reach the dataset and the workdir: in a bucket (`s3://...`)
or on a filesystem mounted at the same path everywhere (cluster/README.md). `check_ray_nodes_see` and
`check_dask_workers_see` run a small check on every node / worker before the work starts, so a node
that cannot see a path fails at once with a message naming the node and the path, instead of
failing case by case - or, worse, writing cases nobody else can read.
"""

from __future__ import annotations

import contextlib
import importlib
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
                memory_limit: str | None = DEFAULT_MEMORY_LIMIT,
                start_method: str | None = None) -> Iterator["distributed.Client"]:
    """A Client on `address`, or on a fresh LocalCluster (processes, one thread each, 127.0.0.1).

    Local workers are forked from this process where that is safe (`local_start_method`): they
    inherit its imports instead of spawning fresh interpreters that import distributed, numpy,
    scipy and zarr again - seconds of start-up per worker on a loaded 2-core machine, more than
    the work on a small dataset - and they close at once."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        from pipeline.errors import BadInputError  # refused before a cluster starts (Dask would wait ~30 s)

        raise BadInputError(f"--workers must be a whole number of at least 1, got {workers!r}")
    import dask
    from distributed import Client, LocalCluster

    if address:
        with Client(address, timeout="30s") as client:
            yield client
        return
    method = start_method or local_start_method()
    if method == "fork":  # what the stages' tasks run, imported once here rather than in every worker
        for module in FORKED_WORKER_IMPORTS:
            importlib.import_module(module)
    with dask.config.set({"distributed.worker.daemon": False, "distributed.admin.tick.limit": "10s",
                          "distributed.worker.multiprocessing-method": method}):
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


def local_start_method() -> str:
    """How local Dask workers start: 'fork' where it is safe and the platform has it, else 'spawn'.

    Forking is faster to start (the driver's imports are shared) but only safe in a process that
    has not yet loaded gRPC (Ray's client) or torch: a forked copy of their live threads and
    channels can hang the child or, through shared sockets, the parent. So a notebook that trained
    before it preprocesses spawns. macOS's fork is unsafe with its system libraries; Windows has
    none. SEGPIPE_DASK_START_METHOD overrides ('spawn', 'forkserver', 'fork')."""
    chosen = os.environ.get("SEGPIPE_DASK_START_METHOD")
    if chosen:
        return chosen
    if not sys.platform.startswith("linux") or any(m in sys.modules for m in FORK_UNSAFE_MODULES):
        return "spawn"
    return "fork"


FORK_UNSAFE_MODULES = ("grpc", "ray", "torch")
# The modules of the Dask stages' tasks (validation, fingerprint, preprocessing: nibabel, scipy, zarr).
# Forked workers inherit them; otherwise each worker imports them in its first task (~0.5 CPU-s each
# on the 2-core machine, more than the whole check of 208 hippocampus cases).
FORKED_WORKER_IMPORTS = ("pipeline.data.validation", "pipeline.planning.fingerprint", "pipeline.preprocessing.preprocess")


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


def results_of(completed: "distributed.as_completed") -> Iterator[tuple["distributed.Future", object]]:
    """Each future of `completed` (which may grow while iterated) as it finishes, with its result, or the
    exception its task raised (a worker lost for good: KilledWorker), fetched here, when asked for.

    Not `as_completed(..., with_results=True)`: that fetches every result as soon as it is ready, in a
    task on the client's event loop that nobody awaits. Ctrl-C in the caller leaves the loop, the
    client closes its connections, and a fetch still in flight then fails with CommClosedError, which
    Tornado logs as an unhandled-callback traceback on the user's terminal (tests/test_faults.py saw
    it after one Ctrl-C in ten). Fetched on the caller's thread, a result Ctrl-C interrupts is
    cancelled by distributed's `sync`, quietly; none is left in flight.
    """
    from asyncio import CancelledError

    for future in completed:
        try:
            value = future.result()
        except (Exception, CancelledError) as exc:  # noqa: BLE001 - the caller decides what a failed task means
            value = exc
        yield future, value


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


# ---------------------------------------------------------------- Dask workers on the nodes of a Ray cluster

DASK_ON_RAY_START_TIMEOUT_S = 600.0  # like --resources-timeout-s: long enough for an autoscaler to add a node
DASK_ON_RAY_SETTLE_S = 30.0  # after the first worker joined, how long the others that Ray placed may take

# Run as `python -c` by DaskWorkerActor: ask Linux to SIGTERM this process when the actor's process ends,
# however it ends (ray.kill, the driver gone, the node's raylet gone), then become the `dask worker` command.
# SIGTERM closes the nanny and its worker gracefully; the nanny's worker exits with the nanny in any case.
_DASK_WORKER_BOOT = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != parent:  # the actor ended before prctl took effect
    sys.exit(0)
runpy.run_module("distributed.cli.dask_worker", run_name="__main__", alter_sys=True)
"""


def _end_process_group(proc, grace_s: float) -> None:
    """SIGTERM a child started with `start_new_session=True` and its own children, SIGKILL what is left after `grace_s`."""
    import signal
    import subprocess

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # the group outlives its leader while the nanny's worker process is still closing: its pid is still
    # that group's id (Linux reuses no pid in use as a group id), so this reaches only what we started
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


class DaskWorkerActor:
    """A Ray actor (1 CPU, made in `dask_on_ray`) that runs one `dask worker` process on its node.

    The process is the actor's child in a session of its own (so a terminal's Ctrl-C reaches the
    driver only), and ends with the actor: `stop()` (SIGTERM, then SIGKILL after a grace period),
    `__del__` and atexit call it, and the kernel sends SIGTERM should the actor's process die first.
    Its log and TLS files live in a private temporary folder, removed by `stop()`.
    """

    def __init__(self) -> None:
        self.proc = None
        self.folder: str | None = None
        import atexit

        atexit.register(self.stop)

    def start(self, scheduler: str, index: int, memory_limit: str, env: dict, tls: dict[str, str]) -> dict:
        """Start `dask worker SCHEDULER` on this node, its TLS from `tls` ({ca, cert, key}: PEM text); returns
        where it runs ({name, node_id, node_ip, host, pid})."""
        import subprocess

        import ray

        node_id = ray.get_runtime_context().get_node_id()
        ip = ray.util.get_node_ip_address()
        name = f"ray-{node_id[:8]}-{index}"
        self.folder = tempfile.mkdtemp(prefix=f"segpipe-dask-worker-{name}-")  # mode 0700
        files = {}
        for what, text in tls.items():
            files[what] = os.path.join(self.folder, f"{what}.pem")
            with open(os.open(files[what], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(text)
        with open(os.path.join(self.folder, "worker.log"), "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DASK_WORKER_BOOT, str(os.getpid()), scheduler,
                 "--nthreads", "1", "--nworkers", "1", "--memory-limit", memory_limit, "--host", ip,
                 "--protocol", "tls", "--tls-ca-file", files["ca"], "--tls-cert", files["cert"],
                 "--tls-key", files["key"], "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--name", name,
                 "--preload", __name__, "--death-timeout", "60"],  # a worker whose scheduler is gone for a minute exits
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.folder, env={**os.environ, **env})
        return {"name": name, "node_id": node_id, "node_ip": ip, "host": socket.gethostname(), "pid": self.proc.pid}

    def poll(self) -> dict:
        """{returncode: None while the worker process runs, log: the last lines of its output once it has ended}."""
        code = self.proc.poll() if self.proc is not None else None
        return {"returncode": code, "log": self._log_tail() if code is not None else ""}

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            with open(os.path.join(self.folder, "worker.log"), errors="replace") as f:
                return f.read()[-chars:]
        except (OSError, TypeError):
            return ""

    def stop(self, grace_s: float = 5.0) -> int | None:
        """End the worker process and remove its folder (idempotent); its exit code, None if none was started."""
        import shutil

        proc, self.proc = self.proc, None
        if proc is not None:
            _end_process_group(proc, grace_s)
        folder, self.folder = self.folder, None
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        return proc.returncode if proc is not None else None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(grace_s=2.0)


@contextlib.contextmanager
def dask_on_ray(ray_address: str | None, workers: int | None = None, memory_limit: str | None = DEFAULT_MEMORY_LIMIT,
                start_timeout_s: float = DASK_ON_RAY_START_TIMEOUT_S) -> Iterator["distributed.Client"]:
    """A Client whose Dask workers run on the nodes of the Ray cluster at `ray_address` ('auto' in a Ray job).

    The scheduler runs here, in the driver, on this node's address as Ray knows it; `workers` Ray
    actors (default: the cluster's CPUs), 1 CPU each and spread over the nodes, each start one
    single-threaded `dask worker` (nanny, `memory_limit`) on their node that joins it. The block
    starts once the workers Ray could place at once have joined (at least one, within
    `start_timeout_s`, else SegPipeError saying what it waited for); actors still waiting for
    resources start their workers as an autoscaler adds nodes, and those join the running scheduler
    and take work from the others (Dask's work stealing and queued tasks). On leaving the block -
    normally, on an exception or Ctrl-C - the worker processes, the actors and the scheduler end.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        from pipeline.errors import BadInputError  # refused before joining Ray

        raise BadInputError(f"the number of Dask workers on Ray must be a whole number of at least 1, got {workers!r}")
    import time

    import ray
    from distributed import Client, LocalCluster
    from distributed.security import Security

    log = logging.getLogger("segpipe")
    with ray_session(ray_address):
        start = time.monotonic()
        ip = ray.util.get_node_ip_address()
        requested = workers or max(1, int(ray.cluster_resources().get("CPU", 0)))
        free_now = int(ray.available_resources().get("CPU", 0))
        # the scheduler listens on the cluster's network and runs what it is sent: mutual TLS with a key made for
        # this block, which only its client and workers hold (its HTTP server, health and metrics, on loopback)
        security = Security.temporary()
        tls = {"ca": security.tls_ca_file, "cert": security.tls_worker_cert, "key": security.tls_worker_key}
        cluster = LocalCluster(n_workers=0, processes=True, host=ip, scheduler_port=0, protocol="tls://",
                               security=security, dashboard_address=None, silence_logs=40,
                               scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
        actors: list = []
        starts: dict = {}
        try:
            with Client(cluster, security=security) as client:
                actor_class = ray.remote(num_cpus=1, max_restarts=0)(DaskWorkerActor)
                env = {"DASK_DISTRIBUTED__WORKER__DAEMON": "False", "DASK_DISTRIBUTED__ADMIN__TICK__LIMIT": "10s"}
                limit = str(memory_limit) if memory_limit else "0"  # 0: no memory management
                for k in range(requested):
                    actor = actor_class.options(scheduling_strategy="SPREAD").remote()
                    actors.append(actor)
                    starts[actor.start.remote(cluster.scheduler_address, k, limit, env, tls)] = actor
                log.info("starting %d Dask worker(s) on the Ray cluster (%d of %d CPU free), scheduler at %s",
                         requested, free_now, int(ray.cluster_resources().get("CPU", 0)), cluster.scheduler_address)
                joined, placed = _wait_for_dask_workers(client, starts, min(requested, max(1, free_now)), start,
                                                        start_timeout_s, what=(
                    f"Dask workers on the Ray cluster: {requested} x {{1 CPU}} Ray actor(s), one `dask worker` each, "
                    f"joining the scheduler at {cluster.scheduler_address}"))
                log.info("%d of %d Dask worker(s) joined in %.1f s (on %d Ray node(s))%s", joined, requested,
                         time.monotonic() - start, len({p["node_id"] for p in placed}),
                         f"; {requested - len(placed)} wait for Ray resources and join as nodes come"
                         if len(placed) < requested else "")
                yield client
        finally:
            try:
                _stop_dask_worker_actors(actors, starts)
            finally:
                cluster.close()


def _wait_for_dask_workers(client, starts: dict, expected: int, start: float, timeout_s: float,
                           what: str) -> tuple[int, list[dict]]:
    """Wait until `expected` workers joined (or at least one and DASK_ON_RAY_SETTLE_S more passed); returns
    (workers joined, where the placed actors started theirs). SegPipeError after `timeout_s` from `start`
    with none joined, or as soon as every worker started has exited without joining."""
    import time

    import ray

    from pipeline.errors import SegPipeError

    deadline = start + timeout_s
    placed: dict = {}  # start ref -> where
    failed: list[str] = []
    settle = None
    polled = 0.0
    while True:
        waiting = [r for r in starts if r not in placed]
        if waiting:
            done, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            for ref in done:
                try:
                    placed[ref] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - e.g. seg-pipeline not importable on that node
                    placed[ref] = {"node_id": "?", "error": f"{type(exc).__name__}: {exc}"}
                    failed.append(f"a Ray actor could not start its worker ({type(exc).__name__}: {exc})"[:2000])
        joined = len(client.nthreads())
        now = time.monotonic()
        if joined >= expected:
            break
        if joined:
            settle = settle or now + DASK_ON_RAY_SETTLE_S
            if now >= min(settle, deadline):
                break
        elif placed and now - polled >= 1.0:
            polled = now
            alive = [r for r in placed if "error" not in placed[r]]
            exited = [(placed[r], state) for r, state in zip(alive, _poll_dask_worker_actors([starts[r] for r in alive]))
                      if state["returncode"] is not None]
            if len(exited) == len(alive):  # every worker started so far ended without joining: say why now
                failed += [f"the worker {p['name']} on {p['node_ip']} exited with code {state['returncode']}: "
                           f"{state['log'].strip()[-1500:]}" for p, state in exited]
                raise SegPipeError(f"{what}: none joined, and the {len(placed)} started ended:\n" + "\n".join(failed))
        if now >= deadline:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            raise SegPipeError(
                f"waited {timeout_s:.0f} s for {what}: none joined ({len(placed)} of {len(starts)} actor(s) placed). "
                f"The Ray cluster has {ray.cluster_resources().get('CPU', 0):g} CPU on {nodes} node(s) "
                f"({ray.available_resources().get('CPU', 0):g} free). Start or autoscale nodes with free CPUs, or "
                "preprocess with --workers / --dask-address instead" + "".join(f"\n{f}" for f in failed))
        time.sleep(0.25)
    return joined, [p for p in placed.values() if "error" not in p]


def _poll_dask_worker_actors(actors: list, timeout_s: float = 30.0) -> list[dict]:
    """Each actor's `poll()`; an actor that died counts as ended, one that did not answer in time as running."""
    import ray

    refs = [actor.poll.remote() for actor in actors]
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0]) if refs else set()
    states = []
    for ref in refs:
        try:
            states.append(ray.get(ref) if ref in ready else {"returncode": None, "log": ""})
        except Exception as exc:  # noqa: BLE001 - the actor's process died
            states.append({"returncode": "?", "log": f"its Ray actor died ({type(exc).__name__}: {exc})"})
    return states


def _stop_dask_worker_actors(actors: list, starts: dict, timeout_s: float = 30.0) -> None:
    """Stop the worker process of every actor that started one, then kill every actor by its handle (also
    those still waiting for resources, which never started one; one caught starting it dies with it)."""
    import ray

    try:
        started = ray.wait(list(starts), num_returns=len(starts), timeout=0)[0] if starts else []
        stops = [starts[ref].stop.remote() for ref in started]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
