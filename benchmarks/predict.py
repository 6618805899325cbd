"""Seconds per case and peak memory of `predict_folder`, beside `nnUNetv2_predict` on the same cases and model.

What is measured, in one run so the load on the (shared) machine is the same for every row:

1. Task04_Hippocampus (../shared/data): `--cases` real images, predicted by
   * seg-pipeline `predict_folder` in-process (`--workers 1`, what `segpipe predict` does by
     default), with one Ray worker (`ray1`: Ray started as `predict_folder` starts it, one actor)
     and with N Ray workers (`2`: the cases spread over two actors, one torch thread each);
   * `nnUNetv2_predict -d Dataset004_Hippocampus -c 3d_fullres -f 0 -device cpu` with
     `-npp P -nps P` for each `--nnunet-procs` P (0: nnU-Net's sequential mode, one process; 2:
     two preprocessing and two export processes beside the predicting one);
   each with mirroring TTA off and on (`--tta`, nnU-Net's `--disable_tta`).
2. A `--size`^3 volume (default 256) at 1 mm, tiled from a hippocampus image, predicted by the
   same model in-process: the same patch (40x56x40) fits, so this is the sliding-window machinery
   at scale (~1300 windows at 256^3), accumulators and export included. On a CPU each window costs
   about a second of forward pass, so its TTA (`--size-tta`) and nnU-Net's run on it
   (`--size-nnunet`) are opt-in.
3. The TotalSegmentator CT case (`--ct-cases`, default 1; 122x101x30 at 3 mm, int16 HU, 41
   non-contiguous label values 0..117 + background) with the 3d_fullres model of *its own* plan
   (nnU-Net: patch 32x112x128 at 3 mm, 5 stages, 42 outputs), by both tools in-process / with each
   `--nnunet-procs`, TTA off and on (`--ct-tta`). nnU-Net needs consecutive labels, so its raw dataset
   (`Dataset901_TotalSegCT` in `--nnunet-ref`, made once with `nnUNetv2_plan_and_preprocess` and
   reused) holds the class indices 0..41 of the sorted values: our LabelMap's store indices, so
   output channel i is the same class for both; nnU-Net's outputs are mapped back to values
   (`values[index]`) before the agreement is counted.

The model: nnU-Net's own trainer class builds the 3d_fullres network of nnU-Net's plan (hippocampus; CT)
(`nnUNetTrainer(...).initialize()`, the mirroring axes set as training sets them, `save_checkpoint`: the file nnU-Net's training writes, with
freshly initialised weights, since timing does not depend on them) in a temporary nnUNet_results
folder, inside nnU-Net's interpreter. Our model is our planner's 3d_fullres plan for Task04 (all
cases; the CT dataset), checked field by field against nnU-Net's nnUNetPlans.json (where it differs,
nnU-Net's architecture numbers and spacing replace ours and the JSON says so), carrying *the same weights*
(nnU-Net's state dict renamed to our module names, loaded strictly): both tools run the same
network on the same windows, and the label agreement of their outputs is reported as a check.
Without nnU-Net (`--nnunet-python` not given) our model gets seeded random weights instead.

Every row is one child process under `harness.run_command` (so each memory peak is its own): wall
and CPU seconds, and the peak memory of the whole process tree (our worker, Ray's GCS, raylet,
agents and actors; nnU-Net's main process and its pools) as proportional set size (PSS, every
0.5 s; `PssSampler` says why) beside the harness's summed RSS (every 20 ms). Threads: each tool
gets all cores: nnU-Net's entry point sets torch to `multiprocessing.cpu_count()` threads on CPU;
ours in-process uses `--threads` (default: the CPUs this process may use); Ray actors get
cores // workers each (`predict_ray`).

    .venv/bin/python benchmarks/predict.py [--cases 4] [--workers 1,ray1,2] [--tta off,on]
        [--nnunet-python ../nnunet_ref/venv/bin/python] [--nnunet-procs 0,2] [--size 256]
        [--ray-tta off] [--size-tta off] [--size-nnunet] [--ct-cases 1] [--ct-tta off,on] [--repeats 1]

Writes benchmarks/results/predict.{json,md,png} (`--out`, `--name`), sets hippocampus, lean, large, ct.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import (  # noqa: E402
    MIB,
    NNUNET_REF,
    RESULTS,
    SHARED,
    bar_panel,
    machine_info,
    machine_line,
    md_table,
    process_tree,
    python_env,
    run_command,
    write_results,
)

NNUNET_DATASET = "Dataset004_Hippocampus"
CT_DATASET_ID, CT_DATASET = "901", "Dataset901_TotalSegCT"  # made by this benchmark in --nnunet-ref (raw/ + preprocessed/)
CONFIG = "3d_fullres"
OURS, NNUNET = "seg-pipeline", "nnU-Net v2"

# Run in nnU-Net's interpreter: its trainer builds the network of its plan and writes the checkpoint
# exactly as training does (plus the plans.json / dataset.json that training copies beside the
# folds); the state dict is also saved as plain tensors for our side to load with weights_only=True.
NNUNET_MODEL_SCRIPT = """
import json, sys, torch
import nnunetv2.run.run_training as run_training
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
# as /work/shared/tools/nnunet_train_cpu.py: skip the lookup that imports every trainer (and torchvision)
run_training.recursive_find_trainer_class_by_name = lambda name, *a, **k: nnUNetTrainer
dataset, configuration, weights_out, trained = sys.argv[1:5]
torch.manual_seed(0)
trainer = run_training.get_trainer_from_args(dataset, configuration, 0, device=torch.device("cpu"))
trainer.initialize()
if trained:  # a trained checkpoint of the same plan: its weights, strictly (nnU-Net's checkpoints hold numpy objects)
    trainer.network.load_state_dict(torch.load(trained, map_location="cpu", weights_only=False)["network_weights"])
trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the mirroring axes TTA uses, as training does
save_json(trainer.plans_manager.plans, join(trainer.output_folder_base, "plans.json"), sort_keys=False)
save_json(trainer.dataset_json, join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
trainer.save_checkpoint(join(trainer.output_folder, "checkpoint_final.pth"))
net = getattr(trainer.network, "_orig_mod", trainer.network)
torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, weights_out)
print(json.dumps({"model_folder": trainer.output_folder_base, "trainer": type(trainer).__name__,
                  "parameters": sum(p.numel() for p in net.parameters())}))
"""


# ---------------------------------------------------------------- the worker (our side, one child process)


def worker(variant: str, workdir: str, input_dir: str, output_dir: str, tta: bool, threads: int,
           config: str = CONFIG, device: str = "cpu", precision: str = "auto") -> dict:
    """`predict_folder` as a user calls it; prints what it reports (per-case seconds) as one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from pipeline.inference.predict import predict_folder

    workers = int(variant.removeprefix("ray").removeprefix("lean") or 1)
    start = time.perf_counter()
    if variant == "ray1":  # one actor: start Ray the way predict_folder would, then let it join that Ray
        from pipeline.parallel import ray_session

        with ray_session(None, num_cpus=threads):
            report = predict_folder(workdir, input_dir, output_dir, config=config, fold="0", tta=tta,
                                    num_workers=1, progress=False, device=device, precision=precision)
    else:
        report = predict_folder(workdir, input_dir, output_dir, config=config, fold="0", tta=tta,
                                num_workers=workers, progress=False, device=device, precision=precision)
    seconds = time.perf_counter() - start
    per_case = list(report.seconds_per_case.values())
    return {"variant": variant, "tta": tta, "workers": report.workers, "cases": len(report.predicted),
            "predict_folder_s": round(seconds, 3), "case_s_mean": round(statistics.fmean(per_case), 3) if per_case else None,
            "case_s": per_case, "driver_torch_threads": torch.get_num_threads(),
            "stage_seconds": getattr(report, "stage_seconds", None), "precision": report.precision,
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}


# ---------------------------------------------------------------- setup


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(Path(src).resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def hippocampus_inputs(dataset, cases: int, dest: Path) -> list[str]:
    """The first `cases` training images as CASE_0000.nii.gz: the naming both tools read."""
    ids = []
    for case in dataset.cases[:cases]:
        link_or_copy(case.images[0], dest / f"{case.case_id}_0000.nii.gz")
        ids.append(case.case_id)
    return ids


def hippocampus_model_and_inputs(dataset, cases: int, dest: Path):
    """(workdir, case ids): a seeded untrained 3d_fullres model of our plan for `dataset` (equal to
    nnU-Net's; time does not depend on the weights) in DEST/work, and its first `cases` images in DEST/in."""
    from inference import make_model  # benchmarks/inference.py: plans + a seeded untrained model file

    wd, _ = make_model(dest / "work", dataset, ["3d_fullres"])
    return wd, hippocampus_inputs(dataset, cases, dest / "in")


def large_volume(dataset, size: int, dest: Path) -> dict:
    """A size^3 image at 1 mm (the plan's spacing: no resampling) mirrored-tiled from the first
    hippocampus image, so intensities and texture are MRI-like; written as large_0000.nii.gz."""
    import nibabel as nib
    import numpy as np

    image = np.asarray(nib.load(str(dataset.cases[0].images[0])).dataobj)
    tiled = image
    while min(tiled.shape) < size:  # symmetric padding of at most the array's own size per step
        tiled = np.pad(tiled, [(0, min(s, size - s)) if s < size else (0, 0) for s in tiled.shape], mode="symmetric")
    tiled = np.ascontiguousarray(tiled[:size, :size, :size])
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "large_0000.nii.gz"
    nib.save(nib.Nifti1Image(tiled, np.eye(4)), str(path))
    return {"shape": list(tiled.shape), "dtype": str(tiled.dtype), "spacing_mm": [1.0, 1.0, 1.0],
            "source": dataset.cases[0].case_id, "file_mib": round(path.stat().st_size / 2**20, 1)}


def ct_inputs(dataset, cases: int, dest: Path) -> list[str]:
    """The TotalSegmentator CT image as CASE_0000.nii.gz (the naming both tools read); with cases > 1, copies of it
    under CASE_1, CASE_2, ... (the dataset holds one case: a folder of identical cases times per-case throughput)."""
    case = dataset.cases[0]
    ids = [case.case_id] + [f"{case.case_id}_{i}" for i in range(1, cases)]
    for case_id in ids:
        link_or_copy(case.images[0], dest / f"{case_id}_0000.nii.gz")
    return ids


def nnunet_ct_raw(dataset, values: tuple[int, ...], raw: Path) -> dict:
    """nnU-Net v2's raw layout of the CT dataset, labels renumbered 0..K-1 in the order of their values.

    nnU-Net needs consecutive label values (verify_dataset_integrity refuses others; its loss and argmax use the
    value as the class index, and it writes the argmax index as the label). Our LabelMap keeps the values and
    maps them to the same indices (index i is values[i], sorted), so nnU-Net's class i, our store index i and
    output channel i are one class: nnU-Net's outputs are compared after `values[index]`. Written once: a
    dataset.json already describing these values is kept (nnU-Net's plans and preprocessed data beside it too).
    """
    import nibabel as nib
    import numpy as np

    from pipeline.data.labels import LabelMap

    names = dataset.labels  # value -> name
    meta = {"channel_names": {"0": "CT"},
            "labels": {("background" if v == 0 else names.get(v, f"class_{v}")): i for i, v in enumerate(values)},
            "numTraining": len(dataset.cases), "file_ending": ".nii.gz", "name": "TotalSegCT",
            "original_label_values": list(values)}
    if (raw / "dataset.json").is_file() and json.loads((raw / "dataset.json").read_text()) == meta:
        return meta
    label_map = LabelMap(tuple(values))
    for case in dataset.cases:
        link_or_copy(case.images[0], raw / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        img = nib.load(str(case.label))
        index = label_map.to_index(np.asanyarray(img.dataobj))
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        header["scl_slope"], header["scl_inter"] = 1, 0
        (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(index.astype(np.uint8), img.affine, header), str(raw / "labelsTr" / f"{case.case_id}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps(meta, indent=1))
    return meta


def nnunet_env(ref: Path, results: Path) -> dict:
    return dict(os.environ, nnUNet_raw=str(ref / "raw"), nnUNet_preprocessed=str(ref / "preprocessed"),
                nnUNet_results=str(results), nnUNet_compile="false", PYTHONUNBUFFERED="1")


def make_nnunet_model(python: str, ref: Path, results: Path, weights_out: Path, dataset: str = NNUNET_DATASET,
                      trained: Path | None = None) -> dict:
    """nnU-Net's checkpoint_final.pth of its 3d_fullres network, initialised, or with the weights of a `trained`
    checkpoint_final.pth of the same plan; see NNUNET_MODEL_SCRIPT."""
    cmd = [python, "-c", NNUNET_MODEL_SCRIPT, dataset, CONFIG, str(weights_out), str(trained or "")]
    run = run_command(cmd, env=nnunet_env(ref, results), cwd=results, timeout=600)
    if not run.ok or not run.output:
        return {"error": f"building nnU-Net's model failed: {run.error()}"}
    return {**run.output, "build_s": round(run.wall_s, 1), "trained_from": str(trained) if trained else None}


def nnunet_ct_plans(python: str, ref: Path, dataset, values: tuple[int, ...]) -> dict:
    """nnU-Net's raw CT dataset and `nnUNetv2_plan_and_preprocess -c 3d_fullres` of it in `ref`, once: a ref that
    already holds its nnUNetPlans.json (for the same labels) is reused."""
    raw, pre = ref / "raw" / CT_DATASET, ref / "preprocessed" / CT_DATASET
    before = (raw / "dataset.json").read_text() if (raw / "dataset.json").is_file() else None
    meta = nnunet_ct_raw(dataset, values, raw)
    if before != (raw / "dataset.json").read_text():
        shutil.rmtree(pre, ignore_errors=True)  # new labels: plans and preprocessed data made from the old ones go
    if (pre / "nnUNetPlans.json").is_file() and (pre / "dataset.json").is_file():
        return {"labels": len(meta["labels"]), "planned": "reused"}
    tool = Path(python).parent / "nnUNetv2_plan_and_preprocess"
    run = run_command([str(tool), "-d", CT_DATASET_ID, "-c", CONFIG, "-np", "1"],
                      env=nnunet_env(ref, ref / "results"), cwd=ref, timeout=1800)
    if not run.ok or not (pre / "nnUNetPlans.json").is_file():
        return {"error": f"nnUNetv2_plan_and_preprocess -d {CT_DATASET_ID} failed: {run.error()}"}
    return {"labels": len(meta["labels"]), "planned": f"nnUNetv2_plan_and_preprocess, {run.wall_s:.0f} s"}


def topology_check(plans, nnunet_plans: Path | None) -> dict:
    """Our 3d_fullres configuration against nnU-Net's, field by field (both in (z, y, x) = our store order)."""
    ours = plans.configuration(CONFIG)
    facts = {"patch_size": ours.patch_size, "strides": ours.strides, "kernel_sizes": ours.kernel_sizes,
             "features_per_stage": ours.features_per_stage, "n_conv_per_stage": [ours.n_conv_per_stage] * ours.num_stages,
             "spacing": ours.spacing}
    out = {"ours": facts}
    if nnunet_plans is not None and nnunet_plans.is_file():
        conf = json.loads(nnunet_plans.read_text())["configurations"][CONFIG]
        arch = conf["architecture"]["arch_kwargs"]
        theirs = {"patch_size": conf["patch_size"], "strides": arch["strides"], "kernel_sizes": arch["kernel_sizes"],
                  "features_per_stage": arch["features_per_stage"], "n_conv_per_stage": arch["n_conv_per_stage"],
                  "spacing": conf["spacing"]}
        out.update(nnunet=theirs, differences=[k for k in facts if list(facts[k]) != list(theirs[k])])
        fg = json.loads(nnunet_plans.read_text()).get("foreground_intensity_properties_per_channel", {}).get("0")
        if plans.normalization[0].scheme == "ct" and fg:  # CT clipping and z-scoring: foreground statistics of a sample
            ct = plans.normalization[0]
            out["ct_normalization"] = {"ours": {"lower": ct.lower, "upper": ct.upper, "mean": ct.mean, "std": ct.std},
                                       "nnunet": {"lower": fg["percentile_00_5"], "upper": fg["percentile_99_5"],
                                                  "mean": fg["mean"], "std": fg["std"]}}
    return out


def adopt_nnunet_topology(plans, nnunet_plans: Path) -> dict:
    """Our plan's topology check against nnU-Net's; where they differ, nnU-Net's architecture numbers (and spacing)
    replace ours in our 3d_fullres, so nnU-Net's weights fit and both tools run the same network."""
    topo = topology_check(plans, nnunet_plans)
    if topo.get("differences"):
        theirs, conf = topo["nnunet"], plans.configurations[CONFIG]
        if len(set(theirs["n_conv_per_stage"])) != 1:
            raise SystemExit(f"nnU-Net's n_conv_per_stage {theirs['n_conv_per_stage']} varies per stage: our plan "
                             "cannot express it")
        conf.patch_size, conf.strides, conf.kernel_sizes = theirs["patch_size"], theirs["strides"], theirs["kernel_sizes"]
        conf.features_per_stage, conf.spacing = theirs["features_per_stage"], theirs["spacing"]
        conf.n_conv_per_stage = theirs["n_conv_per_stage"][0]
        topo["adopted"] = "our network and plan use nnU-Net's numbers for " + ", ".join(topo["differences"])
    return topo


def topology_notes(topo: dict, prefix: str) -> list[str]:
    """The note a topology check leaves where our planner differs from nnU-Net's (none where it agrees)."""
    if not topo.get("differences"):
        return []
    return [f"{prefix}our planner's 3d_fullres differs from nnU-Net's in {topo['differences']}: "
            + (topo["adopted"] if topo.get("adopted") else "the comparison is NOT of the same topology")]


def make_our_model(workdir: Path, dataset, nnunet_weights: Path | None, nnunet_plans: Path | None = None,
                   configs: tuple[str, ...] = (CONFIG, "3d_lean")) -> tuple[object, dict]:
    """Plans from the whole dataset's fingerprint; the 3d_fullres model file with nnU-Net's weights when given
    (then at nnU-Net's topology: `adopt_nnunet_topology`). The topology check comes back under "topology"."""
    import torch
    from inference import make_model  # benchmarks/inference.py: plans + a seeded untrained model file

    from pipeline.interop.nnunet_weights import load_nnunet_weights
    from pipeline.training.loop import save_model_file
    from pipeline.training.model import build_network

    checks: list[dict] = []
    adopt = nnunet_weights is not None and nnunet_weights.is_file() and nnunet_plans is not None and nnunet_plans.is_file()
    wd, plans = make_model(workdir, dataset, list(configs),
                           adjust=(lambda p: checks.append(adopt_nnunet_topology(p, nnunet_plans))) if adopt else None)
    info = {"weights": "seeded random initialisation (torch.manual_seed(0)), nnU-Net not run",
            "topology": checks[0] if checks else topology_check(plans, nnunet_plans)}
    if nnunet_weights is not None and nnunet_weights.is_file():
        net = build_network(plans.configuration(CONFIG), len(plans.channels), len(plans.label_values))
        load_nnunet_weights(net, torch.load(nnunet_weights, weights_only=True), str(nnunet_weights))  # strict
        save_model_file(wd.run_dir(CONFIG, "0") / "model_final.pt", net, configuration=CONFIG, epoch=0, ema_dice=None,
                        num_input_channels=len(plans.channels), num_classes=len(plans.label_values),
                        label_values=list(plans.label_values), plans_hash=plans.hash(CONFIG))
        info["weights"] = "nnU-Net's checkpoint weights (loaded strictly under our module names)"
        info["parameters"] = sum(p.numel() for p in net.parameters())
    return wd, info


# ---------------------------------------------------------------- measuring one row


def output_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def pss_bytes(pid: int) -> int:
    """Proportional set size: each page shared by n processes counts 1/n (0 if the process has gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class PssSampler:
    """Peak of the summed PSS of this process's descendants (the measured command's tree), every `interval` s.

    Why beside the harness's RSS: a forked child shows its parent's pages in its own RSS until it
    writes them, so summing RSS counts them once per process. nnUNetv2_predict forks a pool of 12
    processes to list its input folder (and forks its -npp/-nps workers), which alone adds
    gigabytes of pages that exist once. PSS splits every shared page among its processes, so the
    sum is the memory the tree really holds. Reading smaps_rollup costs ~15 ms per GB mapped,
    hence the slow rate (the RSS peak sampled every 20 ms stays as the upper bound).
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self.samples = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval):
            pids = [p for p in process_tree(me) if p != me]
            if pids:
                self.peak = max(self.peak, sum(pss_bytes(p) for p in pids))
                self.samples += 1

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(row: dict, cmd: list[str], env: dict, out_dir: Path, cases: int, timeout: float,
            pss_interval: float = 0.5) -> dict:
    """One child process under the harness; the row gains time, CPU and memory figures (or an error)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.time()
    with PssSampler(pss_interval) as pss:
        run = run_command(cmd, env=env, cwd=REPO, timeout=timeout)
    outputs = output_files(out_dir)
    row.update(wall_s=round(run.wall_s, 2), cpu_s=round(run.cpu_s, 2), peak_rss_tree_mib=round(run.peak_rss_tree_mib, 1),
               peak_pss_tree_mib=round(pss.peak / MIB, 1) if pss.samples else None, pss_samples=pss.samples,
               largest_process_mib=run.top_processes[0]["peak_rss_mib"] if run.top_processes else None,
               processes=run.processes, top_processes=run.top_processes[:6], output_dir=str(out_dir),
               load_after=[round(x, 2) for x in os.getloadavg()])
    if not run.ok:
        row["error"] = run.error()
    elif len(outputs) != cases:
        row["error"] = f"{len(outputs)} of {cases} outputs written"
    if "error" in row:
        row["stderr_tail"] = run.stderr_tail[-1500:]
        return row
    mtimes = [p.stat().st_mtime for p in outputs]
    row.update(s_per_case=round(run.wall_s / cases, 3), cpu_s_per_case=round(run.cpu_s / cases, 3),
               first_output_s=round(min(mtimes) - started, 2))
    if run.output:  # our worker's own figures
        row.update(in_tool_case_s=run.output.get("case_s_mean"), predict_folder_s=run.output.get("predict_folder_s"),
                   workers=run.output.get("workers", row.get("workers")), computed_in=run.output.get("precision"))
    return row


def label_agreement(dir_a: Path, dir_b: Path, b_values: tuple[int, ...] | None = None) -> dict | None:
    """Fraction of voxels with the same label in two folders of predictions (same case files). `b_values`: the label
    value of each class index that folder b holds (nnU-Net's renumbered CT labels), compared as values."""
    import nibabel as nib
    import numpy as np

    a, b = {p.name: p for p in output_files(dir_a)}, {p.name: p for p in output_files(dir_b)}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    same = total = 0
    worst = 1.0
    shapes_differ = []
    for name in common:
        x, y = np.asarray(nib.load(str(a[name])).dataobj), np.asarray(nib.load(str(b[name])).dataobj)
        if b_values is not None:
            y = np.asarray(b_values)[y.astype(np.int64)]
        if x.shape != y.shape:
            shapes_differ.append(name)
            continue
        eq = int((x == y).sum())
        same, total = same + eq, total + x.size
        worst = min(worst, eq / x.size)
    return {"cases": len(common), "voxel_agreement": round(same / total, 6) if total else None,
            "worst_case": round(worst, 6), "shape_mismatch": shapes_differ}


def ratio_text(ours: float | None, theirs: float | None) -> str:
    """'1.3x faster' / '1.3x slower' for seconds (lower is better)."""
    if not ours or not theirs:
        return "–"
    r = theirs / ours
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


# ---------------------------------------------------------------- the runs


def our_rows(args, label: str, mode: str, precisions: list[str] | None = None, **row) -> list[dict]:
    """Our rows, one per precision (`--precisions`; Ray rows run the first only). A precision other than
    auto shows in the label; the mode gives what it computed in (the worker reports it)."""
    out = []
    for precision in precisions or args.precisions:
        shown = "" if precision == "auto" else f" {precision}"
        out.append({"tool": OURS, "label": label + shown, "mode": mode + (f", --precision {precision}" if shown else ""),
                    "precision": precision, **row})
    return out


def plan_rows(args, cases: int) -> list[dict]:
    rows = []
    for tta in args.tta:
        for variant in args.workers:
            if variant != "1" and args.ray_tta is not None and tta not in args.ray_tta:
                continue
            workers = int(variant.removeprefix("ray"))
            mode = ("in-process" if variant == "1" else f"Ray, {workers} worker" + ("s" if workers > 1 else ""))
            rows += our_rows(args, f"ours {mode}", f"predict_folder, {mode}", None if variant == "1" else args.precisions[:1],
                             set="hippocampus", variant=variant, tta=tta, cases=cases, workers=workers)
        if args.nnunet_python:
            for procs in args.nnunet_procs:
                rows.append({"set": "hippocampus", "tool": NNUNET, "variant": f"npp{procs}",
                             "label": f"nnU-Net -npp {procs} -nps {procs}",
                             "mode": f"nnUNetv2_predict -npp {procs} -nps {procs}" + (" (sequential)" if procs == 0 else ""),
                             "tta": tta, "cases": cases, "procs": procs})
    if args.lean_cases:
        rows += our_rows(args, "ours 3d_lean", "predict_folder 3d_lean, in-process", set="lean", variant="lean", tta=True,
                         cases=args.lean_cases, workers=1)
    if args.size:
        for tta in args.size_tta:
            rows += our_rows(args, f"ours {args.size}^3", "predict_folder, in-process", set="large", variant="1", tta=tta,
                             cases=1, workers=1)
            if args.nnunet_python and args.size_nnunet:
                procs = min(args.nnunet_procs)
                rows.append({"set": "large", "tool": NNUNET, "variant": f"npp{procs}", "label": f"nnU-Net {args.size}^3",
                             "mode": f"nnUNetv2_predict -npp {procs} -nps {procs}", "tta": tta, "cases": 1, "procs": procs})
    if args.ct_cases:
        for tta in args.ct_tta:
            rows += our_rows(args, "ours CT", "predict_folder, in-process", set="ct", variant="1", tta=tta,
                             cases=args.ct_cases, workers=1)
            for procs in args.nnunet_procs if args.ct_nnunet else ():
                rows.append({"set": "ct", "tool": NNUNET, "variant": f"npp{procs}", "label": f"nnU-Net CT -npp {procs} -nps {procs}",
                             "mode": f"nnUNetv2_predict -npp {procs} -nps {procs}" + (" (sequential)" if procs == 0 else ""),
                             "tta": tta, "cases": args.ct_cases, "procs": procs})
    return rows


def command_for(row: dict, args, wd_root: Path, inputs: Path, out_dir: Path) -> tuple[list[str], dict]:
    if row["tool"] == OURS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row["variant"], str(wd_root), str(inputs),
               str(out_dir), "--tta", "on" if row["tta"] else "off", "--threads", str(args.threads),
               "--config", "3d_lean" if row["variant"] == "lean" else CONFIG, "--device", args.device,
               "--precision", row["precision"]]
        return cmd, python_env(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    tool = str(Path(args.nnunet_python).parent / "nnUNetv2_predict")
    procs = str(row["procs"])
    cmd = [tool, "-i", str(inputs), "-o", str(out_dir), "-d", CT_DATASET if row["set"] == "ct" else NNUNET_DATASET,
           "-c", CONFIG, "-f", "0",
           "-device", args.device, "--disable_progress_bar", "-npp", procs, "-nps", procs]
    return cmd + ([] if row["tta"] else ["--disable_tta"]), args.nnunet_env


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (set, tool, variant, precision, TTA): median s/case over the repeats, min and max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["tool"], r["variant"], r.get("precision"), r["tta"]), []).append(r)
    out = []
    for runs in groups.values():
        ok = [r for r in runs if "s_per_case" in r]
        first = runs[0]
        s = {k: first[k] for k in ("set", "tool", "variant", "label", "mode", "tta", "cases", "precision") if k in first}
        s["repeats"], s["failed"] = len(runs), len(runs) - len(ok)
        if ok:
            med = lambda key: (statistics.median(r[key] for r in ok if r.get(key) is not None)  # noqa: E731
                               if any(r.get(key) is not None for r in ok) else None)
            s.update(s_per_case=round(med("s_per_case"), 3), s_per_case_min=min(r["s_per_case"] for r in ok),
                     s_per_case_max=max(r["s_per_case"] for r in ok), cpu_s_per_case=round(med("cpu_s_per_case"), 3),
                     first_output_s=round(med("first_output_s"), 2), peak_rss_tree_mib=round(med("peak_rss_tree_mib"), 1),
                     peak_pss_tree_mib=med("peak_pss_tree_mib"),
                     largest_process_mib=med("largest_process_mib"), processes=max(r["processes"] for r in ok),
                     workers=ok[0].get("workers"), in_tool_case_s=med("in_tool_case_s"),
                     computed_in=ok[0].get("computed_in"))
        else:
            s["error"] = runs[-1].get("error")
        out.append(s)
    # ours vs nnU-Net's fastest setting with the same TTA on the same set
    for s in out:
        ref = [n for n in out if n["tool"] == NNUNET and n["set"] == s["set"] and n["tta"] == s["tta"] and n.get("s_per_case")]
        if s["tool"] == OURS and ref and s.get("s_per_case"):
            best = min(ref, key=lambda n: n["s_per_case"])
            s["vs_nnunet"] = ratio_text(s["s_per_case"], best["s_per_case"])
            s["vs_nnunet_ref"] = best["label"]
    return out


def comparisons(summary: list[dict]) -> list[dict]:
    """Per set and TTA: our fastest variant vs nnU-Net's fastest; and each of our in-process rows (one per
    precision) vs nnU-Net's fastest and its sequential mode."""
    out = []
    for set_name in dict.fromkeys(s["set"] for s in summary):
        for tta in dict.fromkeys(s["tta"] for s in summary if s["set"] == set_name):
            ok = [s for s in summary if s["set"] == set_name and s["tta"] == tta and s.get("s_per_case")]
            ours = [s for s in ok if s["tool"] == OURS]
            nn = [s for s in ok if s["tool"] == NNUNET]
            if not (ours and nn):
                continue
            fastest = min(nn, key=lambda s: s["s_per_case"])
            pairs = [("fastest of each", min(ours, key=lambda s: s["s_per_case"]), fastest)]
            seq = next((s for s in nn if s["variant"] == "npp0"), None)
            for single in (s for s in ours if s["variant"] in ("1", "lean")):
                if len(ours) > 1 and (single, fastest) not in [p[1:] for p in pairs]:
                    pairs.append(("ours in-process vs nnU-Net's fastest", single, fastest))
                if seq and seq is not fastest and (single, seq) not in [p[1:] for p in pairs]:
                    pairs.append(("one process each (in-process vs -npp 0 -nps 0)", single, seq))
            for what, o, n in pairs:
                out.append({"set": set_name, "tta": tta, "pairing": what, "ours": o["label"], "ours_s_per_case": o["s_per_case"],
                            "nnunet": n["label"], "nnunet_s_per_case": n["s_per_case"],
                            "ratio": ratio_text(o["s_per_case"], n["s_per_case"]),
                            "ours_peak_pss_tree_mib": o["peak_pss_tree_mib"], "nnunet_peak_pss_tree_mib": n["peak_pss_tree_mib"]})
    return out


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    m = result["meta"]
    topo = result["topology"]
    lines = ["# Prediction: seg-pipeline `predict_folder` vs `nnUNetv2_predict`", "",
             f"Machine: {machine_line(result['machine'])}.", "",
             *([] if result.get("complete", True) else ["**Partial: the run was stopped before every row was measured.**", ""]),
             f"Model: 3d_fullres of nnU-Net's Task04_Hippocampus plan (patch {'x'.join(map(str, topo['ours']['patch_size']))}, "
             f"features {topo['ours']['features_per_stage']}, spacing {topo['ours']['spacing']} mm); our plan vs nnU-Net's "
             + ("nnUNetPlans.json: identical (patch, strides, kernels, features, convs per stage, spacing)"
                if topo.get("differences") == [] else
                f"nnUNetPlans.json differs in {topo['differences']}" if topo.get("differences") else "nnUNetPlans.json: not checked")
             + f". Weights: {m['model']['weights']}"
             + (f"; nnU-Net's checkpoint made by {m['nnunet_model'].get('trainer')}.initialize() + save_checkpoint"
                if m.get("nnunet_model", {}).get("trainer") else "")
             + (f", with the weights of the trained checkpoint {m['nnunet_model']['trained_from']} (--nnunet-checkpoint)"
                if m.get("nnunet_model", {}).get("trained_from") else
                ", initialised (untrained)" if m.get("nnunet_model", {}).get("trainer") else "")
             + (f" ({m['model']['parameters']:,} parameters)" if m["model"].get("parameters") else "") + ".", "",
             f"Threads: {m['threads']} torch thread(s) in our predicting process (in-process), cores // workers per Ray actor; "
             f"nnU-Net sets {m['nnunet_torch_threads']} (its CPU default, multiprocessing.cpu_count()). "
             "Every row is one child process measured from outside by benchmarks/harness.py.", ""]
    ct, topo_ct = m.get("ct", {}), result.get("topology_ct") or {}
    if ct.get("case_ids"):
        t = topo_ct.get("ours", {})
        lines += [f"CT model: 3d_fullres of the plan for TotalSegmentator_CT (patch {'x'.join(map(str, t.get('patch_size', [])))}, "
                  f"spacing {t.get('spacing')} mm, strides {t.get('strides')}, features {t.get('features_per_stage')}, "
                  f"{len(ct.get('label_values', []))} classes); our plan vs nnU-Net's {ct.get('nnunet_dataset')} nnUNetPlans.json: "
                  + ("identical" if topo_ct.get("differences") == [] else
                     f"differs in {topo_ct['differences']}" if topo_ct.get("differences") else "not checked")
                  + f". Weights: {ct.get('ours', {}).get('weights')}"
                  + (f", those of the trained checkpoint {ct['nnunet_model']['trained_from']} (--nnunet-ct-checkpoint)"
                     if ct.get("nnunet_model", {}).get("trained_from") else "")
                  + f". Labels: {ct.get('label_mapping')}.", ""]
    for set_name, title in (("hippocampus", f"Task04_Hippocampus, {m['cases']} cases: {', '.join(m['case_ids'])}"),
                            ("large", f"{m.get('size')}^3 volume at 1 mm ({m.get('large', {}).get('source', '')} "
                                      f"mirror-tiled), one case, same model"),
                            ("ct", f"TotalSegmentator CT, {len(m.get('ct', {}).get('case_ids', []))} case(s): 122x101x30 at "
                                   "3 mm, int16 HU, 41 non-contiguous labels + background, its own plan and model")):
        rows = [s for s in result["summary"] if s["set"] == set_name]
        if not rows:
            continue
        lines += [f"## {title}", "",
                  md_table(["tool", "how", "TTA", "s/case (whole command)", "vs nnU-Net (fastest, same TTA)",
                            "first output s", "CPU-s/case", "in-tool s/case", "peak PSS tree MiB", "peak RSS tree MiB",
                            "processes"],
                           [(s["tool"], s["mode"] + (f"; {s['computed_in']}" if s.get("computed_in") else ""),
                             "mirroring" if s["tta"] else "off",
                             _fmt_time(s), s.get("vs_nnunet", "–"), s.get("first_output_s"), s.get("cpu_s_per_case"),
                             s.get("in_tool_case_s"), s.get("peak_pss_tree_mib"), s.get("peak_rss_tree_mib"),
                             s.get("processes")) if s.get("s_per_case") else
                            (s["tool"], s["mode"], "mirroring" if s["tta"] else "off", f"failed: {s.get('error')}",
                             "–", "–", "–", "–", "–", "–", "–") for s in rows]), ""]
    if result["comparisons"]:
        lines += ["## Ours vs nnU-Net (same run)", "",
                  md_table(["cases", "TTA", "pairing", "ours", "s/case", "nnU-Net", "s/case", "ours vs nnU-Net",
                            "peak PSS tree ours / nnU-Net MiB"],
                           [(c["set"], "on" if c["tta"] else "off", c["pairing"], c["ours"], c["ours_s_per_case"], c["nnunet"],
                             c["nnunet_s_per_case"], c["ratio"],
                             f"{_mib(c['ours_peak_pss_tree_mib'])} / {_mib(c['nnunet_peak_pss_tree_mib'])}")
                            for c in result["comparisons"]]), ""]
    if result.get("agreement"):
        lines += ["Same weights, so the outputs should agree: "
                  + "; ".join(f"TTA {'on' if a['tta'] else 'off'} ({a['set']}, {a['ours']}"
                              f"{', ' + a['precision'] if a.get('precision') else ''} vs {a['nnunet']}): "
                              f"{a['voxel_agreement']} of voxels equal "
                              f"(worst case {a['worst_case']}, {a['cases']} cases)" for a in result["agreement"])
                  + ". Both average logits over the mirrorings, the overlapping windows and the folds and take the "
                  "softmax once; what differs is the export (nnU-Net resamples logits, we probabilities), float "
                  "summation order and, in mixed precision, the rounding of the convolutions' inputs to bfloat16 "
                  "(nnU-Net runs float32 on a CPU)"
                  + (", which on untrained weights, whose classes are near ties, flips a few voxels."
                     if not (m.get("nnunet_model", {}).get("trained_from")
                             or m.get("ct", {}).get("nnunet_model", {}).get("trained_from")) else "."), ""]
    norm = (result.get("topology_ct") or {}).get("ct_normalization")
    if norm:
        o, n = norm["ours"], norm["nnunet"]
        lines += [f"CT normalisation, each tool's own fingerprint: ours clips to [{o['lower']:g}, {o['upper']:g}] HU, mean "
                  f"{o['mean']:.2f}, std {o['std']:.2f}; nnU-Net [{n['lower']:g}, {n['upper']:g}] HU, mean {n['mean']:.2f}, "
                  f"std {n['std']:.2f} (percentiles of the foreground voxels each samples), so the CT inputs differ slightly "
                  "as well.", ""]
    lines += ["How to read it:", "",
              "* **s/case (whole command)** = the command's wall seconds / cases: interpreter start, imports, model "
              "load, Ray or nnU-Net's worker pools, every case, exit. It is what a user waits for per case of a folder "
              "of this many cases; startup weighs more the fewer the cases. Median over the repeats (min-max).",
              "* **first output s**: from the command's start to the first prediction file on disk (startup + the "
              "first case). **in-tool s/case**: `predict_folder`'s own per-case timer (read, preprocess, windows, "
              "export, write; inside each actor for Ray), so excluding startup. nnU-Net reports no per-case time.",
              "* **peak PSS tree**: peak of the summed proportional set size of the command and every descendant "
              f"(sampled every {result['meta']['pss_interval']} s from /proc/PID/smaps_rollup): each page shared by n "
              "processes counts 1/n, so this is the memory the tree really holds. For Ray it covers the driver, GCS, "
              "raylet, Ray's agents and idle workers as well as the actors; for nnU-Net its main process, the -npp/-nps "
              "workers and the pool of 12 processes it forks to list the input folder. **peak RSS tree** (sampled every "
              "20 ms by the harness) counts shared pages once per process, as `top` does: an upper bound, badly "
              "inflated by forked processes (nnU-Net's), hardly by Ray's (its workers are separate interpreters).",
              "* `ours Ray, 1 worker` starts Ray as `predict_folder` does for Ray (pipeline.inference.ray_backend.ray_runtime) "
              "and runs one actor in it: the cost of Ray alone. `nnU-Net -npp 0 -nps 0` is nnU-Net's sequential mode "
              "(one process, like our in-process path); larger -npp/-nps overlap preprocessing and export with the "
              "forward passes in worker processes.",
              f"* Load average during the run {result['machine'].get('load_before')} -> {result['machine'].get('load_after')}: "
              "compare rows of one run."]
    for note in result.get("notes", []):
        lines.append(f"* {note}")
    return "\n".join(lines) + "\n"


def _mib(x) -> str:
    return "–" if x is None else f"{x:.0f}"


def _fmt_time(s: dict) -> str:
    if s.get("repeats", 1) > 1 and s["s_per_case_min"] != s["s_per_case_max"]:
        return f"{s['s_per_case']:.2f} ({s['s_per_case_min']:.2f}-{s['s_per_case_max']:.2f})"
    return f"{s['s_per_case']:.2f}"


def plot(result: dict, new_figure):
    panels = [[s for s in result["summary"] if s["set"] in names and s.get("s_per_case")]
              for names in (("hippocampus", "lean"), ("large",), ("ct",))]
    panels = [p for p in panels if p]
    if not panels:
        return None
    widths = [max(3.2, 0.75 * len(p) + 1.2) for p in panels]  # each panel as wide as its bars need
    fig, axes = new_figure(max(6.0, sum(widths)), 4.0 * 2, 2, len(panels))
    axes[0][0].get_gridspec().set_width_ratios(widths)
    for i, rows in enumerate(panels):
        labels = [f"{s['label']}, TTA {'on' if s['tta'] else 'off'}" for s in rows]
        colors = ["tab:orange" if s["tool"] == NNUNET else "tab:blue" for s in rows]
        title = {"large": f"{result['meta'].get('size')}^3", "ct": "TotalSegmentator CT"}.get(rows[0]["set"], rows[0]["set"])
        bar_panel(axes[0][i], labels, [s["s_per_case"] for s in rows], ylabel="s/case (whole command)", colors=colors,
                  low=[s.get("s_per_case_min") for s in rows] if result["meta"]["repeats"] > 1 else None,
                  high=[s.get("s_per_case_max") for s in rows] if result["meta"]["repeats"] > 1 else None,
                  title=f"{title}:\ns/case (blue ours, orange nnU-Net)")
        bar_panel(axes[1][i], labels, [s.get("peak_pss_tree_mib") for s in rows], ylabel="MiB", colors=colors,
                  title=f"{title}:\npeak PSS of the process tree")
    return fig


# ---------------------------------------------------------------- main


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _tta_list(text: str) -> list[bool]:
    values = _list(text)
    if any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"TTA values are on/off, got {text!r}")
    return [v == "on" for v in values]


def _precisions(text: str) -> list[str]:
    values = _list(text)
    if not values or any(v not in ("auto", "mixed", "fp32") for v in values):
        raise argparse.ArgumentTypeError(f"precisions are auto, mixed or fp32, got {text!r}")
    return values


def _workers(text: str) -> list[str]:
    values = _list(text)
    for v in values:
        if not re.fullmatch(r"ray1|[1-9]\d*", v):
            raise argparse.ArgumentTypeError(f"workers are 1 (in-process), ray1 or N > 1 (Ray), got {v!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    default_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=4, metavar=("VARIANT", "WORKDIR", "INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    ap.add_argument("--cases", type=int, default=60, help="hippocampus cases (0: skip the hippocampus rows)")
    ap.add_argument("--lean-cases", type=int, default=60,
                    help="hippocampus cases predicted with 3d_lean, mirroring on (0: skip): the s/case of the CPU preset")
    ap.add_argument("--config", default=CONFIG, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both tools run the network")
    ap.add_argument("--workers", type=_workers, default=_workers("1,ray1,2"),
                    help="our variants: 1 (in-process), ray1 (one Ray actor), N > 1 (N Ray actors)")
    ap.add_argument("--tta", type=_tta_list, default=_tta_list("off,on"), help="mirroring TTA settings: off,on")
    ap.add_argument("--ray-tta", type=_tta_list, default=None,
                    help="TTA settings for the Ray variants (default: those of --tta; quick mode: off)")
    ap.add_argument("--threads", type=int, default=default_threads, help="torch threads of our in-process predictor")
    ap.add_argument("--nnunet-python", default=None, help="interpreter with nnunetv2: adds nnUNetv2_predict rows")
    ap.add_argument("--nnunet-ref", type=Path, default=NNUNET_REF,
                    help=f"nnU-Net raw/ and preprocessed/ holding {NNUNET_DATASET} (default {NNUNET_REF})")
    ap.add_argument("--nnunet-procs", type=lambda t: [int(x) for x in _list(t)], default=[3, 0],
                    help="nnUNetv2_predict -npp = -nps values (0: sequential)")
    ap.add_argument("--size", type=int, default=256, help="edge of the large volume (0: skip)")
    ap.add_argument("--size-tta", type=_tta_list, default=_tta_list("off"), help="TTA settings for the large volume")
    ap.add_argument("--size-nnunet", action="store_true", help="also run nnUNetv2_predict on the large volume")
    ap.add_argument("--ct-cases", type=int, default=1,
                    help="TotalSegmentator CT inputs at nnU-Net's plan for that dataset (0: skip; the dataset holds one "
                         "case, more are copies of it)")
    ap.add_argument("--ct-tta", type=_tta_list, default=_tta_list("off,on"), help="TTA settings for the CT case")
    ap.add_argument("--precisions", type=_precisions, default=["auto"],
                    help="our in-process rows once per precision of `segpipe predict --precision` (auto,fp32: "
                         "mixed where native beside float32); Ray rows run the first")
    ap.add_argument("--precision", default="auto", help=argparse.SUPPRESS)  # the worker's own
    ap.add_argument("--nnunet-checkpoint", type=Path, default=None,
                    help="a trained checkpoint_final.pth of nnU-Net's 3d_fullres for Dataset004 (benchmarks/"
                         "nnunet_interop.py trains one): both tools predict with its weights instead of initialised "
                         "ones, whose near-tied classes make the label agreement a test of float rounding")
    ap.add_argument("--nnunet-ct-checkpoint", type=Path, default=None,
                    help="the same for the CT case: a checkpoint_final.pth of nnU-Net's 3d_fullres trained on this "
                         "script's Dataset901 (labels renumbered 0..41), e.g. one short epoch of nnU-Net's trainer")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every row, interleaved round-robin")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per hippocampus run")
    ap.add_argument("--size-timeout", type=float, default=5400.0, help="seconds per large-volume run")
    ap.add_argument("--pss-interval", type=float, default=0.5, help="seconds between PSS samples of a measured tree")
    ap.add_argument("--name", default="predict")
    ap.add_argument("--out", default=str(RESULTS))
    args, rest = ap.parse_known_args(argv)
    if args.worker:  # our side, one child process: --worker VARIANT WORKDIR INPUT OUTPUT --tta on|off --threads N
        if len(args.tta) != 1 or rest:
            ap.error("--worker takes exactly one --tta value")
        print(json.dumps(worker(*args.worker, tta=args.tta[0], threads=args.threads, config=args.config,
                                device=args.device, precision=args.precision)), flush=True)
        return 0
    if rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")

    from pipeline.data.dataset import load_dataset

    root = SHARED / "Task04_Hippocampus"
    if not (root / "dataset.json").is_file():
        print(f"skipping: {root} not found (the model's plan and every case come from Task04_Hippocampus; "
              "set SEGPIPE_SHARED_DATA)")
        return 0
    machine = machine_info()
    notes: list[str] = []
    if args.nnunet_python:
        pre = args.nnunet_ref / "preprocessed" / NNUNET_DATASET
        missing = [p.name for p in (pre / "nnUNetPlans.json", pre / "dataset.json") if not p.is_file()]
        if missing or not (Path(args.nnunet_python).parent / "nnUNetv2_predict").exists():
            notes.append(f"nnU-Net rows skipped: {pre} lacks {missing}" if missing else
                         f"nnU-Net rows skipped: no nnUNetv2_predict beside {args.nnunet_python}")
            args.nnunet_python = None
    ct_root = SHARED / "TotalSegmentator_CT"
    if args.ct_cases and not (ct_root / "dataset.json").is_file():
        notes.append(f"CT rows skipped: {ct_root} not found")
        args.ct_cases = 0
    args.ct_nnunet = False
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segpipe_bench_predict_") as d:
        tmp = Path(d)
        dataset = load_dataset(root)
        cases = min(args.cases, len(dataset.cases))
        nnunet_model: dict = {}
        weights = None
        if args.nnunet_python:
            results = tmp / "nnunet_results"
            results.mkdir()
            args.nnunet_env = nnunet_env(args.nnunet_ref, results)
            print("building nnU-Net's model (nnUNetTrainer.initialize + save_checkpoint) ...", flush=True)
            nnunet_model = make_nnunet_model(args.nnunet_python, args.nnunet_ref, results, tmp / "nnunet_weights.pt",
                                             trained=args.nnunet_checkpoint)
            if "error" in nnunet_model:
                notes.append(f"nnU-Net rows skipped: {nnunet_model['error']}")
                args.nnunet_python = None
            else:
                weights = tmp / "nnunet_weights.pt"
        print(f"planning Task04 ({len(dataset.cases)} cases) and writing our model ...", flush=True)
        wd, model = make_our_model(tmp / "work", dataset, weights,
                                   args.nnunet_ref / "preprocessed" / NNUNET_DATASET / "nnUNetPlans.json")
        topo = model.pop("topology")
        notes += topology_notes(topo, "")
        if nnunet_model.get("parameters") and model.get("parameters") and nnunet_model["parameters"] != model["parameters"]:
            notes.append(f"parameter counts differ: ours {model['parameters']}, nnU-Net {nnunet_model['parameters']}")
        ct_model: dict = {}
        topo_ct: dict = {}
        ct_values: tuple[int, ...] = ()
        wd_ct = None
        if args.ct_cases:
            ct_dataset = load_dataset(ct_root)
            ct_values = ct_dataset.label_map.values
            ct_weights = None
            if args.nnunet_python:
                print(f"nnU-Net's plan and model for {CT_DATASET} (labels renumbered 0..{len(ct_values) - 1}) ...", flush=True)
                ct_model["nnunet_plan"] = nnunet_ct_plans(args.nnunet_python, args.nnunet_ref, ct_dataset, ct_values)
                if "error" in ct_model["nnunet_plan"]:
                    notes.append(f"nnU-Net CT rows skipped: {ct_model['nnunet_plan']['error']}")
                else:
                    ct_model["nnunet_model"] = make_nnunet_model(args.nnunet_python, args.nnunet_ref, results,
                                                                 tmp / "nnunet_ct_weights.pt", CT_DATASET,
                                                                 trained=args.nnunet_ct_checkpoint)
                    if "error" in ct_model["nnunet_model"]:
                        notes.append(f"nnU-Net CT rows skipped: {ct_model['nnunet_model']['error']}")
                    else:
                        ct_weights, args.ct_nnunet = tmp / "nnunet_ct_weights.pt", True
            print("planning TotalSegmentator_CT and writing our model ...", flush=True)
            wd_ct, ours_ct = make_our_model(tmp / "work_ct", ct_dataset, ct_weights,
                                            args.nnunet_ref / "preprocessed" / CT_DATASET / "nnUNetPlans.json", (CONFIG,))
            topo_ct = ours_ct.pop("topology")
            ct_model["ours"] = ours_ct
            notes += topology_notes(topo_ct, "CT: ")
            params = ct_model.get("nnunet_model", {}).get("parameters")
            if params and ours_ct.get("parameters") and params != ours_ct["parameters"]:
                notes.append(f"CT parameter counts differ: ours {ours_ct['parameters']}, nnU-Net {params}")
        inputs = {"hippocampus": tmp / "in_hippocampus", "large": tmp / "in_large", "lean": tmp / "in_lean",
                  "ct": tmp / "in_ct"}
        workdirs = {name: wd.root for name in inputs} | ({"ct": wd_ct.root} if wd_ct else {})
        case_ids = hippocampus_inputs(dataset, cases, inputs["hippocampus"]) if cases else []
        if args.lean_cases:
            hippocampus_inputs(dataset, args.lean_cases, inputs["lean"])
        large = large_volume(dataset, args.size, inputs["large"]) if args.size else {}
        ct_ids = ct_inputs(ct_dataset, args.ct_cases, inputs["ct"]) if args.ct_cases else []
        if not cases:
            args.tta = []
        rows = plan_rows(args, cases)
        # warm the page cache for the libraries a first run would otherwise load cold (Ray's are large)
        if any(r["tool"] == OURS and r["variant"] != "1" for r in rows):
            run_command([sys.executable, "-c", "import ray, torch, pipeline.inference.sliding_window"], env=python_env(), timeout=300)
        measured: list[dict] = []

        def save(complete: bool, agreement: list[dict] = ()) -> dict:
            """Result files; after every row with complete=False (no plot), so a run stopped early keeps its rows."""
            summary = summarise(measured)
            result = {
                "benchmark": args.name, "device": args.device, "complete": complete,
                "machine": {**machine, "load_after": [round(x, 2) for x in os.getloadavg()]},
                "meta": {"cases": cases, "case_ids": case_ids, "pss_interval": args.pss_interval, "size": args.size or None,
                         "large": large, "threads": args.threads, "nnunet_torch_threads": os.cpu_count(),
                         "repeats": args.repeats, "nnunet_python": args.nnunet_python, "nnunet_ref": str(args.nnunet_ref),
                         "model": model, "nnunet_model": {k: v for k, v in nnunet_model.items() if k != "model_folder"},
                         "ct": {"case_ids": ct_ids, "label_values": list(ct_values), "nnunet_dataset": CT_DATASET,
                                "label_mapping": "nnU-Net's raw labels are the class indices 0..K-1 of the sorted values; "
                                                 "its outputs are mapped back (values[index]) before comparing",
                                **{k: ({kk: vv for kk, vv in v.items() if kk != "model_folder"} if isinstance(v, dict) else v)
                                   for k, v in ct_model.items()}},
                         "args": {k: v for k, v in vars(args).items() if k not in ("nnunet_env", "worker", "out")},
                         "total_s": round(time.perf_counter() - start, 1)},
                "topology": topo, "topology_ct": topo_ct, "summary": summary, "comparisons": comparisons(summary), "agreement": list(agreement),
                "runs": [{k: v for k, v in r.items() if k != "output_dir"} for r in measured], "notes": notes,
            }
            return write_results(args.name, result, markdown(result), (lambda nf: plot(result, nf)) if complete else None,
                                 args.out)

        for repeat in range(args.repeats):
            for plan in rows:
                row = {**plan, "repeat": repeat}
                out_dir = tmp / "out" / (f"{row['set']}-{row['tool'][:3]}-{row['variant']}-{row.get('precision', 'nn')}"
                                         f"-tta{int(row['tta'])}-{repeat}")
                cmd, env = command_for(row, args, workdirs[row["set"]], inputs[row["set"]], out_dir)
                timeout = args.size_timeout if row["set"] == "large" else args.timeout
                row["load_before"] = [round(x, 2) for x in os.getloadavg()]
                measure(row, cmd, env, out_dir, row["cases"], timeout, args.pss_interval)
                measured.append(row)
                shown = (f"{row['s_per_case']:.2f} s/case, first output {row['first_output_s']:.1f} s, "
                         f"CPU {row['cpu_s_per_case']:.2f} s/case, peak PSS/RSS tree {_mib(row['peak_pss_tree_mib'])}/"
                         f"{row['peak_rss_tree_mib']:.0f} MiB"
                         if "s_per_case" in row else f"FAILED {row['error']}")
                print(f"[{time.perf_counter() - start:5.0f}s] {row['set']:11s} {row['label']:28s} TTA "
                      f"{'on ' if row['tta'] else 'off'} {shown}", flush=True)
                save(complete=False)
        agreement = []
        for set_name in ("hippocampus", "large", "ct"):
            for tta in (False, True):
                nn = next((r for r in measured if (r["set"], r["tool"], r["tta"], r["repeat"]) == (set_name, NNUNET, tta, 0)
                           and "s_per_case" in r), None)
                if not nn or (weights is None and set_name != "ct"):
                    continue
                for mine in (r for r in measured if (r["set"], r["tool"], r["tta"], r["repeat"], r["variant"]) ==
                             (set_name, OURS, tta, 0, "1") and "s_per_case" in r):  # in-process, each precision
                    a = label_agreement(Path(mine["output_dir"]), Path(nn["output_dir"]),
                                        ct_values if set_name == "ct" else None)
                    if a:
                        agreement.append({"set": set_name, "tta": tta, "ours": mine["label"], "nnunet": nn["label"],
                                          "precision": mine.get("computed_in"), **a})
    if args.nnunet_python and os.cpu_count() != args.threads:
        notes.append(f"thread counts differ: ours {args.threads}, nnU-Net {os.cpu_count()} (os.cpu_count(), which "
                     "ignores CPU affinity)")
    paths = save(complete=True, agreement=agreement)
    print(paths["md"].read_text())
    print(f"-> {', '.join(str(p) for p in paths.values())}")
    return 1 if any("error" in r for r in measured) else 0

if __name__ == "__main__":
    sys.exit(main())
