"""Ensembles of configurations: class probabilities averaged across configurations, as nnU-Net v2
ensembles (`nnUNetv2_ensemble`), and the choice `segpipe find-best` leaves for `segpipe predict`.

Within one configuration the folds are ensembled by the predictor (logits averaged). Across
configurations the networks, patch sizes and spacings differ, so each configuration predicts
on its own and saves its probabilities on the input's grid (CASE.npz); they are then averaged,
turned into labels and post-processed case by case (one case in memory at a time). Members'
files live under OUTPUT_DIR/.ensemble_members/<config>/ until every case is written, so an
interrupted run resumes where it stopped.

    W/find_best/choice.json                    the chosen configuration or ensemble (BestChoice)
    W/find_best/ensembles/<a>+<b>/postprocessing.json   the rule decided for that pair's ensemble
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import BadInputError, SegPipeError
from pipeline.planning.plans import Plans
from pipeline.storage import as_path, local_file, remove_tree, write_json_atomic
from pipeline.workdir import Workdir, trained_folds

log = logging.getLogger("segpipe.predict")

FIND_BEST_DIR = "find_best"
CHOICE_FILE = "choice.json"
CHOICE_VERSION = 1
MEMBERS_DIR = ".ensemble_members"
BEST = "best"  # `segpipe predict --config best`


def ensemble_name(configs: Sequence[str]) -> str:
    """One name per set of configurations, whatever the order they were given in: '3d_fullres+3d_lean'."""
    return "+".join(sorted(configs))


def ensemble_dir(workdir, configs: Sequence[str]) -> Path:
    return Workdir.at(workdir).root / FIND_BEST_DIR / "ensembles" / ensemble_name(configs)


def choice_path(workdir) -> Path:
    return Workdir.at(workdir).root / FIND_BEST_DIR / CHOICE_FILE


def is_multi_config(config: str) -> bool:
    """`best` or a comma list: what `predict_configurations` handles."""
    return config == BEST or "," in config


def parse_configs(config: str) -> list[str]:
    configs = list(dict.fromkeys(c.strip() for c in config.split(",") if c.strip()))
    if not configs:
        raise BadInputError(f"no configuration given ({config!r})")
    return configs


@dataclass(frozen=True)
class BestChoice:
    """What `segpipe find-best` chose: one configuration or an ensemble, the folds each was
    cross-validated with, and the post-processing rule decided on its pooled validation predictions."""

    name: str  # a configuration, or an ensemble_name
    configs: tuple[str, ...]
    folds: dict[str, list[str]]  # configuration -> its cross-validated folds (predict ensembles them)
    foreground_dice: float | None  # pooled cross-validation, before post-processing (what was compared)
    foreground_dice_postprocessed: float | None
    postprocessing: dict  # PostprocessingRule.to_json()
    num_cases: int
    tta: bool = True
    dataset_name: str = ""
    schema_version: int = CHOICE_VERSION

    @property
    def is_ensemble(self) -> bool:
        return len(self.configs) > 1

    def rule(self):
        from pipeline.inference.postprocessing import PostprocessingRule

        return PostprocessingRule.from_json(self.postprocessing)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["configs"] = list(self.configs)
        for key in ("foreground_dice", "foreground_dice_postprocessed"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> BestChoice:
        version = d.get("schema_version")
        if version != CHOICE_VERSION:
            raise BadInputError(f"the find-best choice has schema version {version}; this segpipe reads "
                                f"{CHOICE_VERSION}: re-run `segpipe find-best`")
        try:
            choice = cls(name=str(d["name"]), configs=tuple(str(c) for c in d["configs"]),
                         folds={str(c): [str(f) for f in fs] for c, fs in d["folds"].items()},
                         foreground_dice=d.get("foreground_dice"),
                         foreground_dice_postprocessed=d.get("foreground_dice_postprocessed"),
                         postprocessing=dict(d["postprocessing"]), num_cases=int(d["num_cases"]),
                         tta=bool(d.get("tta", True)), dataset_name=str(d.get("dataset_name", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInputError(f"the find-best choice is malformed ({type(exc).__name__}: {exc})") from None
        missing = [c for c in choice.configs if c not in choice.folds]
        if not choice.configs or missing:
            raise BadInputError(f"the find-best choice names no folds for {missing or 'any configuration'}")
        return choice

    def save(self, path: str | os.PathLike) -> Path:
        write_json_atomic(path, self.to_json())
        return as_path(path)

    @classmethod
    def load(cls, workdir) -> BestChoice:
        """The workdir's choice, or a SegPipeError saying which command makes it."""
        import json

        path = choice_path(workdir)
        if not path.is_file():
            raise SegPipeError(f"{path} is missing: choose first with `segpipe find-best DATASET --workdir "
                               f"{Workdir.at(workdir).root}` (after `segpipe evaluate-cv` of two configurations or more)")
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"cannot read {path} ({exc}): re-run `segpipe find-best`") from None
        return cls.from_json(d)


# ---------------------------------------------------------------- probabilities -> labels


def load_probabilities(path: str | os.PathLike, case: str | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """CASE.npz as `predict --save-probabilities` writes it: ((K, *RAS shape) float32, label value per channel)."""
    try:
        with local_file(path, ".npz") as local, np.load(local) as npz:
            return npz["probabilities"].astype(np.float32), tuple(int(v) for v in npz["labels"])
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise BadInputError(f"cannot read probabilities {path} ({type(exc).__name__}: {exc})", case) from None


def average_probabilities(paths: Sequence[str | os.PathLike], case: str | None = None
                          ) -> tuple[np.ndarray, tuple[int, ...]]:
    """The mean of several CASE.npz (one running sum: two arrays in memory, whatever the count)."""
    total, labels = None, None
    for path in paths:
        probs, values = load_probabilities(path, case)
        if total is None:
            total, labels = probs, values
            continue
        if values != labels or probs.shape != total.shape:
            raise BadInputError(f"probabilities of {paths[0]} and {path} do not match (labels {list(labels)} vs "
                                f"{list(values)}, shape {total.shape} vs {probs.shape}): are they of one dataset?", case)
        total += probs
    if total is None:
        raise SegPipeError("no probabilities to average")
    total /= len(paths)
    return total, labels


def write_ensemble_case(case: str, npz_paths: Sequence[str | os.PathLike], reference: str | os.PathLike,
                        out_path: str | os.PathLike, label_map, rule=None, save_probabilities: bool = False) -> None:
    """Average one case's probabilities, label, post-process and write it (atomically) in the
    format (`out_path`'s ending), grid and header of `reference` (a member's prediction of the case).

    `label_map` (the plans') turns the average into labels: the argmax of softmax classes, or the
    regions painted in `regions_class_order` (`LabelMap.probabilities_to_values`)."""
    from pipeline.data.images import open_image, write_volume
    from pipeline.inference.postprocessing import apply_postprocessing
    from pipeline.inference.predictor import npz_path, save_probabilities_npz

    probabilities, values = average_probabilities(npz_paths, case)
    geometry = open_image(reference, case).geometry
    if tuple(probabilities.shape[1:]) != tuple(geometry.ras_shape):
        raise BadInputError(f"probabilities of shape {probabilities.shape[1:]} do not fit {reference} "
                            f"(shape {geometry.ras_shape})", case)
    if tuple(values) != tuple(label_map.regions_class_order if label_map.has_regions else label_map.class_values):
        raise BadInputError(f"probabilities of {npz_paths[0]} paint labels {list(values)}, the plans declare "
                            f"{list(label_map.class_values)}: are they of this dataset?", case)
    label = label_map.probabilities_to_values(probabilities)
    if rule is not None:
        label = apply_postprocessing(label, rule)
    out_path = as_path(out_path)
    if save_probabilities:
        save_probabilities_npz(probabilities, label_map, npz_path(out_path))
    del probabilities
    write_volume(label, geometry, out_path, reference=reference)  # written last: marks the case done


# ---------------------------------------------------------------- predicting with several configurations


@dataclass
class EnsembleReport:
    """What `predict_configurations` did."""

    output_dir: str
    config: str  # the ensemble's name
    configs: list[str]
    folds: dict[str, list[str]]
    tta: bool
    postprocessing: dict | None  # the rule applied, None when none
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already written before this run (resume)
    members: list[dict] = field(default_factory=list)  # each configuration's PredictReport
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        folds = "; ".join(f"{c} fold {','.join(self.folds[c])}" for c in self.configs)
        pp = "no post-processing" if not self.postprocessing else "post-processed"
        return (f"predicted {len(self.predicted)} case(s) with the ensemble {self.config} ({folds}; probabilities "
                f"averaged{', mirroring TTA' if self.tta else ''}; {pp}) -> {self.output_dir} in {self.seconds:.1f}s; "
                f"{len(self.skipped)} already there")


def _members_and_folds(wd: Workdir, config: str, fold) -> tuple[list[str], dict[str, list[str]], BestChoice | None]:
    from pipeline.inference.predictor import parse_folds

    choice = BestChoice.load(wd) if config == BEST else None
    configs = list(choice.configs) if choice else parse_configs(config)
    folds = {}
    for c in configs:
        if fold is not None:
            folds[c] = parse_folds(fold)
        elif choice is not None:
            folds[c] = choice.folds[c]
        else:
            folds[c] = trained_folds(wd, c)
            if not folds[c]:
                raise SegPipeError(f"no trained fold of {c} in {wd.root / 'runs' / c}: train it first with "
                                   f"`segpipe train --workdir {wd.root} --config {c} --fold K`")
    return configs, folds, choice


def _ensemble_rule(wd: Workdir, configs: Sequence[str], choice: BestChoice | None):
    """The rule find-best decided for this set of configurations, or None (logged)."""
    from pipeline.inference.postprocessing import PostprocessingRule
    from pipeline.inference.predictor import POSTPROCESSING_FILE

    if choice is not None and set(choice.configs) == set(configs):
        return choice.rule()
    path = ensemble_dir(wd, configs) / POSTPROCESSING_FILE
    if path.is_file():
        return PostprocessingRule.load(path)
    log.info("no post-processing rule for the ensemble %s (run `segpipe find-best` to decide one): none applied",
             ensemble_name(configs))
    return None


def predict_configurations(workdir, input_dir, output_dir, config: str = BEST, fold=None, *,
                           save_probabilities: bool = False, postprocess: bool = True, progress: bool = True,
                           keep_members: bool = False, **options):
    """Predict INPUT_DIR with `best` (the find-best choice) or a comma list of configurations.

    One configuration goes straight to `predict_folder` (its folds ensembled, its rule applied).
    Several: each predicts with its folds (`fold`, else the choice's cross-validated folds, else
    every trained fold) and saves probabilities; they are averaged per case, labelled and
    post-processed with the rule decided for that ensemble. `options` go to `predict_folder`
    (tta, num_workers, ray_address, checkpoint, step, ...). Returns a PredictReport or an EnsembleReport.
    """
    from pipeline.console import progress_bar
    from pipeline.data.files import image_files, strip_ending
    from pipeline.inference.predict import predict_folder
    from pipeline.inference.predictor import find_model, npz_path

    start = time.perf_counter()
    wd = Workdir.at(workdir)
    configs, folds, choice = _members_and_folds(wd, config, fold)
    if len(configs) == 1:
        (only,) = configs
        return predict_folder(wd, input_dir, output_dir, config=only, fold=folds[only],
                              save_probabilities=save_probabilities, postprocess=postprocess, progress=progress,
                              **options)
    for c in configs:  # every model present before anything is predicted
        find_model(wd, c, folds[c], options.get("checkpoint", "final"))
    rule = _ensemble_rule(wd, configs, choice) if postprocess else None
    label_map = Plans.load(wd.plans).label_map()
    output_dir = as_path(output_dir)
    if str(output_dir).rstrip("/") == str(as_path(input_dir)).rstrip("/"):
        raise BadInputError("the output folder must differ from the input folder (predictions would mix with images)")
    members = output_dir / MEMBERS_DIR
    reports = []
    for c in configs:
        log.info("ensemble member %s: folds %s", c, ",".join(folds[c]))
        reports.append(predict_folder(wd, input_dir, members / c, config=c, fold=folds[c], save_probabilities=True,
                                      postprocess=False, progress=progress, **options))
    name = ensemble_name(configs)
    report = EnsembleReport(str(output_dir), name, configs, folds, options.get("tta", True),
                            rule.to_json() if rule is not None and not rule.is_identity else None,
                            members=[r.to_json() for r in reports])
    cases = sorted(set(reports[0].predicted) | set(reports[0].skipped))
    # each member wrote CASE plus the input's ending (its format): the ensemble's file is named alike
    written = {c: {strip_ending(p.name): p for p in image_files(members / c)} for c in configs}
    with progress_bar(len(cases), progress and len(cases) > 1, desc=f"ensemble {name}", unit="case") as bar:
        for case in cases:
            member_files = [written[c][case] for c in configs]
            out = output_dir / member_files[0].name
            if out.exists() and (not save_probabilities or npz_path(out).is_file()):
                report.skipped.append(case)
            else:
                write_ensemble_case(case, [npz_path(p) for p in member_files], member_files[0], out, label_map,
                                    rule, save_probabilities)
                report.predicted.append(case)
            bar.update()
    if not keep_members:
        remove_tree(members)
    report.seconds = time.perf_counter() - start
    log.debug("%s", report)
    return report
