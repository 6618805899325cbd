"""Training-step throughput: forward + deep-supervised Dice+CE + backward + SGD, samples per second (CPU or CUDA).

The plan is nnU-Net's own 3d_fullres for Task04_Hippocampus (tests/reference/nnunet_v2_plans.json when
present, else the same values written below). Variants, each in its own subprocess run by the harness
(benchmarks/harness.py: timeout, peak RSS and CPU time of the worker) so that a slow `torch.compile`
cannot eat the budget: float32 default layout, channels_last_3d, bfloat16 autocast, torch.compile
(inductor), `amp` (CUDA: float16 autocast + GradScaler as nnU-Net trains; CPU: bfloat16 autocast) and
`amp_compile`. Also timed: one batch of nnU-Net-default augmentation (pipeline.augmentation).

`--device cuda` (benchmarks/gpu_suite.sh) runs the variants on the GPU, records the GPU's peak
memory per variant and writes `--name` (default gpu_train_step) instead of train_step.

Implementations are pluggable (`IMPLEMENTATIONS`): `seg-pipeline` is ours; `nnunet` builds
dynamic_network_architectures' PlainConvUNet with nnunetv2's DC_and_CE_loss + DeepSupervisionWrapper, and
needs an interpreter where those are installed: `--nnunet-python /path/to/venv/bin/python` adds it.

    .venv/bin/python benchmarks/train_step.py [--batch 2] [--budget 270] [--full-batch] [--nnunet-python PY]
        [--device cuda --variants fp32,amp,torch_compile,amp_compile --name gpu_train_step]

Per-sample cost on CPU is close to linear in the batch, so the variants run at a small batch (default 2)
to fit the time budget; `--full-batch` adds a float32 run at the plan's batch size (nnU-Net: 7).
Results: benchmarks/results/train_step.{json,md,png}. Timings on a shared 2-core machine are noisy: the
load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import RESULTS, bar_panel, machine_info, machine_line, python_env, run_command, write_results  # noqa: E402
REFERENCE = REPO / "tests" / "reference" / "nnunet_v2_plans.json"
FALLBACK_PLAN = {  # nnU-Net v2 3d_fullres, Task04_Hippocampus
    "patch_size": [40, 56, 40], "batch_size": 7, "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "features_per_stage": [32, 64, 128, 256], "n_conv_per_stage": 2,
}
NUM_CLASSES = 3  # background, anterior, posterior
NNUNET_NOTE_S_PER_IT = 13.3  # nnU-Net's own figure for this plan on this 2-core CPU, batch 7 (from the task notes)
VARIANTS = {
    "fp32": dict(memory_format="contiguous", autocast=None, compile=False),
    "channels_last_3d": dict(memory_format="channels_last_3d", autocast=None, compile=False),
    "bf16_autocast": dict(memory_format="contiguous", autocast="bfloat16", compile=False),
    "torch_compile": dict(memory_format="contiguous", autocast=None, compile=True),
    "amp": dict(memory_format="contiguous", autocast="amp", compile=False),
    "amp_compile": dict(memory_format="contiguous", autocast="amp", compile=True),
}
# seconds one variant may take (warm-up included) before it is reported as too slow; bf16 has no native
# kernels on AVX2-only CPUs and compile time alone can exceed the budget
VARIANT_CAP_S = {"fp32": 90.0, "channels_last_3d": 90.0, "bf16_autocast": 30.0, "torch_compile": 150.0, "amp": 30.0,
                 "amp_compile": 150.0}
CUDA_VARIANTS = "fp32,amp,torch_compile,amp_compile"


def load_plan() -> tuple[dict, str]:
    if REFERENCE.is_file():
        conf = json.loads(REFERENCE.read_text())["Task04_Hippocampus"]["configurations"]["3d_fullres"]
        n_conv = conf["n_conv_per_stage"]
        plan = {k: conf[k] for k in ("patch_size", "batch_size", "kernel_sizes", "strides", "features_per_stage")}
        plan["n_conv_per_stage"] = n_conv[0] if isinstance(n_conv, list) else n_conv
        return plan, str(REFERENCE.relative_to(REPO))
    return dict(FALLBACK_PLAN), "built-in copy of nnU-Net's Task04 3d_fullres plan"


# ------------------------------------------------------------------------------------------------
# implementations: each returns (network, loss_fn) for the plan


def _build_ours(plan: dict):
    from pipeline.losses import build_loss
    from pipeline.model import build_network
    from pipeline.plans import ConfigurationPlan

    conf = ConfigurationPlan(name="3d_fullres", **{k: v for k, v in plan.items() if k != "batch_size"})
    return build_network(conf, 1, NUM_CLASSES), build_loss("dice_ce")


def _build_nnunet(plan: dict):
    import numpy as np
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch import nn

    n = len(plan["strides"])
    net = PlainConvUNet(1, n, plan["features_per_stage"], nn.Conv3d, plan["kernel_sizes"], plan["strides"],
                        [plan["n_conv_per_stage"]] * n, NUM_CLASSES, [plan["n_conv_per_stage"]] * (n - 1), conv_bias=True,
                        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    net.apply(InitWeights_He(1e-2))
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2**i for i in range(n - 1)])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(loss, weights / weights.sum())

    def loss_fn(outputs, target):  # nnU-Net feeds a list of targets, downsampled by its data loader
        import torch.nn.functional as F

        t = target[:, None].float()
        targets = [F.interpolate(t, size=o.shape[2:], mode="nearest-exact") for o in outputs]
        return loss(outputs, targets)

    return net, loss_fn


IMPLEMENTATIONS = {"seg-pipeline": _build_ours, "nnunet": _build_nnunet}


# ------------------------------------------------------------------------------------------------
# worker: one (implementation, variant, batch) measurement, printed as one JSON line


def worker(impl: str, variant: str, batch: int, threads: int, min_time: float, max_steps: int,
           device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as nnU-Net
    plan, _ = load_plan()
    v = VARIANTS[variant]
    net, loss_fn = IMPLEMENTATIONS[impl](plan)
    fmt = torch.channels_last_3d if v["memory_format"] == "channels_last_3d" else torch.contiguous_format
    net = net.to(dev, memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    model = torch.compile(net) if v["compile"] else net
    x = torch.randn(batch, 1, *plan["patch_size"], device=dev).to(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (batch, *plan["patch_size"]), device=dev)
    if v["autocast"] == "amp":  # what training uses on each device
        dtype = torch.float16 if cuda else torch.bfloat16
    else:
        dtype = getattr(torch, v["autocast"]) if v["autocast"] else None
    scaler = torch.amp.GradScaler("cuda") if cuda and dtype == torch.float16 else None

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out, y)  # losses compute in float32
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        value = loss.item()
        if cuda:
            torch.cuda.synchronize()
        return value

    t0 = time.perf_counter()
    first_loss = step()  # includes oneDNN primitive creation / cuDNN autotuning / compilation
    first = time.perf_counter() - t0
    if cuda:
        step()  # cudnn.benchmark may still be choosing algorithms for the backward
        torch.cuda.reset_peak_memory_stats()
    times = []
    while len(times) < max_steps and (sum(times) < min_time or not times):
        t = time.perf_counter()
        last_loss = step()
        times.append(time.perf_counter() - t)
    s_per_step = sum(times) / len(times)
    out = {"impl": impl, "variant": variant, "batch": batch, "threads": threads, "device": device, **v,
           "autocast_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
           "first_step_s": round(first, 3), "steps_timed": len(times), "s_per_step": round(s_per_step, 4),
           "samples_per_s": round(batch / s_per_step, 4), "loss_first": round(first_loss, 4), "loss_last": round(last_loss, 4)}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["gpu_peak_mem_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


# ------------------------------------------------------------------------------------------------
# driver


def run_one(python: str, impl: str, variant: str, batch: int, threads: int, args, timeout: float) -> dict:
    """One worker process under the harness: its JSON line plus wall, CPU and peak RSS from outside."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", impl, variant, str(batch), "--device", args.device,
           "--threads", str(threads), "--min-time", str(args.min_time), "--max-steps", str(args.max_steps)]
    base = {"impl": impl, "variant": variant, "batch": batch, "threads": threads, "device": args.device}
    run = run_command(cmd, env=python_env(), cwd=REPO, timeout=max(1.0, timeout))
    if run.timed_out:
        return {**base, "error": f"warm-up + timed steps did not finish within {timeout:.0f} s"}
    if not run.ok or run.output is None:
        err = (run.stderr_tail.strip().splitlines() or ["no output"])[-1]
        return {**base, "error": err[:300]}
    return {**run.output, "wall_s": round(run.wall_s, 1), "cpu_s": round(run.cpu_s, 1),
            "peak_rss_mib": round(run.peak_rss_tree_mib, 1)}


def time_augmentation(plan: dict, batch: int, seconds: float = 5.0) -> list[dict]:
    import numpy as np
    import torch

    from pipeline.augmentation import AugmentationConfig, Augmenter

    rows = []
    image = np.random.default_rng(0).normal(size=(batch, 1, *plan["patch_size"])).astype(np.float32)
    label = np.random.default_rng(1).integers(0, NUM_CLASSES, (batch, *plan["patch_size"])).astype(np.uint8)
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, config in (("nnunet", AugmentationConfig.for_patch(plan["patch_size"])), ("light", AugmentationConfig.light())):
            aug, rng = Augmenter(config), np.random.default_rng(0)
            aug(image, label, rng)
            n, t = 0, time.perf_counter()
            while n < 30 and ((time.perf_counter() - t) < seconds or n == 0):
                aug(image, label, rng)
                n += 1
            rows.append({"config": name, "threads": threads, "batch": batch,
                         "ms_per_batch": round((time.perf_counter() - t) / n * 1000, 1)})
    torch.set_num_threads(before)
    return rows


def _native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 / AMX); without them bf16 convolutions are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def markdown(result: dict) -> str:
    device = result.get("device", "cpu")
    lines = [f"# Training step on {device.upper()} (forward + Dice/CE deep supervision + backward + SGD)", "",
             f"Plan: {result['plan_source']} — patch {result['plan']['patch_size']}, features "
             f"{result['plan']['features_per_stage']}, {len(result['plan']['strides'])} stages. "
             f"Machine: {machine_line(result['machine'])}; torch {result['machine']['torch']}. "
             f"Native bf16 instructions (CPU): {'yes' if result['machine']['native_bf16'] else 'no'}. "
             "Each row is one worker process run by benchmarks/harness.py (wall, CPU and peak RSS measured from outside).",
             "",
             "| impl | variant | batch | threads | s/step | samples/s | s/step scaled to batch 7 | first step s | peak RSS MiB "
             "| GPU peak MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['variant']} | {r['batch']} | {r['threads']} | – | – | – | – | – | – | {r['error']} |")
        else:
            lines.append(f"| {r['impl']} | {r['variant']} | {r['batch']} | {r['threads']} | {r['s_per_step']} | "
                         f"{r['samples_per_s']} | {r['s_per_step'] / r['batch'] * 7:.2f} | {r['first_step_s']} | "
                         f"{r.get('peak_rss_mib', '–')} | {r.get('gpu_peak_mem_mib', '–')} | {r['steps_timed']} steps timed |")
    if device == "cpu":
        lines += ["", f"nnU-Net's own figure for this plan on this CPU: {NNUNET_NOTE_S_PER_IT} s/iteration at batch 7 "
                  "(from the task notes); rows `nnunet` (with `--nnunet-python`) run nnU-Net's network and loss here, "
                  "side by side. bf16 without native instructions and torch.compile's first step (compilation) "
                  "may not fit their time caps."]
    if result.get("augmentation"):
        lines += ["", "## Augmentation (pipeline.augmentation, one batch, CPU)", "", "| config | threads | batch | ms/batch |",
                  "|---|---|---|---|"]
        lines += [f"| {a['config']} | {a['threads']} | {a['batch']} | {a['ms_per_batch']} |" for a in result["augmentation"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, new_figure):
    ok = [r for r in result["runs"] if "error" not in r]
    if not ok:
        return None
    fig, axes = new_figure(max(6.0, 1.1 * len(ok) + 2), 3.6)
    labels = [f"{'nnU-Net' if r['impl'] == 'nnunet' else 'ours'} {r['variant']} b{r['batch']} t{r['threads']}" for r in ok]
    colors = ["tab:orange" if r["impl"] == "nnunet" else "tab:blue" for r in ok]
    bar_panel(axes[0][0], labels, [r["samples_per_s"] for r in ok], ylabel="samples/s", colors=colors,
              title=f"training step throughput ({result.get('device', 'cpu')})")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--batch", type=int, default=None, help="batch size for the variant comparison (CPU 2, CUDA the plan's)")
    ap.add_argument("--full-batch", action="store_true", help="add a float32 run at the plan's batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for all training-step runs together")
    ap.add_argument("--min-time", type=float, default=10.0, help="time at least this long per variant (after warm-up)")
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--variants", default=None, help=f"comma-separated (default: CPU all but amp*, CUDA {CUDA_VARIANTS})")
    ap.add_argument("--nnunet-python", help="interpreter with nnunetv2 installed: adds nnU-Net's network + loss")
    ap.add_argument("--aug-seconds", type=float, default=5.0, help="time per augmentation setting (0: skip)")
    ap.add_argument("--name", default=None, help="result file name (default train_step; gpu_train_step on CUDA)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")

    if args.worker:
        impl, variant, batch = args.worker
        print(json.dumps(worker(impl, variant, int(batch), args.threads, args.min_time, args.max_steps, args.device)))
        return

    import torch

    machine = machine_info()
    plan, source = load_plan()
    args.batch = args.batch or (plan["batch_size"] if cuda else 2)
    variants = (args.variants or (CUDA_VARIANTS if cuda else "fp32,channels_last_3d,bf16_autocast,torch_compile")).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    start = time.perf_counter()
    jobs = [(sys.executable, "seg-pipeline", v, args.batch, args.threads) for v in variants]
    if args.threads != 1 and not cuda:  # on shared cores one thread can beat two: show both
        jobs.insert(1, (sys.executable, "seg-pipeline", "fp32", args.batch, 1))
    if args.nnunet_python:
        nn_threads = [args.threads] if cuda else sorted({args.threads, 1}, reverse=True)
        nn_variants = ["fp32", "amp"] if cuda else ["fp32"]
        jobs[1:1] = [(args.nnunet_python, "nnunet", v, args.batch, t) for v in nn_variants for t in nn_threads]
    if args.full_batch:
        jobs.append((sys.executable, "seg-pipeline", "fp32", plan["batch_size"], 1))
    runs = []
    for python, impl, variant, batch, threads in jobs:
        left = args.budget - (time.perf_counter() - start)
        if left < 5:
            runs.append({"impl": impl, "variant": variant, "batch": batch, "threads": threads, "error": "skipped: budget spent"})
            continue
        cap = VARIANT_CAP_S[variant] * (1 if cuda else max(1, batch / args.batch))
        r = run_one(python, impl, variant, batch, threads, args, min(left, cap))
        runs.append(r)
        print(json.dumps(r), flush=True)
    augmentation = time_augmentation(plan, plan["batch_size"], args.aug_seconds) if args.aug_seconds > 0 else []
    for a in augmentation:
        print(json.dumps(a))
    machine.update(torch=torch.__version__, native_bf16=_native_bf16())
    result = {
        "benchmark": args.name or ("gpu_train_step" if cuda else "train_step"), "device": args.device,
        "plan": plan, "plan_source": source, "num_classes": NUM_CLASSES,
        "machine": machine, "runs": runs, "augmentation": augmentation,
        "reference": {"nnunet_s_per_iteration_batch7": NNUNET_NOTE_S_PER_IT, "source": "task notes (not re-measured)"},
        "total_s": round(time.perf_counter() - start, 1),
    }
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    paths = write_results(result["benchmark"], result, markdown(result), lambda nf: plot(result, nf), args.out)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
