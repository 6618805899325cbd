"""The cascade's training inputs: the previous stage's cross-validated segmentations, made and stored.

`3d_cascade_fullres` fold k trains on cases that `3d_lowres` fold k also trained on, so their
segmentations must come from the `3d_lowres` folds that validated on them (nnU-Net's
`predicted_next_stage`): each case is segmented by the one fold whose validation set holds it. Every
fold whose validation cases are needed must be trained; a missing one is named with the command
that trains it (exit 2).

Each case is read from the previous stage's preprocessed store (no raw file is read again),
segmented by the sliding window (mirroring TTA, as nnU-Net's validation), carried into the
cascade's store frame (`inference.cascade.to_next_stage_frame`) and written to
`Workdir.next_stage_predictions` (`training.cascade.NextStageSegmentations`: the case's `complete`
flag last). Re-running skips cases already made by the same model file, so an interrupted run
resumes and a retrained fold redoes its cases.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.console import progress_bar
from pipeline.errors import BadInputError
from pipeline.workdir import MODEL_FINAL, Workdir

log = logging.getLogger("segpipe.cascade")


@dataclass
class PreviousStageReport:
    """What `make_previous_stage_predictions` did."""

    path: str
    previous: str
    config: str
    folds: dict[str, list[str]] = field(default_factory=dict)  # previous-stage fold -> the cases it segments
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # made before by the same model file
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.previous} segmentations for {self.config}: {len(self.predicted)} predicted, "
                f"{len(self.skipped)} already there, by fold(s) {', '.join(self.folds)} in {self.seconds:.1f}s "
                f"-> {self.path}")


def folds_for_cases(splits, case_ids) -> dict[str, list[str]]:
    """Cross-validation fold -> those of `case_ids` it validates on (the fold that did not train on them)."""
    if not splits.folds:
        raise BadInputError(f"{len(splits.cases)} case(s) are too few for cross-validation: the cascade trains on "
                            "cross-validated previous-stage segmentations, which need at least 5 cases")
    wanted = set(case_ids)
    out: dict[str, list[str]] = {}
    for index, entry in enumerate(splits.folds):
        cases = sorted(wanted.intersection(entry["val"]))
        if cases:
            out[str(index)] = cases
    uncovered = sorted(wanted - {c for cases in out.values() for c in cases})
    if uncovered:
        raise BadInputError(f"case(s) {', '.join(uncovered[:5])} are in no fold's validation set of splits.json: no "
                            "fold can segment them without having trained on them")
    return out


def make_previous_stage_predictions(workdir, config: str, fold: str | None = None, tta: bool = True,
                                    progress: bool = True) -> PreviousStageReport | None:
    """Segment the cases cascade `config` (fold `fold`, or every fold) trains and validates on with
    its previous stage's cross-validation folds; None for a configuration without a previous stage."""
    from pipeline.inference.cascade import segment, to_next_stage_frame
    from pipeline.inference.predictor import ModelSpec, Predictor
    from pipeline.planning.plans import Plans
    from pipeline.preprocessing.store import open_store
    from pipeline.training.cascade import NextStageSegmentations, model_stamp
    from pipeline.training.splits import load_or_create_splits

    start = time.perf_counter()
    wd = Workdir.at(workdir)
    plans = Plans.load(wd.plans)
    conf = plans.configuration(config)
    previous = conf.previous_stage
    if previous is None:
        return None
    prev_conf = plans.configuration(previous)
    full = open_store(wd.store, "r").config(conf.data_identifier, plans.hash(config))
    try:
        low = open_store(wd.store, "r").config(prev_conf.data_identifier, plans.hash(previous))
    except Exception as exc:  # noqa: BLE001 - said with the command that makes it
        raise BadInputError(f"the cascade {config} needs {previous}'s preprocessed data ({exc}): "
                            f"`segpipe preprocess DATASET --workdir {wd.root} --config {previous}`") from None
    available = full.case_ids()
    splits = load_or_create_splits(wd, available)
    if fold is None:
        needed = sorted(set(available) & {c for entry in splits.folds for c in entry["val"]})
    else:
        split = splits.split(fold, available)
        needed = sorted({*split.train, *split.val})
    by_fold = folds_for_cases(splits, needed)
    untrained = [f for f in by_fold if not (wd.run_dir(previous, f) / MODEL_FINAL).is_file()]
    if untrained:
        commands = "; ".join(f"`segpipe train --workdir {wd.root} --config {previous} --fold {f}`" for f in untrained)
        raise BadInputError(f"{config} trains on {previous}'s cross-validated segmentations of {len(needed)} case(s), "
                            f"which need {previous} fold(s) {', '.join(by_fold)}; not trained yet: {commands}")
    missing_low = sorted(set(needed) - set(low.case_ids()))
    if missing_low:
        raise BadInputError(f"{len(missing_low)} case(s) are not preprocessed for {previous} "
                            f"({', '.join(missing_low[:5])}): `segpipe preprocess DATASET --workdir {wd.root} "
                            f"--config {previous}`")

    path = wd.next_stage_predictions(previous, config)
    store = NextStageSegmentations.open(path, create_with={
        "previous_stage": previous, "configuration": config, "data_identifier": conf.data_identifier,
        "plans_hash": plans.hash(config), "previous_plans_hash": plans.hash(previous),
        "num_classes": len(plans.label_values)})
    done = store.completed()
    report = PreviousStageReport(str(path), previous, config, folds=by_fold)
    work = []
    for f, cases in by_fold.items():
        stamp = model_stamp(wd.run_dir(previous, f))
        todo = [c for c in cases if done.get(c, {}).get("model") != stamp]
        report.skipped += [c for c in cases if c not in todo]
        if todo:
            work.append((f, stamp, todo))
    threshold = conf.anisotropy_threshold
    with progress_bar(sum(len(t) for _, _, t in work), progress, desc=f"{previous} for {config}", unit="case") as bar:
        for f, stamp, todo in work:
            predictor = Predictor.from_spec(ModelSpec(run_dirs=(str(wd.run_dir(previous, f)),), tta=tta,
                                                      postprocess=False))
            for case in todo:
                image = np.asarray(low.image(case)[...], dtype=np.float32)
                seg = segment(predictor, image)
                del image
                seg = to_next_stage_frame(seg, low.meta(case), full.meta(case), threshold)
                store.write(case, seg, chunks=conf.patch_size, fold=f, model=stamp, tta=tta)
                report.predicted.append(case)
                bar.update()
    report.seconds = time.perf_counter() - start
    log.info("%s", report)
    return report
