"""Scores of a prediction folder against reference labels: Dice, IoU, voxel counts, volume, HD95.

Conventions (nnU-Net's where it has one; every output states them in `summary.json["conventions"]`):

* Classes are the dataset's original label values (possibly non-contiguous) and keep them as keys.
* A class absent from both prediction and reference in a case has Dice/IoU/HD95 NaN (JSON null)
  and is left out of that class's mean; "foreground_mean" is the mean over classes of the
  per-class means (classes whose mean is NaN left out), as nnU-Net.
* A class present in only one of the two has Dice 0 and IoU 0, and HD95 NaN: a distance to
  nothing is undefined, and a stand-in (image diagonal, inf) would swamp the mean. Such cases are
  left out of the HD95 mean; `n_hd95` beside it says how many cases it averages.
* HD95 is the symmetric 95th-percentile Hausdorff distance in millimetres between the surface
  voxels of the two masks (a voxel of the mask with a face neighbour outside it): the larger of
  the two directed 95th percentiles, as MONAI and DeepMind's surface-distance. It is computed on
  the bounding box of both masks (exact: all surface voxels lie inside it).
* volume_diff_ml = (predicted volume - reference volume) in millilitres.
* Sparse labels: voxels whose reference is the dataset's `ignore` label are left out of every
  score (both masks are background there), as nnU-Net v2.
* Region-based datasets: each region (the union of its label values) is scored as one mask, beside
  the per-label scores: `summary.json["regions"]` (means, foreground mean, names -> values) and
  `cases[i]["regions"]`; "foreground_mean" stays the mean over labels.

Cases are the prediction files: a fold's validation predictions cover part of the dataset by
design, so reference cases without a prediction are not an error (their count is logged), while
a prediction without a reference, or one whose grid differs from its reference, is bad input.
Both files are read into the RAS frame, so the orientation they were written in does not matter.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.console import number
from pipeline.errors import BadInputError
from pipeline.evaluation.cases import load_pair, map_cases, mask_ignored, pair_cases, reference_label_map
from pipeline.storage import as_path, write_text_atomic

log = logging.getLogger("segpipe.evaluation")

OUTPUT_FILES = ("summary.json", "per_case.csv", "summary.md", "dice_boxplot.png")
CONVENTIONS = {
    "absent_from_both": "dice, iou and hd95 are null and excluded from means",
    "absent_from_one": "dice 0, iou 0, hd95 null (excluded from the hd95 mean; see n_hd95)",
    "hd95": "mm; max of the two directed 95th-percentile surface-voxel distances",
    "volume_diff_ml": "predicted minus reference volume, millilitres",
    "foreground_mean": "mean over classes of the per-class means",
    "ignore": "voxels whose reference is the ignore label are excluded from every score",
    "regions": "a region is scored as the union of its label values; regions.foreground_mean over regions",
}


# ---------------------------------------------------------------- metrics


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hausdorff_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance (mm) between the surfaces of two boolean masks.

    NaN when either mask is empty. Only the bounding box of both masks is transformed: every
    surface voxel lies inside it and Euclidean distances do not depend on what lies outside.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() or not ref.any():
        return math.nan
    union = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    p, r = _surface(pred[union]), _surface(ref[union])
    if np.array_equal(p, r):
        return 0.0
    spacing = tuple(float(s) for s in spacing)
    d_pr = ndimage.distance_transform_edt(~r, sampling=spacing)[p]
    d_rp = ndimage.distance_transform_edt(~p, sampling=spacing)[r]
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def _present(arr: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.bincount(arr.ravel()))


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 labels: Sequence[int] | None = None, case: str | None = None) -> dict[int, dict]:
    """Per class {dice, iou, tp, fp, fn, hd95, volume_diff_ml} for one case (NaN where undefined).

    With `labels`, every non-zero value in either array must be one of them (anything else means
    the files do not belong to this dataset); without, the classes are the values present.
    """
    pred_present, ref_present = _present(pred), _present(ref)
    if labels is None:
        values = sorted((set(pred_present.tolist()) | set(ref_present.tolist())) - {0})
    else:
        values = sorted(int(v) for v in labels if int(v) != 0)
        for what, present in (("prediction", pred_present), ("reference", ref_present)):
            extra = sorted(set(present.tolist()) - set(values) - {0})
            if extra:
                raise BadInputError(f"{what} holds label value(s) {extra[:10]} that are not among the "
                                    f"evaluated labels {values[:20]}", case)
    k = len(values) + 1
    lut = np.zeros(max(int(pred.max(initial=0)), int(ref.max(initial=0)), *values, 0) + 1,
                   dtype=np.uint8 if k <= 255 else np.int16)
    lut[values] = np.arange(1, k)
    pidx, ridx = lut[pred], lut[ref]
    confusion = np.bincount((pidx.astype(np.int32) * k + ridx).ravel(), minlength=k * k).reshape(k, k)
    pboxes, rboxes = ndimage.find_objects(pidx), ndimage.find_objects(ridx)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out: dict[int, dict] = {}
    for i, value in enumerate(values, start=1):
        tp = int(confusion[i, i])
        fp = int(confusion[i, :].sum()) - tp
        fn = int(confusion[:, i].sum()) - tp
        if tp + fp + fn == 0:
            dice = iou = hd95 = math.nan
        else:
            dice = 2 * tp / (2 * tp + fp + fn)
            iou = tp / (tp + fp + fn)
            hd95 = math.nan
            if tp + fp > 0 and tp + fn > 0:
                a, b = pboxes[i - 1], rboxes[i - 1]
                region = tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))
                hd95 = hausdorff_distance(pidx[region] == i, ridx[region] == i, spacing)
        out[value] = {"dice": dice, "iou": iou, "tp": tp, "fp": fp, "fn": fn, "hd95": hd95,
                      "volume_diff_ml": (fp - fn) * voxel_ml}
    return out


def region_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   regions: Sequence) -> dict[str, dict]:
    """Per region (`pipeline.data.labels.Region`) the metrics of `case_metrics`, the region being the
    voxels whose value is any of its label values (BraTS' whole tumour = 1, 2 and 3)."""
    out = {}
    for region in regions:
        p = np.isin(pred, region.values).astype(np.uint8)
        r = np.isin(ref, region.values).astype(np.uint8)
        out[region.name] = case_metrics(p, r, spacing, [1])[1]
    return out


def evaluate_case(case: str, pred_path: Path, ref_path: Path, labels: Sequence[int] | None = None,
                  label_map=None) -> dict:
    """One row of `summary.json["cases"]`, metrics keyed by label value (int); with a `LabelMap` of
    regions also `regions` keyed by region name, and its ignore label masked out."""
    pred, ref, spacing = load_pair(case, pred_path, ref_path)
    if label_map is not None:
        pred, ref = mask_ignored(pred, ref, label_map.ignore_value)
    row = {"case": case, "metrics": case_metrics(pred, ref, spacing, labels, case)}
    if label_map is not None and label_map.has_regions:
        row["regions"] = region_metrics(pred, ref, spacing, label_map.regions)
    return row


# ---------------------------------------------------------------- summary


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _means(per_key: Mapping, keys) -> dict:
    mean = {}
    for v in keys:
        per = per_key[v]
        hd = [m["hd95"] for m in per if not math.isnan(m["hd95"])]
        mean[v] = {"dice": _nanmean(m["dice"] for m in per), "iou": _nanmean(m["iou"] for m in per),
                   "hd95": _nanmean(hd), "volume_diff_ml": _nanmean(m["volume_diff_ml"] for m in per),
                   "n": sum(not math.isnan(m["dice"]) for m in per), "n_hd95": len(hd)}
    return mean


def summarize(cases: list[dict], labels: Mapping[int, str], label_map=None) -> dict:
    """Per-class means (NaN excluded) and the foreground mean; classes absent from a case are NaN there.
    With a region-based `label_map`, the same per region under "regions" (added keys only)."""
    nan_row = {"dice": math.nan, "iou": math.nan, "tp": 0, "fp": 0, "fn": 0, "hd95": math.nan, "volume_diff_ml": 0.0}
    rows = []
    for c in cases:
        metrics = {v: dict(c["metrics"].get(v, nan_row)) for v in labels}
        rows.append({"case": c["case"], "metrics": metrics})
    mean = _means({v: [r["metrics"][v] for r in rows] for v in labels}, labels)
    fg = {key: _nanmean(m[key] for m in mean.values()) for key in ("dice", "iou", "hd95")}
    summary = {
        "labels": {str(v): n for v, n in labels.items()},
        "n_cases": len(rows),
        "mean": {str(v): m for v, m in mean.items()},
        "foreground_mean": fg,
        "cases": [{"case": r["case"], "metrics": {str(v): m for v, m in r["metrics"].items()}} for r in rows],
        "conventions": CONVENTIONS,
    }
    if label_map is not None and label_map.has_ignore:
        summary["ignore_label"] = label_map.ignore_value
    if label_map is not None and label_map.has_regions:
        names = [r.name for r in label_map.regions]
        region_mean = _means({n: [c["regions"][n] for c in cases] for n in names}, names)
        summary["regions"] = {
            "values": {r.name: list(r.values) for r in label_map.regions},
            "mean": region_mean,
            "foreground_mean": {key: _nanmean(m[key] for m in region_mean.values()) for key in ("dice", "iou", "hd95")},
        }
        for out, c in zip(summary["cases"], cases):
            out["regions"] = c["regions"]
    return summary


def to_jsonable(obj):
    """NaN/inf -> None and numpy scalars -> Python, so the file is strict JSON (null, not NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


# ---------------------------------------------------------------- outputs


def per_case_csv(summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ("dice", "iou", "hd95", "tp", "fp", "fn", "volume_diff_ml")
    w.writerow(("case", "label", "name", *cols))
    for c in summary["cases"]:
        for v, m in c["metrics"].items():
            w.writerow((c["case"], v, summary["labels"][v], *("" if m.get(k) is None else m[k] for k in cols)))
        for name, m in c.get("regions", {}).items():  # region rows: label "region", name the region's
            w.writerow((c["case"], "region", name, *("" if m.get(k) is None else m[k] for k in cols)))
    return buf.getvalue()


def _score_table(heads: tuple[str, str], rows: Sequence[tuple[str, str, dict]], mean_label: str, fg: dict) -> list[str]:
    """A markdown table of mean scores: one row per (key, description, means), then the mean row."""
    lines = [f"| {heads[0]} | {heads[1]} | n | Dice | IoU | HD95 (mm) | n HD95 | volume diff (ml) |",
             f"|{'---:' if heads[0] == 'label' else '---'}|---|---:|---:|---:|---:|---:|---:|"]
    for key, what, m in rows:
        lines.append(f"| {key} | {what} | {m['n']} | {number(m['dice'])} | {number(m['iou'])} | "
                     f"{number(m['hd95'], 2)} | {m['n_hd95']} | {number(m['volume_diff_ml'], 3)} |")
    lines.append(f"| | **{mean_label}** | | **{number(fg['dice'])}** | **{number(fg['iou'])}** | "
                 f"{number(fg.get('hd95'), 2)} | | |")
    return lines


def summary_markdown(summary: dict, title: str = "Evaluation") -> str:
    lines = [f"# {title}", "",
             f"{summary['n_cases']} case(s). Dice/IoU/HD95 are per-case means per class; a class absent from "
             "both prediction and reference is excluded. HD95 in mm (cases where one mask is empty are "
             "excluded: `n HD95`). Volume difference = predicted - reference, ml.", ""]
    lines += _score_table(("label", "name"), [(v, summary["labels"][v], m) for v, m in summary["mean"].items()],
                          "foreground mean", summary["foreground_mean"])
    if "ignore_label" in summary:
        lines += ["", f"Voxels whose reference is the ignore label ({summary['ignore_label']}) are not scored."]
    if "regions" in summary:
        regions = summary["regions"]
        lines += ["", "## Regions", "", "Each region scored as the union of its label values.", ""]
        lines += _score_table(("region", "values"), [(n, str(regions["values"][n]), m) for n, m in regions["mean"].items()],
                              "mean over regions", regions["foreground_mean"])
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict, out_dir: Path, title: str = "Evaluation") -> None:
    """The four files; each is written under a temporary name and renamed, summary.json last."""
    from pipeline.plotting import boxplot

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "per_case.csv", per_case_csv(summary))
    write_text_atomic(out_dir / "summary.md", summary_markdown(summary, title))
    groups = {f"{v}: {name}": [c["metrics"][v]["dice"] for c in summary["cases"]]
              for v, name in summary["labels"].items()}
    for name in summary.get("regions", {}).get("mean", {}):
        groups[f"region {name}"] = [c["regions"][name]["dice"] for c in summary["cases"]]
    boxplot(groups, out_dir / "dice_boxplot.png", title=f"Dice per class ({summary['n_cases']} cases)",
            ylabel="Dice", ylim=(0.0, 1.0))
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")


def evaluate_folders(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     labels: Mapping[int, str] | Sequence[int] | None = None, num_workers: int | None = None,
                     progress: bool = True, pictures: bool | Sequence[str] = False,
                     images_dir: str | os.PathLike | None = None) -> dict:
    """Score every prediction in `pred_dir` against `ref_dir`; write the four outputs into `out_dir`.

    `labels` ({value: name} or values) overrides the classes; by default they come from the
    dataset.json of `ref_dir` (or its parent), else from the values found in the files.
    `pictures` (True: every case, or a list of case ids) adds out_dir/pictures/CASE.png, the image
    with reference and prediction contours; the images come from `images_dir` or the dataset.
    Returns the summary as written to summary.json (NaN as None).
    """
    pred_dir, ref_dir, out_dir = as_path(pred_dir), as_path(ref_dir), as_path(out_dir)
    pairs, found_labels = pair_cases(pred_dir, ref_dir)
    label_map = reference_label_map(ref_dir)
    images = {}
    if pictures:
        from pipeline.evaluation.pictures import find_images

        images = find_images(ref_dir, images_dir)  # before the scoring: a missing image folder fails fast
        wanted = {c for c, _, _ in pairs} if pictures is True else set(pictures)
        unknown = sorted(wanted - {c for c, _, _ in pairs})
        if unknown:
            raise BadInputError(f"pictures asked for case(s) without a prediction in {pred_dir}: {', '.join(unknown[:10])}")
        images = {c: p for c, p in images.items() if c in wanted}
    if labels is not None and not isinstance(labels, Mapping):
        labels = {int(v): str(v) for v in labels}
    if labels is not None:
        labels = {int(v): str(n) for v, n in sorted(labels.items()) if int(v) != 0}
    else:
        labels = found_labels
    values = list(labels) if labels is not None else None
    cases = map_cases(lambda c, p, r: evaluate_case(c, p, r, values, label_map), pairs, num_workers, progress,
                      "evaluate")
    if labels is None:
        seen = sorted({v for c in cases for v in c["metrics"]})
        labels = {v: str(v) for v in seen}
    summary = summarize(cases, labels, label_map)
    summary["prediction_dir"], summary["reference_dir"] = str(pred_dir), str(ref_dir)
    summary = to_jsonable(summary)
    write_outputs(summary, out_dir, title=f"Evaluation of {pred_dir.name} against {ref_dir.name}")
    if images:
        from pipeline.evaluation.pictures import draw_case

        rows = {row["case"]: row for row in summary["cases"]}
        drawn = map_cases(lambda c, p, r: draw_case(rows[c], p, r, images[c], labels, out_dir / "pictures" / f"{c}.png"),
                          [t for t in pairs if t[0] in images], num_workers, progress, "pictures")
        log.info("%d picture(s) -> %s", sum(d is not None for d in drawn), out_dir / "pictures")
    log.info("evaluated %d case(s): foreground mean Dice %s -> %s", len(cases),
             number(summary["foreground_mean"]["dice"]), out_dir / "summary.json")
    return summary
