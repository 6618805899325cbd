"""How close prediction's network stage runs to what this CPU can compute: the floor under
`segpipe predict`'s seconds per case.

One hippocampus model (our planner's 3d_fullres plan, equal to nnU-Net's; a seeded untrained network:
time does not depend on the weights) and the first `--cases` Task04 cases, prepared as `predict_folder`
prepares them. Measured in this process, each in the precision `segpipe predict --precision` names:

* the work: windows per case (`window_slices` over each prepared case, as prediction cuts them) and
  floating-point operations per window (torch's FlopCounterMode: 2 per multiply-add);
* the network stage as prediction runs it (`Predictor.stream_probabilities` over the prepared cases:
  batches across cases, forward lanes, accumulation, softmax) and the forward passes alone (the same
  batches and lanes, nothing else);
* what the CPU does at best in that precision: a large matrix product on one thread and on all of them
  (bfloat16 for mixed, float32 for fp32), the reference the convolutions' rate is compared with.

The network stage's seconds per case is what no pipelining can go below on this machine;
`benchmarks/results/predict_hippocampus.json` (same cases), when present, gives nnU-Net's s/case
beside it, so the best ratio this hardware allows is printed next to the one measured.

    python benchmarks/network_rate.py [--cases 60] [--precisions auto,fp32] [--threads 2] [--name network_rate]

Writes benchmarks/results/<name>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import RESULTS, SHARED, machine_info, machine_line, md_table, write_results  # noqa: E402

MATMUL_SIZE = 2048


def matmul_rate(dtype, threads: int, seconds: float = 1.5) -> float:
    """GFLOP/s of a MATMUL_SIZE² matrix product in `dtype` on `threads` torch threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
        b = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
        torch.mm(a, b)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            n += 1
        return 2 * MATMUL_SIZE**3 * n / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(old)


def forward_alone(predictor, per_forward: int, lanes: int, batches: int, amp: bool) -> float:
    """Seconds per window of `batches` forward passes of `per_forward` windows on `lanes` threads."""
    import torch

    from pipeline.inference.sliding_window import network_logits

    patch = tuple(predictor.config.patch_size)
    x = torch.randn(per_forward, len(predictor.plans.channels), *patch)
    net = predictor.network

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            for _ in range(n):
                network_logits(net, x)

    per_lane = max(1, torch.get_num_threads() // lanes)
    with ThreadPoolExecutor(lanes, initializer=torch.set_num_threads, initargs=(per_lane,)) as pool:
        list(pool.map(run, [1] * lanes))  # warm: oneDNN's kernels are chosen on the first pass
        start = time.perf_counter()
        list(pool.map(run, [batches // lanes] * lanes))
        return (time.perf_counter() - start) / (batches // lanes * lanes * per_forward)


def measure(wd, case_files, precision: str, rounds: int) -> dict:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.inference.predict import find_model
    from pipeline.inference.predictor import ModelSpec, Predictor, prepare_case
    from pipeline.inference.sliding_window import auto_batch_size, auto_lanes, pad_to_patch, window_slices
    from pipeline.precision import amp_for, uses_mixed_precision

    amp = uses_mixed_precision(amp_for(precision), torch.device("cpu"))
    spec = ModelSpec(run_dirs=tuple(str(r) for r in find_model(wd, "3d_fullres", [0], "final")), checkpoint="final",
                     tta=False, device="cpu", amp=amp_for(precision))
    predictor = Predictor.from_spec(spec)
    patch = tuple(predictor.config.patch_size)
    prepared = [prepare_case(predictor, case) for case in case_files]
    windows = sum(len(window_slices(pad_to_patch(np.asarray(p.image), patch)[0].shape[1:], patch, spec.step))
                  for p in prepared)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=amp), FlopCounterMode(display=False) as fc:
        predictor.network(torch.zeros(1, len(predictor.plans.channels), *patch))
    flop_per_window = fc.get_total_flops()
    per_forward = auto_batch_size(patch, "cpu", mirrored=False)
    lanes = auto_lanes("cpu", patch, per_forward)
    stage = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in predictor.stream_probabilities(((p, p.image) for p in prepared)):
            pass
        stage.append(time.perf_counter() - start)
    alone = [forward_alone(predictor, per_forward, lanes, max(lanes, 2 * (windows // per_forward // 2)), amp)
             for _ in range(rounds)]
    stage_s, window_s = min(stage), min(alone)
    cores = torch.get_num_threads()
    return {"precision": precision, "mixed": amp, "cases": len(prepared), "windows": windows, "patch": list(patch),
            "gflop_per_window": flop_per_window / 1e9, "per_forward": per_forward, "lanes": lanes, "threads": cores,
            "stage_s": stage_s, "stage_s_all": stage, "stage_s_per_case": stage_s / len(prepared),
            "stage_s_per_window": stage_s / windows, "stage_gflops_per_core": flop_per_window * windows / stage_s / 1e9 / cores,
            "forward_s_per_window": window_s, "forward_s_per_window_all": alone,
            "forward_gflops_per_core": flop_per_window / window_s / 1e9 / cores}


def nnunet_reference() -> dict:
    """nnU-Net's and our whole-command s/case on the same cases, from the last predict_hippocampus run."""
    path = RESULTS / "predict_hippocampus.json"
    if not path.is_file():
        return {}
    for row in json.loads(path.read_text()).get("comparisons", []):
        if row.get("set") == "hippocampus" and not row.get("tta") and "-npp 0" in str(row.get("nnunet", "")):
            return {"nnunet_sequential_s_per_case": row["nnunet_s_per_case"], "ours_s_per_case": row["ours_s_per_case"]}
    return {}


def markdown(result: dict) -> str:
    ref = result["nnunet"]
    rows = []
    for m in result["rows"]:
        peak = result["matmul_gflops_per_core"]["bfloat16" if m["mixed"] else "float32"]
        best = ref.get("nnunet_sequential_s_per_case")
        rows.append([m["precision"] + (" (bfloat16 convolutions)" if m["mixed"] else " (float32)"), m["windows"],
                     f"{m['gflop_per_window']:.1f}", f"{m['per_forward']} x {m['lanes']} lanes",
                     f"{m['forward_s_per_window'] * 1e3:.0f}", f"{m['forward_gflops_per_core']:.0f}",
                     f"{peak:.0f}", f"{100 * m['forward_gflops_per_core'] / peak:.0f}%",
                     f"{m['stage_s']:.2f} ({m['stage_s_per_case']:.3f}/case)",
                     f"{best / m['stage_s_per_case']:.2f}x" if best else None])
    lines = ["# The network's rate: the floor under prediction's s/case (benchmarks/network_rate.py)", "",
             machine_line(result["machine"]), "",
             f"Task04 hippocampus, first {result['rows'][0]['cases']} cases, 3d_fullres (nnU-Net's plan, patch "
             f"{result['rows'][0]['patch']}), no mirroring, {result['rows'][0]['threads']} torch threads; best of "
             f"{result['rounds']} rounds.", "",
             md_table(["precision", "windows", "GFLOP/window", "batch", "forward ms/window", "forward GFLOP/s per core",
                       f"{MATMUL_SIZE}² matmul GFLOP/s per core", "of the matmul rate",
                       "network stage s (per case)", "nnU-Net -npp 0 s/case / network stage s/case"], rows), "",
             f"Matrix product on all {result['rows'][0]['threads']} threads: "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["matmul_gflops_all"].items()) + ".", ""]
    if ref:
        lines += [f"From predict_hippocampus.json (same cases, whole commands, no mirroring): nnU-Net -npp 0 -nps 0 "
                  f"{ref.get('nnunet_sequential_s_per_case', float('nan')):.3f} s/case, ours in-process "
                  f"{ref.get('ours_s_per_case', float('nan')):.3f} s/case. The last column is the ratio the network stage "
                  "alone would give: the best any pipeline, with start-up, reading and export all hidden, can reach "
                  "with this network on this CPU.", ""]
    lines += ["* **forward**: the batches and lanes prediction uses (`auto_batch_size`, `auto_lanes`), passes only. "
              "**network stage**: `Predictor.stream_probabilities` over the prepared cases (the forward passes plus "
              "batching across cases, Gaussian weighting, accumulation and softmax), as `predict_folder` runs it.",
              "* **of the matmul rate**: the convolutions' rate against a large matrix product in the same precision "
              "on one thread, about the most one core computes.", "",
              f"Command: `{result['command']}`"]
    return "\n".join(lines)


def plot(result: dict, new_figure):
    from harness import bar_panel

    fig, axes = new_figure(7, 3.5)
    labels, values, colors = [], [], []
    for m in result["rows"]:
        dtype = "bfloat16" if m["mixed"] else "float32"
        labels += [f"{dtype} matmul", f"{dtype} network forward", f"{dtype} network stage"]
        values += [result["matmul_gflops_per_core"][dtype], m["forward_gflops_per_core"], m["stage_gflops_per_core"]]
        colors += ["#999999", "#1f77b4", "#ff7f0e"]
    bar_panel(axes[0][0], labels, values, ylabel="GFLOP/s per core", colors=colors,
              title="What one core computes: matrix product vs the 3d_fullres network")
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--precisions", default="auto,fp32", help="`segpipe predict --precision` values, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="network_rate")
    args = ap.parse_args(argv)
    root = SHARED / "Task04_Hippocampus"
    if not (root / "dataset.json").is_file():
        print(f"Task04_Hippocampus not found at {root}: nothing to measure")
        return 0
    import torch
    from predict import hippocampus_model_and_inputs

    from pipeline.data.dataset import load_dataset
    from pipeline.inference.predict import group_input_files

    torch.set_num_threads(args.threads)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="segpipe-network-rate-") as tmp:
        tmp = Path(tmp)
        dataset = load_dataset(root)
        wd, _ = hippocampus_model_and_inputs(dataset, args.cases, tmp)
        cases = group_input_files(tmp / "in", 1)
        rows = [measure(wd, cases, p, args.rounds) for p in args.precisions.split(",")]
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    result = {"rows": rows, "rounds": args.rounds, "machine": machine, "nnunet": nnunet_reference(),
              "matmul_gflops_per_core": {k: matmul_rate(v, 1) for k, v in dtypes.items()},
              "matmul_gflops_all": {k: matmul_rate(v, args.threads) for k, v in dtypes.items()},
              "command": "python benchmarks/network_rate.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    paths = write_results(args.name, result, markdown(result), lambda new_figure: plot(result, new_figure))
    print(markdown(result))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
