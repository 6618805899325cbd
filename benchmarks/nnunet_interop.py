"""nnU-Net v2 models in and out of seg-pipeline, against nnU-Net itself (issue 16).

In one run, on the same machine and cases:
1. nnU-Net trains a small real model: Task04_Hippocampus, the first `--train-cases` cases (sorted) in
   nnU-Net's raw layout, `nnUNetv2_plan_and_preprocess -c 3d_fullres`, then each of `--folds` with
   ../shared/tools/nnunet_train_cpu.py and nnU-Net's default `nnUNetTrainer`, shortened to one epoch of
   `--iterations` iterations and without its final validation pass (the same trainer class, so its results
   folder is what users have). Steps whose output exists in `--work` are reused (say so in the result).
2. `segpipe import-nnunet` converts that folder; `--cases` unseen cases (the next ones after the
   training cases) are predicted by `nnUNetv2_predict -f <folds>` (sequential: -npp 0 -nps 0) and by
   `segpipe predict` (default: every fold, as nnU-Net), in-process and over 2 Ray workers, all with
   mirroring TTA. Reported per case: voxel agreement of the label maps (target >= 0.999), Dice of each
   tool against the reference labels, seconds per case of the whole command. A diagnostic run of
   nnU-Net's own predictor with float32 instead of float16 accumulators tells whose numbers differ where.
3. `segpipe export-nnunet` writes the imported seg-pipeline run folders back as an nnU-Net results
   folder (another dataset id); `nnUNetv2_predict` runs it, agreement with step 2's nnU-Net output.
   Our own short `segpipe train` (fold 0, `--own-iterations`) of the same cases is exported and run by
   `nnUNetv2_predict` too, against `segpipe predict` of it.
4. `nnUNetv2_ensemble` on our `--save-probabilities` folders (two folds of the import, or with one fold the
   import and our own run): nnU-Net's tool reads our probability layout.
5. Optionally (on by default) the same checkpoint with background's output bias lowered until about half
   the test voxels are foreground (near-ties everywhere) is imported and predicted by both tools too.

    SEGPIPE_NNUNET_REF=/work/nnunet_ref .venv/bin/python benchmarks/nnunet_interop.py [--cases 10]
        [--train-cases 40] [--folds 0] [--iterations 250] [--own-iterations 60] [--work /tmp/segpipe_nnunet_interop]

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

DATASET_ID, EXPORT_ID, OWN_ID = 4, 904, 905
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
# the final validation pass predicts the fold's validation cases (minutes on a shared CPU); the checkpoint is what we compare
nnUNetTrainer.perform_actual_validation = lambda self, *args, **kwargs: None
sys.argv = [tool] + sys.argv[1:]
runpy.run_path(tool, run_name="__main__")
'''


# nnUNetv2_predict's sliding window with its accumulators (window logits x Gaussian, and the Gaussian sum) and its
# Gaussian in float32 instead of float16, everything else as nnU-Net runs it: the diagnostic for where the two
# tools' probabilities differ (argv: model folder, input folder, output folder, folds)
FLOAT32_PREDICT = '''
import os, sys, types
import torch
import nnunetv2.inference.predict_from_raw_data as nnunet_predict
model, source, target, folds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")


class Float32Torch(types.ModuleType):
    half = torch.float32  # the accumulators are allocated as torch.zeros(..., dtype=torch.half)

    def __getattr__(self, name):
        return getattr(torch, name)


nnunet_predict.torch = Float32Torch("torch")
gaussian = nnunet_predict.compute_gaussian
def compute_gaussian(*args, **kwargs):
    return gaussian(*args, **{**kwargs, "dtype": torch.float32})
compute_gaussian.cache_clear = gaussian.cache_clear
nnunet_predict.compute_gaussian = compute_gaussian
predictor = nnunet_predict.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
predictor.initialize_from_trained_model_folder(model, use_folds=tuple(int(f) for f in folds),
                                               checkpoint_name="checkpoint_final.pth")
os.makedirs(target, exist_ok=True)
predictor.predict_from_files_sequential(source, target, save_probabilities=True, overwrite=True)
'''


BORDER_NOTE = ("why labels or probabilities differ at all: nnU-Net 2.x accumulates the Gaussian-weighted window logits "
               "and the Gaussian sum in float16 (torch.half in predict_from_raw_data.py, its Gaussian made in float16 by "
               "compute_gaussian), seg-pipeline in float32. float16 keeps ~3 decimal digits, so a voxel whose two best "
               "classes are within ~1e-3 of each other may flip; where the Gaussian falls into float16's subnormal range "
               "(< 6e-5, towards a window's corners, i.e. the border of a one-window hippocampus image) the error grows, "
               "which is what a model with weak, uncertain border logits shows most (the earlier 30-iteration model: 0.064). "
               "The float32 diagnostic row tests it: nnU-Net's own predictor with float32 accumulators and nothing else "
               "changed. Not ours to fix: our float32 accumulation is the exact one")


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


def dice_scores(pred_dir: Path, case_ids: list[str], labels=(1, 2)) -> dict:
    """Mean foreground Dice (Anterior, Posterior) per case against the Decathlon's reference labels
    (a class absent from both counts 1)."""
    import nibabel as nib
    import numpy as np

    per_case = {}
    for case in case_ids:
        pred_path = pred_dir / f"{case}.nii.gz"
        if not pred_path.is_file():
            per_case[case] = None
            continue
        pred = np.asarray(nib.load(pred_path).dataobj)
        ref = np.asarray(nib.load(SHARED / "Task04_Hippocampus" / "labelsTr" / f"{case}.nii.gz").dataobj)
        scores = []
        for c in labels:
            p, r = pred == c, ref == c
            total = int(p.sum() + r.sum())
            scores.append(1.0 if total == 0 else 2.0 * float(np.logical_and(p, r).sum()) / total)
        per_case[case] = round(sum(scores) / len(scores), 4)
    values = [v for v in per_case.values() if v is not None]
    return {"per_case": per_case, "mean": round(sum(values) / len(values), 4) if values else None}


def disagreement(ours_dir: Path, nnunet_dir: Path, case_ids: list[str]) -> dict:
    """Where the two tools' labels differ, per case: how many voxels, how far from the image border (voxels),
    nnU-Net's own margin there (top-1 minus top-2 probability) and the probability difference there; and
    where the probabilities differ most. Both read from nnU-Net's layout ((classes, z, y, x), argmax = label)."""
    import numpy as np
    from scipy import ndimage

    per_case = {}
    for case in case_ids:
        a, b = ours_dir / f"{case}.npz", nnunet_dir / f"{case}.npz"
        if not (a.is_file() and b.is_file()):
            continue
        with np.load(a) as fa, np.load(b) as fb:
            x, y = fa["probabilities"].astype(np.float32), fb["probabilities"].astype(np.float32)
        if x.shape != y.shape:
            continue
        inside = np.zeros(x.shape[1:], bool)
        inside[tuple(slice(1, -1) for _ in x.shape[1:])] = True
        border = ndimage.distance_transform_cdt(inside, metric="chessboard")  # 0 on the outermost voxels
        diff = np.abs(x - y).max(0)
        top2 = np.sort(y, axis=0)[-2:]
        differ = x.argmax(0) != y.argmax(0)
        row = {"voxels": int(differ.sum()), "max_prob_diff_at_border_distance": int(border.flat[int(diff.argmax())]),
               "mean_prob_diff_border_0_2": round(float(diff[border <= 2].mean()), 6),
               "mean_prob_diff_inside": round(float(diff[border > 2].mean()), 6) if (border > 2).any() else None}
        if differ.any():
            row.update({"border_distance": sorted(int(d) for d in border[differ])[:20],
                        "nnunet_margin_max": round(float((top2[1] - top2[0])[differ].max()), 5),
                        "prob_diff_there_max": round(float(diff[differ].max()), 5)})
        per_case[case] = row
    return per_case


def mean_argmax(folders: list[Path], target: Path, case_ids: list[str]) -> None:
    """The label maps of the mean of nnU-Net-layout probabilities (what nnUNetv2_ensemble should write), as NIfTI
    on the input's grid ((classes, z, y, x) -> (x, y, z))."""
    import nibabel as nib
    import numpy as np

    target.mkdir(parents=True, exist_ok=True)
    for case in case_ids:
        files = [f / f"{case}.npz" for f in folders]
        if not all(f.is_file() for f in files):
            continue
        mean = sum(np.load(f)["probabilities"].astype(np.float32) for f in files) / len(files)
        image = nib.load(SHARED / "Task04_Hippocampus" / "imagesTr" / f"{case}.nii.gz")
        labels = np.ascontiguousarray(mean.argmax(0).T.astype(np.uint8))
        nib.save(nib.Nifti1Image(labels, image.affine), target / f"{case}.nii.gz")


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
             "Diagnostic: nnU-Net's own predictor run again with its sliding-window accumulators and Gaussian in float32 "
             "instead of float16 (`FLOAT32_PREDICT` in the benchmark; nothing else changed): largest probability difference "
             f"ours vs that **{result['probabilities_vs_nnunet_float32']['max_abs']}**; nnU-Net float16 vs nnU-Net float32 "
             f"{result['probabilities_nnunet_float16_vs_float32']['max_abs']}.", "",
             "## Per case: voxel agreement and foreground Dice against the reference labels", "",
             md_table(["case", *[f"agree: {k}" for k in a], *[f"Dice: {k}" for k in result["dice"]]],
                      [[case, *[v["per_case"].get(case) for v in a.values()],
                        *[v["per_case"].get(case) for v in result["dice"].values()]] for case in result["meta"]["case_ids"]]
                      + [["mean", *[v["mean"] for v in a.values()], *[v["mean"] for v in result["dice"].values()]]]), "",
             "Dice: mean of Anterior and Posterior per case (a class absent from both counts 1).", "",
             "## Where the imported model's labels differ from nnUNetv2_predict's", "",
             md_table(["case", "voxels differing", "their distance to the border (voxels)", "nnU-Net's margin there (max)",
                       "prob. difference there (max)", "largest prob. difference at border distance",
                       "mean prob. difference, border 0-2", "mean prob. difference, inside"],
                      [[case, d["voxels"], d.get("border_distance"), d.get("nnunet_margin_max"), d.get("prob_diff_there_max"),
                        d["max_prob_diff_at_border_distance"], d["mean_prob_diff_border_0_2"], d["mean_prob_diff_inside"]]
                       for case, d in result["disagreement"]["imported"].items()]), "",
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
    ap.add_argument("--cases", type=int, default=10, help="unseen cases predicted by both tools")
    ap.add_argument("--train-cases", type=int, default=40)
    ap.add_argument("--folds", default="0")
    ap.add_argument("--iterations", type=int, default=250, help="training iterations per fold (one epoch)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/segpipe_nnunet_interop"),
                    help="nnU-Net's raw/preprocessed/results and the outputs; existing training is reused")
    ap.add_argument("--nnunet-ref", type=Path, default=NNUNET_REF)
    ap.add_argument("--no-balanced", dest="balanced", action="store_false",
                    help="skip the balanced-classes variant of nnU-Net's model (see the notes in the results)")
    ap.add_argument("--own-iterations", type=int, default=60,
                    help="iterations of our own `segpipe train` (fold 0, one epoch) whose export nnUNetv2_predict runs")
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
    (work / "float32_predict.py").write_text(FLOAT32_PREDICT)
    step(steps, "nnU-Net's predictor, float32 accumulation (diagnostic)", [nn_bin / "python", work / "float32_predict.py",
         model, inputs, out / "nnunet_float32", ",".join(folds)], env, args.timeout, n)
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

    # our own training (the same cases, our planner and trainer) exported and run by nnUNetv2_predict
    own_raw, own_wd = work / "own_raw" / DATASET, work / "own_workdir"
    if not (own_raw / "dataset.json").is_file():  # real files: a dataset's links may not point outside it
        shutil.copytree(work / "raw" / DATASET, own_raw, symlinks=False)
    if not (own_wd / "runs" / CONFIG / "fold_0" / "model_final.pt").is_file():
        step(steps, "segpipe plan + preprocess (own run)", ["bash", "-c", f"{sys.executable} -m pipeline.cli plan {own_raw} "
             f"--workdir {own_wd} && {sys.executable} -m pipeline.cli preprocess {own_raw} --workdir {own_wd} --config "
             f"{CONFIG} --workers 1"], ours_env, args.timeout)
        step(steps, f"segpipe train fold 0 ({args.own_iterations} iterations)", [*segpipe, "train", "--workdir", own_wd,
             "--config", CONFIG, "--fold", "0", "--epochs", "1", "--iterations-per-epoch", args.own_iterations,
             "--val-iterations", "1", "--num-workers", "1", "--cpu"], ours_env, args.timeout)
    own_exported = work / "exported_own"
    shutil.rmtree(own_exported, ignore_errors=True)
    step(steps, "segpipe export-nnunet (own run)", [*segpipe, "export-nnunet", "--workdir", own_wd, "--config", CONFIG,
                                                    own_exported, "--dataset-id", OWN_ID], ours_env, args.timeout)
    step(steps, "segpipe predict (own run) --save-probabilities", [*segpipe, "predict", "--workdir", own_wd, "--config",
         CONFIG, "--fold", "0", inputs, out / "own", "--save-probabilities"], ours_env, args.timeout, n)
    step(steps, "nnUNetv2_predict on our own exported run", [nn_bin / "nnUNetv2_predict", "-i", inputs, "-o",
         out / "nnunet_own", "-d", OWN_ID, "-c", CONFIG, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"],
         nnunet_env(work, own_exported), args.timeout, n)

    # nnUNetv2_ensemble reads our probability layout: two folds of the imported model, or (one fold) the
    # imported model and our own run
    ensemble_inputs = ([out / f"ours_fold{f}" / "nnunet" for f in folds] if len(folds) > 1
                       else [out / "ours" / "nnunet", out / "own" / "nnunet"])
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
        "nnUNetv2_predict on our own exported run vs segpipe predict of it": agreement(out / "nnunet_own", out / "own",
                                                                                       test_ids),
    }
    if len(folds) > 1:
        result_agreement["nnUNetv2_ensemble of our per-fold probabilities vs our fold ensemble"] = agreement(
            out / "ensemble", out / "ours", test_ids)
    else:
        mean_argmax(ensemble_inputs, out / "ensemble_numpy", test_ids)
        result_agreement["nnUNetv2_ensemble of our probabilities (imported + own run) vs their mean's argmax"] = \
            agreement(out / "ensemble", out / "ensemble_numpy", test_ids)
    result_agreement["ours (in-process) vs nnU-Net's predictor with float32 accumulation"] = agreement(
        out / "ours", out / "nnunet_float32", test_ids)
    dice = {name: dice_scores(out / folder, test_ids) for name, folder in (
        ("nnUNetv2_predict (nnU-Net's model)", "nnunet"), ("segpipe predict, imported (in-process)", "ours"),
        ("segpipe predict, imported (Ray)", "ours_ray"), ("nnUNetv2_predict on the export of the import", "nnunet_exported"),
        ("segpipe predict, own run", "own"), ("nnUNetv2_predict on the export of our own run", "nnunet_own"))}
    detail = {"imported": disagreement(out / "ours" / "nnunet", out / "nnunet", test_ids)}
    probabilities = probability_difference(out / "ours" / "nnunet", out / "nnunet", test_ids)
    probabilities_float32 = probability_difference(out / "ours" / "nnunet", out / "nnunet_float32", test_ids)
    probabilities_nnunet_self = probability_difference(out / "nnunet_float32", out / "nnunet", test_ids)
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
              "agreement": result_agreement, "dice": dice, "disagreement": detail, "probabilities": probabilities,
              "probabilities_vs_nnunet_float32": probabilities_float32,
              "probabilities_nnunet_float16_vs_float32": probabilities_nnunet_self, "foreground_voxels_nnunet": foreground,
              "steps": steps, "notes": notes}
    paths = write_results(args.name, result, markdown(result), None, args.out)
    print(paths["md"].read_text())
    return 0 if all(r["ok"] for r in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
