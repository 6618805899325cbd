"""The pipeline's stages as plain functions: the public API under the CLI.

`segpipe`, `segpipe run`, the cluster scripts, the benchmarks and notebooks all call these; each
takes typed arguments and a workdir (a path, or a `Workdir`) and returns a typed result:

    from pipeline import stages

    dataset = stages.load_dataset("data/Task04_Hippocampus")       # validated, or BadInputError
    stages.fingerprint(dataset, "work/hippo")
    plans = stages.plan(dataset, "work/hippo")
    stages.preprocess(dataset, "work/hippo", config="3d_lean")
    stages.train("work/hippo", config="3d_lean", fold="0", time_budget_min=5)
    stages.predict("work/hippo", "new_images/", "predictions/", config="3d_lean")
    summary = stages.evaluate("predictions/", "data/Task04_Hippocampus")

Stages that run on Dask (validation, fingerprint, plan, preprocess) take a `distributed.Client`, or make one
for the call: `workers` local processes, or the scheduler at `dask_address`; `dask_session` makes one
that several stages share. Stages that run on
Ray (train, predict, evaluate_cv) take a `ray_address` (None: a local Ray on 127.0.0.1). What a
stage writes lands in the workdir's layout (`pipeline.workdir`), so each stage finds what the one
before it wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence

from pipeline.data.dataset import Dataset
from pipeline.errors import BadInputError, SegPipeError
from pipeline.storage import as_path
from pipeline.workdir import Workdir

log = logging.getLogger("segpipe")

WorkdirLike = str | os.PathLike | Workdir


@contextlib.contextmanager
def dask_session(client=None, workers: int | None = None, dask_address: str | None = None,
                 ray_address: str | None = None) -> Iterator[object]:
    """`client` as it is, or one made for the block: the scheduler at `dask_address`, Dask workers on the
    nodes of the Ray cluster at `ray_address` (`parallel.dask_on_ray`), or `workers` local processes.
    Several stages in one block share it (validation, fingerprint, plan, preprocess) and so start
    the workers once."""
    if client is not None:
        yield client
        return
    from pipeline.parallel import dask_client, dask_on_ray

    if ray_address and not dask_address:
        with dask_on_ray(ray_address, workers) as made:
            yield made
        return
    with dask_client(workers, dask_address) as made:
        yield made


def load_dataset(path: str | os.PathLike, *, client=None) -> Dataset:
    """The dataset at `path`, checked case by case first: BadInputError listing every problem; legal
    oddities (a constant image, an empty label) are logged as warnings and the run goes on. With a
    Dask `client` its workers check the cases (`validation.check_dataset`): each reads its cases'
    voxels where preprocessing will read them, instead of this process reading the whole dataset."""
    from pipeline.data.dataset import load_dataset as load
    from pipeline.data.validation import check_dataset

    report = check_dataset(path, client=client)
    if report.problems:
        raise BadInputError(report.problems)
    for w in report.warnings:
        log.warning("warning %s", w)
    return load(path)


def fingerprint(dataset: Dataset, workdir: WorkdirLike, *, reuse: bool = False, client=None,
                workers: int | None = None, dask_address: str | None = None, progress: bool = True,
                ray_address: str | None = None):
    """Per-case spacing, shape, intensities and class counts, one Dask task per case, saved as
    `W/fingerprint.json`. With `reuse`, an existing fingerprint is returned as it is."""
    from pipeline.planning.fingerprint import Fingerprint, compute_fingerprint

    wd = Workdir.at(workdir)
    if reuse and wd.fingerprint.is_file():
        return Fingerprint.load(wd.fingerprint)
    with dask_session(client, workers, dask_address, ray_address) as c:
        fp = compute_fingerprint(dataset, client=c, progress=progress)
    fp.save(wd.fingerprint)
    log.info("fingerprint of %d cases -> %s", len(dataset.cases), wd.fingerprint)
    return fp


def plan(dataset: Dataset, workdir: WorkdirLike, *, gpu_memory_gb: float = 8.0, reuse: bool = True, client=None,
         workers: int | None = None, dask_address: str | None = None, progress: bool = True,
         ray_address: str | None = None):
    """nnU-Net v2's plans for `dataset`, saved as `W/plans.json` (the fingerprint is computed first
    when the workdir has none). With `reuse`, existing plans are returned as they are."""
    from pipeline.planning.planner import plan_experiment
    from pipeline.planning.plans import Plans

    wd = Workdir.at(workdir)
    if reuse and wd.plans.is_file():
        return Plans.load(wd.plans)
    fp = fingerprint(dataset, wd, reuse=True, client=client, workers=workers, dask_address=dask_address,
                     progress=progress, ray_address=ray_address)
    plans = plan_experiment(fp, dataset, gpu_memory_gb=gpu_memory_gb)
    plans.save(wd.plans)
    log.info("plans -> %s", wd.plans)
    return plans


def preprocess(dataset: Dataset, workdir: WorkdirLike, config: str = "3d_fullres", *, plans=None, client=None,
               workers: int | None = None, dask_address: str | None = None, progress: bool = True,
               gpu_memory_gb: float = 8.0, ray_address: str | None = None):
    """Every case of `config` into `W/store.zarr` (one Dask task and one writer per case), skipping
    complete cases; returns the `PreprocessReport` (its `failed` lists the cases that could not be
    done). Plans are made first when the workdir has none."""
    from pipeline.preprocessing.preprocess import run_preprocessing

    wd = Workdir.at(workdir)
    with dask_session(client, workers, dask_address, ray_address) as c:
        plans = plans or plan(dataset, wd, gpu_memory_gb=gpu_memory_gb, client=c, progress=progress)
        return run_preprocessing(dataset, plans, config, wd.store, client=c, progress=progress)


def previous_stage(workdir: WorkdirLike, config: str, fold: str | int | None = None, *, tta: bool = True,
                   progress: bool = True):
    """For a cascade stage (`3d_cascade_fullres`): its previous stage's cross-validated segmentations
    of the cases fold `fold` (None: every fold) trains and validates on, made where missing (each case
    by the fold that did not train on it); `PreviousStageReport`, or None for other configurations."""
    from pipeline.inference.previous_stage import make_previous_stage_predictions

    return make_previous_stage_predictions(Workdir.at(workdir), config, None if fold is None else str(fold),
                                           tta=tta, progress=progress)


def train(workdir: WorkdirLike, config: str = "3d_fullres", fold: str | int = "0", **settings):
    """Train one configuration and fold data-parallel with Ray Train; `settings` are the other
    `TrainSettings` fields (num_workers, epochs, time_budget_min, resume, ray_address, recipe, ...).
    A cascade stage first gets its previous stage's segmentations (`previous_stage`).
    Returns the `TrainResult` (model files, metrics, epochs)."""
    from pipeline.training.launch import run_training
    from pipeline.training.loop import TrainSettings

    known = {f.name for f in dataclasses.fields(TrainSettings)} - {"workdir", "config", "fold"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"train() got unknown settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    settings = {k: v for k, v in settings.items() if v is not None}
    previous_stage(workdir, config, fold, progress=False)
    return run_training(TrainSettings(workdir=str(Workdir.at(workdir).root), config=config, fold=str(fold), **settings))


def predict(workdir: WorkdirLike, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
            config: str = "3d_fullres", fold: str | int | Sequence | None = None, **options):
    """Every case of `input_dir` predicted into `output_dir` (CASE plus the input's ending, in its format and geometry),
    skipping cases already there; `fold` None ensembles every trained fold (as nnUNetv2_predict);
    `options` as `inference.predict.predict_folder` (tta, num_workers, ray_address, checkpoint, step,
    save_probabilities, ...). With `save_probabilities`, `output_dir/nnunet/` also gets them in nnU-Net's
    layout for `nnUNetv2_ensemble` (`interop.nnunet.write_probabilities`). Returns the `PredictReport`.

    `config` may also be `best` (what `find_best` chose) or a comma list of configurations: their
    probabilities are averaged (`inference.ensemble`; `fold` None: the cross-validated folds)."""
    from pipeline.inference.ensemble import is_multi_config

    if is_multi_config(config):
        from pipeline.inference.ensemble import predict_configurations

        return predict_configurations(Workdir.at(workdir), as_path(input_dir), as_path(output_dir), config,
                                      fold=fold, **options)
    from pipeline.inference.predict import predict_folder

    report = predict_folder(Workdir.at(workdir), as_path(input_dir), as_path(output_dir), config=config, fold=fold,
                            **options)
    if options.get("save_probabilities"):
        from pipeline.interop.nnunet import PROBABILITIES_DIR, write_probabilities

        try:
            write_probabilities(workdir, config, report.folds[0], as_path(input_dir), as_path(output_dir))
        except BadInputError as exc:  # ours are written; nnU-Net's layout cannot express this model
            log.warning("probabilities not written in nnU-Net's layout (%s/): %s", PROBABILITIES_DIR, exc)
    return report


def import_nnunet(results_folder: str | os.PathLike, workdir: WorkdirLike, folds: Sequence | None = None):
    """An nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_K/checkpoint_*.pth, post-processing)
    converted into the workdir, so that `predict` runs it; BadInputError for what does not map one to
    one (other trainers or architectures, unsafe checkpoint content, missing folds). Returns the `ImportReport`."""
    from pipeline.interop.nnunet import import_results_folder

    return import_results_folder(results_folder, Workdir.at(workdir), None if folds is None else [str(f) for f in folds])


def export_nnunet(workdir: WorkdirLike, output_dir: str | os.PathLike, config: str | None = None,
                  folds: Sequence | None = None, dataset_id: int | None = None):
    """Trained folds of `config` (default: the one trained configuration) written as an nnU-Net v2 results
    folder `output_dir/DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__<config>/` that nnUNetv2_predict reads.
    Returns the `ExportReport`."""
    from pipeline.interop.nnunet import export_run

    wd = Workdir.at(workdir)
    return export_run(wd, as_path(output_dir), config or trained_config(wd),
                      None if folds is None else [str(f) for f in folds], dataset_id)


def evaluate(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
             **options) -> dict:
    """Dice, IoU and HD95 per class and case of `pred_dir` against `ref_dir` (a dataset or a label
    folder), written to `out_dir` (default `pred_dir/evaluation`); returns the summary.json content."""
    from pipeline.evaluation.metrics import evaluate_folders

    out = as_path(out_dir) if out_dir is not None else as_path(pred_dir) / "evaluation"
    return evaluate_folders(as_path(pred_dir), as_path(ref_dir), out, **options)


def trained_config(workdir: WorkdirLike) -> str:
    """The one configuration with trained folds in the workdir (BadInputError when there are several)."""
    from pipeline.workdir import trained_folds

    wd = Workdir.at(workdir)
    runs = wd.runs
    configs = sorted(d.name for d in runs.iterdir() if d.is_dir() and trained_folds(wd, d.name)) if runs.is_dir() else []
    if len(configs) == 1:
        return configs[0]
    if not configs:
        raise SegPipeError(f"no trained model in {runs}: run `segpipe train --workdir {wd.root} --fold K` first")
    raise BadInputError(f"several configurations are trained ({', '.join(configs)}): choose one with --config")


def evaluate_cv(dataset: Dataset, workdir: WorkdirLike, config: str | None = None, **options):
    """Cross-validation: each fold's validation cases predicted by its own model, pooled scores, and
    the post-processing rule decided and saved beside the models. Returns the `CrossvalReport`."""
    from pipeline.evaluation.crossval import evaluate_crossval

    wd = Workdir.at(workdir)
    return evaluate_crossval(wd, dataset.root, config=config or trained_config(wd), **options)


def find_best(dataset: Dataset, workdir: WorkdirLike, configs: str | Sequence[str] | None = None, **options):
    """nnU-Net's best configuration: every cross-validated configuration and every pair ensemble
    (averaged validation probabilities) scored on the pooled folds; the choice is saved for
    `predict(config="best")`. Returns the `FindBestReport` (BadInputError with fewer than two)."""
    from pipeline.evaluation.find_best import find_best_configuration

    return find_best_configuration(Workdir.at(workdir), dataset.root, configs=configs, **options)
