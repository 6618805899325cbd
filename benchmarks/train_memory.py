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

Results: benchmarks/results/train_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def child(workdir: Path, config: str, num_cases: int, epochs: int, iterations: int, val_iterations: int) -> dict:
    """Run the worker loop in this process on the first `num_cases` cases; report peak RSS."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.store import open_store
    from pipeline.training import TrainSettings, prepare_run, train_loop_per_worker

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

    from pipeline.store import open_store

    cs = open_store(workdir / "store.zarr", "r").config(data_identifier)
    ids = cs.case_ids()[:num_cases]
    return sum(int(np.prod(cs.image(c).shape)) * 4 + int(np.prod(cs.label(c).shape)) * 8 for c in ids)


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

    from pipeline.plans import Plans

    tmp = tempfile.TemporaryDirectory(prefix="segpipe-mem-bench-")
    if args.workdir is None:
        args.workdir = build_workdir(Path(tmp.name) / "real")
    data_id = Plans.load(args.workdir / "plans.json").configuration(args.config).data_identifier
    load_before = os.getloadavg()[0]
    sizes = [int(x) for x in args.sizes.split(",")]
    tenfold = Path(tmp.name) / "tenfold"
    if max(sizes) > 208:
        tenfold_store(args.workdir, tenfold, data_id)
    workdir_for = lambda size: args.workdir if size <= 208 else tenfold  # noqa: E731
    runs: dict[int, list[dict]] = {size: [] for size in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            cmd = [sys.executable, __file__, "--child", str(workdir_for(size)), str(size), "--config", args.config,
                   "--epochs", str(args.epochs), "--iterations", str(args.iterations),
                   "--val-iterations", str(args.val_iterations)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"child for {size} cases failed:\n{out.stderr[-3000:]}")
            runs[size].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[size][-1], flush=True)
    rows = []
    for size in sizes:
        peaks = sorted(r["peak_rss_mb"] for r in runs[size])
        rows.append({"cases": size, "peak_rss_mb": round(statistics.median(peaks), 1), "runs_mb": peaks,
                     "seconds": round(statistics.median(r["seconds"] for r in runs[size]), 1),
                     "all_cases_in_ram_mb": round(decoded_bytes(workdir_for(size), data_id, size) / 2**20, 1)})
    peaks = [r["peak_rss_mb"] for r in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    result = {"config": args.config, "epochs": args.epochs, "iterations_per_epoch": args.iterations, "repeats": args.repeats,
              "cpus": len(os.sched_getaffinity(0)), "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
              "rows": rows, "spread": round(spread, 3), "flat_within_10_percent": spread <= 0.10}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Peak RSS of one training worker vs dataset size ({args.config}, {args.epochs} epochs x "
             f"{args.iterations} iterations, Ray Train local mode)", "",
             "| cases | peak RSS MB (median) | runs MB | all cases in RAM would be MB | seconds |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['cases']} | {r['peak_rss_mb']} | {', '.join(map(str, r['runs_mb']))} | {r['all_cases_in_ram_mb']} "
              f"| {r['seconds']} |" for r in rows]
    lines += ["", f"Spread (max - min) / min: {100 * spread:.1f}% "
                  f"({'flat within 10%' if spread <= 0.10 else 'NOT flat within 10%'})."]
    (RESULTS / "train_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    tmp.cleanup()


if __name__ == "__main__":
    main()
