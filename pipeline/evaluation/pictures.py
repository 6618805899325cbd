"""One PNG per case: a few axial slices of the image with reference and prediction contours.

People look before they read: a Dice of 0.6 can be a shifted boundary, a missed lobe or a stray
blob far away, and one picture tells which. Slices are chosen where the structures are (the
quartiles of the axial extent of reference or prediction foreground), drawn in RAS with anterior
up and the patient's right on the left of the picture (radiological convention), at the voxels'
true aspect ratio. The reference is a translucent fill, the prediction an outline, one colour per
class: where they agree the outline hugs the fill.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.plotting import new_figure, save_figure
from pipeline.storage import as_path

COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf", "#17becf")


def pick_slices(reference: np.ndarray, prediction: np.ndarray, count: int = 3) -> list[int]:
    """Axial (last-axis) slice indices spread over the extent of the union of both foregrounds."""
    union = (reference > 0) | (prediction > 0)
    z = np.flatnonzero(union.any(axis=(0, 1)))
    if z.size == 0:  # nothing anywhere: the middle of the volume
        return [reference.shape[2] // 2]
    picks = np.quantile(z, np.linspace(0, 1, count + 2)[1:-1]) if z.size > 1 else z
    return sorted({int(z[np.abs(z - p).argmin()]) for p in np.atleast_1d(picks)})


def _display(slice_ras: np.ndarray) -> np.ndarray:
    """An (x, y) RAS slice as screen rows and columns: anterior at the top, the patient's right (+x)
    on the left, as radiologists read an axial slice (seen from the feet)."""
    return slice_ras.T[::-1, ::-1]


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def case_picture(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, out_png: str | os.PathLike,
                 labels: Mapping[int, str], title: str = "", dice: Mapping[int, float | None] | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), num_slices: int = 3) -> Path:
    """Write the picture of one case. Arrays are 3D in RAS on one grid (image: the first channel)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not image.shape == reference.shape == prediction.shape:
        raise ValueError(f"image {image.shape}, reference {reference.shape} and prediction {prediction.shape} differ")
    slices = pick_slices(reference, prediction, num_slices)
    lo, hi = _window(image)
    aspect = float(spacing[1]) / float(spacing[0])  # screen rows are y, columns x
    fig, axes = new_figure(3.2 * len(slices), 3.8, 1, len(slices))
    values = [v for v in sorted(labels) if v != 0]
    colour = {v: COLOURS[i % len(COLOURS)] for i, v in enumerate(values)}
    for ax, z in zip(axes[0], slices):
        ax.imshow(_display(image[:, :, z]), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
        for value in values:
            ref = _display(reference[:, :, z] == value)
            if ref.any():
                ax.imshow(np.ma.masked_where(~ref, ref), cmap=ListedColormap([colour[value]]), alpha=0.4,
                          interpolation="nearest", aspect=aspect)
            pred = _display(prediction[:, :, z] == value).astype(np.float32)
            if pred.any() and not pred.all():
                ax.contour(pred, levels=[0.5], colors=[colour[value]], linewidths=1.4)
        ax.set_title(f"axial slice {z}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = []
    for value in values:
        d = (dice or {}).get(value)
        score = "" if d is None or (isinstance(d, float) and math.isnan(d)) else f" (Dice {d:.3f})"
        handles.append(Patch(facecolor=colour[value], alpha=0.6, label=f"{labels[value]}{score}"))
    handles += [Patch(facecolor="0.5", alpha=0.4, label="reference: fill"),
                Line2D([], [], color="0.3", label="prediction: outline")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png, dpi=90)


def draw_case(row: dict, pred_path: Path, ref_path: Path, image_path: Path, labels: Mapping[int, str],
              out_png: str | os.PathLike, title: str | None = None) -> Path | None:
    """The picture of one evaluated case (`row`: its entry in summary.json's "cases"), read from its files.

    None when the image is on another grid than its label: validation reports that, not a picture.
    """
    from pipeline.data.images import read_volume
    from pipeline.evaluation.cases import load_pair

    case = row["case"]
    pred, ref, spacing = load_pair(case, pred_path, ref_path)
    data, _ = read_volume(image_path, case)
    image = data[..., 0] if data.ndim == 4 else data  # RAS already; channels last: the first is enough
    if image.shape != ref.shape:
        return None
    dice = {int(v): m.get("dice") for v, m in row["metrics"].items()}
    return case_picture(image, ref, pred, out_png, labels, title=title or case, dice=dice, spacing=spacing)


def find_images(ref_dir: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The first channel's image file per case: from `images_dir` (CASE.nii.gz or CASE_0000.nii.gz,
    as `segpipe predict` reads them), else from the dataset whose folder (or labelsTr/) is `ref_dir`."""
    from pipeline.data.dataset import scan_dataset
    from pipeline.data.files import image_files, split_channel, strip_ending
    from pipeline.errors import BadInputError

    if images_dir is not None:
        folder = as_path(images_dir)
        if not folder.is_dir():
            raise BadInputError(f"image folder {folder} does not exist")
        found: dict[str, Path] = {}
        for path in image_files(folder):
            stem = strip_ending(path.name)
            channel = split_channel(stem)
            if channel is None:
                found[stem] = path
            elif channel[1] == 0:
                found[channel[0]] = path
        return found
    ref_dir = as_path(ref_dir)
    for root in (ref_dir, ref_dir.parent):
        if (root / "dataset.json").is_file():
            dataset, problems = scan_dataset(root)
            if dataset is None:
                raise BadInputError(problems)
            return {c.case_id: c.images[0] for c in dataset.cases}
    raise BadInputError(f"pictures need the images: give a dataset folder as the reference ({ref_dir} is a label "
                        "folder without a dataset.json above it) or an image folder with --images")
