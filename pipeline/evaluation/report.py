"""The report folder a user opens first: one `index.html` with the plan, curves, scores and overlays.

Everything the page shows is copied into the report folder, so it can be zipped or served as is.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from pipeline.console import number
from pipeline.inference.predictor import prediction_name
from pipeline.storage import copy_file, write_text_atomic
from pipeline.workdir import TRAINING_CURVES, Workdir

MAX_OVERLAYS = 4


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _case_dice(case: dict) -> float:
    scores = [m["dice"] for m in case["metrics"].values() if m["dice"] is not None]
    return float(np.mean(scores)) if scores else float("nan")


def _overlays(summary: dict, dataset, pred_dir: Path, out: Path) -> list[str]:
    """Pictures of the worst and the best held-out cases (by mean Dice): where to look first."""
    from pipeline.evaluation.pictures import draw_case

    ranked = sorted((c for c in summary["cases"] if not np.isnan(_case_dice(c))), key=_case_dice)
    half = MAX_OVERLAYS // 2
    chosen = ranked if len(ranked) <= MAX_OVERLAYS else ranked[:half] + ranked[-half:]
    labels = {int(k): v for k, v in summary["labels"].items()}
    names = []
    for case in chosen:
        cid = case["case"]
        files = dataset.case(cid)
        pred = pred_dir / prediction_name(cid, files.images[0])  # in the input's format
        if files.label is None or not pred.is_file():
            continue
        name = f"overlay_{cid}.png"
        if draw_case(case, pred, files.label, files.images[0], labels, out / name,
                     title=f"{cid} (mean Dice {_case_dice(case):.3f})"):
            names.append(name)
    return names


def build_report(wd: Workdir, plans, config: str, fold: str, dataset, pred_dir: Path, eval_dir: Path) -> Path:
    from pipeline.planning.planner import explain_plans

    out = wd.report
    out.mkdir(parents=True, exist_ok=True)
    run_dir = wd.run_dir(config, fold)
    summary = json.loads((eval_dir / "summary.json").read_text())
    sections: list[str] = []

    fg = summary["foreground_mean"]
    rows = [[summary["labels"].get(k, k), k, number(v.get("dice"), 3), number(v.get("iou"), 3), number(v.get("hd95"), 3)]
            for k, v in summary["mean"].items()]
    rows.append(["foreground mean", "", number(fg.get("dice"), 3), number(fg.get("iou"), 3), ""])
    sections.append(f"<h2>Scores on {len(summary['cases'])} held-out case(s)</h2>"
                    + _table(rows, ["class", "value", "Dice", "IoU", "HD95 (mm)"]))
    images = []
    for name, src in (("dice_boxplot.png", eval_dir / "dice_boxplot.png"),
                      ("training_curves.png", run_dir / TRAINING_CURVES)):
        if src.is_file():
            copy_file(src, out / name)
            images.append(name)
    if "dice_boxplot.png" in images:
        sections.append('<img src="dice_boxplot.png" alt="Dice per class">')
    if "training_curves.png" in images:
        sections.append('<h2>Training</h2><img src="training_curves.png" alt="training curves">')

    overlays = _overlays(summary, dataset, pred_dir, out)
    if overlays:
        sections.append("<h2>Overlays: the worst and the best cases</h2><p>reference filled, prediction outlined</p>"
                        + "".join(f'<img class="ov" src="{n}" alt="{n}">' for n in overlays))

    sections.append(f"<h2>Plan ({html.escape(config)})</h2><pre>{html.escape(explain_plans(plans))}</pre>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>seg-pipeline report: {html.escape(dataset.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
img{{max-width:100%;margin:6px 0}}img.ov{{max-width:49%}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}}</style>
</head><body><h1>seg-pipeline report: {html.escape(dataset.name)}</h1>
<p>configuration <b>{html.escape(config)}</b>, fold <b>{html.escape(str(fold))}</b>, foreground mean Dice
<b>{number(fg.get('dice'), 3)}</b></p>
{''.join(sections)}
</body></html>
"""
    write_text_atomic(out / "index.html", page)
    return out / "index.html"
