"""Fingerprint, plan and preprocess a dataset on SLURM: Dask workers as SLURM jobs (dask-jobqueue).

    python cluster/slurm/preprocess.py s3://bucket/datasets/Task04_Hippocampus s3://bucket/segpipe/work/hippo \\
        --jobs 4 --cores 8 --memory 32GB --queue cpu --walltime 02:00:00

Run it on a login node or inside a small allocation: this process is the Dask scheduler and the
driver; each SLURM job it submits runs CORES single-threaded Dask workers. DATASET and WORKDIR are
paths every compute node sees (a shared filesystem) or URLs (s3://, gs://, az://, file://).
Credentials and endpoints come from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...),
which SLURM passes on to the worker jobs (sbatch's default --export=ALL), or from ~/.aws and roles.

Nothing starts before the workers are there: the script waits for --min-workers of them (default:
all) for --wait-timeout seconds, and stops with a message naming the SLURM jobs if they do not come
(still queued, or failed: their logs are in --log-directory). Network: the scheduler listens on the
address of --interface (e.g. ib0) or of --scheduler-host (default: this host's outward address), never
on every interface; the scheduler's and the workers' dashboards on 127.0.0.1 only.

Exit codes: 0 done; 2 bad input (the dataset) or cases that failed (listed); 1 anything else,
including workers that never came.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="dataset folder or URL")
    p.add_argument("workdir", help="workdir folder or URL (plans.json and store.zarr are written there)")
    p.add_argument("--config", default="3d_fullres", help="configuration to preprocess (default 3d_fullres)")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs to request (default 4)")
    p.add_argument("--cores", type=int, default=8, help="cores per job = single-threaded Dask workers per job (default 8)")
    p.add_argument("--memory", default="32GB", help="memory per job (default 32GB), split among its workers")
    p.add_argument("--queue", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--walltime", default="02:00:00", help="time limit per job (default 02:00:00)")
    p.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                   help="extra #SBATCH directive, e.g. --job-extra=--constraint=skylake (repeatable)")
    p.add_argument("--prologue", action="append", default=[], metavar="COMMAND",
                   help="shell command run in each job before the workers, e.g. 'module load python' (repeatable)")
    p.add_argument("--interface", default=None, help="network interface for the scheduler and workers (e.g. ib0)")
    p.add_argument("--scheduler-host", default=None,
                   help="address the scheduler listens on (default: this host's outward address)")
    p.add_argument("--local-directory", default="${TMPDIR:-/tmp}",
                   help="workers' scratch folder on each node (default ${TMPDIR:-/tmp}, expanded there)")
    p.add_argument("--log-directory", default="segpipe-dask-logs", help="SLURM output of the worker jobs")
    p.add_argument("--min-workers", type=int, default=None,
                   help="workers to wait for before starting (default: all, jobs x cores)")
    p.add_argument("--wait-timeout", type=float, default=900.0,
                   help="seconds to wait for them (default 900)")
    args = p.parse_args(argv)
    total = args.jobs * args.cores
    if args.min_workers is None:
        args.min_workers = total
    if not 1 <= args.min_workers <= total:
        p.error(f"--min-workers must be between 1 and jobs x cores = {total}")
    return args


def cluster_options(args: argparse.Namespace) -> dict:
    """dask-jobqueue SLURMCluster arguments: scheduler on one private address, dashboards on loopback."""
    from distributed.utils import get_ip

    if args.interface:
        scheduler = {"interface": args.interface}
    else:
        scheduler = {"host": args.scheduler_host or get_ip()}
    scheduler["dashboard_address"] = "127.0.0.1:8787"
    return dict(
        cores=args.cores,
        processes=args.cores,
        memory=args.memory,
        queue=args.queue,
        account=args.account,
        walltime=args.walltime,
        interface=args.interface,
        scheduler_options=scheduler,
        worker_extra_args=["--dashboard-address", "127.0.0.1:0"],
        local_directory=args.local_directory,
        log_directory=args.log_directory,
        job_extra_directives=list(args.job_extra),
        job_script_prologue=list(args.prologue),
        job_name="segpipe-dask",
    )


def make_cluster(args: argparse.Namespace):
    """The SLURMCluster: this process runs its scheduler; `scale` submits the worker jobs."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise SystemExit("this script needs dask-jobqueue: pip install dask-jobqueue") from None
    return SLURMCluster(**cluster_options(args))


def wait_for_workers(client, cluster, args: argparse.Namespace) -> None:
    """Block until `args.min_workers` workers are connected; a clear SystemExit after the timeout."""
    start = time.monotonic()
    print(f"waiting up to {args.wait_timeout:.0f}s for {args.min_workers} Dask worker(s) "
          f"({args.jobs} SLURM job(s) x {args.cores})", flush=True)
    try:
        client.wait_for_workers(args.min_workers, timeout=args.wait_timeout)
    except TimeoutError:
        joined = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        jobs = ", ".join(str(getattr(job, "job_id", None) or name)
                         for name, job in getattr(cluster, "workers", {}).items()) or "none submitted"
        raise SystemExit(
            f"error: only {joined} of {args.min_workers} Dask worker(s) joined within {args.wait_timeout:.0f}s; "
            f"nothing was done. Are the SLURM jobs still queued or did they fail? squeue -u $USER -n segpipe-dask; "
            f"their output is in {args.log_directory}/ (SLURM job ids: {jobs}). "
            f"Raise --wait-timeout, or lower --min-workers to start with fewer.") from None
    print(f"{args.min_workers} worker(s) ready after {time.monotonic() - start:.0f}s", flush=True)


def run(args: argparse.Namespace, client) -> int:
    """The stages, through their public API only; 2 when the dataset is bad or cases failed."""
    from pipeline import stages
    from pipeline.errors import SegPipeError

    try:
        dataset = stages.load_dataset(args.dataset, client=client)  # validated on the workers: BadInputError (exit 2)
        plans = stages.plan(dataset, args.workdir, client=client)  # fingerprints first, on the workers
        report = stages.preprocess(dataset, args.workdir, config=args.config, plans=plans, client=client)
    except SegPipeError as exc:  # one readable message, the command line's exit code
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    print(report, flush=True)
    if report.failed:
        print(f"error: {len(report.failed)} case(s) failed; re-run the same command to redo only those",
              file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distributed import Client

    cluster = make_cluster(args)
    try:
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            wait_for_workers(client, cluster, args)
            return run(args, client)
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
