"""The per-case record of the store (`cases/<case>/` attribute `meta`): how a stored array came
from its source file, so export can undo every step. Shared by the preprocessing that writes it,
the store that reads it back typed, and the export that inverts it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.data.nifti import Geometry


@dataclass
class CaseMeta:
    """Everything export needs to put a store-frame array back onto the original image grid."""

    case_id: str
    geometry: Geometry  # of the original file (nifti.Geometry)
    shape_ras: list[int]  # shape after reorientation to RAS
    transpose_forward: list[int]  # store axis i = RAS axis transpose_forward[i]
    crop_bbox: list[list[int]]  # RAS frame, [[lo, hi], ...] half-open
    shape_after_crop: list[int]  # store axis order
    spacing_before: list[float]  # store axis order, before resampling
    spacing_after: list[float]  # store axis order (2d configurations: first axis unchanged)
    shape_after_resample: list[int]
    pad: list[list[int]]  # [[before, after], ...] store axis order
    class_voxels: list[int]  # voxels per class index after resampling (empty without a label)
    separate_z_axis: int | None = None  # store axis resampled on its own (anisotropic), or None
    order_z: int = 0  # order along that axis

    @property
    def shape_padded(self) -> list[int]:
        return [s + a + b for s, (a, b) in zip(self.shape_after_resample, self.pad)]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["geometry"] = self.geometry.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> CaseMeta:
        d = dict(d)
        d["geometry"] = Geometry.from_json(d["geometry"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
