"""Preprocess a dataset on a SLURM cluster through dask-jobqueue (`pip install dask-jobqueue`).

    python cluster/dask/slurm_preprocess.py /shared/data/Task04_Hippocampus /shared/work/hippo --jobs 4

Each SLURM job runs `cores` single-threaded Dask workers. The stage functions are the same ones
`segpipe preprocess` calls; only the client differs.
"""

from __future__ import annotations

import argparse

from distributed import Client

from pipeline import cli
from pipeline.preprocessing import run_preprocessing
from pipeline.workdir import Workdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("workdir")
    p.add_argument("--config", default="3d_fullres")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs to request")
    p.add_argument("--cores", type=int, default=8, help="cores (= single-threaded workers) per job")
    p.add_argument("--memory", default="32GB", help="memory per job")
    p.add_argument("--queue", default=None, help="SLURM partition")
    p.add_argument("--walltime", default="02:00:00")
    args = p.parse_args()

    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(cores=args.cores, processes=args.cores, memory=args.memory, queue=args.queue,
                           walltime=args.walltime, job_extra_directives=["--exclusive"])
    cluster.scale(jobs=args.jobs)
    with Client(cluster) as client:
        dataset = cli._load_valid_dataset(args.dataset)
        ns = argparse.Namespace(dataset=args.dataset, workdir=args.workdir, command="preprocess", json=False,
                                workers=None, dask_address=client.scheduler.address, gpu_memory_gb=8.0)
        plans = cli._plan(ns, dataset)
        report = run_preprocessing(dataset, plans, args.config, Workdir.at(args.workdir).store, client=client)
        print(report)
    cluster.close()


if __name__ == "__main__":
    main()
