"""Does adding workers help, and does a training worker's memory stay flat as the dataset grows?

Three measurements on Task04_Hippocampus, each optional:

1. Dask preprocessing (`run_preprocessing`, 3d_fullres) with 1 and 2 workers (`--dask-workers`) on a
   running LocalCluster: cases/s, CPU s/case, peak RSS of the whole tree (benchmarks/preprocess.py's
   `run_ours`, sampled by the harness).
2. Ray training with 1 and 2 workers (`--ray-workers`): `segpipe train --num-workers N` with tiny
   epochs and no validation, run as a child process by the harness (so the peak RSS covers the
   driver, Ray's own processes and every training worker). samples/s = iterations x global batch /
   epoch seconds (from the run's metrics.csv, the first epoch left out when there are more).
   Data parallelism splits the global batch over the workers, so ideal scaling doubles samples/s;
   on a 2-core machine each worker gets one core.
3. The training worker's peak RSS against the number of cases (`--memory-sizes`), reusing
   benchmarks/train_memory.py's `memory_curve` (cases beyond the 208 stored come from a store that
   lists every case ten times).

    .venv/bin/python benchmarks/scaling.py [--workdir W] [--cases 208] [--dask-workers 1 2]
        [--ray-workers 1 2] [--epochs 3] [--iterations 4] [--memory-sizes 20,50,100,208,520,1040,2080]

Without --workdir the 208 cases are preprocessed into a temporary workdir first (about 20 s).
Writes benchmarks/results/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import RESULTS, SHARED, machine_info, machine_line, md_table, python_env, run_command, write_results  # noqa: E402

CONFIG = "3d_lean"


def dask_scaling(cases: int | None, workers: list[int], tmp: Path) -> list[dict]:
    from preprocess import CONFIG as PRE_CONFIG
    from preprocess import run_ours

    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment

    dataset = load_dataset(SHARED / "Task04_Hippocampus")
    if cases:
        dataset = dataclasses.replace(dataset, cases=dataset.cases[:cases])
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    rows = []
    for n in workers:
        row = run_ours(dataset, plans, n, tmp)
        row["config"] = PRE_CONFIG
        rows.append(row)
        print(f"dask {n} worker(s): {row['cases_per_s']:.2f} cases/s, {row['cpu_s_per_case']:.3f} CPU s/case, "
              f"tree {row['peak_rss_tree_MiB']:.0f} MiB", flush=True)
    base = rows[0]["cases_per_s"] if rows else None
    for r in rows:
        r["speedup"] = round(r["cases_per_s"] / base, 3) if base else None
    return rows


def epoch_seconds(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open() as f:
        return [float(row["seconds"]) for row in csv.DictReader(f)]


def ray_scaling(workdir: Path, workers: list[int], epochs: int, iterations: int, timeout: float) -> list[dict]:
    from pipeline.planning.plans import Plans

    global_batch = int(Plans.load(workdir / "plans.json").configuration(CONFIG).batch_size)
    rows = []
    for n in workers:
        cmd = [sys.executable, "-m", "pipeline.cli", "train", "--workdir", str(workdir), "--config", CONFIG,
               "--fold", "0", "--num-workers", str(n), "--epochs", str(epochs), "--iterations-per-epoch",
               str(iterations), "--val-iterations", "0", "--checkpoint-every", str(epochs), "--json"]
        run = run_command(cmd, env=python_env(RAY_USAGE_STATS_ENABLED="0"), timeout=timeout)
        base = {"workers": n, "epochs": epochs, "iterations_per_epoch": iterations, "global_batch": global_batch,
                "wall_s": round(run.wall_s, 1), "cpu_s": round(run.cpu_s, 1),
                "peak_rss_tree_mib": round(run.peak_rss_tree_mib, 1), "processes": run.processes}
        if not run.ok:
            rows.append({**base, "error": run.error()})
            print(f"ray {n} worker(s): failed: {run.error()}", flush=True)
            continue
        seconds = epoch_seconds(workdir / "runs" / CONFIG / "fold_0")
        timed = seconds[1:] if len(seconds) > 1 else seconds
        per_epoch = statistics.median(timed)
        rows.append({**base, "epoch_seconds": seconds, "samples_per_s": round(iterations * global_batch / per_epoch, 3),
                     "s_per_iteration": round(per_epoch / iterations, 3)})
        print(f"ray {n} worker(s): {rows[-1]['samples_per_s']} samples/s, command {run.wall_s:.0f} s, "
              f"tree peak {run.peak_rss_tree_mib:.0f} MiB", flush=True)
    ok = [r for r in rows if "samples_per_s" in r]
    if ok:
        for r in ok:
            r["speedup"] = round(r["samples_per_s"] / ok[0]["samples_per_s"], 3)
    return rows


def markdown(result: dict) -> str:
    lines = ["# Scaling with workers, and training memory vs dataset size (benchmarks/scaling.py)", "",
             f"Machine: {machine_line(result['machine'])}.", ""]
    if result["dask"]:
        lines += [f"## Dask preprocessing ({result['dask'][0]['cases']} hippocampus cases, 3d_fullres, running LocalCluster)", "",
                  md_table(["workers", "cases/s", "speedup", "CPU s/case", "peak RSS per worker MiB", "peak RSS tree MiB"],
                           [(r["workers"], f"{r['cases_per_s']:.2f}", r["speedup"], f"{r['cpu_s_per_case']:.3f}",
                             ", ".join(f"{p:.0f}" for p in r["peak_rss_per_worker_MiB"]), f"{r['peak_rss_tree_MiB']:.0f}")
                            for r in result["dask"]]), ""]
    if result["ray"]:
        r0 = result["ray"][0]
        lines += [f"## Ray training (`segpipe train --config {CONFIG} --num-workers N`, {r0['epochs']} epochs x "
                  f"{r0['iterations_per_epoch']} iterations, global batch {r0['global_batch']}, no validation)", "",
                  md_table(["workers", "samples/s", "speedup", "s/iteration", "epoch seconds", "command wall s",
                            "command CPU s", "peak RSS tree MiB", "note"],
                           [(r["workers"], r.get("samples_per_s"), r.get("speedup"), r.get("s_per_iteration"),
                             ", ".join(f"{s:.1f}" for s in r.get("epoch_seconds", [])), r["wall_s"], r["cpu_s"],
                             r["peak_rss_tree_mib"], r.get("error", "")) for r in result["ray"]]),
                  "", "The command's wall time includes starting and stopping Ray; samples/s comes from the epochs alone. "
                  "Peak RSS covers the driver, Ray's processes and the training workers.", ""]
    if result["memory"]:
        lines += [f"## Training worker peak RSS vs cases ({result['memory_config']}, Ray Train local mode)", "",
                  md_table(["cases", "peak RSS MB", "process tree peak MB", "all cases in RAM would be MB", "seconds"],
                           [(r["cases"], r["peak_rss_mb"], r["peak_rss_tree_mb"], r["all_cases_in_ram_mb"], r["seconds"])
                            for r in result["memory"]]),
                  "", f"Spread (max - min) / min of the peak: {100 * result['memory_spread']:.1f}%.", ""]
    for note in result.get("notes", []):
        lines.append(f"* {note}")
    return "\n".join(lines) + "\n"


def plot(result: dict, new_figure):
    panels = [k for k in ("dask", "ray", "memory") if result[k]]
    if not panels:
        return None
    fig, axes = new_figure(4.6 * len(panels), 3.6, 1, len(panels))
    for ax, key in zip(axes[0], panels):
        if key == "dask":
            rows = result["dask"]
            xs = [r["workers"] for r in rows]
            ax.plot(xs, [r["cases_per_s"] for r in rows], "o-", label="measured")
            ax.plot(xs, [rows[0]["cases_per_s"] * w / xs[0] for w in xs], "k:", label="linear")
            ax.set_xlabel("Dask workers")
            ax.set_ylabel("cases/s")
            ax.set_title("preprocessing", fontsize=10)
        elif key == "ray":
            rows = [r for r in result["ray"] if "samples_per_s" in r]
            xs = [r["workers"] for r in rows]
            if rows:
                ax.plot(xs, [r["samples_per_s"] for r in rows], "o-", label="measured")
                ax.plot(xs, [rows[0]["samples_per_s"] * w / xs[0] for w in xs], "k:", label="linear")
            ax.set_xlabel("Ray Train workers")
            ax.set_ylabel("samples/s")
            ax.set_title(f"training ({CONFIG})", fontsize=10)
        else:
            rows = result["memory"]
            xs = [r["cases"] for r in rows]
            ax.plot(xs, [r["peak_rss_mb"] for r in rows], "o-", label="worker peak RSS")
            ax.plot(xs, [r["all_cases_in_ram_mb"] for r in rows], "s--", label="all cases in RAM")
            ax.set_xscale("log")
            ax.set_xlabel("training cases")
            ax.set_ylabel("MB")
            ax.set_title("training worker memory", fontsize=10)
        ax.legend(fontsize=8)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a workdir with plans.json and the 208-case store")
    parser.add_argument("--cases", type=int, default=None, help="hippocampus cases for the Dask runs (default all)")
    parser.add_argument("--dask-workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--ray-workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--ray-timeout", type=float, default=900.0, help="seconds per `segpipe train` run")
    parser.add_argument("--memory-sizes", default="20,50,100,208,520,1040,2080", help="comma-separated; empty to skip")
    parser.add_argument("--memory-config", default=CONFIG)
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.memory_sizes.split(",") if x.strip()]

    machine = machine_info()
    result = {"machine": machine, "dask": [], "ray": [], "memory": [], "memory_config": args.memory_config,
              "memory_spread": None, "notes": []}
    def save(final: bool = False) -> Path:  # after every section, so a run cut short still leaves what it measured
        result["complete"] = final
        return write_results("scaling", result, markdown(result), lambda nf: plot(result, nf), args.out)["md"]

    with tempfile.TemporaryDirectory(prefix="segpipe-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        if args.dask_workers:
            result["dask"] = dask_scaling(args.cases, args.dask_workers, tmp)
            save()
        if args.ray_workers or sizes:
            if args.workdir is None:
                from loader import build_workdir

                args.workdir = build_workdir(tmp / "work")
            else:  # training writes runs/ and splits.json: work on a copy that shares the store
                work = tmp / "work"
                work.mkdir()
                shutil.copy(args.workdir / "plans.json", work / "plans.json")
                os.symlink(args.workdir.resolve() / "store.zarr", work / "store.zarr")
                if (args.workdir / "splits.json").is_file():
                    shutil.copy(args.workdir / "splits.json", work / "splits.json")
                args.workdir = work
        if args.ray_workers:
            result["ray"] = ray_scaling(args.workdir, args.ray_workers, args.epochs, args.iterations, args.ray_timeout)
            save()
        if sizes:
            from train_memory import memory_curve

            result["memory"] = memory_curve(args.workdir, args.memory_config, sizes, args.memory_repeats, epochs=1,
                                            iterations=3, val_iterations=1, scratch=tmp,
                                            log=lambda r: print("memory", r, flush=True))
            peaks = [r["peak_rss_mb"] for r in result["memory"]]
            result["memory_spread"] = round((max(peaks) - min(peaks)) / min(peaks), 3)
        else:
            result["notes"].append("memory curve skipped (--memory-sizes empty); see train_memory.md")
    print(save(final=True).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
