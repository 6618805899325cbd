"""How long does sliding-window inference take, and what do TTA and Zarr accumulation cost?

1. Task04_Hippocampus (../shared/data): the real plan (fingerprint + planner on the first cases),
   an untrained network of each measured configuration (timing does not depend on the weights),
   `predict_folder` over `--cases` held images: seconds per case with mirroring TTA on and off.
   Everything a user waits for is in it: reading, preprocessing, windows, export, writing.
2. A large synthetic volume (`--size`^3, 3 classes, patch 64^3): the sliding-window machinery
   alone (a 1x1x1 convolution as the network), accumulating in memory vs in a temporary Zarr
   array: seconds and the peak of Python-tracked memory (tracemalloc sees NumPy's buffers).

3. Network forward throughput (`--forward-variants`, e.g. fp32,amp,compile,amp_compile): windows/s
   of nnU-Net's 3d_fullres hippocampus plan as our network, in inference mode, by variant. This
   is the part a GPU changes (benchmarks/gpu_suite.sh runs it with `--device cuda`).

Wall seconds depend on what else runs on the machine, so CPU seconds (all threads of this
process) are recorded beside them, and the harness's tree sampler records the peak RSS.

    .venv/bin/python benchmarks/inference.py [--cases 4] [--configs 3d_lean,3d_fullres] [--size 192]
        [--device cuda] [--forward-variants fp32,amp,compile,amp_compile] [--name gpu_inference]

Writes benchmarks/results/inference.{json,md,png} (`--name` changes the file name).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import MIB, RESULTS, SHARED, Clock, TreeSampler, bar_panel, machine_info, machine_line, write_results  # noqa: E402

from pipeline.data.dataset import load_dataset  # noqa: E402
from pipeline.inference.predict import predict_folder  # noqa: E402
from pipeline.inference.sliding_window import accumulator_bytes, sliding_window_predict, window_slices  # noqa: E402
from pipeline.planning.fingerprint import compute_fingerprint  # noqa: E402
from pipeline.planning.planner import plan_experiment  # noqa: E402
from pipeline.training.loop import save_model_file  # noqa: E402
from pipeline.training.model import build_network  # noqa: E402
from pipeline.workdir import Workdir  # noqa: E402

FORWARD_VARIANTS = {"fp32": (False, False), "amp": (True, False), "compile": (False, True), "amp_compile": (True, True)}

def make_model(workdir: Path, dataset, configs: list[str], adjust=None):
    """Plans of `dataset` (changed in place by `adjust(plans)` when given) and a seeded untrained model per config."""
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    if adjust is not None:
        adjust(plans)
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


def bench_hippocampus(cases: int, configs: list[str], tmp: Path, device: str | None = None,
                      ttas: tuple[bool, ...] = (False, True)) -> list[dict]:
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
    warm_up = str(device or "").startswith("cuda")
    for config in configs:
        conf = plans.configuration(config)
        if warm_up:  # CUDA context, cuDNN autotuning and the first kernels: a one-time cost, not per case
            predict_folder(wd, inputs, tmp / f"warm_{config}", config=config, tta=False, progress=False, device=device)
        for tta in ttas:
            out = tmp / f"pred_{config}_{tta}"
            with Clock() as clock, TreeSampler() as sampler:
                report = predict_folder(wd, inputs, out, config=config, tta=tta, progress=False, device=device)
            per_case = list(report.seconds_per_case.values())
            rows.append({
                "config": config, "tta": tta, "cases": len(per_case), "patch_size": conf.patch_size,
                "features_per_stage": conf.features_per_stage,
                "seconds_per_case_mean": float(np.mean(per_case)), "seconds_per_case_max": float(np.max(per_case)),
                "cpu_seconds_per_case": clock.cpu / len(per_case), "wall_seconds_total": clock.wall,
                "peak_rss_mib": round(sampler.peak_tree / MIB, 1), "device": device or "auto", "warmed_up": warm_up,
            })
            print(f"hippocampus {config:10s} tta={tta!s:5s} {rows[-1]['seconds_per_case_mean']:.2f} s/case "
                  f"({rows[-1]['cpu_seconds_per_case']:.2f} CPU-s/case)")
    return rows


def bench_large(size: int, tmp: Path, device: str | None = None) -> list[dict]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, size, size, size)).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 1).to(device or "cpu")
    patch = (64, 64, 64)
    n_windows = len(window_slices(image.shape[1:], patch, 0.5))
    rows, results = [], {}
    for accumulate in ("memory", "zarr"):
        tracemalloc.start()
        with Clock() as clock:
            probs = sliding_window_predict(net, image, patch, 3, tta_mirror=False, batch_size=2,
                                           accumulate=accumulate, zarr_dir=tmp, device=device)
            labels = np.asarray(probs[...]).argmax(0) if accumulate == "memory" else None
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if accumulate == "zarr":
            from pipeline.data.labels import LabelMap
            from pipeline.inference.predictor import segment_chunked

            labels = segment_chunked(probs, LabelMap((0, 1, 2)))
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


def bench_forward(variants: list[str], device: str, batch: int, min_time: float, max_iters: int,
                  on_row=None) -> list[dict]:
    """Windows/s of the network alone (nnU-Net's 3d_fullres hippocampus plan, our PlainConvUNet), per variant.
    `on_row(rows)` is called after each variant (the caller saves what is measured so far)."""
    from train_step import NUM_CLASSES, _native_bf16, load_plan

    from pipeline.planning.plans import ConfigurationPlan
    from pipeline.training.model import build_network

    plan, _ = load_plan()
    conf = ConfigurationPlan(name="3d_fullres", **{k: v for k, v in plan.items() if k != "batch_size"})
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rows = []
    for variant in variants:
        amp, compiled = FORWARD_VARIANTS[variant]
        if amp and not cuda and not _native_bf16():
            rows.append({"variant": variant, "device": device,
                         "error": "skipped: this CPU has no native bf16 (emulated bf16 takes minutes per call)"})
            continue
        torch.manual_seed(0)
        net = build_network(conf, 1, NUM_CLASSES, deep_supervision=False).to(dev).eval()
        model = torch.compile(net) if compiled else net
        x = torch.randn(batch, 1, *plan["patch_size"], device=dev)
        dtype = (torch.float16 if cuda else torch.bfloat16) if amp else None

        def forward():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=amp):
                out = model(x)
            if cuda:
                torch.cuda.synchronize()
            return out

        try:
            t = time.perf_counter()
            forward()  # compilation / autotuning
            first = time.perf_counter() - t
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            while len(times) < max_iters and (sum(times) < min_time or not times):
                t = time.perf_counter()
                forward()
                times.append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001 - one variant failing (e.g. no compiler) must not lose the others
            rows.append({"variant": variant, "device": device, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        per = sum(times) / len(times)
        row = {"variant": variant, "device": device, "amp": amp, "compile": compiled, "batch": batch,
               "patch_size": plan["patch_size"], "first_call_s": round(first, 3), "iterations": len(times),
               "s_per_batch": round(per, 5), "windows_per_s": round(batch / per, 3)}
        if cuda:
            row["gpu_peak_mem_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        rows.append(row)
        print(f"forward {variant:12s} {row['windows_per_s']:.2f} windows/s (first call {first:.1f} s)")
        if on_row is not None:
            on_row(rows)
    return rows


def markdown(meta: dict, hippo: list[dict], large: list[dict], forward: list[dict]) -> str:
    lines = ["# Sliding-window inference", "",
             f"Device {meta['device']}, {meta['torch_threads']} torch thread(s). Machine: {machine_line(meta['machine'])}. "
             "Other work on the machine inflates wall seconds; CPU seconds count all threads of this process. "
             "Untrained networks of the real plans."]
    if hippo:
        lines += ["", "## Task04_Hippocampus, `predict_folder` seconds per case (read, preprocess, windows, export, write)", "",
                  "`wall s ÷ cases`: the folder's throughput. `s/case`: each case's own latency, reading started to "
                  "written; cases overlap, and windows of consecutive cases share forward passes, so a case may wait "
                  "for the next ones (latency above wall ÷ cases).", "",
                  "| config | patch | features | TTA | cases | wall s ÷ cases | s/case (mean) | s/case (max) | CPU-s/case "
                  "| peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in hippo:
            lines.append(f"| {r['config']} | {'x'.join(map(str, r['patch_size']))} | {r['features_per_stage']} | "
                         f"{'8 mirrorings' if r['tta'] else 'off'} | {r['cases']} | {r['wall_seconds_total'] / r['cases']:.3f} | "
                         f"{r['seconds_per_case_mean']:.2f} | {r['seconds_per_case_max']:.2f} | {r['cpu_seconds_per_case']:.2f} "
                         f"| {r['peak_rss_mib']:.0f} |")
        if str(hippo[0].get("device", "")).startswith("cuda") and not hippo[0].get("warmed_up"):
            lines += ["", "Measured without warm-up calls: each configuration's first row holds one-time costs (the "
                      "CUDA context in the first row, then cuDNN's and the kernels' first use for that network)."]
    if large:
        r0 = large[0]
        lines += ["", f"## Large synthetic volume {'x'.join(map(str, r0['shape'][1:]))}, 3 classes, patch 64^3, "
                  f"{r0['windows']} windows, 1x1x1 conv network (the machinery alone)", "",
                  "| accumulate | seconds | CPU-s | peak traced MiB | accumulators MiB |", "|---|---|---|---|---|"]
        for r in large:
            lines.append(f"| {r['accumulate']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                         f"{r['peak_traced_mib']:.0f} | {r['accumulator_mib']:.0f} |")
        lines += ["", f"Label agreement memory vs Zarr: {r0['label_agreement_memory_vs_zarr']:.6f}."]
    if forward:
        lines += ["", "## Network forward throughput (nnU-Net's 3d_fullres hippocampus plan, inference mode)", "",
                  "| variant | batch | windows/s | s/batch | first call s | GPU peak MiB | note |", "|---|---|---|---|---|---|---|"]
        for r in forward:
            if "error" in r:
                lines.append(f"| {r['variant']} | – | – | – | – | – | {r['error']} |")
            else:
                lines.append(f"| {r['variant']} | {r['batch']} | {r['windows_per_s']} | {r['s_per_batch']} | "
                             f"{r['first_call_s']} | {r.get('gpu_peak_mem_mib', '–')} | {r['iterations']} timed |")
    return "\n".join(lines) + "\n"


def plot(hippo: list[dict], forward: list[dict], new_figure):
    panels = [p for p in (hippo, [r for r in forward if "error" not in r]) if p]
    if not panels:
        return None
    fig, axes = new_figure(5 * len(panels), 3.6, 1, len(panels))
    i = 0
    if hippo:
        bar_panel(axes[0][i], [f"{r['config']} {'TTA' if r['tta'] else 'no TTA'}" for r in hippo],
                  [r["seconds_per_case_mean"] for r in hippo], ylabel="s/case", title="predict_folder, hippocampus")
        i += 1
    ok = [r for r in forward if "error" not in r]
    if ok:
        bar_panel(axes[0][i], [r["variant"] for r in ok], [r["windows_per_s"] for r in ok], ylabel="windows/s",
                  title=f"network forward ({ok[0]['device']})")
    return fig


def save(hippo: list[dict], large: list[dict], forward: list[dict], args, machine: dict) -> None:
    meta = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": args.device or "cpu",
            "torch": torch.__version__, "load_average": os.getloadavg(), "args": vars(args),
            "machine": {**machine, "load_after": [round(x, 2) for x in os.getloadavg()]}}
    result = {"meta": meta, "machine": meta["machine"], "device": meta["device"], "hippocampus": hippo, "large": large,
              "forward": forward}
    name = args.name or ("gpu_inference" if (args.device or "").startswith("cuda") else "inference")
    paths = write_results(name, result, markdown(meta, hippo, large, forward), lambda nf: plot(hippo, forward, nf), args.out)
    print(f"-> {paths['json']}, {paths['md']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4, help="hippocampus cases to predict (0: skip)")
    parser.add_argument("--configs", default="3d_lean,3d_fullres")
    parser.add_argument("--size", type=int, default=192, help="edge of the large synthetic volume (0: skip)")
    parser.add_argument("--tta", choices=("both", "on", "off"), default="both", help="mirroring TTA in predict_folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the pipeline's choice)")
    parser.add_argument("--forward-variants", default="", help=f"comma-separated from {', '.join(FORWARD_VARIANTS)} (empty: skip)")
    parser.add_argument("--forward-batch", type=int, default=2)
    parser.add_argument("--forward-min-time", type=float, default=5.0)
    parser.add_argument("--forward-max-iters", type=int, default=50)
    parser.add_argument("--name", default=None, help="result file name (default inference; gpu_inference on CUDA)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    variants = [v for v in args.forward_variants.split(",") if v]
    unknown = [v for v in variants if v not in FORWARD_VARIANTS]
    if unknown:
        parser.error(f"unknown forward variant(s) {unknown}")
    machine = machine_info()
    hippo, large, forward = [], [], []
    # saved after every part: a run cut off by a time limit (benchmarks/gpu_suite.sh) keeps what it measured
    with tempfile.TemporaryDirectory(prefix="segpipe_bench_inference_") as d:
        ttas = {"both": (False, True), "on": (True,), "off": (False,)}[args.tta]
        if args.cases:
            hippo = bench_hippocampus(args.cases, args.configs.split(","), Path(d), args.device, ttas)
            save(hippo, large, forward, args, machine)
        if args.size:
            large = bench_large(args.size, Path(d), args.device)
            save(hippo, large, forward, args, machine)
    if variants:
        forward = bench_forward(variants, args.device or "cpu", args.forward_batch, args.forward_min_time,
                                args.forward_max_iters, on_row=lambda rows: save(hippo, large, rows, args, machine))
    save(hippo, large, forward, args, machine)


if __name__ == "__main__":
    main()
