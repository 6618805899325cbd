"""`segpipe`: a thin command line over the stage functions.

Exit codes: 0 success, 2 bad input (the user's to fix), 1 anything else. Errors print as one line
without a traceback unless --debug. Every command that has a workdir logs to `<workdir>/logs/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline.console import number
from pipeline.errors import BadInputError, SegPipeError
from pipeline.storage import append_text, as_path, is_url
from pipeline.workdir import Workdir

log = logging.getLogger("segpipe")

EXAMPLES = {
    "validate": "segpipe validate ../shared/data/Task04_Hippocampus",
    "fingerprint": "segpipe fingerprint ../shared/data/Task04_Hippocampus --workdir work/hippo",
    "plan": "segpipe plan ../shared/data/Task04_Hippocampus --workdir work/hippo --explain",
    "preprocess": "segpipe preprocess ../shared/data/Task04_Hippocampus --workdir work/hippo --workers 2",
    "train": "segpipe train --workdir work/hippo --fold 0 --num-workers 2 --time-budget-min 15",
    "predict": "segpipe predict --workdir work/hippo work/hippo/test_images work/hippo/predictions",
    "evaluate": "segpipe evaluate work/hippo/predictions ../shared/data/Task04_Hippocampus --out work/hippo/eval",
    "evaluate-cv": "segpipe evaluate-cv ../shared/data/Task04_Hippocampus --workdir work/hippo --config 3d_lean",
    "find-best": "segpipe find-best ../shared/data/Task04_Hippocampus --workdir work/hippo",
    "run": "segpipe run ../shared/data/Task04_Hippocampus --workdir work/hippo",
    "demo": "segpipe demo --workdir demo_workdir",
    "import-msd": "segpipe import-msd Task04_Hippocampus.tar --dest data/",
    "convert": "segpipe convert data/Task04_Hippocampus data/Dataset004_Hippocampus --to nnunetv2",
    "verify": "segpipe verify work/hippo/store.zarr",
    "import-nnunet": "segpipe import-nnunet nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres "
                     "--workdir work/hippo_nnunet",
    "export-nnunet": "segpipe export-nnunet --workdir work/hippo --config 3d_fullres nnUNet_results",
}


def _color(text: str, code: str, stream=sys.stderr) -> str:
    if stream.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[{code}m{text}\033[0m"
    return text


class _UploadedLog(logging.FileHandler):
    """The command's log for a workdir on object storage: written to a local file while the command
    runs, appended to `W/logs/<command>.log` in the bucket when it ends (object stores cannot append)."""

    def __init__(self, target):
        self.target = target
        fd, self.local = tempfile.mkstemp(prefix="segpipe-log-", suffix=".log")
        os.close(fd)
        super().__init__(self.local)

    def close(self) -> None:
        super().close()
        if os.path.exists(self.local):
            try:
                text = Path(self.local).read_text()
                if text:
                    append_text(self.target, text)
            finally:
                os.unlink(self.local)


def _setup_logging(workdir: str | None, command: str, debug: bool) -> None:
    root = logging.getLogger("segpipe")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in root.handlers:
        handler.close()
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.DEBUG if debug else logging.INFO)
    root.addHandler(console)
    if workdir is not None:
        logs = Workdir.at(workdir).logs
        logs.mkdir(parents=True, exist_ok=True)
        fh = _UploadedLog(logs / f"{command}.log") if is_url(logs) else logging.FileHandler(logs / f"{command}.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)


def _close_logging() -> None:
    root = logging.getLogger("segpipe")
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)


def _emit(args, payload: dict, human: str | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    elif human:
        print(human)


# ---------------------------------------------------------------- stage commands


def cmd_validate(args) -> int:
    from pipeline.data.validation import check_dataset

    report = check_dataset(args.dataset)
    _emit(args, report.to_json())
    if not args.json:
        for w in report.warnings:
            print(f"{_color('warning', '33')} {w}", file=sys.stderr)
        for p in report.problems:
            print(f"{_color('error', '31')} {p}", file=sys.stderr)
        if report.problems:
            print(f"{len(report.problems)} problem(s) in {args.dataset}", file=sys.stderr)
        else:
            print(f"{args.dataset}: ok ({report.num_cases} cases, {len(report.warnings)} warning(s), {report.seconds:.1f}s)")
    return 2 if report.problems else 0


def _dask(args) -> dict:
    """Where the Dask stages run: --workers local processes, the scheduler at --dask-address, or Dask workers on
    the nodes of the Ray cluster at --ray-address (for `run`/`demo` the training's --ray-address, used for
    preprocessing too unless --workers or --dask-address is given)."""
    workers, dask_address = getattr(args, "workers", None), getattr(args, "dask_address", None)
    ray_address = getattr(args, "ray_address", None) if workers is None and dask_address is None else None
    return {"workers": workers, "dask_address": dask_address, "ray_address": ray_address}


def cmd_fingerprint(args) -> int:
    from pipeline import stages

    with stages.dask_session(**_dask(args)) as client:  # one set of workers: validation reads the voxels there
        dataset = stages.load_dataset(args.dataset, client=client)
        fp = stages.fingerprint(dataset, args.workdir, progress=not args.json, client=client)
    _emit(args, {"fingerprint": str(Workdir.at(args.workdir).fingerprint), "cases": len(fp.cases)})
    return 0


def cmd_plan(args) -> int:
    from pipeline import stages
    from pipeline.planning.planner import explain_plans

    with stages.dask_session(**_dask(args)) as client:
        dataset = stages.load_dataset(args.dataset, client=client)
        plans = stages.plan(dataset, args.workdir, gpu_memory_gb=args.gpu_memory_gb, reuse=False,
                            progress=not args.json, client=client)
    if args.json:
        print(json.dumps(plans.to_json(), indent=2))
    elif args.explain:
        print(explain_plans(plans))
    else:
        for name in plans.configurations:
            c = plans.configuration(name)
            print(f"{name}: spacing {c.spacing} patch {c.patch_size} batch {c.batch_size} "
                  f"stages {c.num_stages} features {c.features_per_stage}")
    return 0


def cmd_preprocess(args) -> int:
    from pipeline import stages

    with stages.dask_session(**_dask(args)) as client:
        dataset = stages.load_dataset(args.dataset, client=client)
        report = stages.preprocess(dataset, args.workdir, args.config, progress=not args.json, client=client)
    _emit(args, report.to_json(), str(report))
    return 0 if not report.failed else 2


def cmd_train(args) -> int:
    from pipeline import stages
    from pipeline.training.launch import run_training
    from pipeline.training.loop import TrainSettings

    settings = TrainSettings.from_args(args)
    stages.previous_stage(settings.workdir, settings.config, settings.fold, progress=not args.json)  # a cascade's inputs
    result = run_training(settings)
    _emit(args, result.to_json(), str(result))
    return 0


def cmd_predict(args) -> int:
    from pipeline import stages

    report = stages.predict(
        args.workdir, args.input_dir, args.output_dir, config=args.config, fold=args.fold, tta=not args.no_tta,
        save_probabilities=args.save_probabilities, num_workers=args.num_workers, ray_address=args.ray_address,
        progress=not args.json, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        resources_timeout_s=args.resources_timeout_s or 600.0, checkpoint=args.checkpoint, step=args.step_size,
        device=args.device, precision=args.precision,
    )
    _emit(args, report.to_json(), str(report))
    return 0


def cmd_import_nnunet(args) -> int:
    from pipeline import stages

    report = stages.import_nnunet(args.results_folder, args.workdir, _fold_list(args.fold))
    _emit(args, report.to_json(), str(report))
    return 0


def cmd_export_nnunet(args) -> int:
    from pipeline import stages

    report = stages.export_nnunet(args.workdir, args.output_dir, config=args.config, folds=_fold_list(args.fold),
                                  dataset_id=args.dataset_id)
    _emit(args, report.to_json(), str(report))
    return 0


def _fold_list(text: str | None) -> list[str] | None:
    from pipeline.inference.predictor import parse_folds

    return None if text is None else parse_folds(text)


def _step_size(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction of the patch), got {text}")
    return value


def cmd_evaluate(args) -> int:
    from pipeline import stages

    out = as_path(args.out) if args.out else as_path(args.pred_dir) / "evaluation"
    pictures = False if args.pictures is None else True if args.pictures == "all" else \
        [c.strip() for c in args.pictures.split(",") if c.strip()]
    summary = stages.evaluate(args.pred_dir, args.ref_dir, out, progress=not args.json, pictures=pictures,
                              images_dir=args.images)
    fg = summary["foreground_mean"]
    _emit(args, summary, f"foreground mean Dice {number(fg['dice'])}  IoU {number(fg['iou'])}  -> {out / 'summary.json'}")
    return 0


def cmd_evaluate_cv(args) -> int:
    from pipeline import stages

    dataset = stages.load_dataset(args.dataset)
    report = stages.evaluate_cv(dataset, args.workdir, config=args.config, folds=args.folds, tta=not args.no_tta,
                                num_workers=args.num_workers, ray_address=args.ray_address, progress=not args.json,
                                save_probabilities=not args.no_probabilities, precision=args.precision)
    _emit(args, report.to_json(), str(report))
    return 0


def cmd_find_best(args) -> int:
    from pipeline import stages

    dataset = stages.load_dataset(args.dataset)
    report = stages.find_best(dataset, args.workdir, configs=args.configs, progress=not args.json)
    _emit(args, report.to_json(), str(report))
    return 0


def _run_options(args, demo: bool):
    from pipeline.run import RunOptions
    from pipeline.training.loop import TrainSettings

    train = TrainSettings.from_args(args).to_json()
    for name in ("workdir", "config", "fold"):
        train.pop(name)
    return RunOptions(config=args.config, fold=str(args.fold), workers=args.workers, dask_address=args.dask_address,
                      gpu_memory_gb=args.gpu_memory_gb, tta=not args.no_tta, precision=args.precision, demo=demo,
                      train=train)


def cmd_run(args) -> int:
    from pipeline.run import run_all

    if args.dataset is None:  # `segpipe run` without a dataset: the demo's phantoms
        return cmd_demo(args)
    result = run_all(args.dataset, args.workdir, _run_options(args, demo=False))
    _emit(args, result, f"report: {result.get('report')}")
    return 0


def cmd_demo(args) -> int:
    from pipeline.data.synthetic import make_demo_dataset
    from pipeline.run import run_all

    wd = Workdir.at(args.workdir)
    dataset = make_demo_dataset(wd.root / "demo_dataset", num_cases=args.cases)
    result = run_all(dataset, wd.root, _run_options(args, demo=True))
    _emit(args, result, f"report: {result.get('report')}")
    return 0


def cmd_import_msd(args) -> int:
    from pipeline.data.conversion import import_msd

    path = import_msd(args.source, args.dest)
    _emit(args, {"dataset": str(path)}, f"imported {path}")
    return 0


def cmd_convert(args) -> int:
    from pipeline.data.conversion import msd_to_nnunet, nnunet_to_msd

    convert = msd_to_nnunet if args.to == "nnunetv2" else nnunet_to_msd
    path = convert(args.source, args.dest)
    _emit(args, {"dataset": str(path)}, f"wrote {path} ({args.to} layout)")
    return 0


def cmd_verify(args) -> int:
    """Read every chunk of every complete case: a flipped bit fails its CRC32C and is named here.
    --repair also deletes the damaged cases (exit 0 once nothing damaged is left); the next
    `segpipe preprocess` redoes them."""
    from pipeline.preprocessing.store import open_store, repair_store, verify_store

    if args.repair:
        problems, deleted = repair_store(args.store)
        left = [p for p in problems if p.case is None]  # not a case's: nothing to delete
        _emit(args, {"store": args.store, "ok": not left, "problems": [str(p) for p in problems],
                     "deleted": deleted, "unrepaired": [str(p) for p in left]})
        if not args.json:
            for p in problems:
                print(f"{_color('damaged' if p.case else 'error', '31')} {p}", file=sys.stderr)
            if deleted:
                print(f"deleted {len(deleted)} damaged case(s) from {args.store}: {', '.join(deleted)}; "
                      "`segpipe preprocess DATASET --workdir W` redoes them")
            elif not problems:
                print(f"{args.store}: ok (every chunk read, nothing to repair)")
        return 2 if left else 0
    problems = verify_store(args.store)
    store = open_store(args.store, "r")
    configs = store.config_names()
    cases = sum(len(store.config(name).case_ids()) for name in configs)
    # not an error: an interrupted run leaves them (so would metadata too damaged to read), and the
    # next `segpipe preprocess` deletes and redoes them
    incomplete = [f"{name}/cases/{c}" for name in configs for c in store.config(name).incomplete_case_ids()]
    _emit(args, {"store": args.store, "ok": not problems, "configurations": configs, "cases": cases,
                 "incomplete": incomplete, "problems": [str(p) for p in problems]})
    if not args.json:
        if incomplete:
            print(f"{_color('note', '33')} {len(incomplete)} incomplete case(s), invisible to training; "
                  f"`segpipe preprocess` redoes them: {', '.join(incomplete)}", file=sys.stderr)
        for p in problems:
            print(f"{_color('error', '31')} {p}", file=sys.stderr)
        if problems:
            print(f"{len(problems)} problem(s) in {args.store}", file=sys.stderr)
        else:
            print(f"{args.store}: ok ({cases} complete case(s) in {len(configs)} configuration(s), every chunk read)")
    return 2 if problems else 0


# ---------------------------------------------------------------- parser


def _add_dask(p, ray_address: bool = True):
    """`ray_address=False` where `_add_train` already defines --ray-address (run, demo): it then serves
    preprocessing too (see `_dask`)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, default=None, help="Dask workers on a local cluster (default: cores)")
    g.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT", help="use an existing Dask scheduler")
    if ray_address:
        g.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run the Dask workers on the nodes of this Ray cluster ('auto' inside a Ray job)")


def _add_train(p):
    p.add_argument("--config", default="3d_fullres")
    p.add_argument("--fold", default="0", help="0..4 or 'all'")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: 1 per GPU, else 1)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iterations-per-epoch", type=int, default=None)
    p.add_argument("--time-budget-min", type=float, default=None, help="wall-clock budget; the LR schedule follows it")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="connect to an existing Ray cluster ('auto' inside a Ray job); run/demo also preprocess "
                        "there (Dask workers on its nodes) unless --workers or --dask-address is given")
    p.add_argument("--recipe", choices=("nnunet", "lean", "adam_ce"), default=None,
                   help="optimiser/schedule/augmentation recipe (default: the configuration's preset; 3d_lean -> lean)")
    p.add_argument("--val-iterations", type=int, default=None, help="validation batches per epoch")
    p.add_argument("--checkpoint-every", type=int, default=None, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=None, help="seeds model initialisation and every batch (default 12345)")
    _add_resources(p)


def _add_precision(p, cuda: str):
    """--precision of the commands that run the network: train, predict, evaluate-cv, run and demo
    (pipeline.precision.PRECISIONS; not imported here: it loads torch)."""
    p.add_argument("--precision", choices=["auto", "mixed", "fp32"], default="auto",
                   help=f"what the convolutions compute in: auto (default) mixed precision where the hardware computes "
                        f"it itself ({cuda} on CUDA as nnU-Net; bfloat16 on a CPU with AVX512-BF16/AMX), else "
                        f"float32; fp32 always float32; mixed always mixed")


def _add_resources(p):
    """What each Ray worker asks for; the run waits (for an autoscaler) until the cluster has it."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--use-gpu", dest="use_gpu", action="store_const", const=True, default=None,
                   help="one GPU per worker; wait for GPU nodes (default: GPUs if the cluster has some now)")
    g.add_argument("--cpu", dest="use_gpu", action="store_const", const=False, help="CPU only, even where GPUs are")
    p.add_argument("--cpus-per-worker", type=int, default=None, metavar="N",
                   help="CPUs reserved per Ray worker; its threads and loader processes follow "
                        "(default: a local Ray's CPUs shared out, 1 on a cluster)")
    p.add_argument("--resources-timeout-s", type=float, default=None, metavar="S",
                   help="how long to wait for the cluster to provide the workers' resources (default 600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Self-configuring 3D medical image segmentation: a folder of images in (NIfTI, MetaImage, NRRD, DICOM), "
                    "trained U-Net, predictions and scores out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
    )
    parser.add_argument("--version", action="version", version=f"segpipe {__import__('pipeline').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return p

    p = add("validate", "check a dataset and report every problem (nothing is written)")
    p.add_argument("dataset")

    p = add("fingerprint", "per-case spacing, shapes, intensities and class counts (Dask)")
    p.add_argument("dataset")
    p.add_argument("--workdir", required=True)
    _add_dask(p)

    p = add("plan", "choose spacing, patch, network and batch size by nnU-Net v2's rules")
    p.add_argument("dataset")
    p.add_argument("--workdir", required=True)
    p.add_argument("--explain", action="store_true", help="print every chosen value with its rule")
    p.add_argument("--gpu-memory-gb", type=float, default=8.0, help="memory budget the patch/batch must fit (default 8)")
    _add_dask(p)

    p = add("preprocess", "crop, normalise, resample into the chunked Zarr store (Dask)")
    p.add_argument("dataset")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="3d_fullres")
    _add_dask(p)

    p = add("train", "train the U-Net data-parallel with Ray Train, streaming patches from Zarr")
    p.add_argument("--workdir", required=True)
    _add_train(p)
    _add_precision(p, cuda="float16 + gradient scaling")

    p = add("predict", "sliding-window inference, written in the input's format and original geometry")
    p.add_argument("--workdir", required=True)
    p.add_argument("input_dir")
    p.add_argument("output_dir")
    p.add_argument("--config", default="3d_fullres",
                   help="a configuration; `best` for what `segpipe find-best` chose; or a comma list "
                        "(3d_fullres,3d_lean) whose probabilities are averaged (default 3d_fullres)")
    p.add_argument("--fold", default=None, metavar="0,1,2,3,4",
                   help="fold(s) to ensemble (default: every fold with a trained model, as nnUNetv2_predict; for "
                        "`best` or a list: the cross-validated folds, else every trained fold)")
    p.add_argument("--checkpoint", choices=["final", "best"], default="final",
                   help="model_final.pt (default) or model_best.pt (nnU-Net's checkpoint_best)")
    p.add_argument("--step-size", type=_step_size, default=0.5, metavar="S",
                   help="sliding-window step as a fraction of the patch (default 0.5, nnU-Net's; larger is faster)")
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also OUTPUT/CASE.npz (class probabilities, RAS order) and OUTPUT/nnunet/ (nnU-Net's .npz + "
                        ".pkl layout, for nnUNetv2_ensemble)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray workers predicting cases in parallel")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the network runs: cuda (window logits accumulated on the GPU, mixed precision), "
                        "cpu, or auto (CUDA when torch sees a GPU)")
    _add_precision(p, cuda="float16")
    _add_resources(p)

    p = add("evaluate", "Dice, IoU, HD95 per class and case; summary.json, CSV, markdown, PNG")
    p.add_argument("pred_dir")
    p.add_argument("ref_dir", help="a label folder or a dataset folder")
    p.add_argument("--out", default=None)
    p.add_argument("--pictures", nargs="?", const="all", default=None, metavar="CASE,...",
                   help="also draw OUT/pictures/CASE.png: slices with reference and prediction contours "
                        "(every case, or the ones listed)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="the images for --pictures when REF_DIR is a label folder, named as `segpipe predict` reads them")

    p = add("evaluate-cv", "cross-validation: each fold's validation cases by its own model, pooled scores, "
                           "post-processing decided and saved beside the models")
    p.add_argument("dataset", help="the dataset the workdir was trained on (images and reference labels)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="(default: the one configuration with trained folds)")
    p.add_argument("--folds", default=None, metavar="0,1,2,3,4", help="(default: every fold with a final model)")
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--num-workers", type=int, default=None, help="Ray workers predicting cases in parallel")
    p.add_argument("--ray-address", default=None)
    _add_precision(p, cuda="float16")
    p.add_argument("--no-probabilities", action="store_true",
                   help="do not keep each case's class probabilities (CASE.npz; `segpipe find-best` needs them)")

    p = add("find-best", "compare the cross-validated configurations and their pair ensembles; save the best "
                         "for `segpipe predict --config best`")
    p.add_argument("dataset", help="the dataset the workdir was trained on (reference labels)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--configs", default=None, metavar="2d,3d_fullres,...",
                   help="the candidates (default: every configuration `segpipe evaluate-cv` scored; two or more)")

    for name, text in (("run", "every stage on DATASET, skipping what is done"),
                       ("demo", "every stage on the embedded synthetic phantom dataset")):
        p = add(name, text)
        if name == "run":
            p.add_argument("dataset", nargs="?", default=None, help="(default: the synthetic demo dataset)")
            p.add_argument("--workdir", required=False, default="segpipe_workdir")
        else:
            p.add_argument("--workdir", default="demo_workdir")
        _add_train(p)
        _add_dask(p, ray_address=False)
        p.add_argument("--gpu-memory-gb", type=float, default=8.0)
    for p in (sub.choices["run"], sub.choices["demo"]):
        p.set_defaults(config="auto")
        p.add_argument("--no-tta", action="store_true", help="predict the held-out cases without mirroring")
        _add_precision(p, cuda="float16, with gradient scaling in training,")
    for p in (sub.choices["run"], sub.choices["demo"]):
        p.add_argument("--cases", type=int, default=24,
                       help="synthetic cases to generate when there is no DATASET (default 24)")

    p = add("import-msd", "unpack a Decathlon task tarball (path or http(s) URL) and check it")
    p.add_argument("source")
    p.add_argument("--dest", default=".", help="folder that receives TaskXX_Name/")

    p = add("convert", "convert a dataset between the Decathlon and nnU-Net v2 raw layouts")
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--to", choices=["nnunetv2", "msd"], required=True)

    p = add("import-nnunet", "an nnU-Net v2 trained-model folder into a workdir, so that `segpipe predict` runs it")
    p.add_argument("results_folder", help="nnUNet_results/DatasetNNN_Name/TRAINER__PLANS__CONFIG (dataset.json, "
                                          "plans.json, fold_K/checkpoint_final.pth)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--fold", default=None, metavar="0,1,...", help="folds to import (default: every fold with a checkpoint)")

    p = add("export-nnunet", "a trained configuration written as an nnU-Net v2 results folder (nnUNetv2_predict reads it)")
    p.add_argument("output_dir", help="an nnUNet_results folder: receives DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__CONFIG/")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="(default: the one configuration with trained folds)")
    p.add_argument("--fold", default=None, metavar="0,1,...", help="folds to export (default: every trained fold)")
    p.add_argument("--dataset-id", type=int, default=None,
                   help="nnU-Net's dataset number (default: from the dataset name, TaskNN_/DatasetNNN_, else 999)")

    p = add("verify", "read every chunk of a preprocessed store; report corrupt or missing data (exit 2)")
    p.add_argument("store", help="a store.zarr folder (or fsspec URL)")
    p.add_argument("--repair", action="store_true",
                   help="also delete the damaged cases (exit 0 when nothing damaged is left); the next "
                        "`segpipe preprocess` redoes them")
    return parser


HANDLERS = {
    "validate": cmd_validate, "fingerprint": cmd_fingerprint, "plan": cmd_plan, "preprocess": cmd_preprocess,
    "train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "evaluate-cv": cmd_evaluate_cv, "find-best": cmd_find_best, "run": cmd_run, "demo": cmd_demo,
    "import-msd": cmd_import_msd, "convert": cmd_convert, "verify": cmd_verify,
    "import-nnunet": cmd_import_nnunet, "export-nnunet": cmd_export_nnunet,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = getattr(args, "workdir", None)
    start = time.perf_counter()
    try:
        try:
            _setup_logging(workdir if workdir and args.command != "validate" else None, args.command, args.debug)
        except OSError as exc:  # e.g. the workdir's parent is a file: the user's argument to fix
            raise BadInputError(f"cannot use --workdir {workdir}: {exc.strerror or exc} ({exc.filename})") from None
        code = HANDLERS[args.command](args)
        log.debug("%s finished in %.1fs", args.command, time.perf_counter() - start)
    except KeyboardInterrupt:
        print(_color("interrupted", "33") + ": re-run the same command to resume", file=sys.stderr)
        return 130
    except SegPipeError as exc:
        if args.debug:
            raise
        # bad input: one line per problem, a problem's message spanning lines (nibabel's) joined so
        # that each line is meaningful alone; other errors keep their own line breaks
        lines = ([" ".join(part.strip() for part in str(p).splitlines()) for p in exc.problems]
                 if isinstance(exc, BadInputError) else str(exc).splitlines())
        lines = [line for line in lines if line.strip()] or [type(exc).__name__]
        for line in lines:
            print(f"{_color('error', '31')} {line}", file=sys.stderr)
        log.debug("failed", exc_info=True)
        return exc.exit_code
    except Exception as exc:  # anything unexpected: one line, details in the log / with --debug
        if args.debug:
            raise
        log.debug("unexpected failure", exc_info=True)
        message = " ".join(part.strip() for part in str(exc).splitlines())  # one line: a wrapped message reads whole
        print(f"{_color('error', '31')} {type(exc).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        _close_logging()  # a log for a workdir in a bucket is uploaded here
    return code


if __name__ == "__main__":
    sys.exit(main())
