"""What the label values of a dataset mean: classes, regions and the `ignore` label (nnU-Net v2's rules).

A dataset.json in the nnU-Net v2 layout declares `labels` as {name: value}. Three kinds of entry:

* a class: `"organ": 1`. Without regions the network has one softmax output per class, background
  included, and a voxel's prediction is the argmax.
* a region: `"organ+lesion": [1, 2]`, with `regions_class_order` beside `labels`. When any label is a
  list the dataset is region-based: every foreground entry (a list, or a single value) is a region,
  the network has one sigmoid output per region (no background output), and a prediction paints, in
  the order of the regions, `regions_class_order[i]` wherever region i's probability exceeds 0.5 (later
  regions win, so nested regions list the outer one first).
* `"ignore": V`, the highest value: voxels annotated as "unknown" (sparse scribbles). They count
  neither in the loss nor in any Dice, foreground sampling never centres on them and the network has
  no output for them.

`LabelMap` holds all of it as plain values. The store keeps label values as contiguous indices
(index i is `values[i]`, the ignore value the last); region masks are made from them when a loss or a
metric needs them (`region_indices`), so one store serves both kinds of training.
`probabilities_to_index` / `probabilities_to_values` turn a network's probabilities (softmax or
per-region sigmoid) into a label map: the one place that knows how.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import Problem

IGNORE_NAME = "ignore"


@dataclass(frozen=True)
class Region:
    """One sigmoid output: the voxels whose label value is any of `values`."""

    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class LabelMap:
    """Label values <-> contiguous store indices (index i is `values[i]`, 0 is background), and what
    the network predicts: one softmax output per class, or one sigmoid output per region."""

    values: tuple[int, ...]  # every value a label file may hold, sorted; the ignore value included (last)
    regions: tuple[Region, ...] = ()  # empty: softmax over the classes
    regions_class_order: tuple[int, ...] = ()  # per region, the value it paints on export
    ignore_value: int | None = None

    def __post_init__(self):
        if not self.values or self.values[0] != 0:
            raise ValueError("label values must start with background 0")
        if list(self.values) != sorted(set(self.values)):
            raise ValueError("label values must be unique and sorted")
        if self.ignore_value is not None and self.ignore_value != self.values[-1]:
            raise ValueError(f"the ignore label {self.ignore_value} must be the highest label value "
                             f"({self.values[-1]})")
        if len(self.regions_class_order) != len(self.regions):
            raise ValueError(f"regions_class_order has {len(self.regions_class_order)} entries for "
                             f"{len(self.regions)} regions")
        allowed = set(self.class_values) - {0}
        for region in self.regions:
            if not region.values or not set(region.values) <= allowed:
                raise ValueError(f"region {region.name!r} {list(region.values)}: values must be foreground labels "
                                 f"among {sorted(allowed)}")
        if not set(self.regions_class_order) <= allowed:
            raise ValueError(f"regions_class_order {list(self.regions_class_order)} names values outside "
                             f"{sorted(allowed)}")

    # ------------------------------------------------------------ what the values are

    @property
    def num_classes(self) -> int:
        """How many store indices there are (the ignore label included); see `num_outputs` for the network."""
        return len(self.values)

    @property
    def is_identity(self) -> bool:
        """Values 0..K-1: store indices equal label values."""
        return self.values == tuple(range(len(self.values)))

    @property
    def has_regions(self) -> bool:
        return bool(self.regions)

    @property
    def has_ignore(self) -> bool:
        return self.ignore_value is not None

    @property
    def ignore_index(self) -> int | None:
        """The store index of the ignore label (the last), or None."""
        return len(self.values) - 1 if self.has_ignore else None

    @property
    def class_values(self) -> tuple[int, ...]:
        """The label values that are real classes: background and foreground, not the ignore label."""
        return self.values[:-1] if self.has_ignore else self.values

    @property
    def num_outputs(self) -> int:
        """The network's output channels: one per region, else one per class (background included)."""
        return len(self.regions) if self.has_regions else len(self.class_values)

    @property
    def nonlinearity(self) -> str:
        """"sigmoid" (independent regions) or "softmax" (mutually exclusive classes)."""
        return "sigmoid" if self.has_regions else "softmax"

    @property
    def region_indices(self) -> tuple[tuple[int, ...], ...]:
        """Per region, the store indices it unites (what a loss compares its output channel with)."""
        index = {v: i for i, v in enumerate(self.values)}
        return tuple(tuple(index[v] for v in r.values) for r in self.regions)

    @property
    def output_keys(self) -> tuple[str, ...]:
        """A name per scored output: the region names, else the foreground class values as strings.
        (The training pseudo-Dice columns `val_dice_<key>`.)"""
        if self.has_regions:
            return tuple(r.name for r in self.regions)
        return tuple(str(v) for v in self.class_values[1:])

    # ------------------------------------------------------------ values <-> indices

    def _lookup(self, max_value: int) -> np.ndarray:
        lut = np.full(max(max_value, self.values[-1]) + 1, -1, dtype=np.int16)
        lut[list(self.values)] = np.arange(len(self.values), dtype=np.int16)
        return lut

    def to_index(self, label: np.ndarray) -> np.ndarray:
        """Original values -> store indices (uint8 when it fits). Undeclared values raise."""
        label = np.asarray(label)
        if label.size == 0:
            return label.astype(np.uint8)
        lo, hi = int(label.min()), int(label.max())
        if lo < 0:
            raise ValueError(f"negative label value {lo}")
        out = self._lookup(hi)[label.astype(np.int64, copy=False)]
        if (out < 0).any():
            bad = sorted(set(np.unique(label[out < 0]).tolist()))[:10]
            raise ValueError(f"label values {bad} are not declared in dataset.json")
        return out.astype(self.index_dtype)

    def to_values(self, index: np.ndarray) -> np.ndarray:
        """Store indices -> original values, in the smallest integer type that holds them."""
        return np.asarray(self.values, dtype=self.value_dtype)[np.asarray(index, dtype=np.int64)]

    @property
    def index_dtype(self):
        return np.uint8 if len(self.values) <= 255 else np.int16

    @property
    def value_dtype(self):
        return np.uint8 if self.values[-1] <= 255 else np.int16 if self.values[-1] <= 32767 else np.int32

    # ------------------------------------------------------------ probabilities -> labels

    def probabilities_to_index(self, probabilities) -> np.ndarray:
        """(num_outputs, *spatial) probabilities -> store indices (*spatial).

        Softmax: the argmax. Regions (sigmoid): background, then each region in order painted with
        the index of its `regions_class_order` value where its probability exceeds 0.5 (nnU-Net's rule).
        Works on anything sliceable with a shape (a NumPy array, a Zarr array chunk).
        """
        probabilities = np.asarray(probabilities)
        if probabilities.shape[0] != self.num_outputs:
            raise ValueError(f"{probabilities.shape[0]} probability channels, expected {self.num_outputs}")
        if not self.has_regions:
            return probabilities.argmax(0).astype(self.index_dtype)
        out = np.zeros(probabilities.shape[1:], dtype=self.index_dtype)
        index = {v: i for i, v in enumerate(self.values)}
        for channel, value in enumerate(self.regions_class_order):
            out[probabilities[channel] > 0.5] = index[value]
        return out

    def probabilities_to_values(self, probabilities) -> np.ndarray:
        """(num_outputs, *spatial) probabilities -> label values: what the exported file holds."""
        return self.to_values(self.probabilities_to_index(probabilities))

    def to_json(self) -> dict:
        return {"values": list(self.values), "regions": [{"name": r.name, "values": list(r.values)} for r in self.regions],
                "regions_class_order": list(self.regions_class_order), "ignore_value": self.ignore_value}


# ---------------------------------------------------------------- reading dataset.json


@dataclass(frozen=True)
class LabelDeclaration:
    """The `labels` (and `regions_class_order`) of an nnU-Net v2 dataset.json, parsed."""

    names: dict[int, str]  # every value a label file may hold -> its name (unnamed region members: "label_<v>")
    regions: tuple[Region, ...] = ()
    regions_class_order: tuple[int, ...] = ()
    ignore_value: int | None = None

    def label_map(self) -> LabelMap:
        return LabelMap(tuple(sorted(self.names)), self.regions, self.regions_class_order, self.ignore_value)


def _whole(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value and value >= 0


def parse_nnunet_labels(raw: object, regions_class_order: object, problems: list[Problem]) -> LabelDeclaration:
    """nnU-Net v2's `labels` {name: value | [values]} with `regions_class_order`, every problem collected.

    Rules (nnU-Net v2's LabelManager): background is the single value 0; a list makes the dataset
    region-based and then `regions_class_order` is required, one foreground value per region; `ignore`
    is one value, the highest, in no region; no value is declared twice as a class.
    """
    names: dict[int, str] = {}
    regions: list[Region] = []
    ignore_value: int | None = None
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem(None, "dataset.json 'labels' must be a non-empty object like {\"background\": 0}"))
        return LabelDeclaration(names)
    has_lists = any(isinstance(v, (list, tuple)) for v in raw.values())
    for name, value in raw.items():
        name = str(name)
        if isinstance(value, (list, tuple)):
            if not value or not all(_whole(v) for v in value):
                problems.append(Problem(None, f"region {name!r} has value {value!r}: expected a non-empty list of "
                                              "non-negative integer label values"))
                continue
            members = tuple(sorted({int(v) for v in value}))
            if len(members) != len(value):
                problems.append(Problem(None, f"region {name!r} lists a label value twice ({list(value)})"))
                continue
            if 0 in members:
                problems.append(Problem(None, f"region {name!r} contains background 0: regions are foreground "
                                              "(background is what no region covers)"))
                continue
            if name == IGNORE_NAME:
                problems.append(Problem(None, f"label 'ignore' has value {list(value)}: the ignore label is one "
                                              "value, not a region"))
                continue
            regions.append(Region(name, members))
            for v in members:
                names.setdefault(v, f"label_{v}")
            continue
        if not _whole(value):
            problems.append(Problem(None, f"label {name!r} has value {value!r}: expected a non-negative integer"))
            continue
        v = int(value)
        if name == IGNORE_NAME:
            ignore_value = v
        elif v != 0 and has_lists:
            regions.append(Region(name, (v,)))
        owner = names.get(v)
        if owner is not None and not owner.startswith("label_"):
            problems.append(Problem(None, f"dataset.json labels {owner!r} and {name!r} both have value {v}: each "
                                          "class needs its own value"))
            continue
        names[v] = name
    if ignore_value is not None:
        if ignore_value == 0:
            problems.append(Problem(None, "label 'ignore' has value 0: background cannot be ignored"))
        elif any(ignore_value in r.values for r in regions):
            problems.append(Problem(None, f"the ignore label {ignore_value} is part of a region: ignored voxels "
                                          "belong to no region"))
        elif ignore_value != max(names):
            problems.append(Problem(None, f"the ignore label {ignore_value} must be the highest label value "
                                          f"(found {max(names)}), as nnU-Net v2 requires"))
    order = _parse_regions_class_order(regions_class_order, regions, names, ignore_value, problems)
    if any(p.case is None for p in problems):
        return LabelDeclaration(names, (), (), ignore_value)
    return LabelDeclaration(names, tuple(regions) if has_lists else (), order, ignore_value)


def _parse_regions_class_order(raw: object, regions: list[Region], names: dict[int, str], ignore_value: int | None,
                               problems: list[Problem]) -> tuple[int, ...]:
    if not regions:
        if raw is not None:
            problems.append(Problem(None, "dataset.json has 'regions_class_order' but no region (a label whose "
                                          "value is a list): remove it, or declare the regions"))
        return ()
    if raw is None:
        problems.append(Problem(None, f"dataset.json declares regions ({', '.join(r.name for r in regions)}) but no "
                                      "'regions_class_order': give the label value each region paints on export, "
                                      "one per region in the order of 'labels'"))
        return ()
    if not isinstance(raw, list) or not all(_whole(v) for v in raw):
        problems.append(Problem(None, f"dataset.json 'regions_class_order' must be a list of label values, got {raw!r}"))
        return ()
    if len(raw) != len(regions):
        problems.append(Problem(None, f"dataset.json 'regions_class_order' has {len(raw)} entries for {len(regions)} "
                                      f"regions ({', '.join(r.name for r in regions)}): one per region"))
        return ()
    bad = [int(v) for v in raw if int(v) == 0 or int(v) == ignore_value or int(v) not in names]
    if bad:
        problems.append(Problem(None, f"dataset.json 'regions_class_order' holds {bad}: each entry must be a "
                                      "foreground label value of the dataset (not background or ignore)"))
        return ()
    return tuple(int(v) for v in raw)
