"""Which configuration, or pair of configurations ensembled, segments best: nnU-Net v2's
`find_best_configuration` on seg-pipeline's cross-validation.

Every configuration cross-validated by `segpipe evaluate-cv` is a candidate (2d, 3d_fullres,
3d_lean, 3d_lowres, 3d_cascade_fullres, ...), and so is every pair of them ensembled: for each
validation case the two configurations' class probabilities (each case predicted by the fold that
did not train on it) are averaged and labelled. All candidates are scored on the same pooled
cases; the highest foreground mean Dice before post-processing wins (on a tie the single
configuration, listed first, as nnU-Net). The post-processing rule is decided on the winner's own
pooled predictions: `evaluate-cv`'s for a configuration, here for an ensemble.

    W/find_best/find_best.json, find_best.md, find_best.png   every candidate side by side, the choice
    W/find_best/choice.json                                   what `segpipe predict --config best` runs
    W/find_best/ensembles/<a>+<b>/predictions/, evaluation/, postprocessing.json, ...

Re-running reuses an ensemble's predictions unless a member's probabilities are newer.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import BadInputError, SegPipeError
from pipeline.inference.ensemble import (
    FIND_BEST_DIR,
    BestChoice,
    choice_path,
    ensemble_dir,
    ensemble_name,
    parse_configs,
    write_ensemble_case,
)
from pipeline.planning.plans import Plans
from pipeline.storage import stat, write_text_atomic
from pipeline.workdir import Workdir, trained_folds

log = logging.getLogger("segpipe.find_best")

FIND_BEST_VERSION = 1  # find_best.json's layout


@dataclass
class Candidate:
    """One row of the table: a configuration or an ensemble, scored on the pooled validation cases."""

    name: str
    configs: list[str]
    foreground_dice: float | None  # compared
    dice: dict[str, float | None]  # label value -> pooled mean Dice
    foreground_dice_postprocessed: float | None  # after its own rule (None: the rule changes nothing)
    postprocessing: dict  # PostprocessingRule.to_json()
    summary: str  # its summary.json

    @property
    def score(self) -> float:
        d = self.foreground_dice
        return -math.inf if d is None or not math.isfinite(d) else d


@dataclass
class FindBestReport:
    dataset_name: str
    labels: dict[str, str]
    folds: dict[str, list[str]]  # configuration -> cross-validated folds
    num_cases: int
    candidates: list[Candidate]
    best: str
    paths: dict[str, str] = field(default_factory=dict)
    schema_version: int = FIND_BEST_VERSION

    @property
    def choice(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.best)

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        width = max(len(c.name) for c in self.candidates)
        lines = [f"best configuration on {self.num_cases} pooled validation case(s) "
                 f"(foreground mean Dice, before -> after post-processing):"]
        for c in sorted(self.candidates, key=lambda c: -c.score):
            after = "" if c.foreground_dice_postprocessed is None else f" -> {fmt(c.foreground_dice_postprocessed)}"
            lines.append(f"  {'*' if c.name == self.best else ' '} {c.name:<{width}}  {fmt(c.foreground_dice)}{after}")
        best = self.choice
        lines.append(f"  chosen: {best.name} ({'ensemble of ' + ' and '.join(best.configs) if len(best.configs) > 1 else 'one configuration'}); "
                     f"predict with `segpipe predict --workdir W --config best INPUT OUTPUT`")
        lines.append(f"  -> {self.paths.get('report')}")
        return "\n".join(lines)


def _crossvalidated(wd: Workdir) -> dict:
    """config -> CrossvalReport for every configuration `segpipe evaluate-cv` has scored."""
    from pipeline.evaluation.crossval import CrossvalReport

    root = wd.root / "crossval"
    found = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / "crossval.json").is_file():
                found[d.name] = CrossvalReport.load(d / "crossval.json")
    return found


def _not_enough(wd: Workdir, dataset_dir, have: Sequence[str]) -> BadInputError:
    runs = wd.runs
    trained = sorted(d.name for d in runs.iterdir() if d.is_dir() and trained_folds(wd, d.name)) if runs.is_dir() else []
    todo = [c for c in trained if c not in have]
    hint = (f"; trained but not cross-validated: {', '.join(todo)} (run `segpipe evaluate-cv {dataset_dir} --workdir "
            f"{wd.root} --config {todo[0]}`)" if todo else
            "; train and cross-validate another configuration (`segpipe train --config C --fold K` for each fold, "
            "then `segpipe evaluate-cv`)")
    return BadInputError(f"find-best compares two cross-validated configurations or more; {wd.root} has "
                         f"{len(have)}: {', '.join(have) or 'none'}{hint}")


def _validation_files(wd: Workdir, config: str, report, splits, dataset) -> dict[str, tuple[Path, Path]]:
    """case -> (prediction, probabilities) of the fold that validated on it; BadInputError when
    the probabilities are missing (a cross-validation from before they were saved)."""
    from pipeline.inference.predictor import npz_path, prediction_name

    files, missing = {}, []
    for fold in report.folds:
        for case in splits.validation_cases(fold):
            pred = wd.run_dir(config, fold) / "validation" / prediction_name(case, dataset.case(case).images[0])
            files[case] = (pred, npz_path(pred))
            if not (pred.exists() and npz_path(pred).is_file()):
                missing.append(case)
    if missing:
        raise BadInputError(f"configuration {config} has no validation probabilities for {len(missing)} case(s) "
                            f"({', '.join(sorted(missing)[:5])}): re-run `segpipe evaluate-cv {dataset.root} --workdir "
                            f"{wd.root} --config {config}` (it saves them and predicts only those cases again)")
    return files


def _up_to_date(out: Path, inputs: Sequence[Path]) -> bool:
    return out.exists() and stat(out)[1] >= max(stat(p)[1] for p in inputs)


def _ensemble_candidate(wd: Workdir, dataset, configs: Sequence[str], files: dict[str, dict[str, tuple[Path, Path]]],
                        progress: bool) -> Candidate:
    """Average the members' validation probabilities case by case, score them, decide their rule."""
    from pipeline.data.files import image_files
    from pipeline.evaluation.cases import map_cases
    from pipeline.evaluation.crossval import score_pooled
    from pipeline.storage import remove_tree

    out = ensemble_dir(wd, configs)
    pred_dir = out / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    cases = sorted(files[configs[0]])
    pooled = {case: pred_dir / files[configs[0]][case][0].name for case in cases}  # named as the members'
    for stale in set(image_files(pred_dir)) - set(pooled.values()):  # cases no longer validated would be scored too
        if stale.is_dir():  # a DICOM series
            remove_tree(stale)
        else:
            stale.unlink()
    label_map = Plans.load(wd.plans).label_map()
    todo = []
    for case in cases:
        npzs = [files[c][case][1] for c in configs]
        if not _up_to_date(pooled[case], npzs):
            todo.append((case, npzs, files[configs[0]][case][0], pooled[case], label_map))
    log.info("ensemble %s: %d case(s) to average, %d up to date", ensemble_name(configs), len(todo), len(cases) - len(todo))
    # two cases at a time: each holds every class's probabilities twice (a label map is K times smaller)
    if todo:
        map_cases(write_ensemble_case, todo, 2, progress, f"ensemble {ensemble_name(configs)}")
    summary, rule, pp_dice = score_pooled(pooled, dataset, out, progress=progress)
    return Candidate(ensemble_name(configs), list(configs), summary["foreground_mean"]["dice"],
                     {v: m["dice"] for v, m in summary["mean"].items()}, pp_dice, rule.to_json(),
                     str(out / "evaluation" / "summary.json"))


def find_best_configuration(workdir, dataset_dir, configs: str | Sequence[str] | None = None,
                            ensembles: bool = True, progress: bool = True) -> FindBestReport:
    """Compare the cross-validated configurations and their pair ensembles; save and return the choice.

    `configs` limits the candidates (default: every configuration `segpipe evaluate-cv` scored);
    at least two are needed. They must have been cross-validated on the same cases.
    """
    from pipeline.data.dataset import load_dataset
    from pipeline.training.splits import load_or_create_splits

    wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
    available = _crossvalidated(wd)
    if configs:
        wanted = parse_configs(configs) if isinstance(configs, str) else list(dict.fromkeys(configs))
        missing = [c for c in wanted if c not in available]
        if missing:
            raise BadInputError(f"configuration(s) {', '.join(missing)} not cross-validated in {wd.root}: run "
                                f"`segpipe evaluate-cv {dataset_dir} --workdir {wd.root} --config {missing[0]}` first")
    else:
        wanted = list(available)
    if len(wanted) < 2 and configs:
        raise BadInputError(f"--configs names {len(wanted)} configuration ({', '.join(wanted)}): find-best compares two "
                            f"or more (cross-validated in {wd.root}: {', '.join(available) or 'none'})")
    if len(wanted) < 2:
        raise _not_enough(wd, dataset_dir, wanted)
    reports = {c: available[c] for c in wanted}
    optimistic = [c for c, r in reports.items() if r.optimistic]
    if optimistic:
        raise BadInputError(f"configuration(s) {', '.join(optimistic)} were cross-validated with fold 'all', which trained "
                            "on its validation cases: compare folds 0-4 (`segpipe evaluate-cv --folds 0,1,2,3,4`)")
    dataset = load_dataset(dataset_dir)
    if not wd.splits.is_file():
        raise SegPipeError(f"{wd.splits} is missing: the folds' validation cases are unknown")
    splits = load_or_create_splits(wd, dataset.case_ids)
    files = {c: _validation_files(wd, c, reports[c], splits, dataset) for c in wanted}
    first = wanted[0]
    for c in wanted[1:]:
        if set(files[c]) != set(files[first]):
            raise BadInputError(f"{first} (folds {','.join(reports[first].folds)}) and {c} (folds "
                                f"{','.join(reports[c].folds)}) were cross-validated on different cases: re-run "
                                f"`segpipe evaluate-cv` with the same --folds for both")

    candidates = [Candidate(c, [c], r.foreground_dice, dict(r.dice), r.foreground_dice_postprocessed,
                            dict(r.postprocessing), r.paths.get("summary", "")) for c, r in reports.items()]
    if ensembles:
        for pair in itertools.combinations(wanted, 2):
            candidates.append(_ensemble_candidate(wd, dataset, list(pair), files, progress))
    best = max(candidates, key=lambda c: c.score)  # the first of equals: configurations before ensembles
    if best.score == -math.inf:
        raise BadInputError("no candidate has a foreground Dice (the references hold no foreground?): nothing to compare")
    out = wd.root / FIND_BEST_DIR
    report = FindBestReport(dataset.name, {str(v): n for v, n in sorted(dataset.labels.items()) if v != 0},
                            {c: list(r.folds) for c, r in reports.items()}, len(files[first]), candidates, best.name,
                            paths={"choice": str(choice_path(wd)), "report": str(out / "find_best.md")})
    choice = BestChoice(best.name, tuple(best.configs), {c: list(reports[c].folds) for c in best.configs},
                        best.foreground_dice, best.foreground_dice_postprocessed, best.postprocessing,
                        report.num_cases, tta=all(reports[c].tta for c in best.configs), dataset_name=dataset.name)
    choice.save(choice_path(wd))
    _write_report(report, out)
    return report


def _steps(rule: dict, labels: dict[str, str]) -> str:
    steps = (["largest foreground component"] if rule.get("keep_largest_foreground") else []) + \
            [f"largest {labels.get(str(v), v)} component" for v in rule.get("keep_largest_per_class", [])]
    return "; ".join(steps) or "none"


def _write_report(report: FindBestReport, out: Path) -> None:
    from pipeline.plotting import new_figure, save_figure

    fmt = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731
    values = list(report.labels)
    rows = ["| candidate | kind | " + " | ".join(f"Dice {report.labels[v]}" for v in values) +
            " | foreground Dice | post-processing | after it |", "|" + "---|" * (len(values) + 5)]
    ranked = sorted(report.candidates, key=lambda c: -c.score)
    for c in ranked:
        name = f"**{c.name}**" if c.name == report.best else c.name
        rows.append(f"| {name} | {'ensemble' if len(c.configs) > 1 else 'configuration'} | " +
                    " | ".join(fmt(c.dice.get(v)) for v in values) +
                    f" | {fmt(c.foreground_dice)} | {_steps(c.postprocessing, report.labels)} | "
                    f"{fmt(c.foreground_dice if c.foreground_dice_postprocessed is None else c.foreground_dice_postprocessed)} |")
    best = report.choice
    folds = "; ".join(f"{c}: {','.join(report.folds[c])}" for c in report.folds)
    text = ["# Best configuration", "",
            f"{len(report.candidates)} candidates scored on the same {report.num_cases} pooled validation cases "
            f"(each predicted by the fold that did not train on it; folds {folds}). Ensembles average the class "
            "probabilities of two configurations. The highest foreground mean Dice before post-processing wins "
            "(nnU-Net v2's rule); the post-processing column is each candidate's own largest-component rule.", "",
            *rows, "",
            f"**Chosen: {best.name}** " + (f"(ensemble of {' and '.join(best.configs)})" if len(best.configs) > 1
                                           else "(one configuration)") +
            f", foreground Dice {fmt(best.foreground_dice)}.", "",
            "Predict with it (every cross-validated fold, probabilities averaged across configurations, its "
            "post-processing applied):", "",
            "```", "segpipe predict --workdir W --config best INPUT_DIR OUTPUT_DIR", "```", "",
            "![candidates](find_best.png)", ""]
    write_text_atomic(out / "find_best.md", "\n".join(text))
    write_text_atomic(out / "find_best.json", json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")

    fig, axes = new_figure(max(4.5, 0.9 * len(ranked) + 2.5), 3.6)
    ax = axes[0, 0]
    x = np.arange(len(ranked))
    colors = ["tab:orange" if c.name == report.best else "tab:blue" if len(c.configs) == 1 else "tab:green"
              for c in ranked]
    ax.bar(x, [max(c.score, 0.0) for c in ranked], 0.6, color=colors)
    for i, c in enumerate(ranked):
        ax.text(i, max(c.score, 0.0) + 0.01, fmt(c.foreground_dice), ha="center", fontsize=7)
    ax.set_xticks(x, [c.name.replace("+", "+\n") for c in ranked], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pooled foreground mean Dice")
    ax.set_title(f"{report.dataset_name}: chosen {report.best} (orange; ensembles green)", fontsize=9)
    save_figure(fig, out / "find_best.png")
