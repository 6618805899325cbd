"""Cross-validation: each fold's validation cases predicted by that fold's own model, scored together.

This is the honest estimate of how the configuration does on unseen cases (nnU-Net's
cross-validation summary), and the data the post-processing rule is decided on: the rule is kept
beside every evaluated fold's model (`postprocessing.json`), so later `segpipe predict` runs apply it.
Predictions for the decision are made without any rule (an earlier one would bias it).

Layout (the workdir's, beside the models):

    runs/<config>/fold_<k>/validation/CASE.nii.gz     fold k's validation cases, by fold k's model
    runs/<config>/fold_<k>/validation/CASE.npz        ... and their class probabilities (what `segpipe
                                                       find-best` averages into ensembles)
    runs/<config>/fold_<k>/postprocessing.json        the rule decided on the pooled folds
    crossval/<config>/predictions/                     links to every fold's validation predictions
    crossval/<config>/evaluation/                      pooled summary.json, per_case.csv, summary.md, box plot
    crossval/<config>/postprocessed/ + evaluation_postprocessed/   when the rule changes anything
    crossval/<config>/crossval.json, crossval.md, crossval.png     folds side by side, pseudo-Dice vs evaluated

Re-running skips predictions already written (a case lacking its probabilities is predicted again);
scoring and the decision are redone (they are cheap).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.files import ending_of
from pipeline.errors import BadInputError, SegPipeError
from pipeline.storage import as_path, link, remove_tree
from pipeline.workdir import METRICS_CSV, Workdir, trained_folds

log = logging.getLogger("segpipe.crossval")

CROSSVAL_VERSION = 1  # crossval.json's layout


def link_inputs(dataset, case_ids: Sequence[str], folder: Path) -> Path:
    """A folder of links to the cases' images, named as `segpipe predict` reads them (copies on
    object storage, which has no links)."""
    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for cid in case_ids:
        case = dataset.case(cid)
        if case.four_d or len(case.images) == 1:
            targets = {f"{cid}{ending_of(case.images[0].name)}": case.images[0]}
        else:
            targets = {f"{cid}_{i:04d}{ending_of(p.name)}": p for i, p in enumerate(case.images)}
        for name, target in targets.items():
            link(target, folder / name)
    return folder


def final_pseudo_dice(run_dir: Path) -> dict[str, float]:
    """The last epoch's validation pseudo-Dice per class (label value -> Dice) from metrics.csv."""
    path = run_dir / METRICS_CSV
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out = {}
    for key, value in rows[-1].items():
        if key.startswith("val_dice_") and value not in ("", None):
            out[key[len("val_dice_"):]] = float(value)
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


@dataclass
class FoldScore:
    fold: str
    cases: int
    dice: dict[str, float | None]  # label value -> mean Dice over this fold's cases
    foreground_dice: float | None
    pseudo_dice: dict[str, float]  # the training run's last validation pseudo-Dice
    pseudo_foreground_dice: float | None


@dataclass
class CrossvalReport:
    config: str
    folds: list[str]
    num_cases: int
    labels: dict[str, str]
    dice: dict[str, float | None]  # pooled per-class mean
    foreground_dice: float | None
    foreground_dice_postprocessed: float | None
    postprocessing: dict
    per_fold: list[FoldScore] = field(default_factory=list)
    tta: bool = True  # mirroring at prediction
    optimistic: bool = False  # fold 'all' validates on cases it trained on
    paths: dict[str, str] = field(default_factory=dict)
    probabilities: bool = False  # CASE.npz saved beside each validation prediction
    schema_version: int = CROSSVAL_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> CrossvalReport:
        """A crossval.json written by `evaluate_crossval`; BadInputError if unreadable or of another layout."""
        try:
            d = json.loads(as_path(path).read_text())
            version = d.pop("schema_version", CROSSVAL_VERSION)  # files from before the version was recorded
            if version != CROSSVAL_VERSION:
                raise ValueError(f"schema version {version}, this segpipe reads {CROSSVAL_VERSION}")
            d["per_fold"] = [FoldScore(**f) for f in d.get("per_fold", [])]
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BadInputError(f"cannot read the cross-validation record {path} ({exc}): re-run `segpipe evaluate-cv`") from None

    def __str__(self) -> str:
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        lines = [f"cross-validation of {self.config}, fold(s) {','.join(self.folds)}: {self.num_cases} case(s), "
                 f"foreground mean Dice {fmt(self.foreground_dice)}"]
        if self.optimistic:
            lines.append("  note: fold 'all' trained on these cases too, so its scores are optimistic")
        for f in self.per_fold:
            lines.append(f"  fold {f.fold}: {f.cases} case(s), Dice {fmt(f.foreground_dice)}, "
                         f"training pseudo-Dice {fmt(f.pseudo_foreground_dice)}")
        pp = self.postprocessing
        steps = (["largest foreground component"] if pp.get("keep_largest_foreground") else []) + \
                [f"largest component of {v}" for v in pp.get("keep_largest_per_class", [])]
        lines.append(f"  post-processing: {', '.join(steps) if steps else 'none helps'}"
                     + (f" -> Dice {fmt(self.foreground_dice_postprocessed)}" if steps else ""))
        lines.append(f"  -> {self.paths.get('report')}")
        return "\n".join(lines)


def _link_predictions(sources: dict[str, Path], folder: Path) -> None:
    """`folder` holds exactly one link per case (rebuilt each run: folds may have changed)."""
    remove_tree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for case, path in sources.items():
        link(path, folder / path.name)


def evaluate_crossval(workdir, dataset_dir, config: str = "3d_fullres", folds: Sequence[str] | str | None = None,
                      tta: bool = True, num_workers: int | None = None, ray_address: str | None = None,
                      progress: bool = True, save_probabilities: bool = True, precision: str = "auto") -> CrossvalReport:
    """Predict each fold's validation cases with its model, score them pooled, decide post-processing.

    With `save_probabilities` (default) each case's class probabilities are kept beside its
    prediction (CASE.npz, one case in memory at a time), for `segpipe find-best`'s ensembles.
    `precision`: what the convolutions compute in (`pipeline.precision`; "fp32" for the same
    scores on every machine).
    """
    from pipeline.data.dataset import load_dataset
    from pipeline.inference.predict import predict_folder
    from pipeline.inference.predictor import (
        POSTPROCESSING_FILE,
        parse_folds,
        prediction_name,
    )
    from pipeline.training.splits import load_or_create_splits

    wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
    folds = parse_folds(folds) if folds else trained_folds(wd, config)
    if not folds:
        raise SegPipeError(f"no trained fold of {config} in {wd.root / 'runs' / config}: train folds 0-4 "
                           f"(or 'all') first with `segpipe train --workdir {wd.root} --config {config} --fold K`")
    if not wd.splits.is_file():
        raise SegPipeError(f"{wd.splits} is missing: the folds' validation cases are unknown (it is written by "
                           "`segpipe train`)")
    dataset = load_dataset(dataset_dir)
    splits = load_or_create_splits(wd, dataset.case_ids)
    out = wd.root / "crossval" / config
    pooled: dict[str, Path] = {}
    fold_of: dict[str, str] = {}
    for fold in folds:
        cases = splits.validation_cases(fold)
        unknown = sorted(set(cases) - set(dataset.case_ids))
        if unknown:
            raise BadInputError(f"fold {fold} validates on case(s) not in {dataset_dir}: {', '.join(unknown[:5])} "
                                "- is this the dataset the workdir was trained on?")
        run_dir = wd.run_dir(config, fold)
        inputs = link_inputs(dataset, cases, out / "inputs" / f"fold_{fold}")
        pred_dir = run_dir / "validation"
        log.info("fold %s: predicting %d validation case(s) -> %s", fold, len(cases), pred_dir)
        predict_folder(wd, inputs, pred_dir, config=config, fold=fold, tta=tta, num_workers=num_workers,
                       ray_address=ray_address, progress=progress, postprocess=False,
                       save_probabilities=save_probabilities, precision=precision)
        for case in cases:
            if case in fold_of:
                raise BadInputError(f"case {case} is a validation case of folds {fold_of[case]} and {fold}: "
                                     "pooled scores need each case once; evaluate those folds separately")
            pooled[case] = pred_dir / prediction_name(case, dataset.case(case).images[0])
            fold_of[case] = fold

    _link_predictions(pooled, out / "predictions")
    summary, rule, pp_dice = score_pooled(pooled, dataset, out, progress=progress)
    for fold in folds:
        rule.save(wd.run_dir(config, fold) / POSTPROCESSING_FILE)

    per_fold = []
    for fold in folds:
        rows = [r for r in summary["cases"] if fold_of.get(r["case"]) == fold]
        dice = {v: _mean(r["metrics"][v]["dice"] for r in rows) for v in summary["labels"]}
        pseudo = final_pseudo_dice(wd.run_dir(config, fold))
        per_fold.append(FoldScore(fold, len(rows), dice, _mean(dice.values()), pseudo,
                                  _mean(pseudo.values()) if pseudo else None))
    report = CrossvalReport(
        config=config, folds=list(folds), num_cases=summary["n_cases"], labels=summary["labels"],
        dice={v: m["dice"] for v, m in summary["mean"].items()}, foreground_dice=summary["foreground_mean"]["dice"],
        foreground_dice_postprocessed=pp_dice, postprocessing=rule.to_json(), per_fold=per_fold, tta=tta,
        optimistic="all" in folds, probabilities=save_probabilities,
        paths={"predictions": str(out / "predictions"), "summary": str(out / "evaluation" / "summary.json"),
               "postprocessing": str(out / POSTPROCESSING_FILE), "report": str(out / "crossval.md")})
    _write_report(report, out)
    return report


def score_pooled(pooled: dict[str, Path], dataset, out: Path, progress: bool = True):
    """Score pooled predictions (case -> file) and decide nnU-Net's post-processing on them.

    Writes `out/evaluation/`, `out/postprocessing.json` and, when the rule changes anything,
    `out/postprocessed/` + `out/evaluation_postprocessed/`. Returns (summary, rule, foreground Dice
    after the rule or None). `out/predictions/` must already hold the pooled files.
    """
    from pipeline.data.images import read_volume, write_volume
    from pipeline.evaluation.metrics import evaluate_folders
    from pipeline.evaluation.postprocessing import decide_postprocessing
    from pipeline.inference.postprocessing import apply_postprocessing
    from pipeline.inference.predictor import POSTPROCESSING_FILE

    summary = evaluate_folders(out / "predictions", dataset.root, out / "evaluation", progress=progress)
    rule = decide_postprocessing(out / "predictions", dataset.root, labels=dataset.labels, progress=progress)
    rule.save(out / POSTPROCESSING_FILE)
    pp_dice = None
    pp_dir = out / "postprocessed"
    remove_tree(pp_dir)  # an earlier run's files (other cases, another rule) would be scored with these
    if not rule.is_identity:
        pp_dir.mkdir(parents=True, exist_ok=True)
        for case, path in pooled.items():
            label, geometry = read_volume(path, case, dtype=None)
            fixed = apply_postprocessing(label, rule)  # read_volume's array is in RAS already
            write_volume(fixed, geometry, pp_dir / path.name, reference=path)
        pp_summary = evaluate_folders(pp_dir, dataset.root, out / "evaluation_postprocessed", progress=progress)
        pp_dice = pp_summary["foreground_mean"]["dice"]
    return summary, rule, pp_dice


def _write_report(report: CrossvalReport, out: Path) -> None:
    from pipeline.plotting import new_figure, save_figure
    from pipeline.storage import write_text_atomic

    fmt = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731
    values = list(report.labels)
    head = "| fold | cases | " + " | ".join(f"Dice {report.labels[v]}" for v in values) + \
           " | foreground Dice | training pseudo-Dice | difference |"
    rows = [head, "|" + "---|" * (len(values) + 5)]
    for f in report.per_fold:
        diff = None if f.foreground_dice is None or f.pseudo_foreground_dice is None \
            else f.foreground_dice - f.pseudo_foreground_dice
        rows.append(f"| {f.fold} | {f.cases} | " + " | ".join(fmt(f.dice.get(v)) for v in values) +
                    f" | {fmt(f.foreground_dice)} | {fmt(f.pseudo_foreground_dice)} | "
                    f"{'–' if diff is None else f'{diff:+.4f}'} |")
    rows.append(f"| **pooled** | {report.num_cases} | " + " | ".join(fmt(report.dice.get(v)) for v in values) +
                f" | **{fmt(report.foreground_dice)}** | | |")
    pp = report.postprocessing
    steps = (["keep the largest foreground component"] if pp["keep_largest_foreground"] else []) + \
            [f"keep the largest component of {report.labels.get(str(v), v)}" for v in pp["keep_largest_per_class"]]
    text = [f"# Cross-validation of {report.config}", "",
            "Each fold's validation cases predicted by that fold's model, scored together "
            "(`evaluation/summary.json`). The training pseudo-Dice is the last epoch's, on validation patches.", ""]
    if report.optimistic:
        text += ["**Fold `all` trained on its validation cases too: these scores are optimistic.**", ""]
    text += rows + ["", "## Post-processing", "",
                    (f"Kept: {'; '.join(steps)}. Foreground Dice {fmt(pp['dice_before'].get('foreground'))} -> "
                     f"{fmt(report.foreground_dice_postprocessed)} (`evaluation_postprocessed/`)." if steps else
                     f"No largest-component step improves the Dice (foreground {fmt(pp['dice_before'].get('foreground'))}): "
                     "predictions stay as they are."),
                    "The rule is saved beside each fold's model as `postprocessing.json`; `segpipe predict` applies it.",
                    "", "![folds](crossval.png)", ""]
    write_text_atomic(out / "crossval.md", "\n".join(text))
    write_text_atomic(out / "crossval.json", json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")

    fig, axes = new_figure(max(4.5, 1.3 * len(report.per_fold) + 2.5), 3.6)
    ax = axes[0, 0]
    x = np.arange(len(report.per_fold))
    evaluated = [f.foreground_dice or 0.0 for f in report.per_fold]
    pseudo = [f.pseudo_foreground_dice or 0.0 for f in report.per_fold]
    ax.bar(x - 0.2, evaluated, 0.4, label="evaluated (whole cases)")
    ax.bar(x + 0.2, pseudo, 0.4, label="training pseudo-Dice (patches)")
    ax.set_xticks(x, [f"fold {f.fold}" for f in report.per_fold])
    ax.set_ylim(0, 1)
    ax.set_ylabel("foreground mean Dice")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{report.config}: pooled Dice {fmt(report.foreground_dice)}", fontsize=10)
    save_figure(fig, out / "crossval.png")
