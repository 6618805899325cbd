"""Fold-0 training on Task04_Hippocampus under a wall-clock budget, then Dice per class on fold 0's
validation cases (issue target: mean foreground Dice >= 0.85 within 30 CPU-minutes).

    python benchmarks/train_hippocampus.py [--budget-min 30] [--config 3d_lean] [--workers 1] [--tta]

Runs the real command line (plan, preprocess, train, then `segpipe evaluate-cv --folds 0`: fold 0's
validation cases predicted by its model and scored) in a workdir that is kept (`--workdir`), and
writes benchmarks/results/train_hippocampus.{json,md,png} (the PNG is the training curve). Beside
the evaluated Dice it records the training run's last pseudo-Dice (validation patches), which
should agree within a few points, and the Dice after the post-processing evaluate-cv decided.
benchmarks/quality_vs_nnunet.py --ours-workdir reuses the run for the comparison with nnU-Net.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.training.splits import load_or_create_splits  # noqa: E402
from pipeline.workdir import Workdir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("SEGPIPE_SHARED_DATA", REPO.parent / "shared" / "data")) / "Task04_Hippocampus"


def segpipe(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=30.0, help="training wall-clock budget")
    p.add_argument("--config", default="3d_lean")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--tta", action="store_true", help="mirroring at prediction (8x slower on a CPU)")
    p.add_argument("--workdir", default="/tmp/segpipe_bench_hippocampus")
    args = p.parse_args()
    if not (DATA / "dataset.json").is_file():
        sys.exit(f"skipped: {DATA} not found (the shared data lives in ../shared/data)")

    wd = Path(args.workdir)
    load_before = os.getloadavg()
    timings = {"plan_s": segpipe("plan", str(DATA), "--workdir", str(wd)),
               "preprocess_s": segpipe("preprocess", str(DATA), "--workdir", str(wd), "--config", args.config)}
    timings["train_s"] = segpipe("train", "--workdir", str(wd), "--config", args.config, "--fold", "0",
                                 "--num-workers", str(args.workers), "--time-budget-min", str(args.budget_min))
    cv = [] if args.tta else ["--no-tta"]
    timings["evaluate_cv_s"] = segpipe("evaluate-cv", str(DATA), "--workdir", str(wd), "--config", args.config,
                                       "--folds", "0", *cv)
    report = json.loads((wd / "crossval" / args.config / "crossval.json").read_text())
    summary = json.loads((wd / "crossval" / args.config / "evaluation" / "summary.json").read_text())
    val_cases = load_or_create_splits(Workdir.at(wd), []).validation_cases("0")
    run = wd / "runs" / args.config / "fold_0"
    epochs = (run / "metrics.csv").read_text().strip().splitlines()[1:]
    fold0 = report["per_fold"][0]
    result = {
        "benchmark": "train_hippocampus",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "load_before": load_before, "load_after": os.getloadavg(), "gpu": None},
        "config": args.config, "workers": args.workers, "budget_min": args.budget_min, "tta": args.tta,
        "epochs": len(epochs), "validation_cases": len(val_cases),
        # Ray's workers are not this process's children, so rusage cannot count their CPU; the budget
        # bounds it: wall-clock budget x cores
        "cpu_minutes_at_most": round(args.budget_min * (os.cpu_count() or 1), 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "dice": {summary["labels"][k]: v["dice"] for k, v in summary["mean"].items()},
        "foreground_mean_dice": summary["foreground_mean"]["dice"],
        "pseudo_dice": {summary["labels"].get(k, k): v for k, v in fold0["pseudo_dice"].items()},
        "pseudo_foreground_dice": fold0["pseudo_foreground_dice"],
        "postprocessing": report["postprocessing"],
        "foreground_mean_dice_postprocessed": report["foreground_dice_postprocessed"],
        "workdir": str(wd),
        "target": ">= 0.85 mean foreground Dice within 30 CPU-minutes",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_hippocampus.json").write_text(json.dumps(result, indent=2) + "\n")
    if (run / "training_curves.png").is_file():
        shutil.copyfile(run / "training_curves.png", RESULTS / "train_hippocampus.png")
    dice = " / ".join(f"{k} {v:.3f}" for k, v in result["dice"].items())
    pseudo = result["pseudo_foreground_dice"]
    pp = result["foreground_mean_dice_postprocessed"]
    md = (f"# Fold-0 training on Task04_Hippocampus ({result['date']}, CPU, {result['machine']['cpus']} cores, "
          f"load {load_before[0]:.1f} before)\n\n"
          f"| config | workers | budget (min) | epochs | train wall (s) | Dice per class | foreground mean | "
          f"training pseudo-Dice | after post-processing |\n"
          f"|---|---|---|---|---|---|---|---|---|\n"
          f"| {args.config} | {args.workers} | {args.budget_min} | {len(epochs)} | {timings['train_s']:.0f} | {dice} | "
          f"**{result['foreground_mean_dice']:.3f}** | {'–' if pseudo is None else f'{pseudo:.3f}'} | "
          f"{'unchanged' if pp is None else f'{pp:.3f}'} |\n\n"
          f"{len(val_cases)} validation cases of fold 0 scored whole by `segpipe evaluate-cv`, prediction "
          f"{'with' if args.tta else 'without'} mirroring; the pseudo-Dice is the training run's last epoch, "
          f"on validation patches. Target: >= 0.85 within 30 CPU-minutes. Command: "
          f"`python benchmarks/train_hippocampus.py --budget-min {args.budget_min} --config {args.config} "
          f"--workers {args.workers}{' --tta' if args.tta else ''}`\n\n![curves](train_hippocampus.png)\n")
    (RESULTS / "train_hippocampus.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
