"""Can the Zarr patch loader keep a training worker fed? Patches/s made vs patches/s a train step consumes.

For each configuration (3d_lean with its light augmentation, 3d_fullres with nnU-Net's), as one
data-parallel worker of two on this machine would run it (rank 0's share of the batch, 1 torch
thread):
* loader: patches/s of `BatchSampler` alone (store reads + oversampling + augmentation, one thread);
* step: patches/s consumed by forward + deep-supervised loss + backward + optimizer step;
* end to end: iterations/s of the real loop (next batch, then step) with each prefetch mode -
  `none` (load in the loop), `thread` (one producer thread, queue of 2), `process` (DataLoader,
  1 worker process) - which is what decides the default on a 2-core machine.
Target: loader >= 5x the step's consumption. Results: benchmarks/results/loader.{json,md,png}.

    .venv/bin/python benchmarks/loader.py [--workdir W] [--batches 12] [--steps 3]

Without --workdir the 208 hippocampus cases are preprocessed into a temporary workdir first.
Timings on a shared machine are noisy: the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import SHARED, bar_panel, machine_info, machine_line, write_results  # noqa: E402

DATA = SHARED / "Task04_Hippocampus"


def build_workdir(root: Path, cases: int | None = None) -> Path:
    """plans.json + store.zarr (3d_fullres, shared by 3d_lean) of the first `cases` hippocampus cases (default all 208)."""
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment
    from pipeline.preprocessing.preprocess import run_preprocessing

    if not (DATA / "dataset.json").is_file():
        sys.exit(f"{DATA} not found")
    dataset = load_dataset(DATA)
    if cases:
        dataset = dataclasses.replace(dataset, cases=dataset.cases[:cases])
    plans = plan_experiment(compute_fingerprint(dataset, client=None, progress=False), dataset)
    plans.save(root / "plans.json")
    run_preprocessing(dataset, plans, "3d_fullres", root / "store.zarr", client=None, progress=sys.stderr.isatty())
    return root


def make_worker(workdir: Path, config: str, world: int = 2):
    """Network, loss, optimizer and batch specs exactly as `training._WorkerRun` builds them for rank 0."""
    from pipeline.planning.plans import Plans
    from pipeline.preprocessing.store import open_store
    from pipeline.training.augmentation import AugmentationConfig
    from pipeline.training.loop import RECIPES, TrainSettings, supervision_weights
    from pipeline.training.losses import DeepSupervisionLoss, build_loss
    from pipeline.training.model import build_network
    from pipeline.training.sampling import PatchSpec, foreground_slots

    plans = Plans.load(workdir / "plans.json")
    settings = TrainSettings(str(workdir), config=config, epochs=1).resolved(plans)
    recipe = RECIPES[settings.recipe]
    conf = plans.configuration(config)
    net = build_network(conf, len(plans.channels), len(plans.label_values))
    opt = (torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=0.99, nesterov=True)
           if recipe.optimizer == "sgd" else torch.optim.AdamW(net.parameters(), lr=recipe.lr))
    loss_fn = DeepSupervisionLoss(build_loss(recipe.loss, deep_supervision=False),
                                  supervision_weights(conf.num_stages - 1, ddp=world > 1))
    cases = tuple(open_store(workdir / "store.zarr", "r").config(conf.data_identifier).case_ids())
    patch = tuple(conf.patch_size)
    spec = PatchSpec(str(workdir / "store.zarr"), conf.data_identifier, cases, patch,
                     foreground_slots(int(conf.batch_size), rank=0, world_size=world),
                     augmentation=AugmentationConfig.for_patch(patch, recipe.augmentation).to_json())
    return net, opt, loss_fn, spec, recipe


def step(net, opt, loss_fn, batch, clip: float) -> None:
    image, label = batch
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(image), label)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()


def bench_config(workdir: Path, config: str, batches: int, steps: int) -> dict:
    from pipeline.training.sampling import BatchSampler, TrainBatches, batch_iterator, close_iterator

    torch.set_num_threads(1)
    net, opt, loss_fn, spec, recipe = make_worker(workdir, config)
    sampler = BatchSampler(spec)
    sampler.batch((0, 0, 0, 10_000))  # warm-up: imports, zarr metadata
    t, c = time.perf_counter(), time.process_time()
    made = [sampler.batch((0, 0, 0, i)) for i in range(batches)]
    load_s, load_cpu = (time.perf_counter() - t) / batches, (time.process_time() - c) / batches
    step(net, opt, loss_fn, made[0], recipe.grad_clip)  # warm-up
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(net, opt, loss_fn, made[(i + 1) % len(made)], recipe.grad_clip)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    b = spec.batch_size
    out = {"config": config, "recipe": recipe.name, "augmentation": recipe.augmentation, "patch": list(spec.patch_size),
           "crop": list(spec.crop_size()), "batch_per_rank": b, "cases": len(spec.case_ids),
           "loader_s_per_batch": round(load_s, 4), "loader_cpu_s_per_batch": round(load_cpu, 4),
           "loader_patches_per_s": round(b / load_s, 1), "step_s": round(step_s, 3),
           "step_patches_per_s": round(b / step_s, 2), "ratio": round(step_s / load_s, 1), "end_to_end_it_per_s": {}}
    for mode in ("none", "thread", "process"):
        it = batch_iterator(TrainBatches(spec, iterations_per_epoch=1000), mode, num_workers=1)
        step(net, opt, loss_fn, next(it), recipe.grad_clip)  # start-up (a process spawns) outside the timing
        t = time.perf_counter()
        for _ in range(steps):
            step(net, opt, loss_fn, next(it), recipe.grad_clip)
        out["end_to_end_it_per_s"][mode] = round(steps / (time.perf_counter() - t), 3)
        close_iterator(it)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a workdir with plans.json and store.zarr")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", default="3d_lean,3d_fullres")
    parser.add_argument("--build-only", action="store_true",
                        help="only preprocess the hippocampus cases into --workdir (a workdir other benchmarks share)")
    parser.add_argument("--cases", type=int, default=None, help="with --build-only: the first N cases (default all 208)")
    args = parser.parse_args()
    if args.build_only:
        if args.workdir is None:
            parser.error("--build-only needs --workdir")
        args.workdir.mkdir(parents=True, exist_ok=True)
        build_workdir(args.workdir, args.cases)
        print(f"-> {args.workdir}")
        return
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="segpipe-loader-bench-")
        args.workdir = build_workdir(Path(tmp.name))
    machine = machine_info()
    load_before = os.getloadavg()[0]
    rows = [bench_config(args.workdir, c, args.batches, args.steps) for c in args.configs.split(",")]
    result = {"cpus": len(os.sched_getaffinity(0)), "torch_threads": 1,
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)], "target_ratio": 5, "rows": rows,
              "machine": machine}
    lines = [f"# Patch loader vs train step ({result['cpus']} CPUs, 1 torch thread per worker as with 2 Ray workers; "
             f"load average {result['load_average'][0]} -> {result['load_average'][1]})", "",
             "| config | aug | batch/rank | crop | loader patches/s | loader CPU s/batch | step patches/s | "
             "loader / step | it/s none | it/s thread | it/s process |", "|" + " --- |" * 11]
    for r in rows:
        e = r["end_to_end_it_per_s"]
        lines.append(f"| {r['config']} | {r['augmentation']} | {r['batch_per_rank']} | {'x'.join(map(str, r['crop']))} "
                     f"| {r['loader_patches_per_s']} | {r['loader_cpu_s_per_batch']} | {r['step_patches_per_s']} "
                     f"| {r['ratio']}x | {e['none']} | {e['thread']} | {e['process']} |")
    lines += ["", "Target: loader >= 5x the step. `it/s` columns: the real loop (next batch + step) per prefetch mode.",
              "", f"Machine: {machine_line(machine | {'load_after': [round(x, 2) for x in os.getloadavg()]})}"]

    def plot(new_figure):
        fig, axes = new_figure(9, 3.4, 1, 2)
        labels = [r["config"] for r in rows]
        ax = axes[0][0]
        width = 0.38
        xs = range(len(rows))
        ax.bar([x - width / 2 for x in xs], [r["loader_patches_per_s"] for r in rows], width, label="loader makes")
        ax.bar([x + width / 2 for x in xs], [r["step_patches_per_s"] for r in rows], width, label="train step consumes")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.set_ylabel("patches/s (1 thread)")
        ax.legend(fontsize=8)
        ax.set_title("loader vs step", fontsize=10)
        modes = ["none", "thread", "process"]
        bar_panel(axes[0][1], [f"{r['config']} {m}" for r in rows for m in modes],
                  [r["end_to_end_it_per_s"][m] for r in rows for m in modes], ylabel="iterations/s",
                  title="real loop per prefetch mode")
        return fig

    write_results("loader", result, "\n".join(lines), plot)
    print("\n".join(lines))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
