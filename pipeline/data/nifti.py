"""NIfTI reading and writing in one consistent frame.

Every volume is reoriented on reading to the closest canonical (RAS+) orientation: a permutation
and flips of the voxel axes, no interpolation. So a dataset of mixed orientations is planned and
trained in one frame, and the project's array axis order is nibabel's (x, y, z) in RAS. The
`Geometry` recorded on reading is what export needs to write a prediction back with the input's
exact affine, header and orientation.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)

from pipeline.errors import BadInputError
from pipeline.storage import as_path, is_url, local_file, replacing, size_of

RAS = axcodes2ornt(("R", "A", "S"))
# Deflate cannot expand data by more than ~1032:1, so a .nii.gz whose header declares more bytes
# than that is forged or broken; refusing it up front avoids allocating a huge array.
MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class Geometry:
    """Where a volume sits in the world, before our reorientation: everything export needs."""

    affine: tuple[tuple[float, ...], ...]  # original 4x4 voxel-to-world
    shape: tuple[int, ...]  # original spatial shape (original axis order)
    axcodes: tuple[str, ...]  # original orientation, e.g. ("P", "S", "R")
    spacing: tuple[float, ...]  # voxel size in the RAS frame, project axis order

    @property
    def ornt(self) -> np.ndarray:
        return axcodes2ornt(self.axcodes)

    @property
    def ras_shape(self) -> tuple[int, ...]:
        shape = [0, 0, 0]
        for axis, (target, _flip) in enumerate(self.ornt):
            shape[int(target)] = self.shape[axis]
        return tuple(shape)

    def to_json(self) -> dict:
        return {k: [list(r) for r in v] if k == "affine" else list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> Geometry:
        return cls(
            affine=tuple(tuple(float(x) for x in row) for row in d["affine"]),
            shape=tuple(int(s) for s in d["shape"]),
            axcodes=tuple(d["axcodes"]),
            spacing=tuple(float(s) for s in d["spacing"]),
        )

    def allclose(self, other: Geometry, atol: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)


def display_name(path: str | os.PathLike) -> str:
    """A file as messages name it: with its folder, so imagesTr/x.nii.gz and labelsTr/x.nii.gz differ."""
    path = as_path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def load_header(path: Path, case: str | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only), with errors that name the case and file. On object
    storage the file is read through a ranged stream: the header costs one small request, the
    voxels are fetched only when read."""
    path = as_path(path)
    if not path.is_file():
        raise BadInputError(f"missing file {display_name(path)}", case)
    try:
        img = _open_remote(path) if is_url(path) else nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for junk files
        raise BadInputError(f"unreadable NIfTI {display_name(path)} ({type(exc).__name__}: {exc})", case) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInputError(f"{display_name(path)} is not a NIfTI image", case)
    _check_declared_size(img, path, case)
    return img


def _open_remote(path) -> nib.Nifti1Image:
    stream = path.open("rb")
    if path.name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream)
    try:
        return nib.Nifti1Image.from_stream(stream)
    except Exception:  # noqa: BLE001 - not NIfTI-1: perhaps NIfTI-2, else the caller's error
        stream.seek(0)
        return nib.Nifti2Image.from_stream(stream)


def _check_declared_size(img: nib.Nifti1Image, path: Path, case: str | None) -> None:
    shape = img.shape
    if any(int(s) <= 0 for s in shape):
        raise BadInputError(f"{display_name(path)} declares an empty shape {tuple(shape)}", case)
    declared = int(np.prod([int(s) for s in shape], dtype=np.float64)) * img.get_data_dtype().itemsize
    size = size_of(path)
    compressed = path.name.endswith(".gz")
    limit = size * MAX_DEFLATE_RATIO if compressed else size
    if declared > limit:
        raise BadInputError(
            f"{display_name(path)} header declares shape {tuple(shape)} ({declared / 2**30:.1f} GiB) "
            f"that a {size} byte file cannot hold: truncated or forged header",
            case,
        )


def read_array(img: nib.Nifti1Image, path: Path, case: str | None = None, dtype=np.float32) -> np.ndarray:
    """Read the voxels, turning truncated or corrupt files into a BadInputError."""
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except (EOFError, OSError, ValueError, gzip.BadGzipFile, zlib.error, MemoryError) as exc:
        raise BadInputError(f"cannot read voxels of {display_name(path)} ({type(exc).__name__}: {exc})", case) from None


def spacing_of(img: nib.Nifti1Image) -> tuple[float, ...]:
    """Voxel size in the RAS frame (project axis order), from the header alone."""
    ornt = io_orientation(img.affine)
    zooms = img.header.get_zooms()[:3]
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = float(zooms[axis])
    return tuple(spacing)


def geometry_of(img: nib.Nifti1Image) -> Geometry:
    ornt = io_orientation(img.affine)
    return Geometry(
        affine=tuple(tuple(float(x) for x in row) for row in img.affine),
        shape=tuple(int(s) for s in img.shape[:3]),
        axcodes=tuple(nib.orientations.ornt2axcodes(ornt)),
        spacing=spacing_of(img),
    )


def to_ras(data: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Original voxel order -> RAS voxel order (leading three axes; trailing channel axes kept)."""
    return np.ascontiguousarray(apply_orientation(data, geometry.ornt))


def from_ras(data: np.ndarray, geometry: Geometry) -> np.ndarray:
    """RAS voxel order -> the original voxel order of the file the geometry came from."""
    return np.ascontiguousarray(apply_orientation(data, ornt_transform(RAS, geometry.ornt)))


def read_volume(path: Path, case: str | None = None, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Load one file as a RAS array (3D, or 4D with channels last) and its original geometry."""
    img = load_header(path, case)
    geometry = geometry_of(img)
    return to_ras(read_array(img, path, case, dtype), geometry), geometry


def write_volume(data_ras: np.ndarray, geometry: Geometry, path: Path, reference: Path | None = None) -> None:
    """Write a RAS array back in the original orientation with the original affine.

    With `reference`, its header is reused (qform/sform codes, units, descriptions) so the output
    sits exactly where the input did. The file is written under a temporary name and renamed, so
    a crash never leaves a half-written NIfTI behind.
    """
    data = from_ras(data_ras, geometry)
    affine = np.asarray(geometry.affine, dtype=np.float64)
    header = None
    if reference is not None and as_path(reference).is_file():
        with local_file(reference, ".nii.gz" if str(reference).endswith(".gz") else ".nii") as ref:
            header = nib.load(str(ref)).header.copy()
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(data.dtype)
    if header is not None:
        img.header["scl_slope"] = 1.0 if np.issubdtype(data.dtype, np.floating) else np.nan
        img.header["scl_inter"] = 0.0 if np.issubdtype(data.dtype, np.floating) else np.nan
        # the reference's own codes, even 0 ("unknown"): nibabel read the affine under them, so
        # a reader finds the same affine again, and the header stays the input's
        img.set_qform(affine, code=int(header["qform_code"]))
        img.set_sform(affine, code=int(header["sform_code"]))
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    with replacing(path, suffix) as tmp:  # nibabel picks compression from the name
        nib.save(img, str(tmp))
