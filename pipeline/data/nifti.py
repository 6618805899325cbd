"""NIfTI reading and writing in one consistent frame.

Every volume is reoriented on reading to the closest canonical (RAS+) orientation: a permutation
and flips of the voxel axes, no interpolation. So a dataset of mixed orientations is planned and
trained in one frame, and the project's array axis order is nibabel's (x, y, z) in RAS. The
`Geometry` recorded on reading is what export needs to write a prediction back with the input's
exact affine, header and orientation.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import os
import stat
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
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

log = logging.getLogger("segpipe")


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


def describe_error(exc: BaseException) -> str:
    """`Type: message` on one line: nibabel's messages span lines (" - could the file be damaged?"),
    and every error the CLI prints is one line that makes sense alone."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def not_a_file(path) -> str:
    """Why `path` is not a file to read, in words: missing, a folder, a broken link, a link loop..."""
    path = as_path(path)
    name = display_name(path)
    if is_url(path):
        return f"{name} is a folder, not a NIfTI file" if path.is_dir() else f"missing file {name}"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{name} is a symbolic link loop, not a file"
        if os.path.islink(path):
            return f"{name} is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if exc.errno == errno.ENOENT:
            return f"missing file {name}"
        return f"cannot open {name} ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return f"{name} is a folder, not a NIfTI file"
    return f"{name} is not a regular file (a device, socket or pipe)"


class _HeaderFixes(logging.Filter):
    """Collects, instead of printing, what nibabel's header check silently repairs on load (pixdim 0
    becomes 1, ...) while `_capturing_header_fixes` is active in this thread; other threads and
    other callers are untouched."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        fixes = getattr(self.local, "fixes", None)
        if fixes is None:
            return True
        fixes.append(record.getMessage())
        return False


_NIBABEL_LOG = logging.getLogger("nibabel.global")  # where nibabel's header checks report
if not any(isinstance(f, _HeaderFixes) for f in _NIBABEL_LOG.filters):
    _NIBABEL_LOG.addFilter(_HeaderFixes())


def load_header(path: Path, case: str | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only), with errors that name the case and file. On object
    storage the file is read through a ranged stream: the header costs one small request, the
    voxels are fetched only when read.

    A header declaring a voxel size of 0 (pixdim) is refused: nibabel would silently read it as
    1 mm, and with no qform/sform nothing else says where the voxels are."""
    path = as_path(path)
    if not path.is_file():
        raise BadInputError(not_a_file(path), case)
    _HeaderFixes.local.fixes = fixes = []
    try:
        img = _open_remote(path) if is_url(path) else nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for junk files
        raise BadInputError(f"unreadable NIfTI {display_name(path)} ({describe_error(exc)})", case) from None
    finally:
        _HeaderFixes.local.fixes = None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInputError(f"{display_name(path)} is not a NIfTI image", case)
    for fix in fixes:
        log.debug("%s: nibabel repaired its header: %s", display_name(path), fix)
    if any("pixdim[1,2,3] should be non-zero" in fix for fix in fixes):
        codes = int(img.header["qform_code"]), int(img.header["sform_code"])
        where = ("and no qform/sform, so its spacing is undefined" if codes == (0, 0) else
                 f"(qform_code {codes[0]}, sform_code {codes[1]})")
        raise BadInputError(f"{display_name(path)} header declares a voxel size of 0 (pixdim[1..3]) {where}: "
                            "nibabel would silently read it as 1 mm; set the real voxel size", case)
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


def scaling_of(dataobj) -> tuple[float, float]:
    """(scl_slope, scl_inter) as nibabel applies them on reading: (1, 0) when the header has none
    (nibabel also reads a slope of 0 or NaN as no scaling)."""
    return float(getattr(dataobj, "slope", 1.0)), float(getattr(dataobj, "inter", 0.0))


def label_dtype(dataobj):
    """The dtype labels are read in: the file's own when unscaled (the values are exact), float64
    when scl_slope/scl_inter apply (so 0/2/4 with slope 0.5 reads 0/1/2, as every stage sees it)."""
    return None if scaling_of(dataobj) == (1.0, 0.0) else np.float64


def read_array(img: nib.Nifti1Image, path: Path, case: str | None = None, dtype=np.float32) -> np.ndarray:
    """Read the voxels, turning truncated or corrupt files into a BadInputError."""
    return array_from(img.dataobj, path, case, dtype)


def array_from(dataobj, path: Path, case: str | None = None, dtype=np.float32) -> np.ndarray:
    """The voxels of an array proxy as every stage reads them: the header's scl_slope/scl_inter
    applied, then cast to `dtype` (None: nibabel's choice). The one reading of voxel values
    (validation reads its checked bytes through it too). Scaling that takes a voxel beyond the
    range of `dtype` is refused, instead of reading Inf with a numpy warning."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asarray(dataobj, dtype=dtype)
    except (EOFError, OSError, ValueError, gzip.BadGzipFile, zlib.error, MemoryError) as exc:
        raise BadInputError(f"cannot read voxels of {display_name(path)} ({describe_error(exc)})", case) from None
    slope, inter = scaling_of(dataobj)
    if (slope, inter) != (1.0, 0.0) and data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raw = np.asarray(dataobj.get_unscaled())
            overflow = int((bad & np.isfinite(raw)).sum()) if raw.dtype.kind in "fc" else int(bad.sum())
            if overflow:
                raise BadInputError(
                    f"{display_name(path)}: its header's scaling (scl_slope {slope:g}, scl_inter {inter:g}) takes "
                    f"{overflow} voxel(s) beyond the {data.dtype} range (+-{np.finfo(data.dtype).max:.3g}): "
                    "correct scl_slope/scl_inter or store the real values", case)
    return data


def read_voxels(img: nib.Nifti1Image, path: Path, case: str | None = None, dtype=np.float32) -> np.ndarray:
    """All voxels of a file as every stage reads them (`nifti.array_from`: scl_slope/scl_inter
    applied, cast to `dtype`), reading a gzip stream to its end to check its CRC.

    `img` is the file's header as `load_header` checked it, so the declared size is sane and
    bounds how much decompressed output is accepted (a gzip bomb cannot fill the memory).
    """
    offset = int(img.dataobj.offset)  # nibabel zeroes the in-memory header's offset on load
    file_dtype = img.header.get_data_dtype()
    expected = offset + int(np.prod(img.shape)) * file_dtype.itemsize
    try:
        raw = as_path(path).read_bytes()
        if as_path(path).name.endswith(".gz"):
            raw = gunzip_checked(raw, limit=2 * expected + 2**20)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise BadInputError(f"cannot read voxels of {display_name(path)}: truncated or corrupt "
                            f"({describe_error(exc)})", case) from None
    if len(raw) < expected:
        raise BadInputError(f"cannot read voxels of {display_name(path)}: truncated or corrupt (the header declares "
                            f"{expected} bytes, the file holds {len(raw)})", case)
    proxy = ArrayProxy(io.BytesIO(raw), (tuple(img.shape), file_dtype, offset, *scaling_of(img.dataobj)))
    return array_from(proxy, path, case, dtype)


def gunzip_checked(raw: bytes, limit: int) -> bytes:
    """Every member of a gzip stream, CRC- and length-checked by zlib, refusing output past `limit`."""
    parts, total = [], 0
    while raw:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing: zlib checks CRC and size
        part = inflater.decompress(raw, limit - total + 1)
        total += len(part)
        if total > limit:
            raise ValueError(f"decompresses to more than {limit} bytes, far beyond what its header declares")
        if not inflater.eof:
            raise EOFError("compressed stream ends before its end-of-stream marker")
        parts.append(part)
        raw = inflater.unused_data.lstrip(b"\0")  # next member; some writers pad with zeros
    return b"".join(parts)


def spacing_of(img: nib.Nifti1Image) -> tuple[float, ...]:
    """Voxel size in the RAS frame (project axis order), from the header alone."""
    return ras_spacing(img.affine, img.header.get_zooms()[:3])


def ras_spacing(affine, zooms) -> tuple[float, ...]:
    """Voxel sizes given per file axis (`zooms`), put in RAS axis order by the affine's orientation."""
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(io_orientation(np.asarray(affine))):
        spacing[int(target)] = float(zooms[axis])
    return tuple(spacing)


def geometry_of(img: nib.Nifti1Image) -> Geometry:
    return geometry_from(img.affine, img.shape[:3], img.header.get_zooms()[:3])


def geometry_from(affine, shape, zooms) -> Geometry:
    """The Geometry of a voxel grid: a 4x4 voxel-to-RAS-world affine, its spatial shape and voxel
    sizes in file axis order. Every format's reader describes its grid through this one function."""
    affine = np.asarray(affine, dtype=np.float64)
    return Geometry(
        affine=tuple(tuple(float(x) for x in row) for row in affine),
        shape=tuple(int(s) for s in shape[:3]),
        axcodes=tuple(nib.orientations.ornt2axcodes(io_orientation(affine))),
        spacing=ras_spacing(affine, zooms),
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
