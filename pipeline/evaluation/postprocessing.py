"""nnU-Net's post-processing decision: keep only the largest connected component, where that helps.

Decided on validation predictions against their references, as nnU-Net v2's
`determine_postprocessing`:

1. Foreground as a whole: keep only the largest component of (any foreground label); removed voxels
   become background. Kept if the foreground mean Dice strictly improves and no class's mean
   Dice gets worse.
2. Then, only with more than one foreground class, each class in label order, on the output of
   step 1 if kept: keep only that class's largest component; kept if that class's mean Dice
   strictly improves. (One class's step only turns its own voxels into background, so the
   classes are decided independently.)

Components use full connectivity (26 neighbours in 3D, skimage's default as nnU-Net); when
several components tie for largest, all of them are kept. Dice is nnU-Net's: a class absent from
both prediction and reference is NaN and excluded from the mean.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import BadInputError
from pipeline.evaluation.cases import load_pair, map_cases, mask_ignored, pair_cases, reference_label_map
from pipeline.inference.postprocessing import PostprocessingRule, keep_largest

# ---------------------------------------------------------------- deciding


def _counts(pred: np.ndarray, ref: np.ndarray, value: int) -> tuple[int, int, int]:
    p, r = pred == value, ref == value
    tp = int(np.count_nonzero(p & r))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp


def _present(arr: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.bincount(arr.ravel())).tolist()) - {0}


def _case_counts(case: str, pred_path: Path, ref_path: Path, labels: Sequence[int] | None,
                 ignore_value: int | None = None) -> dict:
    """tp/fp/fn per class for: the prediction, after step 1, and after each class's step on either.

    Without `labels` the classes are the values present in this case (absent ones count 0, 0, 0).
    Voxels whose reference is `ignore_value` count nowhere.
    """
    pred, ref = mask_ignored(*load_pair(case, pred_path, ref_path)[:2], ignore_value)
    if labels is None:
        labels = sorted(_present(pred) | _present(ref))
    else:
        for what, arr in (("prediction", pred), ("reference", ref)):
            extra = sorted(_present(arr) - set(labels))
            if extra:
                raise BadInputError(f"{what} holds label value(s) {extra[:10]} not among {list(labels)[:20]}", case)
    fg = keep_largest(pred, labels)
    fg_changed = not np.array_equal(fg, pred)
    out = {"base": {}, "fg": {}, "class_on_base": {}, "class_on_fg": {}}
    for v in labels:
        out["base"][v] = _counts(pred, ref, v)
        out["class_on_base"][v] = _counts(keep_largest(pred, [v]), ref, v)
        if fg_changed:
            out["fg"][v] = _counts(fg, ref, v)
            out["class_on_fg"][v] = _counts(keep_largest(fg, [v]), ref, v)
        else:
            out["fg"][v], out["class_on_fg"][v] = out["base"][v], out["class_on_base"][v]
    return out


def _mean_dice(cases: list[dict], variant: str, value: int) -> float:
    counts = (c[variant].get(value, (0, 0, 0)) for c in cases)
    dice = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts if tp + fp + fn]
    return float(np.mean(dice)) if dice else math.nan


def _fg_mean(per_class: Mapping[int, float]) -> float:
    vals = [v for v in per_class.values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def decide_postprocessing(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike,
                          labels: Mapping[int, str] | Sequence[int] | None = None,
                          num_workers: int | None = None, progress: bool = False) -> PostprocessingRule:
    """nnU-Net's largest-component rule, decided on the predictions in `pred_dir` (see module doc).

    `labels` are the foreground label values (default: from the dataset.json of `ref_dir`, else
    the values found in the predictions and references). Each case is read once.
    """
    pairs, found = pair_cases(pred_dir, ref_dir)
    if labels is None:
        labels = found
    given = None if labels is None else sorted(int(v) for v in labels if int(v) != 0)
    label_map = reference_label_map(ref_dir)
    ignore = None if label_map is None else label_map.ignore_value
    cases = map_cases(lambda c, p, r: _case_counts(c, p, r, given, ignore), pairs, num_workers, progress,
                      "post-processing")
    values = given if given is not None else sorted({v for c in cases for v in c["base"]})
    if not values:
        raise BadInputError("no foreground labels to post-process: predictions and references are all background")
    before = {v: _mean_dice(cases, "base", v) for v in values}
    after_fg = {v: _mean_dice(cases, "fg", v) for v in values}
    use_fg = _fg_mean(after_fg) > _fg_mean(before) and not any(after_fg[v] < before[v] for v in values)
    source, class_variant = ("fg", "class_on_fg") if use_fg else ("base", "class_on_base")
    current = after_fg if use_fg else dict(before)
    per_class: list[int] = []
    if len(values) > 1:
        for v in values:
            candidate = _mean_dice(cases, class_variant, v)
            if candidate > current[v]:
                per_class.append(v)
                current[v] = candidate
    fmt = lambda d: {"foreground": _fg_mean(d), **{str(v): d[v] for v in values}}  # noqa: E731
    return PostprocessingRule(labels=tuple(values), keep_largest_foreground=use_fg,
                              keep_largest_per_class=tuple(per_class), dice_before=fmt(before),
                              dice_after=fmt(current), num_cases=len(cases))
