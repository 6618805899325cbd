"""Preprocessing throughput and memory: cases/second and peak RSS per Dask worker.

Runs `pipeline.preprocessing.run_preprocessing` (3d_fullres, the real planner's plans) into a fresh
temporary store for

* the Task04_Hippocampus training cases (208, small 1 mm MRI), in-process and with 1 and 2 Dask
  workers (LocalCluster: processes, one thread each, as `segpipe preprocess`),
* a scaled-up synthetic set written by this script: a few hippocampus cases upsampled to 256^3
  with spacings varied per case (0.5 mm +- 10%), so the planner's median target spacing makes
  every case resample (order 3 image, one-hot order 1 label) - the cost profile of a large CT/MRI.

Memory and CPU time are sampled in a thread every 100 ms from /proc/<pid>/status (VmRSS) for every process in
this process's tree: peak per worker process and peak of the whole tree (scheduler, nannies and
workers included). With ``--with-nnunet VENV`` the same data goes through ``nnUNetv2_preprocess
-c 3d_fullres -np N`` of that venv (the raw and plans folders of /work/nnunet_ref, preprocessed
output into a temporary folder so nothing there is overwritten).

    .venv/bin/python benchmarks/preprocess.py [--cases 208] [--workers 1 2] [--synthetic-cases 4]
        [--with-nnunet /work/nnunet_ref/venv]

Writes benchmarks/results/preprocess.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import zoom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.dataset import load_dataset, read_case  # noqa: E402
from pipeline.fingerprint import compute_fingerprint  # noqa: E402
from pipeline.parallel import dask_client  # noqa: E402
from pipeline.planning import plan_experiment  # noqa: E402
from pipeline.preprocessing import run_preprocessing  # noqa: E402

SHARED = Path(os.environ.get("SEGPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
NNUNET_REF = Path("/work/nnunet_ref")
CONFIG = "3d_fullres"


# ---------------------------------------------------------------- memory sampling


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of one process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class RssSampler:
    """Peak VmRSS per process and of the whole tree under `root`, and the tree's CPU time, sampled in a thread.

    CPU time is robust where wall-clock is not (a shared machine): it is summed over every process
    of the tree, counted from the start of the sampling, minus the sampler thread's own CPU.
    """

    def __init__(self, root: int, interval: float = 0.1):
        self.root, self.interval = root, interval
        self.peak_per_pid: dict[int, int] = {}
        self.peak_tree = 0
        self._cpu_start = {pid: _cpu_seconds(pid) or 0.0 for pid in _tree(root)}
        self._cpu_last: dict[int, float] = dict(self._cpu_start)
        self._own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total = 0
        for pid in _tree(self.root):
            rss = _rss_kib(pid)
            total += rss
            if rss > self.peak_per_pid.get(pid, 0):
                self.peak_per_pid[pid] = rss
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._cpu_last[pid] = cpu
        self.peak_tree = max(self.peak_tree, total)

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.is_set():
            self._sample()
            self._own_cpu = time.thread_time() - start
            self._stop.wait(self.interval)
        self._sample()
        self._own_cpu = time.thread_time() - start

    @property
    def cpu_seconds(self) -> float:
        used = sum(last - self._cpu_start.get(pid, 0.0) for pid, last in self._cpu_last.items())
        return used - self._own_cpu

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- runs


def run_ours(dataset, plans, workers: int | None, tmp: Path) -> dict:
    """One run into a fresh store: workers None = in-process (sequential), else a LocalCluster."""
    store = tmp / f"store-{workers}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    if workers is None:
        with RssSampler(os.getpid()) as sampler:
            start = time.perf_counter()
            report = run_preprocessing(dataset, plans, CONFIG, store, progress=False)
            seconds = time.perf_counter() - start
        worker_peaks = [sampler.peak_per_pid.get(os.getpid(), 0)]
    else:
        with dask_client(workers=workers) as client:
            worker_pids = sorted(client.run(os.getpid).values())
            client.run(lambda: __import__("pipeline.preprocessing"))  # imports are not preprocessing time
            with RssSampler(os.getpid()) as sampler:
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
            "peak_rss_per_worker_MiB": [p / 1024 for p in worker_peaks],
            "peak_rss_tree_MiB": sampler.peak_tree / 1024, "store_MB": size / 1e6}


def run_nnunet(venv: Path, dataset_id: int, dataset_name: str, workers: int, tmp: Path, raw: Path) -> dict:
    """nnUNetv2_preprocess on the same raw data; plans and fingerprint copied into a scratch folder."""
    pre = tmp / f"nnunet_pre-{workers}"
    shutil.rmtree(pre, ignore_errors=True)
    (pre / dataset_name).mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json", "nnUNetPlans.json"):
        shutil.copy(NNUNET_REF / "preprocessed" / dataset_name / name, pre / dataset_name / name)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(tmp / "nnunet_results"),
               PATH=f"{venv / 'bin'}:{os.environ['PATH']}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [str(venv / "bin" / "nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", CONFIG, "-np", str(workers)]
    with RssSampler(os.getpid()) as sampler:
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    out = pre / dataset_name / f"nnUNetPlans_{CONFIG}"
    cases = len(list(out.glob("*.pkl")))
    children = {pid: kib for pid, kib in sampler.peak_per_pid.items() if pid != os.getpid()}
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(pre, ignore_errors=True)
    return {"tool": "nnU-Net v2", "workers": workers, "mode": f"nnUNetv2_preprocess -np {workers}", "cases": cases,
            "seconds": seconds, "cases_per_s": cases / seconds, "cpu_s_per_case": sampler.cpu_seconds / max(1, cases),
            "peak_rss_per_worker_MiB": sorted((k / 1024 for k in children.values()), reverse=True)[:workers],
            "peak_rss_tree_MiB": sampler.peak_tree / 1024, "store_MB": size / 1e6}


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


# ---------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = ["# Preprocessing throughput (benchmarks/preprocess.py)", "",
             f"Machine: {results['machine']}; load average at start {results['load_average']}. cases/s is "
             "wall-clock and suffers when the machine is shared; CPU s/case (user + system of every process "
             "of the run: workers, nannies, scheduler, client) does not. RSS = VmRSS sampled every 100 ms; "
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
    if any(r["tool"] != "seg-pipeline" for info in results["sets"].values() for r in info["runs"]):
        lines += ["nnU-Net rows: per-worker RSS is the largest -np processes of its tree; its tree peak comes from "
                  "about 8 short-lived ~250 MiB processes it starts after the preprocessing pool has finished, "
                  "whatever -np (seen with ps), plus its ~400 MiB main process.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None, help="hippocampus cases (default: all 208)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-in-process", action="store_true")
    parser.add_argument("--skip-hippocampus", action="store_true", help="only the synthetic set")
    parser.add_argument("--synthetic-cases", type=int, default=4, help="0 to skip the large synthetic set")
    parser.add_argument("--synthetic-size", type=int, default=256)
    parser.add_argument("--with-nnunet", type=Path, default=None, metavar="VENV",
                        help="also run nnUNetv2_preprocess from this venv (e.g. /work/nnunet_ref/venv)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    results = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU(s), "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
               "load_average": [round(x, 1) for x in os.getloadavg()], "sets": {}}
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
        for name, dataset, description in sets:
            plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
            conf = plans.configuration(CONFIG)
            info = {"cases": len(dataset.cases), "description": description + f"; target spacing {conf.spacing}, "
                    f"patch {conf.patch_size}", "runs": []}
            modes = ([] if args.no_in_process else [None]) + list(args.workers)
            for workers in modes:
                row = run_ours(dataset, plans, workers, tmp)
                info["runs"].append(row)
                print(f"{name}: {row['mode']} {row['workers']} worker(s): {row['cases_per_s']:.2f} cases/s, "
                      f"{row['cpu_s_per_case']:.2f} CPU s/case, "
                      f"peak RSS/worker {[round(p) for p in row['peak_rss_per_worker_MiB']]} MiB, tree {row['peak_rss_tree_MiB']:.0f} MiB")
            if args.with_nnunet and name == "Task04_Hippocampus":
                raw = NNUNET_REF / "raw"
                if args.cases:
                    print("note: nnU-Net runs on all cases of its raw folder; use --cases only without --with-nnunet")
                for workers in args.workers:
                    row = run_nnunet(args.with_nnunet, 4, "Dataset004_Hippocampus", workers, tmp, raw)
                    info["runs"].append(row)
                    print(f"{name}: {row['mode']}: {row['cases_per_s']:.2f} cases/s, {row['cpu_s_per_case']:.2f} CPU s/case, "
                          f"peak RSS {[round(p) for p in row['peak_rss_per_worker_MiB']]} MiB, tree {row['peak_rss_tree_MiB']:.0f} MiB")
            results["sets"][name] = info
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocess.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "preprocess.md").write_text(markdown(results))
    print(f"-> {out / 'preprocess.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
