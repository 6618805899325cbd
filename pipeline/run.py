"""`segpipe run`: every stage from a dataset folder to a report, each skipping what is already done.

Re-running after a crash goes on where it stopped: fingerprint and plans are reused when present,
preprocessing skips complete cases, training resumes from its latest checkpoint (or is skipped
when the final model exists), prediction skips cases already written; evaluation and the report
are cheap and always rebuilt.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import SegPipeError
from .workdir import Workdir

log = logging.getLogger("segpipe.run")

# On a CPU the nnU-Net-faithful topology learns too slowly to be useful within a laptop's budget
# (see planning.py's `3d_lean` explanation); on a GPU the faithful plan is the default.
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


def run_all(args) -> dict:
    """Validate -> fingerprint -> plan -> preprocess -> train -> predict held-out -> evaluate -> report."""
    from . import cli
    from .crossval import link_inputs
    from .evaluation import evaluate_folders
    from .inference import predict_folder
    from .parallel import dask_client
    from .preprocessing import run_preprocessing
    from .report import build_report
    from .splits import load_or_create_splits
    from .training import TrainSettings, run_training

    wd = Workdir.at(args.workdir)
    wd.root.mkdir(parents=True, exist_ok=True)
    dataset = cli._load_valid_dataset(args.dataset)
    log.info("[1/7] dataset %s: %d cases, %d channel(s), %d classes", dataset.name, len(dataset.cases),
             dataset.num_channels, dataset.label_map.num_classes)
    log.info("[2/7] fingerprint")
    cli._fingerprint(args, dataset)
    log.info("[3/7] plan")
    plans = cli._plan(args, dataset)
    config = choose_config(getattr(args, "config", None))
    args.config = config
    data_id = plans.configuration(config).data_identifier
    log.info("[4/7] preprocess (%s -> store group %s)", config, data_id)
    with dask_client(getattr(args, "workers", None), getattr(args, "dask_address", None)) as client:
        report = run_preprocessing(dataset, plans, config, wd.store, client=client, progress=True)
    log.info("%s", report)
    if report.failed:
        raise SegPipeError(f"preprocessing failed for {len(report.failed)} case(s): {report.failed[0]}")

    fold = str(getattr(args, "fold", "0"))
    run_dir = wd.run_dir(config, fold)
    if (run_dir / "model_final.pt").is_file():
        log.info("[5/7] train: %s already holds the final model, skipped", run_dir)
    else:
        if args.command == "demo" and args.time_budget_min is None and args.epochs is None:
            args.time_budget_min = DEMO_TIME_BUDGET_MIN
        args.resume = args.resume or (run_dir / "checkpoints").exists() or (wd.root / "runs" / "ray").exists()
        log.info("[5/7] train %s fold %s", config, fold)
        run_training(TrainSettings.from_args(args))

    splits = load_or_create_splits(wd, dataset.case_ids)
    heldout = splits.validation_cases(fold)
    pred_dir = wd.root / "predictions" / f"{config}_fold{fold}"
    log.info("[6/7] predict %d held-out case(s) -> %s", len(heldout), pred_dir)
    inputs = link_inputs(dataset, heldout, wd.root / "heldout_images")
    predict_folder(wd, inputs, pred_dir, config=config, fold=fold, tta=not getattr(args, "no_tta", False), progress=True)
    log.info("[7/7] evaluate and report")
    eval_dir = wd.root / "evaluation" / f"{config}_fold{fold}"
    summary = evaluate_folders(pred_dir, Path(args.dataset), eval_dir)
    report_path = build_report(wd, plans, config, fold, dataset, pred_dir, eval_dir)
    fg = summary["foreground_mean"]
    log.info("foreground mean Dice %s  IoU %s on %d held-out case(s)", cli._num(fg["dice"]), cli._num(fg["iou"]), len(heldout))
    return {"report": str(report_path), "config": config, "fold": fold, "foreground_mean": fg,
            "evaluation": str(eval_dir / "summary.json")}
