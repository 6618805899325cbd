"""`segpipe run`: every stage from a dataset folder to a report, each skipping what is already done.

Re-running after a crash goes on where it stopped: fingerprint and plans are reused when present,
preprocessing skips complete cases, training resumes from its latest checkpoint (or is skipped
when the final model exists), prediction skips cases already written; evaluation and the report
are cheap and always rebuilt.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from pipeline import stages
from pipeline.console import number
from pipeline.errors import SegPipeError
from pipeline.workdir import MODEL_FINAL, Workdir

log = logging.getLogger("segpipe.run")

# On a CPU the nnU-Net-faithful topology learns too slowly to be useful within a laptop's budget
# (see planner.py's `3d_lean` explanation); on a GPU the faithful plan is the default.
CPU_CONFIG = "3d_lean"
GPU_CONFIG = "3d_fullres"
DEMO_TIME_BUDGET_MIN = 4.0


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch install simply means "no GPU"
        return False


def choose_config(requested: str | None) -> str:
    if requested and requested != "auto":
        return requested
    return GPU_CONFIG if _has_gpu() else CPU_CONFIG


@dataclass
class RunOptions:
    """What `segpipe run` / `segpipe demo` take beyond the dataset and the workdir."""

    config: str = "auto"  # 'auto': 3d_fullres with a GPU, 3d_lean without
    fold: str = "0"
    workers: int | None = None  # local Dask workers
    dask_address: str | None = None
    gpu_memory_gb: float = 8.0
    tta: bool = True  # mirroring when predicting the held-out cases
    precision: str = "auto"  # of predicting the held-out cases, and of training unless `train` says otherwise
    demo: bool = False  # the demo's time budget unless epochs or a budget are given
    train: dict = field(default_factory=dict)  # TrainSettings fields (epochs, num_workers, ray_address, ...)


def run_all(dataset_path: str | os.PathLike, workdir: str | os.PathLike, options: RunOptions | None = None) -> dict:
    """Validate -> fingerprint -> plan -> preprocess -> train -> predict held-out -> evaluate -> report."""
    from pipeline.evaluation.crossval import link_inputs
    from pipeline.evaluation.report import build_report
    from pipeline.training.splits import load_or_create_splits

    o = options or RunOptions()
    wd = Workdir.at(workdir)
    wd.root.mkdir(parents=True, exist_ok=True)
    dask = dict(workers=o.workers, dask_address=o.dask_address,  # neither: Dask workers on the training's Ray cluster
                ray_address=o.train.get("ray_address") if o.workers is None and o.dask_address is None else None)
    config = choose_config(o.config)
    with stages.dask_session(**dask) as client:  # validation to preprocessing on one set of Dask workers
        dataset = stages.load_dataset(dataset_path, client=client)
        log.info("[1/7] dataset %s: %d cases, %d channel(s), %d classes", dataset.name, len(dataset.cases),
                 dataset.num_channels, dataset.label_map.num_classes)
        log.info("[2/7] fingerprint")
        stages.fingerprint(dataset, wd, reuse=True, client=client)
        log.info("[3/7] plan")
        plans = stages.plan(dataset, wd, gpu_memory_gb=o.gpu_memory_gb, client=client)
        previous = plans.configuration(config).previous_stage
        for name in (config, previous) if previous is not None else (config,):  # a cascade's previous stage too
            what = " (the cascade's previous stage)" if name == previous else ""
            log.info("[4/7] preprocess %s%s -> store group %s", name, what, plans.configuration(name).data_identifier)
            report = stages.preprocess(dataset, wd, name, plans=plans, client=client)
            log.info("%s", report)
            if report.failed:
                raise SegPipeError(f"preprocessing {name} failed for {len(report.failed)} case(s): {report.failed[0]}")

    fold = str(o.fold)
    if previous is not None:  # a cascade: its previous stage first, every cross-validation fold of it
        for k in previous_stage_folds(wd, dataset.case_ids, fold):
            _train(wd, previous, k, o)
    _train(wd, config, fold, o)

    splits = load_or_create_splits(wd, dataset.case_ids)
    heldout = splits.validation_cases(fold)
    pred_dir = wd.root / "predictions" / f"{config}_fold{fold}"
    log.info("[6/7] predict %d held-out case(s) -> %s", len(heldout), pred_dir)
    inputs = link_inputs(dataset, heldout, wd.root / "heldout_images")
    stages.predict(wd, inputs, pred_dir, config=config, fold=fold, tta=o.tta, progress=True, precision=o.precision)
    log.info("[7/7] evaluate and report")
    eval_dir = wd.root / "evaluation" / f"{config}_fold{fold}"
    summary = stages.evaluate(pred_dir, dataset.root, eval_dir)
    report_path = build_report(wd, plans, config, fold, dataset, pred_dir, eval_dir)
    fg = summary["foreground_mean"]
    log.info("foreground mean Dice %s  IoU %s on %d held-out case(s)", number(fg["dice"]), number(fg["iou"]), len(heldout))
    return {"report": str(report_path), "config": config, "fold": fold, "foreground_mean": fg,
            "evaluation": str(eval_dir / "summary.json")}


def _train(wd: Workdir, config: str, fold: str, o: RunOptions) -> None:
    """Train one configuration and fold unless its final model exists; an interrupted run resumes."""
    run_dir = wd.run_dir(config, fold)
    if (run_dir / MODEL_FINAL).is_file():
        log.info("[5/7] train: %s already holds the final model, skipped", run_dir)
        return
    train = dict(o.train)
    train.setdefault("precision", o.precision)
    if o.demo and train.get("time_budget_min") is None and train.get("epochs") is None:
        train["time_budget_min"] = DEMO_TIME_BUDGET_MIN
    # an interrupted run continues from its checkpoint; with none yet, training starts afresh
    train["resume"] = bool(train.get("resume")) or wd.ray_storage.exists()
    log.info("[5/7] train %s fold %s", config, fold)
    stages.train(wd, config, fold, **train)


def previous_stage_folds(wd: Workdir, case_ids, fold: str) -> list[str]:
    """The previous stage's folds a cascade fold needs: those validating on its training and validation cases."""
    from pipeline.inference.previous_stage import folds_for_cases
    from pipeline.training.splits import load_or_create_splits

    splits = load_or_create_splits(wd, case_ids)
    split = splits.split(fold)
    return list(folds_for_cases(splits, [*split.train, *split.val]))
