"""Where Dask work runs: a loopback LocalCluster by default, or an existing scheduler.

Stages take a `distributed.Client` (or None to run in this process), so they stay plain functions;
this module only decides which client to hand them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# A single case must not take the machine down: each worker is capped, and Dask's nanny
# restarts a worker that passes the limit (the task is then reported failed with its case id).
DEFAULT_MEMORY_LIMIT = "4GiB"


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


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
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def keep_local_ray_on_loopback() -> None:
    """Make the Ray this process is about to start listen on 127.0.0.1 only (call before `ray.init`).

    Ray turns `_node_ip_address="127.0.0.1"` into the machine's outward address
    (`ray._private.services.resolve_ip_for_localhost`) unless multi-node clusters are disabled, and
    then its GCS, raylet, agents and workers listen on every interface. With clusters disabled -
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read into `ray_constants` at import, so it is set on the
    imported module too - the node address is loopback and every Ray listener binds to it
    (tests/test_security.py checks the sockets). Only for a Ray started here: a driver joining a
    cluster at `--ray-address` needs its outward address.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by Ray's own processes
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
