"""Quality at equal compute: seg-pipeline vs nnU-Net v2, both trained on hippocampus fold 0 for the same wall-clock budget.

Both train on the same fold-0 training cases (our split is nnU-Net's own KFold; the same lists are
written into nnU-Net's splits_final.json) for `--budget-min` minutes of training loop on this
machine, then predict the same validation cases with mirroring TTA, and both prediction folders are
scored by the same code: `pipeline.evaluation.metrics.evaluate_folders` against the dataset's labels.

* ours: `segpipe train --config CONFIG --fold 0 --time-budget-min M` (the LR schedule follows the
  clock), then `segpipe predict` of the validation images. CONFIG defaults to 3d_lean, the preset
  for CPUs and small budgets; `--config 3d_fullres` trains nnU-Net's network with its recipe.
* nnU-Net: its own trainer on its own preprocessed data (``--nnunet-ref``/preprocessed), through a
  budget trainer defined here (`nnUNetTrainer_SegpipeBudget`): nnU-Net's epoch loop, SGD and poly
  schedule unchanged, but `num_epochs` x `num_iterations_per_epoch` chosen so the poly schedule
  spans the budget (from nnU-Net's measured seconds per iteration: benchmarks/results/train_step.json
  or `--nnunet-s-per-it`), and the loop stops before an epoch that would end past the budget
  (as ours does). Its trainer lookup is patched the way /work/shared/tools/nnunet_train_cpu.py does
  (PyPI's torchvision does not load beside the CPU torch). After training nnU-Net predicts its
  validation cases itself (`perform_actual_validation`, mirroring on), as `nnUNetv2_train` does.

Each training and prediction command runs under benchmarks/harness.py (wall, CPU seconds and peak
RSS of the whole process tree, workers included).

    .venv/bin/python benchmarks/quality_vs_nnunet.py --budget-min 30 [--nnunet-venv ../nnunet_ref/venv]
        [--val-cases 8] [--config 3d_lean] [--workdir W]

`--val-cases N` scores only the first N validation cases of fold 0 (both tools), for short trials.
Writes benchmarks/results/quality_vs_nnunet.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import (  # noqa: E402
    NNUNET_REF,
    RESULTS,
    SHARED,
    machine_info,
    machine_line,
    md_table,
    python_env,
    run_command,
    subset_dataset,
    write_results,
)

NNUNET_DATASET = "Dataset004_Hippocampus"
NNUNET_S_PER_IT_FALLBACK = 13.3  # nnU-Net's figure for this plan on this 2-core CPU at batch 7 (task notes)
TRAINER = "nnUNetTrainer_SegpipeBudget"
ENV_PREFIX = "SEGPIPE_NNUNET_"


# ---------------------------------------------------------------- nnU-Net side (runs under nnU-Net's interpreter)


def nnunet_train_entry(argv: list[str]) -> None:
    """`nnUNetv2_train argv...` with the budget trainer below available (no `pipeline` import here)."""
    import torch
    from nnunetv2.run import run_training
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_SegpipeBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
        """nnU-Net's trainer with the epoch count and length from the environment and a wall-clock stop."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ[ENV_PREFIX + "EPOCHS"])
            self.num_iterations_per_epoch = int(os.environ[ENV_PREFIX + "ITERATIONS"])
            self.num_val_iterations_per_epoch = int(os.environ[ENV_PREFIX + "VAL_ITERATIONS"])
            self.budget_s = float(os.environ[ENV_PREFIX + "BUDGET_S"])

        def perform_actual_validation(self, save_probabilities: bool = False):
            if os.environ.get(ENV_PREFIX + "NO_MIRRORING") == "1":  # --no-tta: as ours, no mirroring
                self.inference_allowed_mirroring_axes = None
            return super().perform_actual_validation(save_probabilities)

        def run_training(self):  # nnU-Net's loop, plus the budget check before each epoch
            self.on_train_start()
            start, last, done = time.perf_counter(), 0.0, 0
            for _ in range(self.current_epoch, self.num_epochs):
                if time.perf_counter() - start + last > self.budget_s:
                    self.print_to_log_file(f"time budget of {self.budget_s:.0f} s reached after {done} epochs")
                    break
                t = time.perf_counter()
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()
                last = time.perf_counter() - t
                done += 1
            loop_s = time.perf_counter() - start
            self.on_train_end()
            with open(os.path.join(self.output_folder, "segpipe_budget.json"), "w") as f:
                json.dump({"epochs": done, "planned_epochs": self.num_epochs,
                           "iterations_per_epoch": self.num_iterations_per_epoch,
                           "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                           "train_loop_s": round(loop_s, 1), "budget_s": self.budget_s, "batch_size": self.batch_size}, f)

    def find_trainer(name, *_args, **_kwargs):
        if name == TRAINER:
            return nnUNetTrainer_SegpipeBudget
        raise RuntimeError(f"only {TRAINER} is available here, not {name}")

    run_training.recursive_find_trainer_class_by_name = find_trainer
    sys.argv = ["nnUNetv2_train", *argv]
    run_training.run_training_entry()


# ---------------------------------------------------------------- driver (our interpreter)


def nnunet_seconds_per_iteration(override: float | None) -> tuple[float, str]:
    """nnU-Net's s/iteration at its batch size on this machine: measured by train_step.py if we have it."""
    if override:
        return override, "--nnunet-s-per-it"
    path = RESULTS / "train_step.json"
    if path.is_file():
        data = json.loads(path.read_text())
        rows = [r for r in data.get("runs", []) if r.get("impl") == "nnunet" and "s_per_step" in r
                and r.get("device", "cpu") == "cpu"]
        if rows:
            best = min(rows, key=lambda r: r["s_per_step"] / r["batch"])
            batch = int(data.get("plan", {}).get("batch_size", 7))
            return best["s_per_step"] / best["batch"] * batch, f"benchmarks/results/train_step.json (scaled to batch {batch})"
    return NNUNET_S_PER_IT_FALLBACK, "task notes"


def nnunet_schedule(budget_s: float, s_per_it: float, target_epochs: int = 10) -> dict:
    """Epochs x iterations that fill the budget with about `target_epochs` epochs (validation ~ 1/5 of an epoch)."""
    val_cost = 1 / 3  # a validation batch is a forward pass only
    its_total = max(1.0, budget_s / s_per_it)
    iterations = int(min(250, max(1, round(its_total / target_epochs))))
    val_iterations = max(1, iterations // 5)
    epochs = max(1, int(budget_s // (s_per_it * (iterations + val_cost * val_iterations))))
    return {"epochs": epochs, "iterations": iterations, "val_iterations": val_iterations}


def prepare_nnunet(ref: Path, tmp: Path, train: list[str], val: list[str]) -> dict[str, str]:
    """Scratch nnUNet_preprocessed/results folders: plans and data linked from `ref`, our split written."""
    src = ref / "preprocessed" / NNUNET_DATASET
    pre = tmp / "nnunet_preprocessed" / NNUNET_DATASET
    pre.mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json", "nnUNetPlans.json"):
        shutil.copy(src / name, pre / name)
    for name in ("nnUNetPlans_3d_fullres", "gt_segmentations"):  # read only (blosc2 data is never unpacked)
        os.symlink(src / name, pre / name)
    (pre / "splits_final.json").write_text(json.dumps([{"train": train, "val": val}], indent=1))
    (tmp / "nnunet_results").mkdir()
    return {"nnUNet_raw": str(ref / "raw"), "nnUNet_preprocessed": str(pre.parent),
            "nnUNet_results": str(tmp / "nnunet_results"), "nnUNet_def_n_proc": str(len(os.sched_getaffinity(0)))}


def run_nnunet(python: str, ref: Path, tmp: Path, train: list[str], val: list[str], budget_s: float,
               schedule: dict, timeout: float, tta: bool = True) -> dict:
    env = dict(os.environ, **prepare_nnunet(ref, tmp, train, val))  # nnU-Net's interpreter: no `pipeline` path
    if not tta:
        env[ENV_PREFIX + "NO_MIRRORING"] = "1"
    env.update({ENV_PREFIX + "EPOCHS": str(schedule["epochs"]), ENV_PREFIX + "ITERATIONS": str(schedule["iterations"]),
                ENV_PREFIX + "VAL_ITERATIONS": str(schedule["val_iterations"]), ENV_PREFIX + "BUDGET_S": str(budget_s)})
    cmd = [python, str(Path(__file__).resolve()), "--nnunet-train", "4", "3d_fullres", "0", "-tr", TRAINER,
           "-device", "cpu"]
    run = run_command(cmd, env=env, timeout=timeout)
    fold = Path(env["nnUNet_results"]) / NNUNET_DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    row = {"tool": "nnU-Net v2", "config": "3d_fullres", "recipe": f"nnU-Net trainer, {schedule['epochs']} epochs x "
           f"{schedule['iterations']} it planned", "command_wall_s": round(run.wall_s, 1), "command_cpu_s": round(run.cpu_s, 1),
           "peak_rss_tree_mib": round(run.peak_rss_tree_mib, 1), "processes": run.processes,
           "predictions": str(fold / "validation")}
    if not run.ok:
        row["error"] = run.error()
        row["stderr_tail"] = run.stderr_tail[-1500:]
        return row
    budget = fold / "segpipe_budget.json"
    if budget.is_file():
        info = json.loads(budget.read_text())
        row.update(epochs=info["epochs"], train_loop_s=info["train_loop_s"],
                   samples_seen=info["epochs"] * info["iterations_per_epoch"] * info["batch_size"])
    return row


def run_ours(workdir: Path, config: str, budget_min: float, val_dir: Path, out: Path, tta: bool, timeout: float,
             iterations: int | None = None) -> dict:
    env = python_env(RAY_USAGE_STATS_ENABLED="0")
    extra = ["--iterations-per-epoch", str(iterations)] if iterations else []
    train = run_command([sys.executable, "-m", "pipeline.cli", "train", "--workdir", str(workdir), "--config", config,
                         "--fold", "0", "--time-budget-min", str(budget_min), "--json", *extra], env=env, timeout=timeout)
    row = {"tool": "seg-pipeline", "config": config, "command_wall_s": round(train.wall_s, 1),
           "command_cpu_s": round(train.cpu_s, 1), "peak_rss_tree_mib": round(train.peak_rss_tree_mib, 1),
           "processes": train.processes, "predictions": str(out)}
    if not train.ok:
        row["error"] = train.error()
        row["stderr_tail"] = train.stderr_tail[-1500:]
        return row
    run_dir = workdir / "runs" / config / "fold_0"
    settings = json.loads((run_dir / "train_settings.json").read_text())
    import csv

    with (run_dir / "metrics.csv").open() as f:
        epochs = list(csv.DictReader(f))
    from pipeline.planning.plans import Plans

    batch = int(Plans.load(workdir / "plans.json").configuration(config).batch_size)
    row.update(recipe=settings.get("recipe"), epochs=len(epochs),
               train_loop_s=round(sum(float(e["seconds"]) for e in epochs), 1),
               samples_seen=len(epochs) * int(settings["iterations_per_epoch"]) * batch)
    predict = run_command([sys.executable, "-m", "pipeline.cli", "predict", "--workdir", str(workdir), str(val_dir),
                           str(out), "--config", config, "--fold", "0", "--json"] + ([] if tta else ["--no-tta"]),
                          env=env, timeout=timeout)
    row.update(predict_wall_s=round(predict.wall_s, 1), predict_cpu_s=round(predict.cpu_s, 1))
    if not predict.ok:
        row["error"] = f"predict: {predict.error()}"
    return row


def reuse_ours(workdir: Path, config: str, budget_min: float, val: list[str], tmp: Path) -> dict:
    """Our row from a finished fold-0 run (benchmarks/train_hippocampus.py), its validation predictions
    made by `segpipe evaluate-cv --folds 0`: one 30-minute training serves both benchmarks."""
    import csv

    from pipeline.planning.plans import Plans

    run_dir = workdir / "runs" / config / "fold_0"
    settings = json.loads((run_dir / "train_settings.json").read_text())
    if abs(float(settings.get("time_budget_min") or 0) - budget_min) > 1e-6:
        raise SystemExit(f"{run_dir} trained for {settings.get('time_budget_min')} min, not --budget-min {budget_min}")
    crossval = json.loads((workdir / "crossval" / config / "crossval.json").read_text())
    with (run_dir / "metrics.csv").open() as f:
        epochs = list(csv.DictReader(f))
    batch = int(Plans.load(workdir / "plans.json").configuration(config).batch_size)
    preds = tmp / "pred_ours"
    preds.mkdir()
    for case in val:  # exactly the cases nnU-Net is scored on
        os.symlink(run_dir / "validation" / f"{case}.nii.gz", preds / f"{case}.nii.gz")
    info = {}
    bench = RESULTS / "train_hippocampus.json"
    if bench.is_file():
        info = json.loads(bench.read_text())
    return {"tool": "seg-pipeline", "config": config, "recipe": settings.get("recipe"), "epochs": len(epochs),
            "train_loop_s": round(sum(float(e["seconds"]) for e in epochs), 1),
            "samples_seen": len(epochs) * int(settings["iterations_per_epoch"]) * batch,
            "command_wall_s": info.get("timings_s", {}).get("train_s"), "command_cpu_s": None,
            "peak_rss_tree_mib": None, "processes": None, "predictions": str(preds), "tta": crossval.get("tta"),
            "pseudo_foreground_dice": crossval["per_fold"][0]["pseudo_foreground_dice"],
            "reused_from": str(workdir)}


def score(row: dict, tmp: Path, labels: dict) -> None:
    from pipeline.evaluation.metrics import evaluate_folders

    pred = Path(row["predictions"])
    if "error" in row or not pred.is_dir():
        return
    summary = evaluate_folders(pred, SHARED / "Task04_Hippocampus", tmp / f"eval_{row['tool']}", progress=False)
    row["cases_scored"] = summary["n_cases"]
    row["dice_mean"] = summary["foreground_mean"]["dice"]
    row["hd95_mean"] = summary["foreground_mean"]["hd95"]
    row["dice_per_class"] = {labels.get(k, k): m["dice"] for k, m in summary["mean"].items()}


def prepare_workdir(args, tmp: Path) -> Path:
    """Our workdir: the 208 cases preprocessed (or --workdir's store, linked), runs written in tmp."""
    work = tmp / "work"
    if args.workdir is None:
        from loader import build_workdir

        work.mkdir()
        return build_workdir(work)
    work.mkdir()
    shutil.copy(args.workdir / "plans.json", work / "plans.json")
    os.symlink(args.workdir.resolve() / "store.zarr", work / "store.zarr")
    return work


def markdown(result: dict) -> str:
    reused = next((r["reused_from"] for r in result["rows"] if r.get("reused_from")), None)
    rows = []
    budget_s = result["budget_min"] * 60
    for r in result["rows"]:
        per = r.get("dice_per_class") or {}
        loop = r.get("train_loop_s")
        used = f"{loop} ({100 * loop / budget_s:.0f}%)" if loop is not None else None
        rows.append((r["tool"], r["config"], r.get("recipe"), r.get("epochs"), used, r.get("samples_seen"),
                     _f(r.get("dice_mean")), ", ".join(f"{k} {_f(v)}" for k, v in per.items()) or None,
                     _f(r.get("hd95_mean"), 2), r.get("cases_scored"), r["command_wall_s"], r["command_cpu_s"],
                     r["peak_rss_tree_mib"], r.get("error", "")))
    s = result["nnunet_schedule"]
    return "\n".join([
        f"# Quality at equal compute: {result['budget_min']} min of training each, hippocampus fold 0", "",
        f"Machine: {machine_line(result['machine'])}.", "",
        f"Both train on the {result['train_cases']} fold-0 training cases and are scored by "
        f"`pipeline.evaluation.metrics.evaluate_folders` on {result['val_cases']} validation case(s) "
        f"({'all of fold 0' if result['all_val_cases'] else 'the first of fold 0'}), predicted "
        f"{'with' if result.get('tta', True) else 'without'} mirroring TTA. "
        f"nnU-Net's schedule: {s['epochs']} epochs x {s['iterations']} iterations (+{s['val_iterations']} validation), "
        f"planned from {result['nnunet_s_per_it']:.1f} s/iteration ({result['nnunet_s_per_it_source']}), stopped at the budget.",
        "",
        md_table(["tool", "config", "recipe", "epochs", "train loop s (of budget)", "samples seen", "mean Dice", "Dice per class",
                  "mean HD95 mm", "cases", "train command wall s", "train command CPU s", "peak RSS tree MiB", "note"], rows),
        "", "Equal compute holds only as far as the train-loop seconds agree: both stop before an epoch that would "
        "end past the budget, so an epoch longer than the budget overshoots it (compare `samples seen`). "
        "Command wall/CPU/RSS: the whole training command (nnU-Net's includes its own validation predictions; "
        + ("ours is the run of benchmarks/train_hippocampus.py in " + str(reused) + ", predicted by "
           "`segpipe evaluate-cv --folds 0`)." if reused else "ours predicts in a separate `segpipe predict`)."),
    ]) + "\n"


def _f(x, digits: int = 4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def plot(result: dict, new_figure):
    rows = [r for r in result["rows"] if r.get("dice_per_class")]
    if not rows:
        return None
    fig, axes = new_figure(6.5, 3.6)
    ax = axes[0][0]
    classes = list(rows[0]["dice_per_class"])
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(classes) + 1)]
        vals = [r["dice_per_class"].get(c) or 0.0 for c in classes] + [r.get("dice_mean") or 0.0]
        bars = ax.bar(xs, vals, width, label=f"{r['tool']} ({r['config']})")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)  # a Dice of 0 is otherwise an invisible bar
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(classes) + 1)])
    ax.set_xticklabels(classes + ["mean"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(f"{result['budget_min']} min of training each", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--nnunet-train":
        nnunet_train_entry(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=30.0, help="training-loop minutes for each tool")
    parser.add_argument("--config", default="3d_lean", help="our configuration (3d_lean: CPU preset; 3d_fullres)")
    parser.add_argument("--nnunet-venv", type=Path, default=None, help="venv with nnunetv2 (default: ../nnunet_ref/venv)")
    parser.add_argument("--nnunet-ref", type=Path, default=NNUNET_REF, help="nnU-Net raw/ and preprocessed/ of Dataset004")
    parser.add_argument("--nnunet-s-per-it", type=float, default=None, help="nnU-Net s/iteration at batch 7 (plans its schedule)")
    parser.add_argument("--val-cases", type=int, default=None, help="score only the first N fold-0 validation cases")
    parser.add_argument("--our-iterations", type=int, default=None,
                        help="our iterations per epoch (default: the recipe's; fewer for budgets of a few minutes)")
    parser.add_argument("--workdir", type=Path, default=None, help="a workdir with plans.json and store.zarr (208 cases)")
    parser.add_argument("--ours-workdir", type=Path, default=None,
                        help="reuse the fold-0 run of benchmarks/train_hippocampus.py in this workdir (same budget)")
    parser.add_argument("--no-tta", action="store_true", help="both predict without mirroring (8x less CPU)")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    venv = args.nnunet_venv or NNUNET_REF / "venv"
    python = str(venv / "bin" / "python")
    if not args.skip_nnunet and not (Path(python).exists() and (args.nnunet_ref / "preprocessed" / NNUNET_DATASET).is_dir()):
        parser.error(f"nnU-Net needs {python} and {args.nnunet_ref}/preprocessed/{NNUNET_DATASET} (or pass --skip-nnunet)")

    from pipeline.data.dataset import load_dataset
    from pipeline.training.splits import load_or_create_splits
    from pipeline.workdir import Workdir

    machine = machine_info()
    budget_s = args.budget_min * 60
    timeout = budget_s * 3 + 1800  # start-up, validation and prediction on a loaded machine
    s_per_it, source = nnunet_seconds_per_iteration(args.nnunet_s_per_it)
    schedule = nnunet_schedule(budget_s, s_per_it)
    dataset = load_dataset(SHARED / "Task04_Hippocampus")
    labels = {str(k): v for k, v in dataset.labels.items()}
    with tempfile.TemporaryDirectory(prefix="segpipe-quality-") as tmp_name:
        tmp = Path(tmp_name)
        workdir = args.ours_workdir if args.ours_workdir is not None else prepare_workdir(args, tmp)
        split = load_or_create_splits(Workdir.at(workdir), [c.case_id for c in dataset.cases]).split(0)
        val = list(split.val[: args.val_cases] if args.val_cases else split.val)
        val_data = subset_dataset(dataset.root, val, tmp / "val_data")
        rows = []
        if args.ours_workdir is not None:
            rows.append(reuse_ours(args.ours_workdir, args.config, args.budget_min, val, tmp))
        elif not args.skip_ours:
            print(f"seg-pipeline: training {args.config} for {args.budget_min} min ...", flush=True)
            rows.append(run_ours(workdir, args.config, args.budget_min, val_data / "imagesTr", tmp / "pred_ours",
                                 not args.no_tta, timeout, args.our_iterations))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "stderr_tail"}), flush=True)
        if not args.skip_nnunet:
            print(f"nnU-Net: training for {args.budget_min} min ({schedule}) ...", flush=True)
            rows.append(run_nnunet(python, args.nnunet_ref, tmp, list(split.train), val, budget_s, schedule, timeout,
                                   tta=not args.no_tta))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "stderr_tail"}), flush=True)
        for row in rows:
            score(row, tmp, labels)
    result = {"budget_min": args.budget_min, "tta": not args.no_tta, "train_cases": len(split.train), "val_cases": len(val),
              "all_val_cases": len(val) == len(split.val), "val_case_ids": val, "nnunet_schedule": schedule,
              "nnunet_s_per_it": s_per_it, "nnunet_s_per_it_source": source, "rows": rows, "machine": machine}
    paths = write_results("quality_vs_nnunet", result, markdown(result), lambda nf: plot(result, nf), args.out)
    print(paths["md"].read_text())
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
