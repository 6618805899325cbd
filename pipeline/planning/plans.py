"""Typed plans: what the planner decided, serialised to `plans.json` with a schema version.

As in nnU-Net v2, configurations may inherit from one another (`inherits_from`): a configuration
stores only what it changes, and `Plans.configuration(name)` resolves the chain. Every per-axis
list (spacing, patch_size, kernel_sizes, strides, median_shape) is in the *store's* axis order:
the RAS axes of `pipeline.data.nifti` permuted by `transpose_forward` (the lowest-resolution axis first,
as nnU-Net does, so the 2D configuration slices along it).

`Plans.load` / `Plans.from_json` check the file against this schema before any stage uses it
(`check_plans_json`): types, ranges and the agreement between fields, naming the file and the
field of every problem (a BadInputError, exit 2), so a hand-edited or damaged plans.json is never a
`ZeroDivisionError` in the trainer, a 4096^3 patch that runs out of memory, or a batch of 0
quietly read as something else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.labels import LabelMap, Region
from pipeline.errors import BadInputError, Problem
from pipeline.storage import as_path, write_json_atomic

SCHEMA_VERSION = 2  # 2: regions, regions_class_order, ignore_label (a version-1 file loads with none of them)
READABLE_VERSIONS = (1, 2)
# The plans hash names the layout of preprocessed data, which version 2 did not change: stores and
# models made from version-1 plans stay valid after an upgrade.
HASH_LAYOUT_VERSION = 1

NORMALIZATION_SCHEMES = ("ct", "zscore", "none")
# The largest patch a plans.json may ask for. nnU-Net's planner starts from a 256^3 patch (2048^2
# in 2D) and only ever shrinks it to fit the memory budget, and clips it to the median image
# padded up to the network's stride multiple. Its U-Net holds at least ~160 feature-map values per
# patch voxel (2 encoder + 3 decoder maps of 32 features at full resolution, and the output), so a
# 512^3 patch (2^27 voxels) needs ~86 GB of float16 activations at the minimum batch of 2: more
# than any single GPU has. A hand-edited patch may exceed the median image (it is then padded),
# but not by more than MAX_PATCH_OVER_MEDIAN per axis: beyond that it is mostly padding.
MAX_PATCH_VOXELS = 512**3
MAX_PATCH_OVER_MEDIAN = 4
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # data_identifier is a folder in the store
REQUIRED_TO_TRAIN = ("spacing", "patch_size", "batch_size", "strides", "kernel_sizes", "features_per_stage",
                     "n_conv_per_stage")


@dataclass
class ChannelNormalization:
    """How one channel is normalised; CT uses dataset-wide foreground statistics from the fingerprint."""

    scheme: str  # "ct" | "zscore" | "none"
    use_nonzero_mask: bool = False
    mean: float | None = None
    std: float | None = None
    lower: float | None = None  # 0.5th foreground percentile (CT clipping)
    upper: float | None = None  # 99.5th foreground percentile


@dataclass
class ConfigurationPlan:
    """One configuration ('2d', '3d_fullres', '3d_lowres', ...). Fields left None are inherited."""

    name: str  # the key in `configurations`
    inherits_from: str | None = None  # parent configuration whose fields fill the gaps
    data_identifier: str | None = None  # configurations sharing it share preprocessed data
    spacing: list[float] | None = None  # target spacing, store axis order
    patch_size: list[int] | None = None  # 2 entries for 2d (the last two store axes), else 3
    batch_size: int | None = None  # patches per optimiser step (per worker)
    median_shape: list[int] | None = None  # median case shape after resampling
    kernel_sizes: list[list[int]] | None = None  # per stage
    strides: list[list[int]] | None = None  # per stage, the first is all ones
    features_per_stage: list[int] | None = None  # channels of each encoder stage
    n_conv_per_stage: int | None = None  # (conv, norm, nonlinearity) blocks per stage
    normalization_schemes: list[str] | None = None  # per channel, copy of Plans.normalization[i].scheme
    use_mask_for_norm: list[bool] | None = None  # normalise inside the nonzero mask only
    image_order: int | None = None  # spline order resampling images
    label_order: int | None = None  # order resampling one-hot labels
    order_z: int | None = None  # order along the low-resolution axis when it is resampled separately
    anisotropy_threshold: float | None = None  # max/min spacing ratio above which z is separate
    preset: str | None = None  # "nnunet" (faithful) or "lean" (compute-budget)
    batch_dice: bool | None = None  # Dice over the whole batch (nnU-Net: 2d and cascaded 3d) or per sample
    previous_stage: str | None = None  # cascade: the configuration whose cross-validated segmentations are extra inputs
    explanations: dict[str, str] = field(default_factory=dict)  # field -> the rule and numbers behind it

    @property
    def dims(self) -> int:
        return len(self.patch_size or [])

    @property
    def num_stages(self) -> int:
        return len(self.strides or [])


@dataclass
class Plans:
    """Everything the planner chose for one dataset; `segpipe plan --explain` prints why."""

    dataset_name: str  # from dataset.json
    channels: list[str]  # modality per input channel ("CT" selects CT normalisation)
    labels: dict[str, str]  # original label value (as str, JSON keys) -> name
    transpose_forward: list[int]  # store axis i = RAS axis transpose_forward[i]
    normalization: list[ChannelNormalization]  # one per channel
    configurations: dict[str, ConfigurationPlan]  # '2d', '3d_fullres', '3d_lowres', '3d_cascade_fullres', '3d_lean'
    gpu_memory_gb: float = 8.0  # memory budget the patch and batch were sized for
    fingerprint_hash: str = ""  # the fingerprint the plan was made from
    explanations: dict[str, str] = field(default_factory=dict)  # dataset-level choices
    regions: list[dict] = field(default_factory=list)  # [{"name", "values"}]: sigmoid outputs; [] = softmax classes
    regions_class_order: list[int] = field(default_factory=list)  # per region, the label value it paints on export
    ignore_label: int | None = None  # the "ignore" value (the highest in `labels`): no loss, no Dice, no output
    schema_version: int = SCHEMA_VERSION  # bumped when the JSON layout changes

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(sorted(int(k) for k in self.labels))

    def label_map(self):
        """The `LabelMap` (classes or regions, ignore label) these plans train and predict with."""
        return LabelMap(self.label_values, tuple(Region(r["name"], tuple(r["values"])) for r in self.regions),
                        tuple(self.regions_class_order), self.ignore_label)

    def configuration(self, name: str) -> ConfigurationPlan:
        """The configuration with its inheritance chain resolved (child fields win)."""
        if name not in self.configurations:
            why = self.explanations.get(name)  # e.g. no 3D configuration for single-slice images
            have = ", ".join(self.configurations) or "none"
            raise BadInputError(f"plans have no configuration {name!r} (have: {have})"
                                + (f": {why}" if why else "") + "; choose one of them with --config")
        chain, seen = [], set()
        current: str | None = name
        while current is not None:
            if current in seen:
                raise BadInputError(f"plans: configuration {name!r} inherits from itself (the chain loops at {current!r})")
            if current not in self.configurations:
                raise BadInputError(f"plans: configuration {chain[-1].name!r} inherits from {current!r}, which does "
                                    "not exist")
            seen.add(current)
            chain.append(self.configurations[current])
            current = self.configurations[current].inherits_from
        resolved: dict[str, Any] = {}
        explanations: dict[str, str] = {}
        for conf in reversed(chain):
            for f in dataclasses.fields(conf):
                value = getattr(conf, f.name)
                if f.name == "explanations":
                    explanations.update(value)
                elif value is not None:
                    resolved[f.name] = value
        resolved.update(name=name, inherits_from=None, explanations=explanations)
        if resolved.get("data_identifier") is None:
            resolved["data_identifier"] = name
        return ConfigurationPlan(**resolved)

    def hash(self, configuration: str | None = None) -> str:
        """A digest of everything that shapes preprocessed data: stores made from other plans are refused."""
        payload: dict[str, Any] = {
            "schema_version": HASH_LAYOUT_VERSION,
            "channels": self.channels,
            "labels": self.labels,
            "transpose_forward": self.transpose_forward,
            "normalization": [dataclasses.asdict(n) for n in self.normalization],
        }
        if self.ignore_label is not None:  # it decides which voxels the stored sampling locations may hold
            payload["ignore_label"] = self.ignore_label
        if configuration is not None:
            conf = self.configuration(configuration)
            payload["configuration"] = {
                k: getattr(conf, k)
                for k in ("spacing", "patch_size", "normalization_schemes", "use_mask_for_norm",
                          "image_order", "label_order", "order_z", "anisotropy_threshold")
            }
        blob = json.dumps(payload, sort_keys=True, default=float).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "plans.json") -> Plans:
        """Plans from their JSON form, checked against the schema first (BadInputError naming
        `where` and each bad field)."""
        if not isinstance(d, dict):
            raise _bad(where, [f"must hold a JSON object, not {type(d).__name__}"])
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise _bad(where, [f"has schema version {version}; this seg-pipeline reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))}"])
        if version == 1 and any(k in d for k in ("regions", "regions_class_order", "ignore_label")):
            raise _bad(where, ["has schema version 1, which has no regions or ignore label: "
                               "a file declaring them must say schema_version 2"])
        problems = check_plans_json(d)
        if problems:
            raise _bad(where, problems)
        d = dict(d, schema_version=SCHEMA_VERSION)  # version 1 is version 2 without regions or ignore label
        d["normalization"] = [ChannelNormalization(**n) for n in d["normalization"]]
        d["configurations"] = {k: ConfigurationPlan(**{"name": k, **v}) for k, v in d["configurations"].items()}
        plans = cls(**d)
        problems = [msg for name in plans.configurations for msg in _check_resolved(plans, name)]
        if problems:
            raise _bad(where, problems)
        return plans

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plans:
        path = as_path(path)
        if not path.is_file():
            raise BadInputError(f"{path} not found: run `segpipe plan` first")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(path), [f"is not valid JSON ({exc})"]) from None
        return cls.from_json(data, str(path))


def _bad(where: str, problems: list[str]) -> BadInputError:
    """One line per problem, each naming the file; the way out on the last."""
    lines = [Problem(None, f"{where} {msg}" if msg.startswith(("is ", "has ", "must ")) else f"{where}: {msg}",
                     scope="") for msg in problems]
    last = lines[-1]
    lines[-1] = Problem(None, f"{last.message} (re-run `segpipe plan`, or correct the file)", scope="")
    return BadInputError(lines)


# ------------------------------------------------------------------ the schema


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _ints(v, low: int = 1, length: int | None = None) -> bool:
    return (isinstance(v, list) and bool(v) and (length is None or len(v) == length)
            and all(_is_int(x) and x >= low for x in v))


def _got(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_fields(obj: dict, where: str, types: dict[str, tuple[str, Any]], required: tuple[str, ...]) -> list[str]:
    """`types`: field -> (what it must be, a test of a non-null value)."""
    problems = [f"{where}.{k} is missing" for k in required if k not in obj]
    for key, value in obj.items():
        if key not in types:
            problems.append(f"{where}.{key} is not a field of this schema (unknown key)")
        elif value is not None and not types[key][1](value):
            problems.append(f"{where}.{key} must be {types[key][0]}, got {_got(value)}")
        elif value is None and key in required:
            problems.append(f"{where}.{key} must be {types[key][0]}, got null")
    return problems


_PLANS_FIELDS: dict[str, tuple[str, Any]] = {
    "dataset_name": ("a string", lambda v: isinstance(v, str)),
    "channels": ("a non-empty list of channel names", lambda v: isinstance(v, list) and bool(v)
                 and all(isinstance(x, str) for x in v)),
    "labels": ('an object of label values -> names like {"0": "background"}', lambda v: isinstance(v, dict)
               and "0" in v and all(re.fullmatch(r"0|[1-9][0-9]*", k) and isinstance(n, str) for k, n in v.items())),
    "transpose_forward": ("a permutation of [0, 1, 2]", lambda v: isinstance(v, list)
                          and all(_is_int(x) for x in v) and sorted(v) == [0, 1, 2]),
    "normalization": ("a list with one object per channel", lambda v: isinstance(v, list)
                      and all(isinstance(x, dict) for x in v)),
    "configurations": ("a non-empty object of configurations", lambda v: isinstance(v, dict) and bool(v)
                       and all(isinstance(x, dict) for x in v.values())),
    "gpu_memory_gb": ("a positive number", lambda v: _is_number(v) and v > 0),
    "fingerprint_hash": ("a string", lambda v: isinstance(v, str)),
    "explanations": ("an object of strings", lambda v: isinstance(v, dict)),
    "regions": ('a list of {"name": ..., "values": [label values]}', lambda v: isinstance(v, list) and all(
        isinstance(r, dict) and set(r) == {"name", "values"} and isinstance(r["name"], str)
        and _ints(r["values"]) for r in v)),
    "regions_class_order": ("a list of label values, one per region", lambda v: isinstance(v, list)
                            and all(_is_int(x) and x > 0 for x in v)),
    "ignore_label": ("a label value", lambda v: _is_int(v) and v > 0),
    "schema_version": ("an integer", _is_int),
}

_NORMALIZATION_FIELDS: dict[str, tuple[str, Any]] = {
    "scheme": (f"one of {', '.join(NORMALIZATION_SCHEMES)}", lambda v: v in NORMALIZATION_SCHEMES),
    "use_nonzero_mask": ("true or false", lambda v: isinstance(v, bool)),
    "mean": ("a finite number", _is_number),
    "std": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    "lower": ("a finite number", _is_number),
    "upper": ("a finite number", _is_number),
}

_CONFIGURATION_FIELDS: dict[str, tuple[str, Any]] = {
    "name": ("its key in 'configurations'", lambda v: isinstance(v, str)),
    "inherits_from": ("the name of another configuration", lambda v: isinstance(v, str)),
    "data_identifier": ("a folder name (letters, digits, _ . -)", lambda v: isinstance(v, str)
                        and bool(SAFE_NAME.match(v)) and v not in (".", "..")),
    "spacing": ("a list of 2 or 3 positive numbers (mm)", lambda v: isinstance(v, list) and len(v) in (2, 3)
                and all(_is_number(x) and x > 0 for x in v)),
    "patch_size": ("a list of 2 or 3 whole numbers >= 1", lambda v: _ints(v) and len(v) in (2, 3)),
    "batch_size": ("a whole number >= 1", lambda v: _is_int(v) and v >= 1),
    "median_shape": ("a list of whole numbers >= 1", _ints),
    "kernel_sizes": ("a list of per-stage lists of odd whole numbers >= 1", lambda v: isinstance(v, list)
                     and bool(v) and all(_ints(k) and all(x % 2 == 1 for x in k) for k in v)),
    "strides": ("a list of per-stage lists of whole numbers >= 1", lambda v: isinstance(v, list) and bool(v)
                and all(_ints(k) for k in v)),
    "features_per_stage": ("a list of whole numbers >= 1", _ints),
    "n_conv_per_stage": ("a whole number >= 1", lambda v: _is_int(v) and v >= 1),
    "normalization_schemes": (f"a list of {', '.join(NORMALIZATION_SCHEMES)}", lambda v: isinstance(v, list)
                              and all(x in NORMALIZATION_SCHEMES for x in v)),
    "use_mask_for_norm": ("a list of true/false", lambda v: isinstance(v, list) and all(isinstance(x, bool) for x in v)),
    "image_order": ("a spline order 0..5", lambda v: _is_int(v) and 0 <= v <= 5),
    "label_order": ("a spline order 0..5", lambda v: _is_int(v) and 0 <= v <= 5),
    "order_z": ("a spline order 0..5", lambda v: _is_int(v) and 0 <= v <= 5),
    "anisotropy_threshold": ("a number >= 1", lambda v: _is_number(v) and v >= 1),
    "preset": ("a string", lambda v: isinstance(v, str)),
    "batch_dice": ("true or false", lambda v: isinstance(v, bool)),
    "previous_stage": ("the name of another configuration", lambda v: isinstance(v, str)),
    "explanations": ("an object of strings", lambda v: isinstance(v, dict)),
}


def check_plans_json(d: dict) -> list[str]:
    """Every way the JSON form of plans breaks the schema, field by field ('configurations.2d.batch_size
    must be ...'); empty when it is sound. Fields are checked one by one here; how a configuration's
    fields agree once its inheritance is resolved, in `_check_resolved`."""
    required = tuple(f.name for f in dataclasses.fields(Plans) if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    problems = _check_fields(d, "", _PLANS_FIELDS, required)
    problems = [p[1:] if p.startswith(".") else p for p in problems]
    if problems:
        return problems
    if len(d["normalization"]) != len(d["channels"]):
        problems.append(f"normalization has {len(d['normalization'])} entries for {len(d['channels'])} channel(s)")
    for i, norm in enumerate(d["normalization"]):
        problems += _check_fields(norm, f"normalization[{i}]", _NORMALIZATION_FIELDS, ("scheme",))
        if norm.get("scheme") == "ct" and not all(_is_number(norm.get(k)) for k in ("mean", "std", "lower", "upper")):
            problems.append(f"normalization[{i}] is CT but lacks one of mean, std, lower, upper")
    problems += _check_label_semantics(d)
    for name, conf in d["configurations"].items():
        where = f"configurations.{name}"
        problems += _check_fields(conf, where, _CONFIGURATION_FIELDS, ())
        if conf.get("name") not in (None, name):
            problems.append(f"{where}.name is {conf['name']!r}, not its key {name!r}")
        parent = conf.get("inherits_from")
        if isinstance(parent, str) and parent not in d["configurations"]:
            problems.append(f"{where}.inherits_from names {parent!r}, which is not a configuration")
        previous = conf.get("previous_stage")
        if isinstance(previous, str) and (previous not in d["configurations"] or previous == name):
            problems.append(f"{where}.previous_stage names {previous!r}, which is not another configuration")
    return problems


def _check_label_semantics(d: dict) -> list[str]:
    """Regions, their order and the ignore label agree with `labels` (`LabelMap`'s own checks)."""
    try:
        LabelMap(tuple(sorted(int(k) for k in d["labels"])),
                 tuple(Region(r["name"], tuple(r["values"])) for r in d.get("regions") or []),
                 tuple(d.get("regions_class_order") or []), d.get("ignore_label"))
    except ValueError as exc:
        return [f"labels, regions and ignore_label disagree: {exc}"]
    return []


def _check_resolved(plans: Plans, name: str) -> list[str]:
    """How the fields of configuration `name` agree once its inheritance chain is resolved."""
    where = f"configurations.{name}"
    try:
        conf = plans.configuration(name)
    except BadInputError as exc:
        return [p.message.removeprefix("plans: ") for p in exc.problems]
    missing = [f for f in REQUIRED_TO_TRAIN if getattr(conf, f) is None]
    if missing:
        return [f"{where} has no {', '.join(missing)} (its own or inherited)"]
    if conf.previous_stage is not None:
        previous = plans.configuration(conf.previous_stage)
        if previous.previous_stage is not None or len(previous.spacing or []) != 3 or len(conf.spacing) != 3:
            return [f"{where}.previous_stage {conf.previous_stage!r} must be a 3D configuration that is not itself "
                    "a cascade stage"]
    dims = len(conf.spacing)
    expected = 2 if name.startswith("2d") else 3 if name.startswith("3d") else dims
    problems = []
    if dims != expected:
        problems.append(f"{where}.spacing has {dims} entries: a {expected}D configuration needs {expected}")
    for fname in ("patch_size", "median_shape"):
        value = getattr(conf, fname)
        if value is not None and len(value) != expected:
            problems.append(f"{where}.{fname} has {len(value)} entries {value}: a {expected}D configuration needs "
                            f"{expected}")
    stages = len(conf.strides)
    for fname in ("strides", "kernel_sizes"):
        bad = [k for k in getattr(conf, fname) if len(k) != expected]
        if bad:
            problems.append(f"{where}.{fname} holds {bad[0]}: every stage needs {expected} entries")
    for fname in ("kernel_sizes", "features_per_stage"):
        if len(getattr(conf, fname)) != stages:
            problems.append(f"{where}.{fname} has {len(getattr(conf, fname))} stages, its strides (own or "
                            f"inherited) {stages}")
    for fname in ("normalization_schemes", "use_mask_for_norm"):
        value = getattr(conf, fname)
        if value is not None and len(value) != len(plans.channels):
            problems.append(f"{where}.{fname} has {len(value)} entries for {len(plans.channels)} channel(s)")
    if problems:
        return problems
    patch = conf.patch_size
    total = [math.prod(s[a] for s in conf.strides) for a in range(expected)]
    if any(p % t for p, t in zip(patch, total)):
        problems.append(f"{where}.patch_size {patch} is not a multiple of the network's total stride {total} per "
                        "axis: its skip connections would not line up")
    voxels = math.prod(patch)
    if voxels > MAX_PATCH_VOXELS:
        problems.append(f"{where}.patch_size {patch} is {voxels:,} voxels, more than the {MAX_PATCH_VOXELS:,} (512^3) a "
                        "patch may have: at batch 2 its U-Net would need ~86 GB or more of activations, beyond any "
                        "GPU (nnU-Net's planner starts from 256^3 and only shrinks)")
    elif conf.median_shape is not None:
        padded = [t * math.ceil(m / t) for m, t in zip(conf.median_shape, total)]
        over = [a for a in range(expected) if patch[a] > MAX_PATCH_OVER_MEDIAN * padded[a]]
        if over:
            problems.append(f"{where}.patch_size {patch} is more than {MAX_PATCH_OVER_MEDIAN}x the median image "
                            f"{conf.median_shape} (padded to the stride: {padded}) along axis {over[0]}: such a "
                            "patch is mostly padding (the planner never exceeds the padded median)")
    return problems

