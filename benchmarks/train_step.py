"""Training-step throughput: forward + deep-supervised Dice+CE + backward + grad clip + SGD, samples per second.

The plan is nnU-Net's own 3d_fullres for Task04_Hippocampus (tests/reference/nnunet_v2_plans.json when
present, else the same values written below). `seg-pipeline` is ours (pipeline.training.model + pipeline.training.losses,
exactly what training runs: on CPU the network computes channels-last); `nnunet` builds
dynamic_network_architectures' PlainConvUNet with nnunetv2's DC_and_CE_loss + DeepSupervisionWrapper and
needs an interpreter where those are installed: `--nnunet-python /path/to/venv/bin/python` adds it.

Why interleaved: the development machine has 2 shared cores whose load swings between 2 and 15, so two
figures measured a minute apart say more about the neighbours than about the code. Each contender runs
in its own long-lived worker process (started, built and warmed up once: oneDNN primitive creation,
cuDNN autotuning, compilation), and the driver then asks the workers for one step each in turn,
A B / B A / A B ... (the order alternates so that a load trend favours neither). Each round gives a ratio
of two steps taken seconds apart, and the report is the median ratio with its spread over the rounds.
Every worker also reports the CPU seconds its own process spent per step (`time.process_time`, all
threads); samples per CPU-second are much less sensitive to other processes than samples per second
(they still move somewhat: a busy machine shares caches and memory bandwidth, and with 2 threads an
OpenMP thread spins while its peer is descheduled). Both sides run with the same thread count
(torch.set_num_threads and OMP/MKL_NUM_THREADS).

Fairness: nnU-Net's deep-supervision targets are downsampled by its data loader (in background
processes), so its worker prepares them once, outside the timed step; ours are strided views taken
inside our loss, and are timed. Both sides clip the gradient norm at 12, as both trainers do.

Variants (ours; `fp32` also nnU-Net's): `fp32` each side's training default on this device;
`ncdhw` ours with channels-last switched off (the layout nnU-Net computes in, our previous default);
`channels_last_3d` weights and input converted as well; `bf16_autocast`; `torch_compile` (inductor;
its compilation is the first step, reported as `first step s`, not amortised into the rate); `amp`
(CUDA: float16 autocast + GradScaler as nnU-Net trains; CPU: bfloat16) and `amp_compile`. Variants
nnU-Net also has (CPU: fp32; CUDA: fp32, amp), and `ncdhw`, are interleaved with ours; the others run
alone afterwards, each under a time cap. Also timed: one batch of nnU-Net-default augmentation.

    .venv/bin/python benchmarks/train_step.py [--batch 2] [--threads 2] [--pairs 6] [--budget 280]
        [--full-batch] [--nnunet-python PY] [--device cuda --variants fp32,amp,torch_compile,amp_compile --name gpu_train_step]

Per-sample cost on CPU is close to linear in the batch, so the comparisons run at a small batch (default
2) at 1 thread and at `--threads`; `--full-batch` adds an interleaved comparison at the plan's batch size
(nnU-Net: 7). Results: benchmarks/results/train_step.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import (  # noqa: E402
    RESULTS,
    TreeSampler,
    _end_processes,
    bar_panel,
    fmt_spread,
    load_average,
    machine_info,
    machine_line,
    python_env,
    spread,
    write_results,
)

REFERENCE = REPO / "tests" / "reference" / "nnunet_v2_plans.json"
FALLBACK_PLAN = {  # nnU-Net v2 3d_fullres, Task04_Hippocampus
    "patch_size": [40, 56, 40], "batch_size": 7, "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "features_per_stage": [32, 64, 128, 256], "n_conv_per_stage": 2,
}
NUM_CLASSES = 3  # background, anterior, posterior
GRAD_CLIP = 12.0  # both trainers
NNUNET_NOTE_S_PER_IT = 13.3  # nnU-Net's own figure for this plan on this 2-core CPU, batch 7 (from the task notes)
VARIANTS = {
    "fp32": dict(memory_format="default", autocast=None, compile=False),
    "ncdhw": dict(memory_format="ncdhw", autocast=None, compile=False),
    "channels_last_3d": dict(memory_format="channels_last_3d", autocast=None, compile=False),
    "bf16_autocast": dict(memory_format="default", autocast="bfloat16", compile=False),
    "torch_compile": dict(memory_format="default", autocast=None, compile=True),
    "amp": dict(memory_format="default", autocast="amp", compile=False),
    "amp_compile": dict(memory_format="default", autocast="amp", compile=True),
}
# seconds one variant may take alone (start, warm-up and timed steps) before it is reported as too slow;
# bf16 has no native kernels on AVX2-only CPUs and compile time alone can exceed the budget
VARIANT_CAP_S = {"fp32": 90.0, "ncdhw": 90.0, "channels_last_3d": 90.0, "bf16_autocast": 30.0, "torch_compile": 150.0,
                 "amp": 30.0, "amp_compile": 150.0}
START_CAP_S = 120.0  # a worker's start: imports, build, warm-up step (compiling variants: their cap)
CUDA_VARIANTS = "fp32,amp,torch_compile,amp_compile"
CPU_VARIANTS = "fp32,ncdhw,bf16_autocast,torch_compile"


def load_plan() -> tuple[dict, str]:
    if REFERENCE.is_file():
        conf = json.loads(REFERENCE.read_text())["Task04_Hippocampus"]["configurations"]["3d_fullres"]
        n_conv = conf["n_conv_per_stage"]
        plan = {k: conf[k] for k in ("patch_size", "batch_size", "kernel_sizes", "strides", "features_per_stage")}
        plan["n_conv_per_stage"] = n_conv[0] if isinstance(n_conv, list) else n_conv
        return plan, str(REFERENCE.relative_to(REPO))
    return dict(FALLBACK_PLAN), "built-in copy of nnU-Net's Task04 3d_fullres plan"


# ------------------------------------------------------------------------------------------------
# implementations: each returns (network, loss_fn(outputs, target), prepare_target(label)); what
# prepare_target does happens once, outside the timed step (a data loader's work)


def _build_ours(plan: dict, variant: str):
    from pipeline.planning.plans import ConfigurationPlan
    from pipeline.training.losses import build_loss
    from pipeline.training.model import build_network

    conf = ConfigurationPlan(name="3d_fullres", **{k: v for k, v in plan.items() if k != "batch_size"})
    net = build_network(conf, 1, NUM_CLASSES, channels_last_cpu=VARIANTS[variant]["memory_format"] != "ncdhw")
    return net, build_loss("dice_ce"), lambda y: y


def _build_nnunet(plan: dict, variant: str):
    import numpy as np
    import torch.nn.functional as F
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
    cum = np.cumprod(np.asarray(plan["strides"]), axis=0)[:-1]

    def targets(label):  # nnU-Net's DownsampleSegForDSTransform: one target per output, nearest
        t = label[:, None].float()
        return [F.interpolate(t, size=[p // int(s) for p, s in zip(plan["patch_size"], c)], mode="nearest-exact")
                for c in cum]

    return net, loss, targets


IMPLEMENTATIONS = {"seg-pipeline": _build_ours, "nnunet": _build_nnunet}


# ------------------------------------------------------------------------------------------------
# worker: one (implementation, variant, batch, threads) kept alive; steps on request


def serve(impl: str, variant: str, batch: int, threads: int, device: str = "cpu") -> None:
    """Build, warm up, print a `ready` JSON line; then one JSON line per `step` read from stdin until `quit`."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as nnU-Net
    plan, _ = load_plan()
    v = VARIANTS[variant]
    net, loss_fn, prepare_target = IMPLEMENTATIONS[impl](plan, variant)
    fmt = torch.channels_last_3d if v["memory_format"] == "channels_last_3d" else torch.contiguous_format
    net = net.to(dev, memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    model = torch.compile(net) if v["compile"] else net
    x = torch.randn(batch, 1, *plan["patch_size"], device=dev).to(memory_format=fmt)
    target = prepare_target(torch.randint(0, NUM_CLASSES, (batch, *plan["patch_size"]), device=dev))
    if v["autocast"] == "amp":  # what training uses on each device
        dtype = torch.float16 if cuda else torch.bfloat16
    else:
        dtype = getattr(torch, v["autocast"]) if v["autocast"] else None
    scaler = torch.amp.GradScaler("cuda") if cuda and dtype == torch.float16 else None

    def step() -> dict:
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        # the loss inside autocast, as both trainers compute it (ours: pipeline.training.loop; nnU-Net's
        # train_step): outside it, nnU-Net's Dice sums float16 probabilities and overflows to NaN
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
            loss = loss_fn(out, target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        value = loss.item()
        if cuda:
            torch.cuda.synchronize()
        return {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "loss": value}

    def say(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    first = step()  # oneDNN primitive creation / cuDNN autotuning / compilation
    if cuda:
        step()  # cudnn.benchmark may still be choosing algorithms for the backward
        torch.cuda.reset_peak_memory_stats()
    say({"event": "ready", "first_step_s": round(first["wall_s"], 3), "loss_first": round(first["loss"], 4),
         "torch_threads": torch.get_num_threads()})
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        n = int(command[1]) if len(command) > 1 else 1
        steps = [step() for _ in range(n)]
        say({"event": "step", "steps": n, "wall_s": sum(s["wall_s"] for s in steps) / n,
             "cpu_s": sum(s["cpu_s"] for s in steps) / n, "loss": steps[-1]["loss"]})
    done = {"event": "done"}
    if cuda:
        done["gpu"] = torch.cuda.get_device_name(dev)
        done["gpu_peak_mem_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    say(done)


# ------------------------------------------------------------------------------------------------
# driver side of a worker


class WorkerError(RuntimeError):
    pass


class Worker:
    """A `--serve` process: JSON lines in, one command line out per request; sampled from outside for
    peak RSS and CPU (benchmarks/harness.py's TreeSampler)."""

    def __init__(self, python: str, impl: str, variant: str, batch: int, threads: int, device: str):
        self.impl, self.variant, self.batch, self.threads, self.device = impl, variant, batch, threads, device
        cmd = [python, str(Path(__file__).resolve()), "--serve", impl, variant, str(batch), "--device", device,
               "--threads", str(threads)]
        env = python_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        self.sampler = TreeSampler(self.proc.pid, from_birth=True).start()
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.ready: dict = {}
        self.steps: list[dict] = []
        self.done: dict = {}

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    self.lines.put(json.loads(line))
        self.lines.put(None)  # end of output

    def _read_err(self) -> None:
        for line in iter(self.proc.stderr.readline, ""):
            self.stderr.append(line)
            del self.stderr[:-50]

    def _next(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=max(0.1, timeout))
        except queue.Empty:
            raise WorkerError(f"no answer within {timeout:.0f} s") from None
        if msg is None:
            tail = [s.strip() for s in self.stderr if s.strip()]
            raise WorkerError((tail or ["worker exited without output"])[-1][:300])
        return msg

    def wait_ready(self, timeout: float) -> dict:
        self.ready = self._next(timeout)
        return self.ready

    def step(self, timeout: float, n: int = 1) -> dict:
        try:
            self.proc.stdin.write(f"step {n}\n")
            self.proc.stdin.flush()
        except OSError:  # the worker has gone: say why
            self._next(5.0)
            raise WorkerError("worker exited") from None
        msg = self._next(timeout)
        self.steps.append(msg)
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        with contextlib.suppress(WorkerError):
            msg = self._next(10.0)
            if msg.get("event") == "done":
                self.done = msg
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _end_processes(list(self.sampler.start_times.items()))
            self.proc.wait()
        self.sampler.stop()

    def kill(self) -> None:
        _end_processes(list(self.sampler.start_times.items()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.sampler.stop()

    def row(self) -> dict:
        """The result row: medians over the timed steps, with their spread."""
        v = VARIANTS[self.variant]
        row = {"impl": self.impl, "variant": self.variant, "batch": self.batch, "threads": self.threads,
               "device": self.device, **v}
        walls = [s["wall_s"] for s in self.steps]
        cpus = [s["cpu_s"] for s in self.steps]
        if not walls:
            return row
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        row.update({
            "first_step_s": self.ready.get("first_step_s"), "steps_timed": sum(s["steps"] for s in self.steps),
            "s_per_step": round(wall, 4), "samples_per_s": round(self.batch / wall, 4),
            "cpu_s_per_step": round(cpu, 4), "samples_per_cpu_s": round(self.batch / cpu, 4),
            "samples_per_s_spread": spread([self.batch / w for w in walls]),
            "samples_per_cpu_s_spread": spread([self.batch / c for c in cpus]),
            "loss_first": self.ready.get("loss_first"), "loss_last": round(self.steps[-1]["loss"], 4),
            "peak_rss_mib": round(self.sampler.peak_tree / 2**20, 1), "worker_cpu_s": round(self.sampler.cpu_seconds, 1),
            "wall_s": round(time.perf_counter() - self.started, 1),
        })
        row.update({k: self.done[k] for k in ("gpu", "gpu_peak_mem_mib") if k in self.done})
        if loss_problem(row):
            row["loss_problem"] = loss_problem(row)
        return row


def loss_problem(row: dict) -> str | None:
    """Why a row's timing is not a training step's, or None: a non-finite loss makes GradScaler skip the
    optimizer step (and says the numbers overflowed), so such a row is not comparable with a finite one."""
    if "s_per_step" not in row:  # no timed steps: nothing to qualify
        return None
    # a timed row always has both losses; the result JSON stores a non-finite one as null
    losses = [row.get(k) for k in ("loss_first", "loss_last")]
    if all(v is not None and math.isfinite(v) for v in losses):
        return None
    shown = ", ".join("NaN/inf" if v is None or not math.isfinite(v) else str(v) for v in losses)
    return f"loss not finite (first, last: {shown}): optimizer steps skipped, not a full training step, not comparable"


def _error_row(impl: str, variant: str, batch: int, threads: int, device: str, error: str) -> dict:
    return {"impl": impl, "variant": variant, "batch": batch, "threads": threads, "device": device, "error": error}


def _start(contenders, batch: int, threads: int, device: str, deadline: float) -> tuple[list[Worker], list[dict]]:
    """Start the workers one after another (their warm-ups never overlap); those that fail become error rows."""
    workers, errors = [], []
    for python, impl, variant in contenders:
        left = deadline - time.perf_counter()
        if left < 5:
            errors.append(_error_row(impl, variant, batch, threads, device, "skipped: budget spent"))
            continue
        cap = max(START_CAP_S, VARIANT_CAP_S[variant]) if VARIANTS[variant]["compile"] else START_CAP_S
        w = Worker(python, impl, variant, batch, threads, device)
        try:
            w.wait_ready(min(left, cap))
            workers.append(w)
        except WorkerError as exc:
            w.kill()
            errors.append(_error_row(impl, variant, batch, threads, device, f"start/warm-up: {exc}"))
    return workers, errors


def compare(contenders, batch: int, threads: int, device: str, rounds: int, block: int, deadline: float
            ) -> tuple[list[dict], dict | None]:
    """Interleaved rounds over `contenders` [(python, impl, variant)], ours first. Returns their rows and the
    comparison record (per-round ratios of every other contender's step time to ours)."""
    load_before = load_average()
    workers, rows = _start(contenders, batch, threads, device, deadline)
    record = None
    try:
        done_rounds, round_s = 0, 0.0
        while workers and done_rounds < rounds:
            if done_rounds and time.perf_counter() + 1.2 * round_s > deadline:
                break
            t = time.perf_counter()
            order = workers if done_rounds % 2 == 0 else workers[::-1]
            for w in order:
                w.step(timeout=max(5.0, deadline - time.perf_counter() + 60), n=block)
            round_s = time.perf_counter() - t
            done_rounds += 1
    except WorkerError as exc:
        rows.append({"error": f"during the interleaved steps: {exc}"})
    finally:
        for w in workers:
            w.close()
    ours = next((w for w in workers if w.impl == "seg-pipeline" and w.variant == contenders[0][2]), None)
    if ours is not None and ours.steps:
        record = {"variant": ours.variant, "batch": batch, "threads": threads, "device": device,
                  "rounds": len(ours.steps), "steps_per_turn": block, "load_before": load_before,
                  "load_after": load_average(), "versus": []}
        for w in workers:
            if w is ours or not w.steps:
                continue
            wall = [o["wall_s"] and b["wall_s"] / o["wall_s"] for o, b in zip(ours.steps, w.steps)]
            cpu = [o["cpu_s"] and b["cpu_s"] / o["cpu_s"] for o, b in zip(ours.steps, w.steps)]
            record["versus"].append({"impl": w.impl, "variant": w.variant, "rounds": len(wall),
                                     "ratio_samples_per_s": spread(wall), "ratio_samples_per_cpu_s": spread(cpu),
                                     "ratios_wall": [round(r, 4) for r in wall], "ratios_cpu": [round(r, 4) for r in cpu]})
    rows = [w.row() for w in workers] + rows
    return rows, record


def alone(python: str, impl: str, variant: str, batch: int, threads: int, device: str, min_time: float,
          max_steps: int, deadline: float) -> dict:
    """One worker: start, then steps until `min_time` of timed steps or `max_steps`, within `deadline`."""
    workers, errors = _start([(python, impl, variant)], batch, threads, device, deadline)
    if not workers:
        return errors[0]
    w = workers[0]
    try:
        spent = 0.0
        while len(w.steps) < max(1, max_steps) and (spent < min_time or not w.steps):
            left = deadline - time.perf_counter()
            if w.steps and left < 1.2 * w.steps[-1]["wall_s"]:
                break
            spent += w.step(timeout=max(5.0, left))["wall_s"]
    except WorkerError as exc:
        w.kill()
        return _error_row(impl, variant, batch, threads, device,
                          f"steps did not finish within the cap ({exc})" if "no answer" in str(exc) else str(exc))
    w.close()
    return w.row()


# ------------------------------------------------------------------------------------------------
# report


def time_augmentation(plan: dict, batch: int, seconds: float = 5.0) -> list[dict]:
    import numpy as np
    import torch

    from pipeline.training.augmentation import AugmentationConfig, Augmenter

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


def _label(impl: str, variant: str) -> str:
    return f"{'nnU-Net' if impl == 'nnunet' else 'ours'} {variant}"


def _x(s: dict | None) -> str:
    """'1.52x (1.31-1.70, IQR 1.45-1.58)'."""
    if not s or s.get("median") is None:
        return "–"
    text = f"{s['median']:.2f}x"
    if s["n"] > 1:
        text += f" ({s['min']:.2f}-{s['max']:.2f}, IQR {s['q1']:.2f}-{s['q3']:.2f})"
    return text


def markdown(result: dict) -> str:
    device = result.get("device", "cpu")
    lines = [f"# Training step on {device.upper()} (forward + Dice/CE deep supervision + backward + grad clip + SGD)", "",
             f"Plan: {result['plan_source']} — patch {result['plan']['patch_size']}, features "
             f"{result['plan']['features_per_stage']}, {len(result['plan']['strides'])} stages. "
             f"Machine: {machine_line(result['machine'])}; torch {result['machine']['torch']}. "
             f"Native bf16 instructions (CPU): {'yes' if result['machine']['native_bf16'] else 'no'}.", ""]
    if result.get("comparisons"):
        lines += ["## Interleaved comparison", "",
                  "Each contender is one long-lived worker process, warmed up once; the driver then asks them for one "
                  "step each in turn (order alternating every round), so each round's ratio compares steps taken "
                  "seconds apart. Ratio = ours' samples/s ÷ theirs (> 1: ours faster), median (min-max, IQR) over "
                  "the rounds. Per CPU-second: the CPU time the measuring process itself spent, which other "
                  "processes on the machine disturb much less than wall time (at 2 threads less so: a thread spins "
                  "while its peer waits for a core). Same batch, same thread count, same topology on both sides.", "",
                  "| ours | versus | batch | threads | rounds | ratio, samples/s | ratio, samples per CPU-s | load before -> after |",
                  "|---|---|---|---|---|---|---|---|"]
        bad = {(r.get("impl"), r.get("variant"), r.get("batch"), r.get("threads")) for r in result["runs"] if loss_problem(r)}
        for c in result["comparisons"]:
            load = "/".join(f"{x:.1f}" for x in c["load_before"][:1]) + " -> " + "/".join(f"{x:.1f}" for x in c["load_after"][:1])
            for v in c["versus"]:
                flag = ("  **not comparable: a side's loss is not finite (see Runs)**"
                        if bad & {("seg-pipeline", c["variant"], c["batch"], c["threads"]),
                                  (v["impl"], v["variant"], c["batch"], c["threads"])} else "")
                lines.append(f"| {_label('seg-pipeline', c['variant'])} | {_label(v['impl'], v['variant'])} | {c['batch']} "
                             f"| {c['threads']} | {v['rounds']} | {_x(v['ratio_samples_per_s'])}{flag} "
                             f"| {_x(v['ratio_samples_per_cpu_s'])} | {load} |")
        lines.append("")
    lines += ["## Runs", "",
              "samples/s and samples per CPU-second: median (min-max) over the timed steps. `first step s` holds "
              "oneDNN's primitive creation, and for compiled variants the compilation (not amortised into the rates).",
              "",
              "| impl | variant | batch | threads | s/step | samples/s | samples per CPU-s | s/step scaled to batch 7 "
              "| first step s | peak RSS MiB | GPU peak MiB | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r.get('impl', '–')} | {r.get('variant', '–')} | {r.get('batch', '–')} | {r.get('threads', '–')} "
                         f"| – | – | – | – | – | – | – | {r['error']} |")
        elif "s_per_step" in r:
            lines.append(f"| {r['impl']} | {r['variant']} | {r['batch']} | {r['threads']} | {r['s_per_step']} | "
                         f"{fmt_spread(r['samples_per_s_spread'], 3)} | {fmt_spread(r['samples_per_cpu_s_spread'], 3)} | "
                         f"{r['s_per_step'] / r['batch'] * 7:.2f} | {r['first_step_s']} | {r.get('peak_rss_mib', '–')} | "
                         f"{r.get('gpu_peak_mem_mib', '–')} | {r['steps_timed']} steps timed"
                         f"{', interleaved' if r.get('interleaved') else ''}"
                         f"{'; **' + loss_problem(r) + '**' if loss_problem(r) else ''} |")
    if device == "cpu":
        lines += ["", f"nnU-Net's own figure for this plan on this CPU: {NNUNET_NOTE_S_PER_IT} s/iteration at batch 7 "
                  "(from the task notes). Ours `fp32` is what training runs (channels-last activations on CPU, "
                  "pipeline/model.py); `ncdhw` is ours in nnU-Net's layout. bf16 without native instructions and "
                  "torch.compile's first step (compilation) may not fit their time caps."]
    if result.get("augmentation"):
        lines += ["", "## Augmentation (pipeline.training.augmentation, one batch, CPU)", "", "| config | threads | batch | ms/batch |",
                  "|---|---|---|---|"]
        lines += [f"| {a['config']} | {a['threads']} | {a['batch']} | {a['ms_per_batch']} |" for a in result["augmentation"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, new_figure):
    ok = [r for r in result["runs"] if "s_per_step" in r]
    comps = [(c, v) for c in result.get("comparisons", []) for v in c["versus"]]
    if not ok:
        return None
    ncols = 2 if comps else 1
    fig, axes = new_figure(max(6.0, 1.1 * len(ok) + 2) + (5 if comps else 0), 3.8, 1, ncols)
    labels = [f"{_label(r['impl'], r['variant'])} b{r['batch']} t{r['threads']}" + (" (loss NaN)" if loss_problem(r) else "")
              for r in ok]
    colors = ["tab:gray" if loss_problem(r) else "tab:orange" if r["impl"] == "nnunet" else "tab:blue" for r in ok]
    bar_panel(axes[0][0], labels, [r["samples_per_s"] for r in ok], ylabel="samples/s", colors=colors,
              low=[r["samples_per_s_spread"]["min"] for r in ok], high=[r["samples_per_s_spread"]["max"] for r in ok],
              title=f"training step throughput ({result.get('device', 'cpu')}), median (min-max)")
    if comps:
        ax = axes[0][1]
        for i, (c, v) in enumerate(comps):
            for j, (key, color) in enumerate((("ratios_wall", "tab:blue"), ("ratios_cpu", "tab:green"))):
                ys = v[key]
                ax.scatter([i + (j - 0.5) * 0.25] * len(ys), ys, s=14, color=color,
                           label=("per wall second" if j == 0 else "per CPU-second") if i == 0 else None)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(1.5, color="tab:red", linewidth=0.8, linestyle="--", label="target 1.5x")
        ax.set_xticks(range(len(comps)))
        ax.set_xticklabels([f"vs {_label(v['impl'], v['variant'])}\nb{c['batch']} t{c['threads']}" for c, v in comps],
                           fontsize=8)
        ax.set_ylabel("ours ÷ theirs, per round")
        ax.set_title("interleaved rounds: speed ratio", fontsize=10)
        ax.legend(fontsize=7)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", nargs=3, metavar=("IMPL", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--batch", type=int, default=None, help="batch size of the comparisons (CPU 2, CUDA the plan's)")
    ap.add_argument("--full-batch", action="store_true", help="add an interleaved comparison at the plan's batch size")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of every worker (CPU: 1 is compared as well)")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for all training-step runs together")
    ap.add_argument("--pairs", type=int, default=6, help="interleaved rounds per comparison (fewer if the budget ends)")
    ap.add_argument("--steps-per-turn", type=int, default=None, help="steps a worker takes per turn (CPU 1, CUDA 10)")
    ap.add_argument("--min-time", type=float, default=10.0, help="variants run alone: time at least this long")
    ap.add_argument("--max-steps", type=int, default=5, help="variants run alone: at most this many timed steps")
    ap.add_argument("--variants", default=None, help=f"comma-separated (default: CPU {CPU_VARIANTS}, CUDA {CUDA_VARIANTS})")
    ap.add_argument("--nnunet-python", help="interpreter with nnunetv2 installed: adds nnU-Net's network + loss")
    ap.add_argument("--aug-seconds", type=float, default=5.0, help="time per augmentation setting (0: skip)")
    ap.add_argument("--name", default=None, help="result file name (default train_step; gpu_train_step on CUDA)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")

    if args.serve:
        impl, variant, batch = args.serve
        serve(impl, variant, int(batch), args.threads, args.device)
        return

    import torch

    from pipeline.precision import native_bf16  # what `--precision auto` asks of this CPU

    machine = machine_info()
    plan, source = load_plan()
    args.batch = args.batch or (plan["batch_size"] if cuda else 2)
    block = args.steps_per_turn or (10 if cuda else 1)
    variants = (args.variants or (CUDA_VARIANTS if cuda else CPU_VARIANTS)).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    me, nn_py = sys.executable, args.nnunet_python
    shared = [v for v in variants if v in (("fp32", "amp") if cuda else ("fp32",))]  # nnU-Net has these too
    head = shared[0] if shared else variants[0]
    # interleaved comparisons: (variant, batch, threads, contenders)
    plans = []
    thread_counts = [args.threads] if cuda else sorted({1, args.threads})
    for variant in (shared or [head]):
        for threads in thread_counts:
            contenders = [(me, "seg-pipeline", variant)]
            if nn_py and variant in shared:
                contenders.append((nn_py, "nnunet", variant))
            if variant == "fp32" and "ncdhw" in variants and threads == thread_counts[0]:
                contenders.append((me, "seg-pipeline", "ncdhw"))
            plans.append((variant, args.batch, threads, contenders))
    if args.full_batch and plan["batch_size"] != args.batch:
        contenders = [(me, "seg-pipeline", head)] + ([(nn_py, "nnunet", head)] if nn_py and head in shared else [])
        plans.append((head, plan["batch_size"], 1 if not cuda else args.threads, contenders))
    solo = [v for v in variants if v not in shared and v != "ncdhw" and v != head]

    start = time.perf_counter()
    end = start + args.budget
    runs, comparisons = [], []
    machine.update(torch=torch.__version__, native_bf16=native_bf16())

    def save(augmentation: list[dict]) -> dict:
        """Write what is measured so far: a run cut off by a time limit (gpu_suite.sh) keeps its finished rows."""
        result = {
            "benchmark": args.name or ("gpu_train_step" if cuda else "train_step"), "device": args.device,
            "plan": plan, "plan_source": source, "num_classes": NUM_CLASSES,
            "machine": dict(machine, load_after=load_average()), "comparisons": comparisons, "runs": runs,
            "augmentation": augmentation,
            "reference": {"nnunet_s_per_iteration_batch7": NNUNET_NOTE_S_PER_IT, "source": "task notes (not re-measured)"},
            "total_s": round(time.perf_counter() - start, 1),
        }
        result["paths"] = write_results(result["benchmark"], result, markdown(result), lambda nf: plot(result, nf), args.out)
        return result

    for i, (variant, batch, threads, contenders) in enumerate(plans):
        # a fair share of what is left for each comparison still to come, and some for the variants run alone
        left = end - time.perf_counter()
        share = left * (0.7 if solo else 1.0) / (len(plans) - i)
        rounds = args.pairs if batch == args.batch else max(2, args.pairs // 2)
        rows, record = compare(contenders, batch, threads, args.device, rounds, block, time.perf_counter() + share)
        for r in rows:
            r["interleaved"] = len(contenders) > 1
            print(json.dumps({k: v for k, v in r.items() if not k.endswith("_spread")}), flush=True)
        runs += rows
        if record:
            comparisons.append(record)
            for v in record["versus"]:
                print(f"ours {variant} vs {_label(v['impl'], v['variant'])}, batch {batch}, {threads} thread(s): "
                      f"samples/s {_x(v['ratio_samples_per_s'])}; per CPU-s {_x(v['ratio_samples_per_cpu_s'])}",
                      flush=True)
        save([])
    for variant in solo:
        left = end - time.perf_counter()
        if left < 5:
            runs.append(_error_row("seg-pipeline", variant, args.batch, args.threads, args.device, "skipped: budget spent"))
            continue
        cap = VARIANT_CAP_S[variant] if not cuda else max(VARIANT_CAP_S[variant], 60.0)
        r = alone(me, "seg-pipeline", variant, args.batch, args.threads, args.device, args.min_time, args.max_steps,
                  time.perf_counter() + min(left, cap))
        runs.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("_spread")}), flush=True)
        save([])
    augmentation = time_augmentation(plan, plan["batch_size"], args.aug_seconds) if args.aug_seconds > 0 else []
    for a in augmentation:
        print(json.dumps(a))
    print(save(augmentation)["paths"]["md"].read_text())


if __name__ == "__main__":
    main()
