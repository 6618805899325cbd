"""Figures the pipeline writes (per-class box plots, training curves) as PNG files.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas directly, never through
pyplot's global state: safe in worker threads and on machines without a display, and it leaves
the process-wide backend alone. Each PNG is written under a temporary name and renamed, so a
crash never leaves a truncated image.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.storage import as_path, replacing

TRAINING_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds")  # plus val_dice_<label> per class


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Figure, out_png: str | os.PathLike, dpi: int = 100) -> Path:
    out = as_path(out_png)
    with replacing(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out


def _finite(values) -> np.ndarray:
    arr = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def boxplot(groups: Mapping[str, Sequence[float | None]], out_png: str | os.PathLike, title: str = "",
            ylabel: str = "", ylim: tuple[float, float] | None = None) -> Path:
    """One box per group (e.g. per-case Dice per class), each labelled with its name and n.

    NaN/None values are dropped (a class absent from a case has no score); a group left empty
    keeps its place on the axis with n=0. The figure widens with the number of groups.
    """
    names = list(groups)
    data = [_finite(groups[n]) for n in names]
    width = min(40.0, max(5.0, 0.55 * len(names) + 2.0))
    fig, axes = new_figure(width, 4.5)
    ax = axes[0, 0]
    positions = np.arange(1, len(names) + 1)
    filled = [i for i, d in enumerate(data) if d.size]
    if filled:
        ax.boxplot([data[i] for i in filled], positions=positions[filled], widths=0.6, showmeans=True,
                   meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black"})
        rng = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
        for i in filled:
            jitter = rng.uniform(-0.12, 0.12, data[i].size)
            ax.scatter(positions[i] + jitter, data[i], s=9, alpha=0.5, color="tab:blue", zorder=3)
    crowded = len(names) > 8  # many classes: vertical one-line tick labels
    ax.set_xticks(positions, [f"{n}{' ' if crowded else chr(10)}(n={d.size})" for n, d in zip(names, data)],
                  rotation=90 if crowded else 0, fontsize=8 if crowded else 10)
    ax.set_xlim(0.4, len(names) + 0.6)
    if ylim is not None:
        ax.set_ylim(ylim[0] - 0.02 * (ylim[1] - ylim[0]), ylim[1] + 0.02 * (ylim[1] - ylim[0]))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_png)


def read_metrics_csv(metrics_csv: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a training metrics CSV as float arrays; empty cells (no validation that epoch) -> NaN."""
    with as_path(metrics_csv).open("r", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        if name is None:
            continue
        vals = []
        for r in rows:
            cell = (r.get(name) or "").strip()
            try:
                vals.append(float(cell) if cell else math.nan)
            except ValueError:
                vals.append(math.nan)
        columns[name] = np.asarray(vals, dtype=np.float64)
    return columns


def _plot_series(ax, x, y, label, **kw):
    ok = np.isfinite(y)
    if ok.any():
        ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 30 else None, markersize=3, label=label, **kw)


def plot_training_curves(metrics_csv: str | os.PathLike, out_png: str | os.PathLike, title: str | None = None,
                         label_names: Mapping[str, str] | None = None) -> Path:
    """Losses, validation Dice per class (and their mean), learning rate and epoch time against epoch.

    The CSV has columns epoch, train_loss, val_loss, val_dice_<label> (one per class), lr and
    seconds (the epoch's wall time); any may be missing or empty on some rows. `label_names`
    ({"1": "Anterior", ...}) names the classes in the legend.
    """
    cols = read_metrics_csv(metrics_csv)
    n = len(next(iter(cols.values()))) if cols else 0
    epoch = cols.get("epoch", np.arange(n, dtype=np.float64))
    fig, axes = new_figure(11, 7, 2, 2)
    (ax_loss, ax_dice), (ax_lr, ax_time) = axes

    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if key in cols:
            _plot_series(ax_loss, epoch, cols[key], label)
    ax_loss.set_title("loss")

    dice_cols = [c for c in cols if c.startswith("val_dice_")]
    for c in dice_cols:
        value = c[len("val_dice_"):]
        _plot_series(ax_dice, epoch, cols[c], (label_names or {}).get(value, value), alpha=0.8, linewidth=1)
    if len(dice_cols) > 1:
        stacked = np.vstack([cols[c] for c in dice_cols])
        with warnings.catch_warnings():  # an epoch without validation: all-NaN column -> NaN, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(stacked, axis=0)
        _plot_series(ax_dice, epoch, mean, "mean", color="black", linewidth=2.2)
    ax_dice.set_title("validation Dice")
    ax_dice.set_ylim(-0.02, 1.02)

    if "lr" in cols:
        _plot_series(ax_lr, epoch, cols["lr"], "lr", color="tab:purple")
        lr = cols["lr"][np.isfinite(cols["lr"])]
        if lr.size and (lr > 0).all() and lr.max() / lr.min() > 20:
            ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate")

    total = ""
    if "seconds" in cols:
        _plot_series(ax_time, epoch, cols["seconds"], "seconds", color="tab:gray")
        secs = cols["seconds"][np.isfinite(cols["seconds"])]
        total = f" (total {secs.sum() / 60:.1f} min)" if secs.size else ""
        if secs.size:
            ax_time.set_ylim(bottom=0)
    ax_time.set_title("seconds per epoch" + total)

    for ax in (ax_loss, ax_dice, ax_lr, ax_time):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and ax is not ax_time and ax is not ax_lr:
            ax.legend(fontsize=8, ncols=1 if len(dice_cols) < 12 else 3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title or f"training curves: {as_path(metrics_csv).parent.name or as_path(metrics_csv).name}")
    return save_figure(fig, out_png)
