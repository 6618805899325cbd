"""How long does sliding-window inference take, and what do TTA and Zarr accumulation cost?

1. Task04_Hippocampus (../shared/data): the real plan (fingerprint + planner on the first cases),
   an untrained network of each measured configuration (timing does not depend on the weights),
   `predict_folder` over `--cases` held images: seconds per case with mirroring TTA on and off.
   Everything a user waits for is in it: reading, preprocessing, windows, export, writing.
2. A large synthetic volume (`--size`^3, 3 classes, patch 64^3): the sliding-window machinery
   alone (a 1x1x1 convolution as the network), accumulating in memory vs in a temporary Zarr
   array: seconds and the peak of Python-tracked memory (tracemalloc sees NumPy's buffers).

Wall seconds depend on what else runs on the machine, so CPU seconds (all threads of this
process) are recorded beside them.

    .venv/bin/python benchmarks/inference.py [--cases 4] [--configs 3d_lean,3d_fullres] [--size 192]

Writes benchmarks/results/inference.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.dataset import load_dataset  # noqa: E402
from pipeline.fingerprint import compute_fingerprint  # noqa: E402
from pipeline.inference import accumulator_bytes, predict_folder, sliding_window_predict, window_slices  # noqa: E402
from pipeline.model import build_network  # noqa: E402
from pipeline.planning import plan_experiment  # noqa: E402
from pipeline.training import save_model_file  # noqa: E402
from pipeline.workdir import Workdir  # noqa: E402

SHARED = Path(os.environ.get("SEGPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def make_model(workdir: Path, dataset, configs: list[str]):
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    wd = Workdir.at(workdir)
    plans.save(wd.plans)
    for config in configs:
        run_dir = wd.run_dir(config, "0")
        plans.save(run_dir / "plans.json")
        torch.manual_seed(0)
        net = build_network(plans.configuration(config), len(plans.channels), len(plans.label_values))
        save_model_file(run_dir / "model_final.pt", net, configuration=config, epoch=0, ema_dice=None,
                        num_input_channels=len(plans.channels), num_classes=len(plans.label_values),
                        label_values=list(plans.label_values), plans_hash=plans.hash(config))
    return wd, plans


def bench_hippocampus(cases: int, configs: list[str], tmp: Path) -> list[dict]:
    root = SHARED / "Task04_Hippocampus"
    if not (root / "dataset.json").is_file():
        print(f"skipping hippocampus: {root} not found")
        return []
    dataset = load_dataset(root)
    dataset = dataclasses.replace(dataset, cases=dataset.cases[:max(cases, 2)])
    wd, plans = make_model(tmp / "work", dataset, configs)
    inputs = tmp / "inputs"
    inputs.mkdir()
    for case in dataset.cases[:cases]:
        os.symlink(case.images[0], inputs / case.images[0].name)
    rows = []
    for config in configs:
        conf = plans.configuration(config)
        for tta in (False, True):
            out = tmp / f"pred_{config}_{tta}"
            with _Clock() as clock:
                report = predict_folder(wd, inputs, out, config=config, tta=tta, progress=False)
            per_case = list(report.seconds_per_case.values())
            rows.append({
                "config": config, "tta": tta, "cases": len(per_case), "patch_size": conf.patch_size,
                "features_per_stage": conf.features_per_stage,
                "seconds_per_case_mean": float(np.mean(per_case)), "seconds_per_case_max": float(np.max(per_case)),
                "cpu_seconds_per_case": clock.cpu / len(per_case), "wall_seconds_total": clock.wall,
            })
            print(f"hippocampus {config:10s} tta={tta!s:5s} {rows[-1]['seconds_per_case_mean']:.2f} s/case "
                  f"({rows[-1]['cpu_seconds_per_case']:.2f} CPU-s/case)")
    return rows


def bench_large(size: int, tmp: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, size, size, size)).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 1)
    patch = (64, 64, 64)
    n_windows = len(window_slices(image.shape[1:], patch, 0.5))
    rows, results = [], {}
    for accumulate in ("memory", "zarr"):
        tracemalloc.start()
        with _Clock() as clock:
            probs = sliding_window_predict(net, image, patch, 3, tta_mirror=False, batch_size=2,
                                           accumulate=accumulate, zarr_dir=tmp)
            labels = np.asarray(probs[...]).argmax(0) if accumulate == "memory" else None
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if accumulate == "zarr":
            from pipeline.inference import _argmax_chunked

            labels = _argmax_chunked(probs, np.uint8)
        results[accumulate] = labels
        del probs
        rows.append({"shape": list(image.shape), "patch_size": list(patch), "windows": n_windows,
                     "accumulate": accumulate, "seconds": clock.wall, "cpu_seconds": clock.cpu,
                     "peak_traced_mib": peak / 2**20,
                     "accumulator_mib": accumulator_bytes(3, image.shape[1:]) / 2**20})
        print(f"large {size}^3 {accumulate:6s} {clock.wall:.1f} s, peak traced {peak / 2**20:.0f} MiB")
    same = float(np.mean(results["memory"] == results["zarr"]))
    for r in rows:
        r["label_agreement_memory_vs_zarr"] = same
    return rows


def write_results(hippo: list[dict], large: list[dict], args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": "cpu",
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": os.getloadavg(), "args": vars(args)}
    (RESULTS / "inference.json").write_text(json.dumps({"meta": meta, "hippocampus": hippo, "large": large},
                                                       indent=2) + "\n")
    lines = ["# Sliding-window inference", "",
             f"CPU only, {meta['torch_threads']} torch thread(s) on {meta['cpu_count']} cores, load average "
             f"{meta['load_average'][0]:.1f} at the end (other work on the machine inflates wall seconds; "
             "CPU seconds count all threads of this process). Untrained networks of the real plans.", "",
             "## Task04_Hippocampus, `predict_folder` seconds per case (read, preprocess, windows, export, write)", "",
             "| config | patch | features | TTA | cases | s/case (mean) | s/case (max) | CPU-s/case |",
             "|---|---|---|---|---|---|---|---|"]
    for r in hippo:
        lines.append(f"| {r['config']} | {'x'.join(map(str, r['patch_size']))} | {r['features_per_stage']} | "
                     f"{'8 mirrorings' if r['tta'] else 'off'} | {r['cases']} | {r['seconds_per_case_mean']:.2f} | "
                     f"{r['seconds_per_case_max']:.2f} | {r['cpu_seconds_per_case']:.2f} |")
    if large:
        r0 = large[0]
        lines += ["", f"## Large synthetic volume {'x'.join(map(str, r0['shape'][1:]))}, 3 classes, patch 64^3, "
                  f"{r0['windows']} windows, 1x1x1 conv network (the machinery alone)", "",
                  "| accumulate | seconds | CPU-s | peak traced MiB | accumulators MiB |", "|---|---|---|---|---|"]
        for r in large:
            lines.append(f"| {r['accumulate']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                         f"{r['peak_traced_mib']:.0f} | {r['accumulator_mib']:.0f} |")
        lines += ["", f"Label agreement memory vs Zarr: {r0['label_agreement_memory_vs_zarr']:.6f}."]
    (RESULTS / "inference.md").write_text("\n".join(lines) + "\n")
    print(f"-> {RESULTS / 'inference.json'}, {RESULTS / 'inference.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--configs", default="3d_lean,3d_fullres")
    parser.add_argument("--size", type=int, default=192, help="edge of the large synthetic volume (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="segpipe_bench_inference_") as d:
        hippo = bench_hippocampus(args.cases, args.configs.split(","), Path(d))
        large = bench_large(args.size, Path(d)) if args.size else []
    write_results(hippo, large, args)


if __name__ == "__main__":
    main()
