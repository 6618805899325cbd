"""nnU-Net v2 models in and out of seg-pipeline, against nnU-Net itself (issue 16).

In one run, on the same machine and cases:
1. nnU-Net trains a small real model: Task04_Hippocampus, the first `--train-cases` cases (sorted) in
   nnU-Net's raw layout, `nnUNetv2_plan_and_preprocess -c 3d_fullres`, then each of `--folds` with
   ../shared/tools/nnunet_train_cpu.py and nnU-Net's default `nnUNetTrainer`, shortened to one epoch of
   `--iterations` iterations (the same trainer class, so its results folder is what users have; a
   few minutes on a CPU). Steps whose output exists in `--work` are reused (say so in the result).
2. `segpipe import-nnunet` converts that folder; `--cases` unseen cases (the next ones after the
   training cases) are predicted by `nnUNetv2_predict -f <folds>` (sequential: -npp 0 -nps 0) and by
   `segpipe predict` (default: every fold, as nnU-Net), in-process and over 2 Ray workers, both
   with mirroring TTA. Reported: voxel agreement of the label maps per case (target >= 0.999) and
   seconds per case of the whole command.
3. `segpipe export-nnunet` writes the imported seg-pipeline run folders back as an nnU-Net results
   folder (another dataset id); `nnUNetv2_predict` runs it, agreement with step 2's nnU-Net output.
4. `segpipe predict --save-probabilities` per fold, then `nnUNetv2_ensemble` on their `nnunet/`
   folders: nnU-Net's tool reads our probability layout; agreement with our two-fold ensemble.
5. A few training iterations leave a model that predicts background everywhere, which makes label
   agreement easy; so the same checkpoint with background's output bias lowered until about half
   the test voxels are foreground (near-ties everywhere) is imported and predicted by both tools too.

    SEGPIPE_NNUNET_REF=/work/nnunet_ref .venv/bin/python benchmarks/nnunet_interop.py [--cases 4]
        [--train-cases 40] [--folds 0,1] [--iterations 30] [--work /tmp/segpipe_nnunet_interop]

Writes benchmarks/results/nnunet_interop.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import (  # noqa: E402
    NNUNET_REF,
    RESULTS,
    SHARED,
    finish_machine,
    machine_info,
    machine_line,
    md_table,
    python_env,
    run_command,
    write_results,
)

DATASET_ID, EXPORT_ID = 4, 904
DATASET = "Dataset004_Hippocampus"
CONFIG = "3d_fullres"
# nnunet_train_cpu.py with nnUNetTrainer shortened: nnU-Net records the init arguments by introspecting
# __init__'s signature, so the replacement keeps it
TRAIN_WRAPPER = '''
import runpy, sys
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
iterations, tool = int(sys.argv.pop(1)), sys.argv.pop(1)
original = nnUNetTrainer.__init__
def init(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
    original(self, plans, configuration, fold, dataset_json, device)
    self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, iterations, 1
nnUNetTrainer.__init__ = init
sys.argv = [tool] + sys.argv[1:]
runpy.run_path(tool, run_name="__main__")
'''


BORDER_NOTE = ("where the probabilities differ most is within a few voxels of the image border. Likely cause (not proven): nnU-Net 2.8 accumulates "
               "the Gaussian-weighted window logits and the weights in float16 (torch.half, predict_from_raw_data.py), "
               "and the Gaussian is smallest there, so its own values lose precision; seg-pipeline accumulates in "
               "float32. The preprocessed input is identical (checked by hand on hippocampus_056: largest difference 0.0), "
               "and without TTA the border differences remain (0.117 at most on hippocampus_088, mean 1.4e-4).")


def nnunet_env(work: Path, results: Path | None = None) -> dict:
    return dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                nnUNet_results=str(results or work / "results"), nnUNet_compile="false", PYTHONUNBUFFERED="1")


def link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)


def raw_dataset(work: Path, case_ids: list[str]) -> None:
    """nnU-Net's raw layout of the training cases (links), with its dataset.json."""
    src = SHARED / "Task04_Hippocampus"
    dst = work / "raw" / DATASET
    for case in case_ids:
        link(src / "imagesTr" / f"{case}.nii.gz", dst / "imagesTr" / f"{case}_0000.nii.gz")
        link(src / "labelsTr" / f"{case}.nii.gz", dst / "labelsTr" / f"{case}.nii.gz")
    (dst / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(case_ids), "file_ending": ".nii.gz", "name": "Hippocampus"}, indent=1))


def step(log: list, name: str, cmd: list, env: dict, timeout: float, cases: int | None = None) -> dict:
    print(f"-> {name}", flush=True)
    run = run_command(cmd, env=env, cwd=REPO, timeout=timeout)
    row = {"step": name, "ok": run.ok, "wall_s": round(run.wall_s, 2), "cpu_s": round(run.cpu_s, 2),
           "peak_rss_tree_mib": round(run.peak_rss_tree_mib, 1), "command": " ".join(map(str, cmd))}
    if cases:
        row["s_per_case"] = round(run.wall_s / cases, 2)
    if not run.ok:
        row["error"] = run.error()
        print(f"   FAILED {row['error']}", flush=True)
    else:
        print(f"   {run.wall_s:.1f} s", flush=True)
    log.append(row)
    return row


def agreement(a_dir: Path, b_dir: Path, case_ids: list[str]) -> dict:
    """Voxel agreement of two folders of label maps, per case (arrays as stored: both keep the input's grid)."""
    import nibabel as nib
    import numpy as np

    per_case = {}
    for case in case_ids:
        a, b = a_dir / f"{case}.nii.gz", b_dir / f"{case}.nii.gz"
        if not (a.is_file() and b.is_file()):
            per_case[case] = None
            continue
        x, y = np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)
        per_case[case] = round(float((x == y).mean()), 6) if x.shape == y.shape else 0.0
    values = [v for v in per_case.values() if v is not None]
    return {"per_case": per_case, "min": min(values) if values else None,
            "mean": round(sum(values) / len(values), 6) if values else None, "cases": len(values)}


def probability_difference(ours_dir: Path, nnunet_dir: Path, case_ids: list[str]) -> dict:
    """Largest and mean absolute difference of the softmax probabilities both tools wrote in nnU-Net's layout
    (CASE.npz `probabilities`, (classes, z, y, x)); ours are stored as float16 (resolution ~5e-4 near 1)."""
    import numpy as np

    per_case = {}
    for case in case_ids:
        a, b = ours_dir / f"{case}.npz", nnunet_dir / f"{case}.npz"
        if not (a.is_file() and b.is_file()):
            per_case[case] = None
            continue
        with np.load(a) as fa, np.load(b) as fb:
            x, y = fa["probabilities"].astype(np.float32), fb["probabilities"].astype(np.float32)
        per_case[case] = ({"max_abs": round(float(np.abs(x - y).max()), 6), "mean_abs": round(float(np.abs(x - y).mean()), 7)}
                          if x.shape == y.shape else {"shape_ours": list(x.shape), "shape_nnunet": list(y.shape)})
    values = [v["max_abs"] for v in per_case.values() if v and "max_abs" in v]
    return {"per_case": per_case, "max_abs": max(values) if values else None}


def balanced_shift(nnunet_dir: Path, case_ids: list[str]) -> float:
    """Median over the test voxels of log p(background) - log p(best foreground class), from nnU-Net's probabilities."""
    import numpy as np

    margins = []
    for case in case_ids:
        with np.load(nnunet_dir / f"{case}.npz") as f:
            p = np.clip(f["probabilities"].astype(np.float64), 1e-12, 1)
        margins.append((np.log(p[0]) - np.log(p[1:].max(0))).ravel())
    return float(np.median(np.concatenate(margins)))


def make_balanced_model(source: Path, target: Path, folds: list[str], shift: float) -> None:
    """A copy of nnU-Net's model folder whose checkpoints' full-resolution head has background's bias lowered by
    `shift` (loaded with seg-pipeline's safe loader, saved with torch.save as nnU-Net reads it)."""
    import torch

    from pipeline.interop.nnunet_files import load_checkpoint

    target.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(source / name, target / name)
    for fold in folds:
        ckpt = load_checkpoint(source / f"fold_{fold}" / "checkpoint_final.pth")
        heads = sorted({int(k.split(".")[2]) for k in ckpt["network_weights"] if k.startswith("decoder.seg_layers.")})
        bias = ckpt["network_weights"][f"decoder.seg_layers.{heads[-1]}.bias"]
        bias[0] -= shift
        (target / f"fold_{fold}").mkdir()
        torch.save(ckpt, target / f"fold_{fold}" / "checkpoint_final.pth")


def foreground_voxels(folder: Path, case_ids: list[str]) -> int:
    import nibabel as nib
    import numpy as np

    return int(sum(np.count_nonzero(np.asarray(nib.load(folder / f"{c}.nii.gz").dataobj))
                   for c in case_ids if (folder / f"{c}.nii.gz").is_file()))


def markdown(result: dict) -> str:
    a = result["agreement"]
    lines = [f"# nnU-Net v2 models in and out ({result['meta']['cases']} unseen Task04 cases, folds "
             f"{','.join(result['meta']['folds'])})", "", machine_line(result["machine"]), "",
             f"nnU-Net's model: `nnUNetTrainer` {CONFIG}, {result['meta']['train_cases']} training cases, one epoch of "
             f"{result['meta']['iterations']} iterations per fold (trained with ../shared/tools/nnunet_train_cpu.py; "
             f"{'reused from an earlier run in --work' if result['meta']['reused_training'] else 'trained in this run'}).",
             "", "## Agreement of the label maps (fraction of voxels equal; target >= 0.999)", "",
             md_table(["comparison", "min over cases", "mean"],
                      [[k, v["min"], v["mean"]] for k, v in a.items()]), "",
             f"Softmax probabilities in nnU-Net's layout (ours from `--save-probabilities`, `OUTPUT/nnunet/`), largest "
             f"absolute difference over every class and voxel: **{result['probabilities']['max_abs']}** (ours are "
             f"stored as float16). Foreground voxels in nnU-Net's labels: {result['foreground_voxels_nnunet']}.", "",
             "## Steps (whole commands; s/case = wall / cases)", "",
             md_table(["step", "ok", "wall s", "s/case", "CPU s", "peak RSS tree MiB"],
                      [[r["step"], "yes" if r["ok"] else f"NO: {r.get('error', '')}", r["wall_s"], r.get("s_per_case", "–"),
                        r["cpu_s"], r["peak_rss_tree_mib"]] for r in result["steps"]]), "",
             "How to read it: every row is one command run once, side by side on the same (shared) machine; "
             f"load average {result['machine'].get('load_before')} -> {result['machine'].get('load_after')}. "
             "s/case includes interpreter start, imports and model loading, so it weighs startup more the fewer the "
             "cases. The exported folder is the imported seg-pipeline run written back (`segpipe export-nnunet`), "
             "predicted by nnUNetv2_predict itself.", ""]
    lines += [f"* {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=4, help="unseen cases predicted by both tools")
    ap.add_argument("--train-cases", type=int, default=40)
    ap.add_argument("--folds", default="0,1")
    ap.add_argument("--iterations", type=int, default=30, help="training iterations per fold (one epoch)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/segpipe_nnunet_interop"),
                    help="nnU-Net's raw/preprocessed/results and the outputs; existing training is reused")
    ap.add_argument("--nnunet-ref", type=Path, default=NNUNET_REF)
    ap.add_argument("--no-balanced", dest="balanced", action="store_false",
                    help="skip the balanced-classes variant of nnU-Net's model (see the notes in the results)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--name", default="nnunet_interop")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    task = SHARED / "Task04_Hippocampus"
    nn_bin = args.nnunet_ref / "bin"
    tool = SHARED.parent / "tools" / "nnunet_train_cpu.py"
    missing = [str(p) for p in (task / "dataset.json", nn_bin / "nnUNetv2_predict", tool) if not p.exists()]
    if missing:
        print(f"skipping: {', '.join(missing)} not found (needs ../shared/data, ../shared/tools and the nnU-Net "
              "environment at SEGPIPE_NNUNET_REF)")
        return 0
    machine = machine_info()
    folds = [f.strip() for f in args.folds.split(",") if f.strip()]
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (task / "imagesTr").glob("*.nii.gz"))
    train_ids, test_ids = ids[:args.train_cases], ids[args.train_cases:args.train_cases + args.cases]
    env, ours_env = nnunet_env(work), python_env()
    steps: list[dict] = []
    notes: list[str] = []
    start = time.perf_counter()

    raw_dataset(work, train_ids)
    if not (work / "preprocessed" / DATASET / "nnUNetPlans.json").is_file():
        step(steps, "nnUNetv2_plan_and_preprocess", [nn_bin / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID,
                                                      "-c", CONFIG, "-np", "2"], env, args.timeout)
    model = work / "results" / DATASET / f"nnUNetTrainer__nnUNetPlans__{CONFIG}"
    (work / "train_short.py").write_text(TRAIN_WRAPPER)
    reused = True
    for fold in folds:
        if not (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            reused = False
            step(steps, f"nnU-Net training fold {fold}", [nn_bin / "python", work / "train_short.py", args.iterations,
                                                          tool, DATASET_ID, CONFIG, fold, "-device", "cpu"], env, args.timeout)
    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    for case in test_ids:
        link(task / "imagesTr" / f"{case}.nii.gz", inputs / f"{case}_0000.nii.gz")
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    wd = work / "segpipe_workdir"
    shutil.rmtree(wd, ignore_errors=True)
    segpipe = [sys.executable, "-m", "pipeline.cli"]
    n = len(test_ids)

    step(steps, "segpipe import-nnunet", [*segpipe, "import-nnunet", model, "--workdir", wd], ours_env, args.timeout)
    step(steps, f"nnUNetv2_predict -f {' '.join(folds)} --save_probabilities", [nn_bin / "nnUNetv2_predict", "-i", inputs,
         "-o", out / "nnunet", "-d", DATASET_ID, "-c", CONFIG, "-f", *folds, "-device", "cpu", "-npp", "0", "-nps", "0",
         "--save_probabilities"], env, args.timeout, n)
    step(steps, "segpipe predict --save-probabilities (in-process)", [*segpipe, "predict", "--workdir", wd, inputs,
         out / "ours", "--save-probabilities"], ours_env, args.timeout, n)
    step(steps, "segpipe predict --num-workers 2 (Ray)", [*segpipe, "predict", "--workdir", wd, inputs, out / "ours_ray",
                                                          "--num-workers", "2"], ours_env, args.timeout, n)
    exported = work / "exported_results"
    shutil.rmtree(exported, ignore_errors=True)
    step(steps, "segpipe export-nnunet", [*segpipe, "export-nnunet", "--workdir", wd, exported, "--dataset-id",
                                          EXPORT_ID], ours_env, args.timeout)
    step(steps, "nnUNetv2_predict on the exported folder", [nn_bin / "nnUNetv2_predict", "-i", inputs, "-o",
         out / "nnunet_exported", "-d", EXPORT_ID, "-c", CONFIG, "-f", *folds, "-device", "cpu", "-npp", "0", "-nps", "0"],
         nnunet_env(work, exported), args.timeout, n)
    if len(folds) > 1:
        for fold in folds:
            step(steps, f"segpipe predict --fold {fold} --save-probabilities", [*segpipe, "predict", "--workdir", wd,
                 inputs, out / f"ours_fold{fold}", "--fold", fold, "--save-probabilities"], ours_env, args.timeout, n)
    ensemble_inputs = [out / f"ours_fold{f}" / "nnunet" for f in folds] if len(folds) > 1 else [out / "ours" / "nnunet"]
    step(steps, "nnUNetv2_ensemble on our probabilities", [nn_bin / "nnUNetv2_ensemble", "-i", *ensemble_inputs,
         "-o", out / "ensemble", "-np", "1"], env, args.timeout)

    balanced = work / "results_balanced" / DATASET / model.name
    if args.balanced:  # the same network, background's output bias lowered so that about half the voxels are foreground
        shutil.rmtree(balanced.parents[1], ignore_errors=True)
        shift = balanced_shift(out / "nnunet", test_ids)
        make_balanced_model(model, balanced, folds, shift)
        notes.append(f"balanced model: nnU-Net's checkpoint with the background logit's bias of the full-resolution head "
                     f"lowered by {shift:.3f} (the median margin of background over the best foreground class on the "
                     "test cases), so that about half the voxels are foreground: near-ties everywhere, a harsh test of "
                     "label agreement")
        step(steps, "segpipe import-nnunet (balanced)", [*segpipe, "import-nnunet", balanced, "--workdir",
                                                         work / "segpipe_balanced"], ours_env, args.timeout)
        step(steps, "nnUNetv2_predict_from_modelfolder (balanced)", [nn_bin / "nnUNetv2_predict_from_modelfolder", "-i",
             inputs, "-o", out / "nnunet_balanced", "-m", balanced, "-f", *folds, "-device", "cpu", "-npp", "1", "-nps",
             "1"], env, args.timeout, n)  # this entry point wants at least one process each
        step(steps, "segpipe predict (balanced)", [*segpipe, "predict", "--workdir", work / "segpipe_balanced", inputs,
                                                   out / "ours_balanced"], ours_env, args.timeout, n)
    result_agreement = {
        "ours (in-process) vs nnUNetv2_predict": agreement(out / "ours", out / "nnunet", test_ids),
        "ours (Ray, 2 workers) vs nnUNetv2_predict": agreement(out / "ours_ray", out / "nnunet", test_ids),
        "nnUNetv2_predict on our export vs on nnU-Net's own folder": agreement(out / "nnunet_exported", out / "nnunet", test_ids),
        "nnUNetv2_ensemble of our per-fold probabilities vs our fold ensemble": agreement(out / "ensemble", out / "ours", test_ids),
    }
    probabilities = probability_difference(out / "ours" / "nnunet", out / "nnunet", test_ids)
    foreground = foreground_voxels(out / "nnunet", test_ids)
    if foreground == 0:
        notes.append("nnU-Net's model predicts background everywhere on these cases (a few training iterations), so "
                     "the label agreement is weak evidence; the probability difference compares every class's softmax")
    if args.balanced:
        result_agreement["balanced model: ours vs nnUNetv2_predict"] = agreement(out / "ours_balanced",
                                                                                  out / "nnunet_balanced", test_ids)
        if result_agreement["balanced model: ours vs nnUNetv2_predict"]["cases"]:
            notes.append(f"balanced model: {foreground_voxels(out / 'nnunet_balanced', test_ids)} foreground voxels "
                         "in nnU-Net's labels")
    notes.append(BORDER_NOTE)
    notes.append("our fold ensemble averages logits (as nnUNetv2_predict), nnUNetv2_ensemble averages the per-fold "
                 "probabilities (stored as float16 by segpipe): near-ties may differ")
    result = {"benchmark": args.name, "device": "cpu", "machine": finish_machine(machine),
              "meta": {"cases": n, "case_ids": test_ids, "train_cases": len(train_ids), "folds": folds,
                       "iterations": args.iterations, "reused_training": reused, "work": str(work),
                       "total_s": round(time.perf_counter() - start, 1)},
              "agreement": result_agreement, "probabilities": probabilities, "foreground_voxels_nnunet": foreground,
              "steps": steps, "notes": notes}
    paths = write_results(args.name, result, markdown(result), None, args.out)
    print(paths["md"].read_text())
    return 0 if all(r["ok"] for r in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
