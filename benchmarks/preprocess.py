"""Preprocessing throughput and memory: cases/second and peak RSS per Dask worker.

Runs `pipeline.preprocessing.preprocess.run_preprocessing` (3d_fullres, the real planner's plans) into a fresh
temporary store for

* the Task04_Hippocampus training cases (208, small 1 mm MRI), in-process and with 1 and 2 Dask
  workers (LocalCluster: processes, one thread each, as `segpipe preprocess`),
* a scaled-up synthetic set written by this script: a few hippocampus cases upsampled to 256^3
  with spacings varied per case (0.5 mm +- 10%), so the planner's median target spacing makes
  every case resample (order 3 image, one-hot order 1 label) - the cost profile of a large CT/MRI.

Memory and CPU time are sampled by the harness (benchmarks/harness.py: VmRSS and user+system time
of every process in this process's tree, every 20 ms): peak per worker process and peak of the
whole tree (scheduler, nannies and workers included). With ``--with-nnunet VENV`` the same cases
go through ``nnUNetv2_preprocess -c 3d_fullres -np N`` of that venv, run as a child process measured
by `harness.run_command`: the raw data and plans come from ``--nnunet-ref`` (default
../nnunet_ref: raw/ and preprocessed/ with nnU-Net's own fingerprint and plans), a subset of
``--cases`` cases is linked into a scratch raw folder, and the output goes to a temporary folder so
nothing there is overwritten.

    .venv/bin/python benchmarks/preprocess.py [--cases 208] [--workers 1 2] [--synthetic-cases 4]
        [--with-nnunet ../nnunet_ref/venv] [--nnunet-ref ../nnunet_ref]

Writes benchmarks/results/preprocess.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import zoom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import (  # noqa: E402
    MIB,
    NNUNET_REF,
    RESULTS,
    SHARED,
    TreeSampler,
    bar_panel,
    machine_info,
    machine_line,
    python_env,
    run_command,
    subset_dataset,
    write_results,
)
from preprocess_vs_nnunet import DUMP as NNUNET_DUMP  # noqa: E402
from preprocess_vs_nnunet import to_store_frame  # noqa: E402

from pipeline.data.dataset import load_dataset, read_case  # noqa: E402
from pipeline.parallel import dask_client  # noqa: E402
from pipeline.planning.fingerprint import compute_fingerprint  # noqa: E402
from pipeline.planning.planner import plan_experiment  # noqa: E402
from pipeline.preprocessing.preprocess import run_preprocessing  # noqa: E402

CONFIG = "3d_fullres"


# ---------------------------------------------------------------- runs


def run_ours(dataset, plans, workers: int | None, tmp: Path) -> dict:
    """One run into a fresh store: workers None = in-process (sequential), else a LocalCluster."""
    store = tmp / f"store-{workers}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    if workers is None:
        with TreeSampler(os.getpid()) as sampler:
            start = time.perf_counter()
            report = run_preprocessing(dataset, plans, CONFIG, store, progress=False)
            seconds = time.perf_counter() - start
        worker_peaks = [sampler.peak_per_pid.get(os.getpid(), 0)]
    else:
        with dask_client(workers=workers) as client:
            worker_pids = sorted(client.run(os.getpid).values())
            client.run(lambda: __import__("pipeline.preprocessing.preprocess"))  # imports are not preprocessing time
            with TreeSampler(os.getpid()) as sampler:
                start = time.perf_counter()
                report = run_preprocessing(dataset, plans, CONFIG, store, client=client, progress=False)
                seconds = time.perf_counter() - start
            worker_peaks = [sampler.peak_per_pid.get(pid, 0) for pid in worker_pids]
    if report.failed:
        raise RuntimeError(str(report))
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    shutil.rmtree(store, ignore_errors=True)
    return {"tool": "seg-pipeline", "workers": workers or 0, "mode": "in-process" if workers is None else "dask",
            "cases": len(report.done), "seconds": seconds, "cases_per_s": len(report.done) / seconds,
            "cpu_s_per_case": sampler.cpu_seconds / max(1, len(report.done)),
            "peak_rss_per_worker_MiB": [p / MIB for p in worker_peaks],
            "peak_rss_tree_MiB": sampler.peak_tree / MIB, "store_MB": size / 1e6}


def run_cli(dataset, plans, workers: int, tmp: Path, inspect=None) -> dict:
    """`segpipe preprocess --workers N` as a user runs it (validation, Dask start-up, preprocessing, shutdown),
    measured by the harness as a child process: the end-to-end figure to set beside nnUNetv2_preprocess.
    `inspect(store_path)` runs on the store before it is deleted (the agreement check)."""
    wd = tmp / f"cli-{workers}"
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    plans.save(wd / "plans.json")  # so the command preprocesses only (no fingerprint / plan)
    data = subset_dataset(dataset.root, [c.case_id for c in dataset.cases], tmp / f"cli-data-{workers}")
    cmd = [sys.executable, "-m", "pipeline.cli", "preprocess", str(data), "--workdir", str(wd), "--config", CONFIG,
           "--workers", str(workers), "--json"]
    run = run_command(cmd, env=python_env())
    if not run.ok:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.error()})")
    cases = len(dataset.cases)
    size = sum(f.stat().st_size for f in (wd / "store.zarr").rglob("*") if f.is_file())
    workers_rss = [p["peak_rss_mib"] for p in run.top_processes if p["pid"] != run.pid and p["peak_rss_mib"] > 50]
    if inspect is not None:
        inspect(wd / "store.zarr")
    shutil.rmtree(wd, ignore_errors=True)
    return {"tool": "seg-pipeline", "workers": workers, "mode": f"segpipe preprocess --workers {workers} (CLI)",
            "cases": cases, "seconds": run.wall_s, "cases_per_s": cases / run.wall_s,
            "cpu_s_per_case": run.cpu_s / max(1, cases), "peak_rss_per_worker_MiB": sorted(workers_rss, reverse=True)[:workers],
            "peak_rss_tree_MiB": run.peak_rss_tree_mib, "store_MB": size / 1e6, "processes": run.processes}


def nnunet_subset_raw(raw: Path, dataset_name: str, case_ids: list[str], dest: Path) -> Path:
    """A raw folder holding only `case_ids` of `raw/dataset_name` (symlinks), so both tools see the same cases."""
    src, dst = raw / dataset_name, dest / dataset_name
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    meta = json.loads((src / "dataset.json").read_text())
    ending = meta.get("file_ending", ".nii.gz")
    for case in case_ids:
        for image in sorted((src / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            os.symlink(image, dst / "imagesTr" / image.name)
        os.symlink(src / "labelsTr" / f"{case}{ending}", dst / "labelsTr" / f"{case}{ending}")
    meta["numTraining"] = len(case_ids)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dest


def run_nnunet(venv: Path, dataset_id: int, dataset_name: str, workers: int, tmp: Path, raw: Path,
               ref: Path = NNUNET_REF, inspect=None) -> dict:
    """nnUNetv2_preprocess on the same raw data; plans and fingerprint copied into a scratch folder.

    The command runs as a child measured by the harness: its tree (the -np pool and the export
    processes nnU-Net starts afterwards) is sampled like our Dask workers.
    """
    pre = tmp / f"nnunet_pre-{workers}"
    shutil.rmtree(pre, ignore_errors=True)
    (pre / dataset_name).mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json", "nnUNetPlans.json"):
        shutil.copy(ref / "preprocessed" / dataset_name / name, pre / dataset_name / name)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(tmp / "nnunet_results"),
               PATH=f"{venv / 'bin'}:{os.environ['PATH']}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [str(venv / "bin" / "nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", CONFIG, "-np", str(workers)]
    run = run_command(cmd, env=env)
    if not run.ok:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.error()}):\n{run.stderr_tail[-2000:]}")
    out = pre / dataset_name / f"nnUNetPlans_{CONFIG}"
    cases = len(list(out.glob("*.pkl")))
    children = [p["peak_rss_mib"] for p in run.top_processes if p["pid"] != run.pid]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if inspect is not None:
        inspect(out)
    shutil.rmtree(pre, ignore_errors=True)
    return {"tool": "nnU-Net v2", "workers": workers, "mode": f"nnUNetv2_preprocess -np {workers}", "cases": cases,
            "seconds": run.wall_s, "cases_per_s": cases / run.wall_s, "cpu_s_per_case": run.cpu_s / max(1, cases),
            "peak_rss_per_worker_MiB": sorted(children, reverse=True)[:workers],
            "peak_rss_tree_MiB": run.peak_rss_tree_mib, "store_MB": size / 1e6, "processes": run.processes}


# ---------------------------------------------------------------- synthetic large cases


def make_large_dataset(source, root: Path, count: int, size: int, seed: int = 0) -> Path:
    """Hippocampus cases upsampled to size^3 (linear image, nearest label), spacing 0.5 mm +- 10%."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    training = []
    for i, case_files in enumerate(source.cases[:count]):
        case = read_case(source, case_files)
        factors = [size / n for n in case.label.shape]
        image = zoom(case.image[0], factors, order=1).astype(np.float32)
        label = zoom(case.label, factors, order=0).astype(np.uint8)
        spacing = 0.5 * (1 + rng.uniform(-0.1, 0.1, 3))
        affine = np.diag([*spacing, 1.0])
        name = f"large_{i:03d}.nii"
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": f"Synthetic{size}", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "anterior", "2": "posterior"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


# The TotalSegmentator CT case (122x101x30 at 3 mm, 41 labels) rebuilt at finer (in-plane, z) spacings:
# a CT dataset whose cases differ in spacing, so the planner's median target makes every case resample.
CT_SPACINGS = [(0.8, 1.5), (0.9, 2.0), (1.0, 1.25), (1.1, 2.5), (1.2, 1.5), (1.3, 3.0), (0.85, 2.0),
               (0.95, 1.75), (1.05, 2.25), (1.15, 1.25), (1.25, 2.0), (0.75, 2.5), (0.9, 1.5), (1.0, 3.0),
               (1.1, 1.75), (1.2, 2.25), (1.3, 1.5), (0.8, 2.75), (1.0, 2.0), (1.15, 3.0)]


def make_ct_dataset(root: Path, count: int = 20, nnunet_raw: Path | None = None) -> Path:
    """`count` CT volumes made from the TotalSegmentator case at the spacings of `CT_SPACINGS` (cycled)
    (image trilinear, labels nearest; RAS, .nii.gz, int16 HU); with `nnunet_raw`, the same files in
    nnU-Net v2's raw layout there (Dataset990_CTSpacings) for `nnUNetv2_preprocess`."""
    source = load_dataset(SHARED / "TotalSegmentator_CT")
    case = read_case(source, source.cases[0])
    image, label = np.asarray(case.image[0]), np.asarray(case.label)
    values = list(source.label_map.values)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    training = []
    for i in range(count):
        inplane, z = CT_SPACINGS[i % len(CT_SPACINGS)]
        spacing = np.array([inplane, inplane, z])
        factors = np.asarray(case.spacing) / spacing
        img = np.rint(zoom(image, factors, order=1)).astype(np.int16)
        lab = zoom(label, factors, order=0).astype(np.uint8)
        affine = np.diag([*spacing, 1.0])
        name = f"ct_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img, affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(lab, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = json.loads((SHARED / "TotalSegmentator_CT" / "dataset.json").read_text())
    meta.update(name="CTSpacings", training=training, numTraining=count)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    if nnunet_raw is not None:
        dst = nnunet_raw / "Dataset990_CTSpacings"
        shutil.rmtree(dst, ignore_errors=True)
        (dst / "imagesTr").mkdir(parents=True)
        (dst / "labelsTr").mkdir()
        for i in range(count):
            os.link(root / "imagesTr" / f"ct_{i:03d}.nii.gz", dst / "imagesTr" / f"ct_{i:03d}_0000.nii.gz")
            os.link(root / "labelsTr" / f"ct_{i:03d}.nii.gz", dst / "labelsTr" / f"ct_{i:03d}.nii.gz")
        names = source.labels
        (dst / "dataset.json").write_text(json.dumps({
            "name": "CTSpacings", "channel_names": {"0": "CT"}, "numTraining": count, "file_ending": ".nii.gz",
            "labels": {("background" if v == 0 else str(names.get(v, f"label_{v}"))): v for v in values}}, indent=1))
    return root


def nnunet_plan(venv: Path, dataset_id: int, dataset_name: str, raw: Path, dest: Path, workers: int) -> Path:
    """nnU-Net's own fingerprint and plans for a raw dataset (set-up, not timed); returns the
    reference folder `run_nnunet` copies them from (dest/preprocessed/<dataset_name>)."""
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(dest / "preprocessed"),
               nnUNet_results=str(dest / "results"), OMP_NUM_THREADS="1")
    for tool, extra in (("nnUNetv2_extract_fingerprint", ["-np", str(workers)]), ("nnUNetv2_plan_experiment", [])):
        subprocess.run([str(venv / "bin" / tool), "-d", str(dataset_id), *extra], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    shutil.copy(raw / dataset_name / "dataset.json", dest / "preprocessed" / dataset_name / "dataset.json")
    return dest


def save_store_cases(store: Path, folder: Path) -> None:
    """Each case's label and image (padding removed) as .npy, with its orientation and axis order."""
    from pipeline.preprocessing.store import open_store

    folder.mkdir(parents=True, exist_ok=True)
    root = open_store(store, "r")
    cs = root.config(root.config_names()[0])
    for cid in cs.case_ids():
        meta = cs.meta(cid)
        unpad = tuple(slice(a, a + n) for (a, _), n in zip(meta.pad, meta.shape_after_resample))
        np.save(folder / f"{cid}_label.npy", np.asarray(cs.label(cid)[unpad]))
        np.save(folder / f"{cid}_image.npy", np.asarray(cs.image(cid)[(slice(None), *unpad)]))
        (folder / f"{cid}.json").write_text(json.dumps({"ornt": np.asarray(meta.geometry.ornt).tolist(),
                                                        "transpose_forward": meta.transpose_forward}))


def save_nnunet_cases(python: Path, out: Path, folder: Path) -> None:
    """nnU-Net's preprocessed arrays (blosc2) as .npy, read in its own interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name[: -len(".pkl")] for p in out.glob("*.pkl"))
    subprocess.run([str(python), "-c", NNUNET_DUMP, str(out), str(folder), *cases], check=True)


# nnU-Net's own per-case preprocessing (what each nnUNetv2_preprocess worker runs), in its interpreter
NNUNET_RUN_CASE = """
import sys, json, numpy as np
from pathlib import Path
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
pre, raw, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
plans = PlansManager(str(pre / "nnUNetPlans.json"))
dataset_json = json.loads((pre / "dataset.json").read_text())
for case in sys.argv[4:]:
    data, seg, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(raw / "imagesTr" / f"{case}_0000.nii.gz")], str(raw / "labelsTr" / f"{case}.nii.gz"), plans,
        plans.get_configuration("3d_fullres"), dataset_json)
    np.save(out / f"{case}.npy", data.astype(np.float32))
    np.save(out / f"{case}_seg.npy", seg)
"""


def nnunet_ct_cases(python: Path, ct_ref: Path, raw: Path, folder: Path, case_ids: list[str]) -> Path:
    """nnU-Net's preprocessed CT cases as .npy in `folder`, kept between runs: the cases not there yet
    are made by its DefaultPreprocessor.run_case with the plans in `ct_ref` (the volumes are deterministic,
    so the reference is made once; the agreement check then needs only our side)."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [c for c in case_ids if not (folder / f"{c}_seg.npy").is_file()]
    if todo:
        subprocess.run([str(python), "-c", NNUNET_RUN_CASE, str(ct_ref / "preprocessed" / "Dataset990_CTSpacings"),
                        str(raw / "Dataset990_CTSpacings"), str(folder), *todo], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return folder


def agreement(ours: Path, theirs: Path, label_map) -> list[dict]:
    """Per case: same shape, labels equal voxel for voxel (share), image correlation."""
    rows = []
    for meta_file in sorted(ours.glob("*.json")):
        cid = meta_file.stem
        meta = json.loads(meta_file.read_text())
        ornt, tf = np.asarray(meta["ornt"]), meta["transpose_forward"]
        ours_lab = np.load(ours / f"{cid}_label.npy")
        row = {"case": cid, "ours_shape": list(ours_lab.shape)}
        if not (theirs / f"{cid}_seg.npy").is_file():
            rows.append({**row, "same_shape": False, "missing": "nnU-Net output"})
            continue
        seg = np.maximum(to_store_frame(np.load(theirs / f"{cid}_seg.npy")[0], ornt, tf), 0)
        seg = label_map.to_index(seg)
        row.update(nnunet_shape=list(seg.shape), same_shape=seg.shape == ours_lab.shape)
        if row["same_shape"]:
            differ = seg != ours_lab
            row["label_agreement"] = float(1 - differ.mean())
            row["label_voxels_differing"] = int(differ.sum())
            # our resampling keeps a class that no output voxel would get (README: "rescued"); nnU-Net drops it
            dropped = np.setdiff1d(np.unique(ours_lab), np.unique(seg))
            row["classes_nnunet_dropped"] = dropped.tolist()
            row["label_voxels_differing_not_rescued"] = int((differ & ~np.isin(ours_lab, dropped)).sum())
            img = np.load(ours / f"{cid}_image.npy").astype(np.float64)
            nn_img = np.stack([to_store_frame(c, ornt, tf) for c in np.load(theirs / f"{cid}.npy")]).astype(np.float64)
            row["image_r"] = float(np.corrcoef(img.ravel(), nn_img.ravel())[0, 1])
        rows.append(row)
    return rows


def ratios(runs: list[dict]) -> dict | None:
    """Ours (whole `segpipe preprocess` command) vs nnUNetv2_preprocess at equal workers: cases/s ratio per
    round (rows alternate ours, nnU-Net) and their median."""
    ours = [r for r in runs if "CLI" in r["mode"]]
    theirs = [r for r in runs if r["tool"] != "seg-pipeline"]
    if not ours or not theirs:
        return None
    per_round = [a["cases_per_s"] / b["cases_per_s"] for a, b in zip(ours, theirs)]
    cpu = [b["cpu_s_per_case"] / a["cpu_s_per_case"] for a, b in zip(ours, theirs)]
    return {"cases_per_s_ratio": per_round, "median": float(np.median(per_round)),
            "cpu_s_per_case_ratio": cpu, "cpu_median": float(np.median(cpu))}


# ---------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = ["# Preprocessing throughput (benchmarks/preprocess.py)", "",
             f"Machine: {machine_line(results['machine'])}. cases/s is "
             "wall-clock and suffers when the machine is shared; CPU s/case (user + system of every process "
             "of the run: workers, nannies, scheduler, client) does not. RSS = VmRSS of every process of the tree, "
             "sampled every 20 ms by benchmarks/harness.py; "
             "the in-process row's RSS includes the benchmark's own interpreter.", ""]
    for name, info in results["sets"].items():
        lines += [f"## {name}: {info['cases']} case(s), {info['description']}", "",
                  "| tool | mode | cases | seconds | cases/s | CPU s/case | peak RSS per worker (MiB) | peak RSS tree (MiB) | output MB |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in info["runs"]:
            per = ", ".join(f"{p:.0f}" for p in r["peak_rss_per_worker_MiB"])
            lines.append(f"| {r['tool']} | {r['mode']} | {r['cases']} | {r['seconds']:.1f} | {r['cases_per_s']:.2f} | "
                         f"{r['cpu_s_per_case']:.2f} | "
                         f"{per} | {r['peak_rss_tree_MiB']:.0f} | {r['store_MB']:.1f} |")
        lines.append("")
        if info.get("ratio_vs_nnunet"):
            rt = info["ratio_vs_nnunet"]
            lines += [f"Whole command, ours vs nnU-Net at equal workers: **{rt['median']:.2f}x** the cases/s (rounds: "
                      f"{', '.join(f'{x:.2f}' for x in rt['cases_per_s_ratio'])}); CPU s/case {rt['cpu_median']:.2f}x less.", ""]
        if info.get("nnunet_target_spacing"):
            lines += [f"Target spacing: nnU-Net's plan {[round(x, 4) for x in info['nnunet_target_spacing']]}, "
                      f"ours {[round(x, 4) for x in info['our_target_spacing']]} (store axis order).", ""]
        if info.get("agreement"):
            ag = info["agreement"]
            lines += [f"Agreement with nnU-Net's preprocessed cases: {ag['same_shape']}/{ag['cases']} same shape, "
                      f"labels identical voxel for voxel in {ag['labels_identical']}/{ag['same_shape']} "
                      f"(lowest share {ag['label_agreement_min']}); identical except the voxels of classes nnU-Net "
                      f"drops and we rescue (README, resampling) in {ag['labels_identical_but_rescued']}/"
                      f"{ag['same_shape']} ({ag['rescued_voxels']} voxels in all); image r >= {ag['image_r_min']}."
                      + (" nnU-Net's cases: its DefaultPreprocessor.run_case (what each nnUNetv2_preprocess worker runs) "
                         "with its own plans, kept from an earlier run (`--nnunet-ct-cases`)."
                         if info.get("agreement_reference") else ""), ""]
    if any(r["tool"] != "seg-pipeline" for info in results["sets"].values() for r in info["runs"]):
        lines += ["CLI and nnU-Net rows are whole commands measured from outside (start-up, workers and shutdown "
                  "included); the in-process and dask rows time `run_preprocessing` alone on a running cluster.", "",
                  "nnU-Net rows: per-worker RSS is the largest -np processes of its tree; its tree peak comes from "
                  "about 8 short-lived ~250 MiB processes it starts after the preprocessing pool has finished, "
                  "whatever -np (seen with ps), plus its ~400 MiB main process.", ""]
    return "\n".join(lines) + "\n"


CT_NAME = "CT at several spacings"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None, help="hippocampus cases (default: all 208)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-in-process", action="store_true")
    parser.add_argument("--no-dask", action="store_true", help="skip the in-cluster `run_preprocessing` rows")
    parser.add_argument("--no-cli", action="store_true",
                        help="skip the end-to-end `segpipe preprocess` rows (hippocampus, CT; one per --workers)")
    parser.add_argument("--skip-hippocampus", action="store_true", help="only the synthetic and CT sets")
    parser.add_argument("--synthetic-cases", type=int, default=4, help="0 to skip the large synthetic set")
    parser.add_argument("--synthetic-size", type=int, default=256)
    parser.add_argument("--ct-cases", type=int, default=0,
                        help="CT volumes rebuilt from the TotalSegmentator case at CT_SPACINGS (0: skip; the issue's set: 20)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the whole-command rows, ours and nnU-Net's alternating")
    parser.add_argument("--with-nnunet", type=Path, default=None, metavar="VENV",
                        help="also run nnUNetv2_preprocess from this venv (e.g. ../nnunet_ref/venv)")
    parser.add_argument("--nnunet-ref", type=Path, default=NNUNET_REF,
                        help="folder with nnU-Net's raw/ and preprocessed/ (plans, fingerprint) of Dataset004_Hippocampus")
    parser.add_argument("--nnunet-ct-ref", type=Path, default=None,
                        help="nnU-Net's fingerprint and plans of this script's CT set made earlier (a folder holding "
                             "preprocessed/Dataset990_CTSpacings): skips planning it again (the volumes are deterministic)")
    parser.add_argument("--nnunet-ct-cases", type=Path, default=None, metavar="DIR",
                        help="check CT agreement against nnU-Net's preprocessed cases kept in DIR (CASE.npy, CASE_seg.npy; "
                             "missing ones are made there first, needs --with-nnunet and --nnunet-ct-ref) instead of "
                             "timing nnUNetv2_preprocess on the CT set")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    results = {"machine": machine_info(), "load_average": [round(x, 1) for x in os.getloadavg()], "sets": {}}

    def save(final: bool = False) -> dict:  # after every row, so a run stopped early keeps what it measured
        results["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
        results["complete"] = final
        return write_results("preprocess", results, markdown(results), lambda nf: plot(results, nf), args.out)

    def add(info: dict, name: str, row: dict) -> None:
        row["load_average"] = [round(x, 2) for x in os.getloadavg()]
        info["runs"].append(row)
        info["ratio_vs_nnunet"] = ratios(info["runs"])
        save()
        print(f"{name}: {row['mode']}: {row['cases_per_s']:.2f} cases/s, {row['cpu_s_per_case']:.3f} CPU s/case, "
              f"peak RSS/worker {[round(p) for p in row['peak_rss_per_worker_MiB']]} MiB, "
              f"tree {row['peak_rss_tree_MiB']:.0f} MiB, load {row['load_average'][0]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp_name:
        tmp = Path(tmp_name)
        hippo = load_dataset(SHARED / "Task04_Hippocampus")
        if args.cases:
            hippo = replace(hippo, cases=hippo.cases[: args.cases])
        sets = [] if args.skip_hippocampus else [("Task04_Hippocampus", hippo, "real 1 mm MRI, about 36x50x35 voxels")]
        if args.synthetic_cases:
            large = load_dataset(make_large_dataset(hippo, tmp / "large", args.synthetic_cases, args.synthetic_size))
            sets.append((f"synthetic {args.synthetic_size}^3", large,
                         f"hippocampus upsampled to {args.synthetic_size}^3, spacing 0.5 mm +- 10% (every case resampled), .nii"))
        ct_ref = None
        if args.ct_cases:
            nn_raw = tmp / "nnunet_raw_ct" if args.with_nnunet else None
            ct = load_dataset(make_ct_dataset(tmp / "ct", args.ct_cases, nn_raw))
            sets.append((CT_NAME, ct, "the TotalSegmentator CT case (41 labels) rebuilt at in-plane 0.75-1.3 mm and "
                         "z 1.25-3 mm, .nii.gz int16; every case resampled"))
            if args.with_nnunet and args.nnunet_ct_ref:
                ct_ref = args.nnunet_ct_ref
            elif args.with_nnunet:
                ct_ref = nnunet_plan(args.with_nnunet, 990, "Dataset990_CTSpacings", nn_raw, tmp / "nnunet_ct_ref",
                                     max(args.workers))
        for name, dataset, description in sets:
            plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
            conf = plans.configuration(CONFIG)
            info = {"cases": len(dataset.cases), "description": description + f"; target spacing "
                    f"{[round(x, 3) for x in conf.spacing]}, patch {conf.patch_size}", "runs": []}
            results["sets"][name] = info
            if name == CT_NAME and ct_ref is not None:
                nn_plans = json.loads((ct_ref / "preprocessed" / "Dataset990_CTSpacings" / "nnUNetPlans.json").read_text())
                info["nnunet_target_spacing"] = nn_plans["configurations"][CONFIG]["spacing"]
                info["our_target_spacing"] = list(conf.spacing)
            if name != CT_NAME:
                modes = ([] if args.no_in_process else [None]) + ([] if args.no_dask else list(args.workers))
                for workers in modes:
                    add(info, name, run_ours(dataset, plans, workers, tmp))
            whole = name in ("Task04_Hippocampus", CT_NAME)
            for round_ in range(args.rounds if whole else 0):
                for workers in args.workers:
                    check = round_ == 0 and name == CT_NAME and (ct_ref is not None or args.nnunet_ct_cases is not None)
                    if not args.no_cli:
                        keep = (lambda store: save_store_cases(store, tmp / "ours_ct")) if check else None
                        add(info, name, run_cli(dataset, plans, workers, tmp, inspect=keep))
                    if args.with_nnunet and name == "Task04_Hippocampus":
                        raw = args.nnunet_ref / "raw"
                        if args.cases:  # the same cases as ours
                            raw = nnunet_subset_raw(raw, "Dataset004_Hippocampus", [c.case_id for c in dataset.cases],
                                                    tmp / "nnunet_raw_subset")
                        add(info, name, run_nnunet(args.with_nnunet, 4, "Dataset004_Hippocampus", workers, tmp, raw,
                                                   args.nnunet_ref))
                    if ct_ref is not None and name == CT_NAME and args.nnunet_ct_cases is None:
                        python = args.with_nnunet / "bin" / "python"
                        keep = (lambda out: save_nnunet_cases(python, out, tmp / "nnunet_ct")) if check else None
                        add(info, name, run_nnunet(args.with_nnunet, 990, "Dataset990_CTSpacings", workers, tmp,
                                                   tmp / "nnunet_raw_ct", ct_ref, inspect=keep))
                    if check and not args.no_cli:
                        theirs = tmp / "nnunet_ct"
                        if args.nnunet_ct_cases is not None:
                            theirs = nnunet_ct_cases(args.with_nnunet / "bin" / "python", ct_ref, tmp / "nnunet_raw_ct",
                                                     args.nnunet_ct_cases, [c.case_id for c in dataset.cases])
                            info["agreement_reference"] = str(args.nnunet_ct_cases)
                        rows = agreement(tmp / "ours_ct", theirs, dataset.label_map)
                        matched = [r for r in rows if r["same_shape"]]
                        info["agreement"] = {
                            "cases": len(rows), "same_shape": len(matched),
                            "labels_identical": sum(r["label_voxels_differing"] == 0 for r in matched),
                            "labels_identical_but_rescued": sum(r["label_voxels_differing_not_rescued"] == 0
                                                                for r in matched),
                            "rescued_voxels": sum(r["label_voxels_differing"] - r["label_voxels_differing_not_rescued"] for r in matched),
                            "label_agreement_min": min((r["label_agreement"] for r in matched), default=None),
                            "image_r_min": min((r["image_r"] for r in matched), default=None), "per_case": rows}
                        save()
                        print(f"{name}: agreement {json.dumps({k: v for k, v in info['agreement'].items() if k != 'per_case'})}")
    paths = save(final=True)
    print(f"-> {paths['md']}")
    return 0


def plot(results: dict, new_figure):
    """cases/s and peak RSS of the tree per run, one row of panels per case set."""
    sets = list(results["sets"].items())
    if not sets:
        return None
    fig, axes = new_figure(10, 3.4 * len(sets), len(sets), 2)
    for row, (name, info) in zip(axes, sets):
        labels = [f"{'ours' if r['tool'] == 'seg-pipeline' else 'nnU-Net'} "
                  f"{'in-process' if r['mode'] == 'in-process' else str(r['workers']) + ' w'}"
                  f"{' CLI' if 'CLI' in r['mode'] else ''}" for r in info["runs"]]
        colors = ["tab:blue" if r["tool"] == "seg-pipeline" else "tab:orange" for r in info["runs"]]
        bar_panel(row[0], labels, [r["cases_per_s"] for r in info["runs"]], ylabel="cases/s", colors=colors,
                  title=f"{name}: throughput")
        bar_panel(row[1], labels, [r["peak_rss_tree_MiB"] for r in info["runs"]], ylabel="MiB", colors=colors,
                  title="peak RSS of the whole process tree")
    return fig


if __name__ == "__main__":
    sys.exit(main())
