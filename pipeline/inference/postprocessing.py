"""The post-processing rule `segpipe evaluate-cv` decides and `segpipe predict` applies: keep only
the largest connected component of the foreground and/or of chosen classes.

Components use full connectivity (26 neighbours in 3D, skimage's default as nnU-Net); when several
components tie for largest, all of them are kept. How the rule is decided:
`pipeline.evaluation.postprocessing`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.errors import BadInputError
from pipeline.storage import as_path, write_text_atomic

RULE_VERSION = 1


@dataclass(frozen=True)
class PostprocessingRule:
    """Which largest-component steps to apply, and the validation Dice that justified them."""

    labels: tuple[int, ...]  # foreground label values (original values)
    keep_largest_foreground: bool = False
    keep_largest_per_class: tuple[int, ...] = ()  # label values, in application order
    dice_before: dict[str, float | None] = field(default_factory=dict)  # {"foreground": .., "<value>": ..}
    dice_after: dict[str, float | None] = field(default_factory=dict)
    num_cases: int = 0

    @property
    def is_identity(self) -> bool:
        return not self.keep_largest_foreground and not self.keep_largest_per_class

    def to_json(self) -> dict:
        clean = lambda d: {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in d.items()}  # noqa: E731
        return {"version": RULE_VERSION, "labels": list(self.labels),
                "keep_largest_foreground": self.keep_largest_foreground,
                "keep_largest_per_class": list(self.keep_largest_per_class),
                "dice_before": clean(self.dice_before), "dice_after": clean(self.dice_after),
                "num_cases": self.num_cases, "connectivity": "full"}

    @classmethod
    def from_json(cls, d: Mapping) -> PostprocessingRule:
        try:
            labels = tuple(int(v) for v in d["labels"])
            per_class = tuple(int(v) for v in d.get("keep_largest_per_class", ()))
            rule = cls(labels=labels, keep_largest_foreground=bool(d.get("keep_largest_foreground", False)),
                       keep_largest_per_class=per_class, dice_before=dict(d.get("dice_before", {})),
                       dice_after=dict(d.get("dice_after", {})), num_cases=int(d.get("num_cases", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"post-processing rule is malformed ({type(exc).__name__}: {exc})") from None
        unknown = sorted(set(per_class) - set(labels))
        if unknown:
            raise BadInputError(f"post-processing rule names classes {unknown} that are not among its labels {list(labels)}")
        return rule

    def save(self, path: str | os.PathLike) -> Path:
        path = as_path(path)
        write_text_atomic(path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PostprocessingRule:
        try:
            return cls.from_json(json.loads(as_path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"cannot read post-processing rule {path} ({exc})") from None


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component(s) of a boolean mask (full connectivity; ties all kept)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    components, n = ndimage.label(mask[box], structure=structure)
    keep = np.zeros_like(mask)
    if n <= 1:
        keep[box] = mask[box]
        return keep
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep[box] = np.isin(components, np.flatnonzero(sizes == sizes.max()))
    return keep


def keep_largest(label_array: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """A copy where voxels of `values` outside their joint largest component become background."""
    mask = np.isin(label_array, list(values))
    out = np.array(label_array, copy=True)
    out[mask & ~largest_component(mask)] = 0
    return out


def apply_postprocessing(label_array: np.ndarray, rule: PostprocessingRule) -> np.ndarray:
    """The rule's steps on one label volume of original values (a new array; the input is untouched)."""
    if rule.is_identity:
        return np.array(label_array, copy=True)
    out = np.asarray(label_array)
    if rule.keep_largest_foreground:
        out = keep_largest(out, rule.labels)
    for value in rule.keep_largest_per_class:
        out = keep_largest(out, [value])
    return out
