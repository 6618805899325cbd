"""Does a training worker's memory depend on the size of the dataset? Peak RSS for 20, 100, 208 and 2080 cases.

Each measurement is a fresh process running the real `training.train_loop_per_worker` through Ray
Train's local mode (`ScalingConfig(num_workers=0)`: the worker loop runs in this process, with the
same sampler, prefetch thread, model, optimizer, validation and checkpointing), training on the
first N cases of the 208 hippocampus cases. 2080 cases: a synthetic store holding every case ten
times under new ids (copied chunk files), so the case list is ten times the real one.

Expected: flat (within 10%), because the sampler reads patches on demand and keeps nothing per case.
A single process's peak RSS varies by about +-5% from run to run (allocator and thread timing), so
every size runs `--repeats` times, interleaved, and the median is compared.
For scale, the column "all cases in RAM" is what holding the decoded cases (float32 image + int64
label, as training consumes them) would take instead.

    .venv/bin/python benchmarks/train_memory.py [--workdir W] [--config 3d_lean] [--epochs 2] [--iterations 4] [--repeats 2]

Each child runs under the harness (benchmarks/harness.py), which also records the peak RSS of the
child's whole process tree (Ray's local-mode helpers included) beside the child's own ru_maxrss.
`memory_curve` is the reusable part (benchmarks/scaling.py draws the curve over more sizes).

Results: benchmarks/results/train_memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import machine_info, machine_line, python_env, run_command, write_results  # noqa: E402


def child(workdir: Path, config: str, num_cases: int, epochs: int, iterations: int, val_iterations: int) -> dict:
    """Run the worker loop in this process on the first `num_cases` cases; report peak RSS."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.preprocessing.store import open_store
    from pipeline.training.launch import prepare_run
    from pipeline.training.loop import TrainSettings, train_loop_per_worker

    with tempfile.TemporaryDirectory(prefix="segpipe-mem-") as tmp:
        settings = TrainSettings(str(workdir), config=config, fold="all", epochs=epochs, iterations_per_epoch=iterations,
                                 val_iterations=val_iterations, checkpoint_every=epochs)
        settings, plans, loop_config = prepare_run(settings)
        cases = open_store(workdir / "store.zarr", "r").config(plans.configuration(config).data_identifier).case_ids()
        loop_config["train_cases"] = cases[:num_cases]
        loop_config["val_cases"] = cases[:max(1, num_cases // 10)]
        loop_config["run_dir"] = str(Path(tmp) / "run")
        start = time.perf_counter()
        TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name="mem", storage_path=str(Path(tmp) / "ray"))).fit()
        seconds = time.perf_counter() - start
    return {"cases": num_cases, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(seconds, 1)}


def tenfold_store(src: Path, dst: Path, data_identifier: str) -> None:
    """A workdir whose store lists every case of `src` ten times (chunk files copied, ids renamed)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "plans.json", dst / "plans.json")
    shutil.copytree(src / "store.zarr", dst / "store.zarr", ignore=shutil.ignore_patterns("cases"))
    cases_src = src / "store.zarr" / data_identifier / "cases"
    cases_dst = dst / "store.zarr" / data_identifier / "cases"
    for case in sorted(p for p in cases_src.iterdir() if p.is_dir()):
        for k in range(10):
            new = cases_dst / f"{case.name}x{k}"
            shutil.copytree(case, new)
            meta = json.loads((new / "zarr.json").read_text())
            meta["attributes"]["case_id"] = new.name
            (new / "zarr.json").write_text(json.dumps(meta))


def decoded_bytes(workdir: Path, data_identifier: str, num_cases: int) -> int:
    import numpy as np

    from pipeline.preprocessing.store import open_store

    cs = open_store(workdir / "store.zarr", "r").config(data_identifier)
    ids = cs.case_ids()[:num_cases]
    return sum(int(np.prod(cs.image(c).shape)) * 4 + int(np.prod(cs.label(c).shape)) * 8 for c in ids)


def memory_curve(workdir: Path, config: str, sizes: list[int], repeats: int, epochs: int, iterations: int,
                 val_iterations: int, scratch: Path, log=print) -> list[dict]:
    """Peak RSS of one training worker per case count: `repeats` fresh child processes per size, interleaved.

    Sizes above the store's case count use a store listing every case ten times (built in `scratch`).
    """
    from pipeline.planning.plans import Plans
    from pipeline.preprocessing.store import open_store

    data_id = Plans.load(workdir / "plans.json").configuration(config).data_identifier
    stored = len(open_store(workdir / "store.zarr", "r").config(data_id).case_ids())
    tenfold = scratch / "tenfold"
    if max(sizes) > stored and not tenfold.exists():
        if max(sizes) > 10 * stored:
            raise ValueError(f"at most {10 * stored} cases (the store holds {stored})")
        tenfold_store(workdir, tenfold, data_id)
    workdir_for = lambda size: workdir if size <= stored else tenfold  # noqa: E731
    runs: dict[int, list[dict]] = {size: [] for size in sizes}
    for _ in range(repeats):
        for size in sizes:
            cmd = [sys.executable, __file__, "--child", str(workdir_for(size)), str(size), "--config", config,
                   "--epochs", str(epochs), "--iterations", str(iterations), "--val-iterations", str(val_iterations)]
            run = run_command(cmd, env=python_env())
            if not run.ok or run.output is None:
                raise RuntimeError(f"child for {size} cases failed ({run.error()}):\n{run.stderr_tail[-3000:]}")
            runs[size].append({**run.output, "peak_rss_tree_mb": round(run.peak_rss_tree_mib, 1),
                               "cpu_s": round(run.cpu_s, 1), "processes": run.processes})
            log(runs[size][-1])
    rows = []
    for size in sizes:
        peaks = sorted(r["peak_rss_mb"] for r in runs[size])
        rows.append({"cases": size, "peak_rss_mb": round(statistics.median(peaks), 1), "runs_mb": peaks,
                     "peak_rss_tree_mb": round(statistics.median(r["peak_rss_tree_mb"] for r in runs[size]), 1),
                     "seconds": round(statistics.median(r["seconds"] for r in runs[size]), 1),
                     "all_cases_in_ram_mb": round(decoded_bytes(workdir_for(size), data_id, size) / 2**20, 1)})
    return rows


def plot_curve(rows: list[dict], new_figure, title: str):
    fig, axes = new_figure(6.5, 3.6)
    ax = axes[0][0]
    xs = [r["cases"] for r in rows]
    ax.plot(xs, [r["peak_rss_mb"] for r in rows], "o-", label="training worker peak RSS (median)")
    for r in rows:
        ax.scatter([r["cases"]] * len(r["runs_mb"]), r["runs_mb"], s=8, color="gray")
    ax.plot(xs, [r["all_cases_in_ram_mb"] for r in rows], "s--", label="all cases decoded in RAM would be")
    ax.set_xscale("log")
    ax.set_xlabel("training cases")
    ax.set_ylabel("MB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a workdir with plans.json and the 208-case store")
    parser.add_argument("--config", default="3d_lean")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--val-iterations", type=int, default=2)
    parser.add_argument("--sizes", default="20,100,208,2080")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("WORKDIR", "CASES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.config, int(args.child[1]), args.epochs, args.iterations,
                               args.val_iterations)))
        return

    from loader import build_workdir

    machine = machine_info()
    tmp = tempfile.TemporaryDirectory(prefix="segpipe-mem-bench-")
    if args.workdir is None:
        args.workdir = build_workdir(Path(tmp.name) / "real")
    load_before = os.getloadavg()[0]
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = memory_curve(args.workdir, args.config, sizes, args.repeats, args.epochs, args.iterations,
                        args.val_iterations, Path(tmp.name), log=lambda r: print(r, flush=True))
    peaks = [r["peak_rss_mb"] for r in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    result = {"config": args.config, "epochs": args.epochs, "iterations_per_epoch": args.iterations, "repeats": args.repeats,
              "cpus": len(os.sched_getaffinity(0)), "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
              "rows": rows, "spread": round(spread, 3), "flat_within_10_percent": spread <= 0.10, "machine": machine}
    lines = [f"# Peak RSS of one training worker vs dataset size ({args.config}, {args.epochs} epochs x "
             f"{args.iterations} iterations, Ray Train local mode)", "",
             "| cases | peak RSS MB (median) | runs MB | process tree peak MB | all cases in RAM would be MB | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['cases']} | {r['peak_rss_mb']} | {', '.join(map(str, r['runs_mb']))} | {r['peak_rss_tree_mb']} "
              f"| {r['all_cases_in_ram_mb']} | {r['seconds']} |" for r in rows]
    lines += ["", f"Spread (max - min) / min: {100 * spread:.1f}% "
                  f"({'flat within 10%' if spread <= 0.10 else 'NOT flat within 10%'}). Peak RSS: the child's own "
                  "ru_maxrss; process tree: the harness's sampled peak of the child and its descendants.", "",
              f"Machine: {machine_line(machine | {'load_after': [round(x, 2) for x in os.getloadavg()]})}"]
    write_results("train_memory", result, "\n".join(lines),
                  lambda nf: plot_curve(rows, nf, f"training worker memory vs cases ({args.config})"))
    print("\n".join(lines))
    tmp.cleanup()


if __name__ == "__main__":
    main()
