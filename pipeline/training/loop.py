"""Training: nnU-Net's epoch loop as a Ray Train per-worker function, plus its settings and results.

`pipeline.training.launch.run_training(settings)` is the stage's entry point; it runs
`train_loop_per_worker` on Ray Train workers. Everything a worker needs travels in `train_loop_config` as plain
JSON (settings, plans, case lists, paths): workers open the store themselves.

Two recipes:
* `nnunet` (nnU-Net v2's trainer): SGD Nesterov momentum 0.99, lr 0.01, poly decay (exponent 0.9),
  weight decay 3e-5, gradient norm clipped at 12, Dice + CE with deep supervision, nnU-Net's
  augmentation, 1000 epochs of 250 iterations, 50 validation batches.
* `lean` (the compute-budget recipe, the default of `3d_lean`): AdamW lr 3e-3 decayed to 0 over
  the wall-clock budget (15 minutes unless told), the same loss, mirroring-only augmentation,
  short epochs (50 iterations) so the budget is used in small steps.

With a time budget the schedule follows the clock: progress = elapsed / budget (or the epoch
fraction when that is further), the learning rate is set at each epoch start from rank 0's
clock (broadcast, so every rank steps with the same rate) and training stops before an epoch
that would end past the budget. `elapsed` counts the training loop only and survives resumes.

Outputs in `W/runs/<config>/fold_<k>/`: `model_best.pt` (best EMA pseudo-Dice, as nnU-Net),
`model_final.pt`, `plans.json`, `train_settings.json`, `metrics.csv`, `training_curves.png`,
`training_log.txt`. Model files are dicts of tensors and primitives, readable with
`torch.load(..., weights_only=True)`; `load_trained_network` rebuilds the network from them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.console import number
from pipeline.errors import BadInputError, SegPipeError
from pipeline.parallel import assigned_cpus
from pipeline.planning.plans import Plans
from pipeline.precision import PRECISIONS, amp_for, precision_name, uses_mixed_precision
from pipeline.storage import append_text, as_path, local_file, replacing
from pipeline.workdir import METRICS_CSV, MODEL_BEST, MODEL_FINAL, TRAINING_CURVES, TRAINING_LOG, Workdir, model_file

EMA_WEIGHT = 0.9  # nnU-Net: ema = 0.9 * ema + 0.1 * mean foreground pseudo-Dice
LEAN_DEFAULT_BUDGET_MIN = 15.0


@dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule, loss and augmentation of one training recipe, with its default lengths."""

    name: str
    optimizer: str  # "sgd" | "adamw" | "adam"
    lr: float
    weight_decay: float
    momentum: float  # SGD momentum (nesterov) / AdamW beta1
    poly_exponent: float
    grad_clip: float
    loss: str  # pipeline.training.losses.build_loss kind
    augmentation: str  # AugmentationConfig.for_patch preset
    epochs: int | None
    iterations_per_epoch: int
    val_iterations: int
    checkpoint_every: int
    time_budget_min: float | None


RECIPES = {
    "nnunet": Recipe("nnunet", "sgd", 1e-2, 3e-5, 0.99, 0.9, 12.0, "dice_ce", "nnunet",
                     epochs=1000, iterations_per_epoch=250, val_iterations=50, checkpoint_every=50,
                     time_budget_min=None),
    "lean": Recipe("lean", "adamw", 3e-3, 1e-2, 0.9, 0.9, 12.0, "dice_ce", "light",
                   epochs=None, iterations_per_epoch=50, val_iterations=10, checkpoint_every=5,
                   time_budget_min=LEAN_DEFAULT_BUDGET_MIN),
    # the seed project's recipe: Adam and plain cross-entropy, light augmentation
    "adam_ce": Recipe("adam_ce", "adam", 3e-4, 0.0, 0.9, 0.9, 12.0, "ce", "light",
                      epochs=None, iterations_per_epoch=50, val_iterations=10, checkpoint_every=5,
                      time_budget_min=LEAN_DEFAULT_BUDGET_MIN),
}


@dataclass
class TrainSettings:
    """How one model is trained; unset values (None) come from the recipe when the run starts."""

    workdir: str  # the workdir holding plans.json and store.zarr
    config: str = "3d_fullres"  # configuration in plans.json
    fold: str = "0"  # 0..4, 'all' (train on every case) or 'holdout'
    num_workers: int | None = None  # Ray Train workers (data-parallel ranks); None: one per GPU, else 1
    epochs: int | None = None  # None: the recipe's (nnunet 1000; lean runs until its time budget)
    iterations_per_epoch: int | None = None  # training batches per epoch (None: nnunet 250, lean 50)
    val_iterations: int | None = None  # validation batches per epoch, over all ranks (None: nnunet 50, lean 10)
    time_budget_min: float | None = None  # wall-clock budget of the training loop; the LR schedule follows it
    resume: bool = False  # continue from the run's latest checkpoint (otherwise a fresh run)
    ray_address: str | None = None  # an existing Ray cluster; None: a local one on 127.0.0.1
    recipe: str | None = None  # 'nnunet', 'lean' or 'adam_ce' (the seed project's Adam + cross-entropy); None: the configuration's preset (3d_lean -> lean)
    checkpoint_every: int | None = None  # epochs between checkpoints (None: nnunet 50, lean 5)
    seed: int = 12345  # seeds model initialisation and every batch
    prefetch: str = "auto"  # per-worker batch prefetch: thread, process (DataLoader), none; auto: thread on CPU, process on GPU
    loader_workers: int | None = None  # DataLoader processes per worker with 'process' (None: its CPUs - 1, at least 1)
    use_gpu: bool | None = None  # True: one GPU per worker (waits for GPU nodes); False: CPU only; None: GPUs if the cluster has some now
    cpus_per_worker: int | None = None  # CPUs Ray reserves per worker; its torch threads and loaders follow (None: a local Ray's CPUs / workers, else 1)
    resources_timeout_s: float = 600.0  # how long to wait for the cluster (an autoscaler) to provide the workers' resources
    precision: str = "auto"  # pipeline.precision.PRECISIONS: auto = mixed where the device computes it itself

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainSettings:
        """From `segpipe train`'s (or `run`'s) parsed arguments; flags the parser lacks keep their defaults."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        return cls(
            workdir=str(Workdir.at(args.workdir).root), config=get("config") or "3d_fullres",
            fold=str(get("fold", "0")), num_workers=get("num_workers"), epochs=get("epochs"),
            iterations_per_epoch=get("iterations_per_epoch"), val_iterations=get("val_iterations"),
            time_budget_min=get("time_budget_min"), resume=bool(get("resume", False)),
            ray_address=get("ray_address"), recipe=get("recipe"), checkpoint_every=get("checkpoint_every"),
            seed=get("seed") if get("seed") is not None else 12345,
            use_gpu=get("use_gpu"), cpus_per_worker=get("cpus_per_worker"),
            resources_timeout_s=get("resources_timeout_s") or 600.0, precision=get("precision") or "auto",
        )

    def resolved(self, plans: Plans) -> TrainSettings:
        """A copy with every recipe default filled in, checked (BadInputError on nonsense)."""
        conf = plans.configuration(self.config)
        recipe_name = self.recipe or ("lean" if conf.preset == "lean" or self.config.endswith("_lean") else "nnunet")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if recipe_name not in RECIPES:
            raise BadInputError(f"unknown recipe {recipe_name!r} (choose from {', '.join(RECIPES)})")
        r = RECIPES[recipe_name]
        budget = self.time_budget_min
        if budget is None and self.epochs is None:
            budget = r.time_budget_min
        out = dataclasses.replace(
            self, recipe=recipe_name, fold=str(self.fold),
            epochs=self.epochs if self.epochs is not None else (r.epochs if budget is None else None),
            iterations_per_epoch=self.iterations_per_epoch or r.iterations_per_epoch,
            val_iterations=self.val_iterations if self.val_iterations is not None else r.val_iterations,
            checkpoint_every=self.checkpoint_every or r.checkpoint_every, time_budget_min=budget,
        )
        for name in ("epochs", "iterations_per_epoch", "checkpoint_every", "num_workers", "cpus_per_worker"):
            value = getattr(out, name)
            if value is not None and value < 1:
                raise BadInputError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if out.val_iterations < 0:
            raise BadInputError(f"val-iterations must be >= 0, got {out.val_iterations}")
        if out.time_budget_min is not None and out.time_budget_min <= 0:
            raise BadInputError(f"time-budget-min must be positive, got {out.time_budget_min}")
        if out.prefetch not in ("auto", "thread", "process", "none"):
            raise BadInputError(f"prefetch must be auto, thread, process or none, not {out.prefetch!r}")
        return out

    @property
    def recipe_spec(self) -> Recipe:
        return RECIPES[self.recipe or "nnunet"]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    """What a training run left behind."""

    run_dir: str
    final_model: str | None
    best_model: str | None
    epochs: int  # completed epochs (counted across resumes)
    resumed_from_epoch: int | None
    final_metrics: dict[str, Any] = field(default_factory=dict)
    metrics_csv: str | None = None
    curves_png: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        m = self.final_metrics
        dice = {k[len("val_dice_"):]: v for k, v in m.items() if k.startswith("val_dice_")}
        dice_text = " ".join(f"{k}:{number(v, 3, missing='-')}" for k, v in dice.items())
        resumed = f" (resumed at {self.resumed_from_epoch})" if self.resumed_from_epoch else ""
        head = f"trained {self.epochs} epoch(s){resumed}"
        return (f"{head}; final train loss {number(m.get('train_loss'), missing='-')}, val loss {number(m.get('val_loss'), missing='-')}, "
                f"pseudo-Dice {dice_text or '-'} (EMA {number(m.get('ema_dice'), 3, missing='-')})\n"
                f"final model: {self.final_model}\nbest model:  {self.best_model}\ncurves:      {self.curves_png}")


# ---------------------------------------------------------------- model files


def save_model_file(path: Path, net: torch.nn.Module, *, configuration: str, epoch: int, ema_dice: float | None,
                    num_input_channels: int, num_classes: int, label_values: list[int], plans_hash: str) -> None:
    """A model file inference reads with `weights_only=True`: weights and the facts needed to rebuild the net."""
    payload = {
        "network_weights": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "configuration": configuration, "epoch": int(epoch),
        "ema_pseudo_dice": None if ema_dice is None else float(ema_dice),
        "num_input_channels": int(num_input_channels), "num_classes": int(num_classes),
        "label_values": [int(v) for v in label_values], "plans_hash": plans_hash,
    }
    _torch_save_atomic(payload, path)


def load_plain(path: Path, map_location: str | torch.device = "cpu"):
    """`torch.load(weights_only=True)`: tensors and primitives only. A file that would run code when
    unpickled is refused in one line (torch's own message suggests `weights_only=False`)."""
    import pickle

    try:
        with local_file(path) as local:
            return torch.load(local, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        raise SegPipeError(f"refused to load {path}: not a plain tensor file but a pickle that would run code "
                           f"when loaded ({detail or type(exc).__name__}); use model files written by segpipe "
                           "from a source you trust") from None


def load_trained_network(run_dir: str | os.PathLike, which: str = "final", device: str | torch.device = "cpu"):
    """(network in eval mode without deep supervision, plans, model-file dict) from a run folder."""
    from pipeline.training.model import build_network

    run_dir = as_path(run_dir)
    path = model_file(run_dir, which)
    if not path.is_file():
        raise SegPipeError(f"{path} not found: train this configuration and fold first (`segpipe train`)")
    payload = load_plain(path)
    plans = Plans.load(run_dir / "plans.json")
    net = build_network(plans.configuration(payload["configuration"]), payload["num_input_channels"],
                        payload["num_classes"], deep_supervision=False)
    net.load_state_dict(payload["network_weights"])
    return net.to(device).eval(), plans, payload


def _torch_save_atomic(obj, path: Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def training_progress(epoch: int, epochs: int | None, elapsed_s: float, budget_min: float | None) -> float:
    """How far training is, in [0, 1]: the epoch fraction or the share of the time budget spent, whichever is further."""
    parts = [epoch / epochs] if epochs else []
    if budget_min:
        parts.append(elapsed_s / (budget_min * 60))
    return min(1.0, max(parts)) if parts else 0.0


def epoch_iterations(epoch: int, epochs: int | None, elapsed_s: float, last_epoch_s: float,
                     budget_min: float | None, iterations: int) -> int:
    """Iterations of the next epoch; 0 means training is over.

    After the last epoch, 0. Under a time budget the epoch is shortened to what fits in the time
    left (estimated from the last epoch), so the budget is used to its end instead of being left
    idle for up to an epoch; a remainder under a tenth of an epoch is not worth its validation.
    """
    if epochs is not None and epoch >= epochs:
        return 0
    if budget_min is None or last_epoch_s <= 0:
        return iterations if budget_min is None or elapsed_s < budget_min * 60 else 0
    fits = int(iterations * (budget_min * 60 - elapsed_s) / last_epoch_s)
    return min(iterations, fits) if fits >= max(1, iterations // 10) else 0


def epoch_learning_rates(base_lr: float, exponent: float, start: float, end: float, iterations: int) -> list[float]:
    """Poly learning rates for each iteration of an epoch spanning training progress `start` -> `end`.

    Stepping the rate every iteration, not every epoch, matters when a time budget allows only a few
    long epochs. Computed from values every rank shares, so all ranks step identically.
    """
    return [poly_lr(base_lr, start + (end - start) * it / iterations, exponent) for it in range(iterations)]


def supervision_weights(n: int, ddp: bool) -> list[float]:
    """nnU-Net's deep-supervision weights; under DDP (uncompiled) the lowest output keeps 1e-6 instead
    of 0 so its head still receives a gradient (DDP refuses parameters without one, as nnU-Net found)."""
    from pipeline.training.model import deep_supervision_weights

    weights = deep_supervision_weights(n)
    if ddp and n > 1:
        raw = [1 / 2**i for i in range(n)]
        raw[-1] = 1e-6
        weights = [w / sum(raw) for w in raw]
    return weights


def poly_lr(base_lr: float, progress: float, exponent: float) -> float:
    """nnU-Net's PolyLRScheduler as a function of training progress in [0, 1]."""
    return base_lr * (1.0 - min(max(progress, 0.0), 1.0)) ** exponent


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """All rows so far, rewritten atomically (rows after a resumed checkpoint are dropped with it)."""
    if not rows:
        return
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [k for k in row if k not in columns]
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                             for k, v in row.items()})


# ---------------------------------------------------------------- the per-worker loop


class _Collective:
    """torch.distributed helpers that degrade to no-ops on a single worker."""

    def __init__(self, world_size: int, device: torch.device):
        import torch.distributed as dist

        self.dist = dist if world_size > 1 and dist.is_available() and dist.is_initialized() else None
        self.world_size = world_size
        # NCCL only moves tensors that live on the GPU
        self.device = device if (self.dist and dist.get_backend() == "nccl") else torch.device("cpu")

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist is None:
            return values
        t = values.to(self.device, torch.float64)
        self.dist.all_reduce(t)
        return t.cpu()

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist is None:
            return values
        t = values.to(self.device, torch.float64)
        self.dist.broadcast(t, src=0)
        return t.cpu()

    def all_gather(self, value: float) -> list[float]:
        if self.dist is None:
            return [float(value)]
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        self.dist.all_gather(out, t)
        return [float(o.item()) for o in out]


def _checksum(tensors) -> float:
    """A cheap fingerprint of a set of tensors (their float64 sum): equal across ranks iff DDP keeps them in sync."""
    return float(sum(t.detach().double().sum().item() for t in tensors if t is not None))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: one data-parallel rank of the epoch loop."""
    import ray.train

    _WorkerRun(config, ray.train.get_context()).run()


class _WorkerRun:
    def __init__(self, config: dict, ctx):
        import ray.train.torch

        from pipeline.training.augmentation import AugmentationConfig
        from pipeline.training.losses import DeepSupervisionLoss, build_loss
        from pipeline.training.model import build_network
        from pipeline.training.sampling import (
            PatchSpec,
            foreground_slots,
            local_batch_size,
        )

        self.settings = TrainSettings.from_json(config["settings"])
        self.recipe = self.settings.recipe_spec
        self.plans = Plans.from_json(config["plans"])
        self.conf = self.plans.configuration(self.settings.config)
        self.run_dir = as_path(config["run_dir"])
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.cuda = self.device.type == "cuda"
        self.cores = assigned_cpus()  # the CPUs Ray gave this worker, not the host's (a pod's limit, a shared node)
        if not self.cuda:
            torch.set_num_threads(self.cores)
        torch.manual_seed(self.settings.seed)
        self.coll = _Collective(self.world, self.device)

        from pipeline.training.cascade import num_input_channels

        self.num_channels = num_input_channels(self.plans, self.settings.config)  # + previous-stage channels
        self.label_values = list(self.plans.label_values)
        self.label_map = self.plans.label_map()
        self.num_classes = self.label_map.num_outputs  # network outputs: regions, or classes without ignore
        self._region_indices = self.label_map.region_indices if self.label_map.has_regions else None
        self.net = build_network(self.conf, self.num_channels, self.num_classes, deep_supervision=True).to(self.device)
        self.optimizer = self._make_optimizer()
        # mixed precision (pipeline.precision): float16 + GradScaler on CUDA, as nnU-Net; bfloat16 on a CPU
        # (float32's exponent range: no scaler)
        self.amp = uses_mixed_precision(amp_for(self.settings.precision), self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda and self.amp else None
        weights = supervision_weights(self.conf.num_stages - 1, ddp=self.world > 1 and not self.cuda)
        batch_dice = True if self.conf.batch_dice is None else bool(self.conf.batch_dice)
        self.loss_fn = DeepSupervisionLoss(build_loss(self.recipe.loss, deep_supervision=False, batch_dice=batch_dice,
                                                      label_map=self.label_map), weights)
        self.plans_hash = config["plans_hash"]

        patch = tuple(int(p) for p in self.conf.patch_size)
        global_batch = int(self.conf.batch_size or 2)
        aug = AugmentationConfig.for_patch(patch, self.recipe.augmentation).to_json()
        common = dict(store_path=config["store"], data_identifier=self.conf.data_identifier, patch_size=patch,
                      seed=self.settings.seed, plans_hash=self.plans_hash,
                      annotated_centres=self.label_map.has_ignore, **config.get("previous_stage", {}))
        self.train_spec = PatchSpec(case_ids=tuple(config["train_cases"]), rank=self.rank, augmentation=aug,
                                    slots=foreground_slots(global_batch, rank=self.rank, world_size=self.world), **common)
        self.val_spec = PatchSpec(case_ids=tuple(config["val_cases"]), rank=self.rank, augmentation=None,
                                  slots=foreground_slots(global_batch), **common)
        self.local_batch = local_batch_size(global_batch, self.rank, self.world)

        # the state a checkpoint carries
        self.epoch = 0
        self.resumed_from: int | None = None  # the checkpoint's epoch when Ray Train restored one
        self.elapsed = 0.0
        self.ema: float | None = None
        self.best_ema: float | None = None
        self.rows: list[dict] = []
        self._restore(ray.train.get_checkpoint())
        # DDP wraps after the weights are loaded; it broadcasts rank 0's parameters anyway
        self.model = ray.train.torch.prepare_model(self.net, move_to_device=False) if self.world > 1 else self.net
        if self.cuda:
            self.model = torch.compile(self.model)

    # ------------------------------------------------------------ setup pieces

    def _make_optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        if r.optimizer == "sgd":
            return torch.optim.SGD(self.net.parameters(), lr=r.lr, momentum=r.momentum, nesterov=True,
                                   weight_decay=r.weight_decay)
        if r.optimizer == "adamw":
            return torch.optim.AdamW(self.net.parameters(), lr=r.lr, betas=(r.momentum, 0.999),
                                     weight_decay=r.weight_decay)
        if r.optimizer == "adam":
            return torch.optim.Adam(self.net.parameters(), lr=r.lr, betas=(r.momentum, 0.999),
                                    weight_decay=r.weight_decay)
        raise SegPipeError(f"unknown optimizer {r.optimizer!r}")

    def _restore(self, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            self.net.load_state_dict(load_plain(Path(d) / "model.pt", self.device))
            state = load_plain(Path(d) / "state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.resumed_from = self.epoch
        self.elapsed = float(state["elapsed"])
        self.ema, self.best_ema = state["ema"], state["best_ema"]
        self.rows = list(state["metrics"])
        torch.set_rng_state(state["torch_rng"])
        if self.rank == 0:
            self._log(f"resumed from the checkpoint of epoch {self.epoch} ({self.elapsed / 60:.1f} min trained)")

    def _checkpoint_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "elapsed": self.elapsed, "ema": self.ema, "best_ema": self.best_ema,
            "metrics": self.rows, "torch_rng": torch.get_rng_state(), "world_size": self.world,
            "settings": self.settings.to_json(),
        }

    # ------------------------------------------------------------ the loop

    def _progress(self) -> float:
        s = self.settings
        return training_progress(self.epoch, s.epochs, self.elapsed, s.time_budget_min)

    def run(self) -> None:
        from pipeline.training.sampling import (
            TrainBatches,
            ValidationBatches,
            batch_iterator,
            close_iterator,
        )

        s = self.settings
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log(f"training {s.config} fold {s.fold}: recipe {s.recipe}, {self.world} worker(s), "
                      f"{len(self.train_spec.case_ids)} train / {len(self.val_spec.case_ids)} val cases, "
                      f"batch {self.local_batch}/rank, {s.iterations_per_epoch} it/epoch, "
                      f"epochs {s.epochs or '-'}, budget {s.time_budget_min or '-'} min; per worker {self.cores} CPU(s), "
                      f"{torch.get_num_threads()} torch thread(s){', 1 GPU' if self.cuda else ''}, "
                      f"{precision_name(self.amp, self.device)}")
        # measured (benchmarks/loader.py): on CPU loading is ~1-3% of a step, so one thread hides it
        # without a second interpreter; a GPU step is fast enough to need loader processes
        prefetch = s.prefetch if s.prefetch != "auto" else ("process" if self.cuda else "thread")
        loader_workers = s.loader_workers or max(1, self.cores - 1)
        train_iter = batch_iterator(TrainBatches(self.train_spec, s.iterations_per_epoch, self.epoch),
                                    prefetch, loader_workers, pin_memory=self.cuda)
        val_data = ValidationBatches(self.val_spec, s.val_iterations, self.world)
        try:
            seconds = 0.0
            iterations = self._epoch_iterations(last_epoch_seconds=0.0)
            while iterations:
                # progress depends only on state every rank shares (epoch, rank 0's clock): the same
                # rates on every rank, from here to where this epoch is expected to end
                p0 = self._progress()
                p1 = training_progress(self.epoch + iterations / s.iterations_per_epoch, s.epochs,
                                       self.elapsed + seconds * iterations / s.iterations_per_epoch, s.time_budget_min)
                lrs = epoch_learning_rates(self.recipe.lr, self.recipe.poly_exponent, p0, p1, iterations)
                lr = lrs[0]
                start = time.perf_counter()
                train_loss, grad_sum = self._train_epoch(train_iter, lrs)
                val_loss, dice = self._validate(val_data)
                seconds = time.perf_counter() - start
                # rank 0's clock decides, so every rank stops at the same epoch
                seconds = float(self.coll.broadcast(torch.tensor([seconds]))[0])
                self.elapsed += seconds
                self.epoch += 1
                mean_fg = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
                if math.isfinite(mean_fg):
                    self.ema = mean_fg if self.ema is None else EMA_WEIGHT * self.ema + (1 - EMA_WEIGHT) * mean_fg
                row = {"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss}
                row.update({f"val_dice_{v}": float(d) for v, d in zip(self.label_map.output_keys, dice)})
                row.update({"ema_dice": self.ema, "lr": lr, "seconds": round(seconds, 3)})
                self.rows.append(row)
                grad_sums = self.coll.all_gather(grad_sum)
                param_sums = self.coll.all_gather(_checksum(self.net.parameters()))
                improved = self.ema is not None and (self.best_ema is None or self.ema > self.best_ema)
                if improved:
                    self.best_ema = self.ema
                iterations = self._epoch_iterations(seconds)
                stop = iterations == 0
                due = stop or self.epoch % s.checkpoint_every == 0
                if self.rank == 0:
                    self._epoch_outputs(row, improved, plot=due)
                report = {**row, "grad_checksums": grad_sums, "param_checksums": param_sums,
                          "best_ema_dice": self.best_ema, "elapsed_s": self.elapsed,
                          "resumed_from_epoch": self.resumed_from}
                self._report(report, checkpoint=due)
        finally:
            close_iterator(train_iter)
        if self.rank == 0:
            self._finish()

    def _epoch_iterations(self, last_epoch_seconds: float) -> int:
        s = self.settings
        return epoch_iterations(self.epoch, s.epochs, self.elapsed, last_epoch_seconds, s.time_budget_min,
                                s.iterations_per_epoch)

    def _train_epoch(self, batches, lrs: list[float]) -> tuple[float, float]:
        self.model.train()
        total, grad_sum = 0.0, 0.0
        n = len(lrs)
        for it, lr in enumerate(lrs):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            image, label = next(batches)
            image = image.to(self.device, non_blocking=True)
            label = label.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                loss = self.loss_fn(self.model(image), label)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if it == n - 1:  # after DDP's all-reduce: identical on every rank when the sync works
                grad_sum = _checksum(p.grad for p in self.net.parameters())
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.recipe.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            total += float(loss.detach())
        mean = self.coll.all_reduce_sum(torch.tensor([total / n]))[0] / self.world
        return float(mean), grad_sum

    @torch.no_grad()
    def _validate(self, data) -> tuple[float, np.ndarray]:
        """Validation loss and per-class pseudo-Dice over the fixed validation batches of all ranks."""
        from pipeline.training.losses import dice_from_counts, pseudo_dice

        k = len(self.label_map.output_keys)
        sums = torch.zeros(2 + 3 * k, dtype=torch.float64)
        self.net.eval()
        for image, label in data:
            image, label = image.to(self.device), label.to(self.device)
            with torch.autocast(self.device.type, enabled=self.amp):
                outputs = self.net(image)
                loss = self.loss_fn(outputs, label)
            tp, fp, fn = pseudo_dice(outputs[0], label, self.num_classes, self._region_indices,
                                     self.label_map.ignore_index)
            sums += torch.cat([torch.tensor([float(loss), 1.0], dtype=torch.float64),
                               tp.double(), fp.double(), fn.double()])
        sums = self.coll.all_reduce_sum(sums)
        if sums[1] == 0:
            return float("nan"), np.full(k, np.nan)
        dice = dice_from_counts(sums[2:2 + k], sums[2 + k:2 + 2 * k], sums[2 + 2 * k:]).numpy()
        return float(sums[0] / sums[1]), dice

    # ------------------------------------------------------------ outputs

    def _log(self, line: str) -> None:
        print(line, flush=True)  # the worker's own log; the driver echoes training_log.txt
        append_text(self.run_dir / TRAINING_LOG, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _model_file(self, path: Path) -> None:
        save_model_file(path, self.net, configuration=self.settings.config, epoch=self.epoch, ema_dice=self.ema,
                        num_input_channels=self.num_channels, num_classes=self.num_classes,
                        label_values=self.label_values, plans_hash=self.plans_hash)

    def _epoch_outputs(self, row: dict, improved: bool, plot: bool) -> None:
        s = self.settings
        dice = " ".join(number(row[f"val_dice_{v}"], 3, missing='-') for v in self.label_map.output_keys)
        self._log(f"epoch {self.epoch}{'/' + str(s.epochs) if s.epochs else ''}  train {number(row['train_loss'], missing='-')}  "
                  f"val {number(row['val_loss'], missing='-')}  dice [{dice}]  ema {number(row['ema_dice'], 3, missing='-')}  lr {row['lr']:.2e}  "
                  f"{row['seconds']:.1f}s" + ("  *best" if improved else ""))
        write_metrics_csv(self.run_dir / METRICS_CSV, self.rows)
        if improved:
            self._model_file(self.run_dir / MODEL_BEST)
        if plot:
            self._plot()

    def _plot(self) -> None:
        from pipeline.plotting import plot_training_curves

        try:
            plot_training_curves(self.run_dir / METRICS_CSV, self.run_dir / TRAINING_CURVES,
                                 title=f"{self.settings.config} fold {self.settings.fold}",
                                 label_names={str(k): v for k, v in self.plans.labels.items()})
        except Exception as exc:  # noqa: BLE001 - a figure is never worth a training run
            self._log(f"could not plot training curves: {type(exc).__name__}: {exc}")

    def _report(self, metrics: dict, checkpoint: bool) -> None:
        import ray.train

        if not (checkpoint and self.rank == 0):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="segpipe-ckpt-") as d:
            torch.save(self.net.state_dict(), Path(d) / "model.pt")
            torch.save(self._checkpoint_state(), Path(d) / "state.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def _finish(self) -> None:
        self._model_file(self.run_dir / MODEL_FINAL)
        write_metrics_csv(self.run_dir / METRICS_CSV, self.rows)
        if self.rows:
            self._plot()
        self._log(f"done: {self.epoch} epochs, {self.elapsed / 60:.1f} min; best EMA pseudo-Dice {number(self.best_ema, 3, missing='-')}")
