"""Launching a training run: checks before any worker starts, the Ray Train TorchTrainer around
`loop.train_loop_per_worker`, and the result read back afterwards. `run_training(settings)` is the
stage's entry point.

Ray: an existing session is reused as it is (and left running); `--ray-address` connects to a
cluster; otherwise a local Ray is started on 127.0.0.1 without a dashboard and shut down after.

Runs and resuming: the Ray run is named `<config>_fold<k>` under `W/runs/ray` (a folder or a bucket
prefix: Ray Train's `storage_path`), and Ray Train V2 continues a run of the same name and storage
path from its latest checkpoint (also after a worker failure: `FailureConfig(max_failures=2)`),
handing it to the workers through its public `ray.train.get_checkpoint()`. So:
* `--resume`: continue that run (epoch counter, optimizer, EMA, metrics and elapsed time restored);
  with no checkpoint yet it starts from scratch.
* without `--resume`, where an earlier run exists: a fresh run. The earlier Ray run and its fold
  folder are moved aside to `<name>.previous` (replacing an older `.previous`), never deleted, so
  nothing trained is lost and the new run cannot pick up the old checkpoints by accident.

Several machines: workers get the plans and absolute paths or URLs in `train_loop_config` and open
the store themselves; rank 0 writes the model files into the fold folder and Ray Train uploads
checkpoints to `W/runs/ray` (its `storage_path`). So the workdir must be in a bucket every node
reaches (`s3://...`) or on a filesystem every node mounts at the same path.

Resources: each worker asks for `cpus_per_worker` CPUs (and a GPU with `use_gpu`), and the run
waits up to `resources_timeout_s` for the cluster to have them (`parallel.wait_for_resources`: the
pending request is what an autoscaler scales up for), instead of sizing itself from whatever is up
at that moment. Workers set their torch threads and loader processes from what Ray assigned them.
Before any worker starts, a check runs on
every node (`parallel.check_ray_nodes_see`) and fails naming the node that cannot see the store or
cannot write the run folders; each worker checks again (nodes may join later) and records where it
ran, merged into `placement.json` in the fold folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import threading
from pathlib import Path

import torch

from pipeline.errors import BadInputError, SegPipeError
from pipeline.parallel import (
    SharedPath,
    check_ray_nodes_see,
    path_problems,
    ray_session,
    wait_for_resources,
    whereami,
)
from pipeline.planning.plans import Plans
from pipeline.preprocessing.store import StoreDamageError
from pipeline.storage import as_path, move, remove_tree, size_of, write_json_atomic
from pipeline.training.loop import TrainResult, TrainSettings, load_plain, train_loop_per_worker
from pipeline.workdir import METRICS_CSV, MODEL_BEST, MODEL_FINAL, TRAIN_SETTINGS, TRAINING_CURVES, TRAINING_LOG, Workdir

log = logging.getLogger("segpipe.train")


# ---------------------------------------------------------------- before the workers start


def prepare_run(settings: TrainSettings) -> tuple[TrainSettings, Plans, dict]:
    """Check everything a run needs before any worker starts; returns resolved settings, plans and the
    JSON `train_loop_config` for the workers. Creates `W/splits.json` the first time (once, here,
    so workers never race to write it)."""
    from pipeline.preprocessing.store import open_store
    from pipeline.training.cascade import num_input_channels, previous_stage_inputs
    from pipeline.training.model import build_network
    from pipeline.training.splits import load_or_create_splits

    wd = Workdir.at(settings.workdir)
    plans = Plans.load(wd.plans)
    settings = settings.resolved(plans)
    conf = plans.configuration(settings.config)
    cstore = open_store(wd.store, "r").config(conf.data_identifier, plans.hash(settings.config))
    available = cstore.case_ids()
    if len(available) < 2:
        raise BadInputError(f"{wd.store}/{conf.data_identifier} holds {len(available)} complete case(s); "
                            "training needs at least 2 (run `segpipe preprocess`)")
    split = load_or_create_splits(wd, available).split(settings.fold, available)
    damaged = cstore.check_cases([*split.train, *split.val])  # before any worker starts: no minute of Ray wasted
    if damaged:
        raise StoreDamageError("\n".join([*list(damaged.values())[:5], *(
            [f"... and {len(damaged) - 5} more damaged case(s)"] if len(damaged) > 5 else [])]))
    # a cascade stage: the previous stage's segmentation of every case, checked here (exit 2 naming the command)
    previous = previous_stage_inputs(wd, plans, settings.config, [*split.train, *split.val])
    with torch.device("meta"):  # a plan the network cannot be built from fails here, not in every worker
        build_network(conf, num_input_channels(plans, settings.config), plans.label_map().num_outputs)
    check_workers(plans, settings.config, settings.num_workers or 1)
    loop_config = {
        "settings": settings.to_json(),
        "plans": plans.to_json(),
        "train_cases": list(split.train),
        "val_cases": list(split.val),
        "store": str(wd.store),
        "run_dir": str(wd.run_dir(settings.config, split.name)),
        "plans_hash": plans.hash(settings.config),
        "previous_stage": previous,
    }
    return settings, plans, loop_config


def check_workers(plans: Plans, config: str, workers: int) -> None:
    """Data parallelism splits the configured batch: every worker needs at least one sample of it."""
    global_batch = int(plans.configuration(config).batch_size or 2)
    if workers > global_batch:
        raise BadInputError(f"{workers} workers cannot share configuration {config}'s batch of {global_batch} "
                            "(each worker needs at least one sample): use --num-workers <= batch size")


def run_training(settings: TrainSettings) -> TrainResult:
    """Train one configuration and fold data-parallel with Ray Train (see `fit`)."""
    return fit(settings)


def collect_result(run_dir: Path, final_metrics: dict | None, resumed_from: int | None) -> TrainResult:
    """The TrainResult of a finished run, from the files rank 0 wrote."""
    final = run_dir / MODEL_FINAL
    if not final.is_file():
        raise SegPipeError(f"training ended without writing {final}")
    meta = load_plain(final)
    metrics = dict(final_metrics or {})
    if not metrics and (run_dir / METRICS_CSV).is_file():
        rows = list(csv.DictReader((run_dir / METRICS_CSV).open()))
        metrics = {k: _number(v) for k, v in rows[-1].items()} if rows else {}
    best = run_dir / MODEL_BEST
    curves = run_dir / TRAINING_CURVES
    return TrainResult(
        run_dir=str(run_dir), final_model=str(final), best_model=str(best) if best.is_file() else None,
        epochs=int(meta["epoch"]), resumed_from_epoch=resumed_from,
        final_metrics={k: v for k, v in metrics.items() if _is_json_value(v)},
        metrics_csv=str(run_dir / METRICS_CSV), curves_png=str(curves) if curves.is_file() else None,
    )


def _is_json_value(v) -> bool:
    return v is None or isinstance(v, (int, float, str)) or (isinstance(v, list) and all(_is_json_value(x) for x in v))


def _number(text: str):
    try:
        return float(text) if text not in ("", None) else None
    except ValueError:
        return text




# Ray Train V2 is the default in Ray 2.60; set it before ray.train is imported so the V2 API is used
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# workers print nothing to the driver (the epoch lines come from the run's log file, see _LogTail);
# a worker group that imports torch on a busy machine may take longer than Ray's default minute to start
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


def run_name(settings: TrainSettings) -> str:
    return f"{settings.config}_fold{settings.fold}"


def _move_aside(path: Path) -> None:
    if not path.exists():
        return
    target = path.with_name(path.name + ".previous")
    remove_tree(target)
    move(path, target)
    log.warning("moved the earlier run aside: %s -> %s (pass --resume to continue a run)", path, target)


def latest_checkpoint_epoch(ray_run) -> int | None:
    """The epoch of a run's latest checkpoint, through Ray Train's public `Result.from_path` (local
    folder or bucket URL); None when there is no run or no checkpoint yet."""
    if not ray_run.exists():
        return None
    from ray.train import Result

    quiet = logging.getLogger("ray.train")  # it explains at INFO that a snapshot was found: we say it better
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        result = Result.from_path(str(ray_run))
    except Exception:  # noqa: BLE001 - no run record (never checkpointed) or unreadable: nothing to resume
        return None
    finally:
        quiet.setLevel(level)
    epoch = (result.metrics or {}).get("epoch") if result.checkpoint is not None else None
    return int(epoch) if epoch is not None else None


def prepare_storage(storage: Path, name: str, run_dir: Path, resume: bool) -> None:
    """Fresh or resumed (see module docstring). Resuming needs nothing here: Ray Train continues a run
    of the same name and storage path from its latest checkpoint and hands it to the workers
    (`ray.train.get_checkpoint()`), which report the epoch they resumed from."""
    ray_run = storage / name
    if resume:
        epoch = latest_checkpoint_epoch(ray_run)
        if epoch is not None:
            log.info("resuming %s from its checkpoint of epoch %d in %s", name, epoch, ray_run)
        else:
            log.info("nothing to resume in %s: starting from scratch", ray_run)
        return
    if ray_run.exists() or any(run_dir.glob("model_*.pt")) or (run_dir / METRICS_CSV).exists():
        _move_aside(ray_run)
        _move_aside(run_dir)


class _LogTail:
    """Echoes the lines rank 0 appends to `training_log.txt` through this process's logger while Ray runs.

    Worker output is not forwarded to the driver (it is mostly Ray's own chatter); the one readable
    line per epoch reaches the console this way, and the file stays beside the model.
    """

    def __init__(self, path: Path, interval: float = 0.5):
        self.path = path
        self.offset = size_of(path) if path.exists() else 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-log-tail", daemon=True)

    def __enter__(self) -> _LogTail:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()

    def _drain(self) -> None:
        try:
            with self.path.open("rb") as f:  # on object storage a ranged read of the (rewritten) object
                f.seek(self.offset)
                data = f.read()
        except (FileNotFoundError, ValueError):  # not there yet / shorter than the offset mid-rewrite
            return
        end = data.rfind(b"\n") + 1  # whole lines only; a partial one waits for the next poll
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            log.info("%s", line.split(" ", 2)[-1] if line[:2].isdigit() else line)


def shared_paths(loop_config: dict, storage: Path) -> list[SharedPath]:
    """What every training node must see: the store (read), the fold folder and Ray's storage (write)."""
    paths = [SharedPath("store", loop_config["store"], "store"), SharedPath("run folder", loop_config["run_dir"], "write"),
             SharedPath("Ray storage folder", str(storage), "write")]
    if loop_config.get("previous_stage"):
        paths.append(SharedPath("previous-stage segmentations", loop_config["previous_stage"]["previous_stage"]))
    return paths


def train_worker(config: dict) -> None:
    """The per-worker function: check this worker sees the workdir, record where it runs, then train."""
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    here = whereami()
    problems = path_problems(shared_paths(config, config["ray_storage"]))
    if problems:
        where = f"{here.get('node_ip', '?')} (node {here.get('node_id', '?')[:12]}, host {here['host']})"
        raise SegPipeError("\n".join([f"training worker {rank} on {where} cannot see {p}" for p in problems]
                                      + ["the workdir must be on a filesystem every node mounts at the same path "
                                         "(cluster/README.md)"]))
    placement = as_path(config["run_dir"]) / "placement"
    placement.mkdir(parents=True, exist_ok=True)
    write_json_atomic(placement / f"rank_{rank}.json",
                      {"rank": rank, "world_size": ctx.get_world_size(), "local_rank": ctx.get_local_rank(), **here})
    train_loop_per_worker(config)


def record_placement(run_dir: Path) -> dict | None:
    """Merge the workers' `placement/rank_<r>.json` into `placement.json`: which rank ran on which node."""
    folder = run_dir / "placement"
    ranks = sorted((json.loads(f.read_text()) for f in folder.glob("rank_*.json")), key=lambda r: r["rank"])
    if not ranks:
        return None
    placement = {"workers": ranks, "nodes": sorted({r.get("node_id", r["host"]) for r in ranks})}
    write_json_atomic(run_dir / "placement.json", placement)
    remove_tree(folder)
    log.info("%d training worker(s) on %d node(s): %s", len(ranks), len(placement["nodes"]),
             ", ".join(f"rank {r['rank']} on {r.get('node_ip', r['host'])} (node {r.get('node_id', '?')[:12]})"
                       for r in ranks))
    return placement


def _root_cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (WorkerGroupError -> RayTaskError -> cause)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def worker_resources(settings: TrainSettings, local_ray: bool) -> tuple[int, dict]:
    """How many workers, and what each asks Ray for: decided from the settings, not from what the
    cluster has at this moment (an autoscaled cluster may have nothing yet); only the defaults look
    at the cluster, and say so."""
    import ray

    resources = ray.cluster_resources()
    gpus_now = int(resources.get("GPU", 0))
    use_gpu = settings.use_gpu if settings.use_gpu is not None else gpus_now > 0
    if settings.use_gpu is None and not use_gpu and not local_ray:
        log.info("no GPU in the Ray cluster now: training on CPU (--use-gpu waits for GPU nodes instead)")
    workers = settings.num_workers or (max(1, gpus_now) if use_gpu else 1)
    cpus = settings.cpus_per_worker or (max(1, int(resources.get("CPU", 1)) // workers) if local_ray else 1)
    if local_ray:  # a Ray this command started cannot grow: say at once what cannot fit
        have = gpus_now if use_gpu else int(resources.get("CPU", 0))
        need = workers if use_gpu else workers * cpus
        if need > have:
            unit = "GPUs" if use_gpu else "CPUs"
            raise BadInputError(f"{workers} training worker(s) need {need} {unit}; this machine's Ray has {have}")
    return workers, ({"CPU": cpus, "GPU": 1} if use_gpu else {"CPU": cpus})


def fit(settings: TrainSettings) -> TrainResult:
    """Check the inputs and that every node sees the workdir, then run `train_worker` on `num_workers`
    Ray workers (DDP); `placement.json` in the fold folder records which node each rank ran on."""
    settings, plans, loop_config = prepare_run(settings)
    wd = Workdir.at(settings.workdir)
    run_dir = as_path(loop_config["run_dir"])
    storage = wd.ray_storage
    name = run_name(settings)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    local_ray = not settings.ray_address and not ray.is_initialized()
    with ray_session(settings.ray_address):
        workers, per_worker = worker_resources(settings, local_ray)
        use_gpu = bool(per_worker.get("GPU"))
        check_workers(plans, settings.config, workers)
        settings = dataclasses.replace(settings, num_workers=workers, use_gpu=use_gpu,
                                       cpus_per_worker=int(per_worker["CPU"]))
        loop_config["settings"] = settings.to_json()
        wait_for_resources(per_worker, workers, settings.resources_timeout_s,
                           f"{workers} training worker(s) of {settings.config} fold {settings.fold}")
        prepare_storage(storage, name, run_dir, settings.resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        storage.mkdir(parents=True, exist_ok=True)
        loop_config["ray_storage"] = str(storage)
        check_ray_nodes_see(shared_paths(loop_config, storage))
        plans.save(run_dir / "plans.json")
        write_json_atomic(run_dir / TRAIN_SETTINGS, settings.to_json())
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=2),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        log.info("training %s fold %s on %d Ray worker(s) (%s)", settings.config, settings.fold, workers,
                 "GPU" if use_gpu else "CPU")
        try:
            with _LogTail(run_dir / TRAINING_LOG):
                result = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error; show the worker's own
            cause = _root_cause(exc)
            if isinstance(cause, SegPipeError):
                raise cause from exc
            raise SegPipeError(f"training failed: {type(cause).__name__}: {cause}") from exc
        record_placement(run_dir)
    return collect_result(run_dir, result.metrics, (result.metrics or {}).get("resumed_from_epoch"))
