"""Typed plans: what the planner decided, serialised to `plans.json` with a schema version.

As in nnU-Net v2, configurations may inherit from one another (`inherits_from`): a configuration
stores only what it changes, and `Plans.configuration(name)` resolves the chain. Every per-axis
list (spacing, patch_size, kernel_sizes, strides, median_shape) is in the *store's* axis order:
the RAS axes of `pipeline.data.nifti` permuted by `transpose_forward` (the lowest-resolution axis first,
as nnU-Net does, so the 2D configuration slices along it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import SegPipeError
from pipeline.storage import as_path, write_json_atomic

SCHEMA_VERSION = 1


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
    configurations: dict[str, ConfigurationPlan]  # '2d', '3d_fullres', '3d_lowres', '3d_lean'
    gpu_memory_gb: float = 8.0  # memory budget the patch and batch were sized for
    fingerprint_hash: str = ""  # the fingerprint the plan was made from
    explanations: dict[str, str] = field(default_factory=dict)  # dataset-level choices
    schema_version: int = SCHEMA_VERSION  # bumped when the JSON layout changes

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(sorted(int(k) for k in self.labels))

    def configuration(self, name: str) -> ConfigurationPlan:
        """The configuration with its inheritance chain resolved (child fields win)."""
        if name not in self.configurations:
            raise SegPipeError(f"plans have no configuration {name!r} (have: {', '.join(self.configurations)})")
        chain, seen = [], set()
        current: str | None = name
        while current is not None:
            if current in seen:
                raise SegPipeError(f"configuration inheritance loops at {current!r}")
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
            "schema_version": self.schema_version,
            "channels": self.channels,
            "labels": self.labels,
            "transpose_forward": self.transpose_forward,
            "normalization": [dataclasses.asdict(n) for n in self.normalization],
        }
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
    def from_json(cls, d: dict) -> Plans:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SegPipeError(f"plans.json has schema version {version}; this seg-pipeline reads {SCHEMA_VERSION} (re-run `segpipe plan`)")
        d = dict(d)
        d["normalization"] = [ChannelNormalization(**n) for n in d["normalization"]]
        d["configurations"] = {k: ConfigurationPlan(**v) for k, v in d["configurations"].items()}
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plans:
        path = as_path(path)
        if not path.is_file():
            raise SegPipeError(f"{path} not found: run `segpipe plan` first")
        return cls.from_json(json.loads(path.read_text()))

