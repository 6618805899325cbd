"""Medical images read and written with their geometry, whatever the file format.

The one door every stage goes through to reach image files: NIfTI (`.nii.gz`, `.nii`) through
nibabel (`pipeline.data.nifti`: lazy headers, ranged reads from buckets), and `.mha`, `.mhd`,
`.nrrd`, `.nhdr` and DICOM series (a `CASE.dcm/` folder of slices) through SimpleITK, the
optional `[itk]` extra.

Every format is described in NIfTI's terms so the rest of the pipeline has one frame: SimpleITK's
physical space is LPS, so an ITK grid (spacing S, direction D, origin o, voxel index (i, j, k))
becomes the voxel-to-RAS affine `diag(-1, -1, 1) @ [D @ diag(S) | o]`, and the array is put in
index order (i, j, k) (SimpleITK's numpy view is (k, j, i)). `nifti.Geometry` then reorients to
RAS and back exactly as for NIfTI. A prediction written beside its input copies the input's own
spacing, origin and direction (and, for DICOM, each slice's position tags), so it lands where the
input was, bit for bit where the format stores numbers in binary or as the same text.
"""

from __future__ import annotations

import abc
import contextlib
import locale
import os
import re
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.files import DICOM_ENDING, ITK_ENDINGS, NIFTI_ENDINGS, ending_of
from pipeline.data.nifti import (
    MAX_DEFLATE_RATIO,
    Geometry,
    array_from,
    describe_error,
    display_name,
    from_ras,
    geometry_from,
    label_dtype,
    load_header,
    not_a_file,
    read_voxels,
    scaling_of,
    to_ras,
)
from pipeline.data.nifti import write_volume as write_nifti
from pipeline.errors import BadInputError, SegPipeError
from pipeline.storage import as_path, is_url, local_file, replacing

ITK_INSTALL = 'pip install "seg-pipeline[itk]"'
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
# DICOM stores positions and directions as decimal strings (VR "DS") of at most 16 characters
DS_MAX_CHARS = 16
# Tags a label map written beside a DICOM series takes from it: the patient, the study and the
# frame of reference, so viewers show it over its image (the series and instance UIDs are new).
DICOM_SHARED_TAGS = ("0010|0010", "0010|0020", "0010|0030", "0010|0040", "0020|000d", "0008|0020", "0008|0030",
                     "0008|0050", "0020|0010", "0020|0052", "0008|0090")


def simpleitk(path, case: str | None = None):
    """The SimpleITK module, or an error naming the file and the extra that installs it."""
    try:
        import SimpleITK
    except ImportError:
        raise SegPipeError(f"{case + ': ' if case else ''}{display_name(path)} is a {ending_of(as_path(path).name)} "
                           f"image, read through SimpleITK, which is not installed: {ITK_INSTALL}") from None
    return SimpleITK


def is_nifti(path) -> bool:
    return as_path(path).name.endswith(NIFTI_ENDINGS)


def _itk_message(exc: BaseException) -> str:
    """ITK's exceptions span many lines with C++ file names, the path again and a stale errno
    ("Reason: No such file or directory" for a file that exists); keep what says what is wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\):\s*", "", line) for line in lines
              if not line.startswith(("Exception thrown in SimpleITK", "Reason:")) and ".cxx:" not in line]
    useful = [line for line in useful if not re.match(r"^File cannot be read: .* for reading\.?$", line)]
    text = " ".join(useful) or "SimpleITK could not read it"
    return text if len(text) <= 300 else text[:297] + "..."


def stored_data_bytes(path: Path, voxel_bytes: int) -> tuple[int, int, str] | None:
    """(bytes of voxel data the header declares, bytes the file holds, "compressed"/"uncompressed")
    for a MetaImage (uncompressed, or compressed with its `CompressedDataSize`) or a raw NRRD; None
    where only ITK can tell (gzip NRRD, skips, file lists). So a truncated file is named with its
    numbers before ITK reads it (ITK's MetaImage reader prints its complaints to the console)."""
    name = path.name
    if not name.endswith(ITK_ENDINGS):
        return None
    with open(path, "rb") as f:
        head = f.read(65536)
    if name.endswith((".mha", ".mhd")):
        field = lambda key: re.search(rb"^" + key + rb"\s*=\s*([^\r\n]*)\r?\n?", head,  # noqa: E731
                                      re.MULTILINE | re.IGNORECASE)
        data_file, compressed, skip, size = (field(k) for k in (rb"ElementDataFile", rb"CompressedData",
                                                                 rb"HeaderSize", rb"CompressedDataSize"))
        if data_file is None or (skip and skip.group(1).strip() not in (b"0", b"")):
            return None
        if compressed and compressed.group(1).strip().lower() == b"true":
            if size is None or not size.group(1).strip().isdigit():
                return None
            declared, kind = int(size.group(1)), "compressed"
        else:
            declared, kind = voxel_bytes, "uncompressed"
        if data_file.group(1).strip().upper() == b"LOCAL":
            return declared, os.path.getsize(path) - data_file.end(), kind
        files = _data_files(path)
        if len(files) == 1 and (path.parent / files[0]).is_file():
            return declared, os.path.getsize(path.parent / files[0]), kind
        return None
    else:
        end = head.find(b"\n\n")
        fields = dict(line.split(":", 1) for line in head[:end].decode("latin-1").splitlines() if ": " in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        if end < 0 or fields.get("encoding") != "raw" or "byte skip" in fields or "line skip" in fields:
            return None
        if "data file" not in fields and "datafile" not in fields:
            return voxel_bytes, os.path.getsize(path) - (end + 2), "uncompressed"
        files = _data_files(path)
        if len(files) == 1 and (path.parent / files[0]).is_file():
            return voxel_bytes, os.path.getsize(path.parent / files[0]), "uncompressed"
        return None


@contextlib.contextmanager
def keeping_locale() -> Iterator[None]:
    """Restore the C locale after SimpleITK's DICOM writer (GDCM), which sets it to "C" and leaves
    it so: Python's text files would then default to ASCII for the rest of the process."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


# ---------------------------------------------------------------- an opened image file


class ImageFile(abc.ABC):
    """One image file (or DICOM series) opened: its header read, its voxels read on request.

    `shape` is in file axis order (x, y, z) with channels last for a 4D file; `affine` maps voxel
    indices to RAS world coordinates (mm); `zooms` are the voxel sizes per file axis."""

    path: Path
    case: str | None
    shape: tuple[int, ...]
    affine: np.ndarray
    zooms: tuple[float, ...]
    dtype: np.dtype  # as stored

    @property
    def name(self) -> str:
        return display_name(self.path)

    @property
    def geometry(self) -> Geometry:
        return geometry_from(self.affine, self.shape[:3], self.zooms)

    @property
    def scaling(self) -> tuple[float, float]:
        """(slope, intercept) applied on reading; (1, 0) when the file declares none."""
        return 1.0, 0.0

    @property
    def label_dtype(self):
        """The dtype a label file is read in: None (the file's own) unless scaling applies."""
        return None

    @abc.abstractmethod
    def read(self, dtype=np.float32) -> np.ndarray:
        """The voxels in file axis order (channels last), scaled, cast to `dtype` (None: as stored)."""

    def read_checked(self, dtype=np.float32) -> np.ndarray:
        """`read`, but every byte of the file read and its checksums verified (validation)."""
        return self.read(dtype)


class NiftiFile(ImageFile):
    """A NIfTI file through nibabel: the header lazily, from a bucket by ranged reads."""

    def __init__(self, path, case: str | None = None):
        self.path, self.case = as_path(path), case
        self.img = load_header(self.path, case)
        self.shape = tuple(int(s) for s in self.img.shape)
        self.affine = np.asarray(self.img.affine, dtype=np.float64)
        self.zooms = tuple(float(z) for z in self.img.header.get_zooms()[:3])
        self.dtype = self.img.get_data_dtype()

    @property
    def scaling(self) -> tuple[float, float]:
        return scaling_of(self.img.dataobj)

    @property
    def label_dtype(self):
        return label_dtype(self.img.dataobj)

    def read(self, dtype=np.float32) -> np.ndarray:
        return array_from(self.img.dataobj, self.path, self.case, dtype)

    def read_checked(self, dtype=np.float32) -> np.ndarray:
        return read_voxels(self.img, self.path, self.case, dtype)


class ItkFile(ImageFile):
    """A `.mha`/`.mhd`/`.nrrd`/`.nhdr` file or a DICOM series folder through SimpleITK.

    From a bucket the file (with an `.mhd`'s data file, or the series' slices) is copied to a
    temporary local folder once, kept while this object lives. A file's header is read alone; a
    DICOM series is read whole on opening (its geometry comes from every slice's position)."""

    def __init__(self, path, case: str | None = None):
        self.path, self.case = as_path(path), case
        self.sitk = simpleitk(self.path, case)
        self.dicom = self.path.name.endswith(DICOM_ENDING)
        _check_exists(self.path, case, folder=self.dicom)
        stack = contextlib.ExitStack()
        self._cleanup = weakref.finalize(self, stack.close)
        self.data_files = () if self.dicom else _data_files(self.path)
        outside = next((n for n in self.data_files if os.path.isabs(n) or ".." in Path(n).parts), None)
        if outside is not None:  # a dataset's files stay inside its folder
            raise BadInputError(f"{self.name} names the data file {outside}, outside its own folder", case)
        try:
            self.local = stack.enter_context(local_file(self.path, siblings=self.data_files if is_url(self.path) else ()))
        except (OSError, FileNotFoundError) as exc:
            raise BadInputError(f"cannot read {self.name} ({describe_error(exc)})", case) from None
        self._image = None
        if self.dicom:
            self._image = self.info = self._read_series()
        else:
            self.info = self.sitk.ImageFileReader()
            self.info.SetFileName(str(self.local))
            try:
                self.info.ReadImageInformation()
            except RuntimeError as exc:
                raise BadInputError(f"unreadable image {self.name} ({_itk_message(exc)})", case) from None
        self._describe(self.info)
        if not self.dicom:
            self._check_declared_size()

    def _read_series(self):
        reader = self.sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(self.local))
        if len(ids) != 1:
            what = "no DICOM series" if not ids else f"{len(ids)} DICOM series ({', '.join(ids[:3])})"
            raise BadInputError(f"{self.name} holds {what}: a .dcm folder must hold exactly one series", self.case)
        files = reader.GetGDCMSeriesFileNames(str(self.local), ids[0])
        if len(files) < 2:
            raise BadInputError(f"{self.name} holds {len(files)} DICOM slice(s): a 3D series needs at least 2", self.case)
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise BadInputError(f"cannot read the DICOM series {self.name} ({_itk_message(exc)})", self.case) from None

    def _describe(self, info) -> None:
        size = tuple(int(s) for s in info.GetSize())
        dim = len(size)
        if dim not in (3, 4):
            raise BadInputError(f"{self.name} is {dim}D (size {size}): expected a 3D volume", self.case)
        spacing = np.asarray(info.GetSpacing(), dtype=np.float64)[:3]
        direction = np.asarray(info.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
        origin = np.asarray(info.GetOrigin(), dtype=np.float64)[:3]
        components = int(info.GetNumberOfComponentsPerPixel() if self.dicom else info.GetNumberOfComponents())
        self.shape = size + ((components,) if components > 1 else ())
        if dim == 4 and components > 1:
            raise BadInputError(f"{self.name} is 4D with {components} components per voxel: expected 3D or 4D scalars",
                                self.case)
        self.zooms = tuple(float(s) for s in spacing)
        self.affine = np.eye(4)
        self.affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
        self.affine[:3, 3] = LPS_TO_RAS @ origin
        self.dtype = self.sitk.GetArrayViewFromImage(self.sitk.Image([1] * 3, info.GetPixelID())).dtype

    def _check_declared_size(self) -> None:
        """A header declaring more voxels than its data could hold (truncated, or forged to make the
        reader allocate a huge array) is refused before any voxel is read."""
        declared = int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize
        data = [self.local.parent / n for n in self.data_files] or [self.local]
        if not all(p.is_file() for p in data):
            missing = next(p.name for p in data if not p.is_file())
            raise BadInputError(f"{self.name} names the data file {missing}, which is missing", self.case)
        size = sum(os.path.getsize(p) for p in data)
        if declared > size * MAX_DEFLATE_RATIO:
            raise BadInputError(f"{self.name} header declares size {self.shape} ({declared / 2**30:.1f} GiB) that "
                                f"{size} bytes of data cannot hold: truncated or forged header", self.case)
        stored = stored_data_bytes(self.local, declared)
        if stored is not None and stored[1] < stored[0]:
            raise BadInputError(f"cannot read voxels of {self.name}: truncated (its header declares {stored[0]} bytes "
                                f"of {stored[2]} voxel data, the file holds {stored[1]})", self.case)

    def read(self, dtype=np.float32) -> np.ndarray:
        image = self._image
        if image is None:
            try:
                image = self.sitk.ReadImage(str(self.local))
            except RuntimeError as exc:
                raise BadInputError(f"cannot read voxels of {self.name}: truncated or corrupt ({_itk_message(exc)})",
                                    self.case) from None
        array = self.sitk.GetArrayFromImage(image)  # (k, j, i) or (t, k, j, i), components last
        spatial = image.GetDimension()
        order = [*range(spatial - 1, -1, -1), *range(spatial, array.ndim)]
        array = np.ascontiguousarray(np.transpose(array, order))  # (i, j, k[, channels])
        return array if dtype is None else array.astype(dtype, copy=False)


def _check_exists(path, case: str | None, folder: bool) -> None:
    if folder:
        if not path.is_dir():
            raise BadInputError(f"{display_name(path)} is a file: a .dcm image must be a folder holding one DICOM series"
                                if path.is_file() else f"missing DICOM series folder {display_name(path)}", case)
    elif not path.is_file():
        raise BadInputError(not_a_file(path).replace("not a NIfTI file", "not an image file"), case)


def _data_files(header: Path) -> tuple[str, ...]:
    """The data file(s) a detached header (`.mhd`, `.nhdr`) names in its folder; () for other files."""
    name = header.name
    if not name.endswith((".mhd", ".nhdr")):
        return ()
    key = r"^ElementDataFile\s*=\s*(.+)$" if name.endswith(".mhd") else r"^data ?file\s*:\s*(.+)$"
    with header.open("rb") as f:
        text = f.read(65536).decode("latin-1")
    m = re.search(key, text, re.MULTILINE | re.IGNORECASE)
    if m is None:
        return ()
    value = m.group(1).strip()
    if value.upper() == "LOCAL" or " " in value or value.upper().startswith("LIST"):
        return ()  # inline data, or a file list / pattern: the reader finds its own files locally
    return (value,)


def files_of(path) -> list[Path]:
    """The files an image is stored in (what a change check stamps): the file itself, a detached
    header with its data file, or every file of a DICOM series folder."""
    path = as_path(path)
    if path.name.endswith(DICOM_ENDING) and path.is_dir():
        return sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
    if path.name.endswith((".mhd", ".nhdr")) and path.is_file():
        return [path, *(path.parent / n for n in _data_files(path) if (path.parent / n).is_file())]
    return [path]


def open_image(path, case: str | None = None) -> ImageFile:
    """An image file opened (header only where the format allows), with errors naming the case."""
    path = as_path(path)
    ending = ending_of(path.name)
    if ending in NIFTI_ENDINGS:
        return NiftiFile(path, case)
    if ending in ITK_ENDINGS or ending == DICOM_ENDING:
        return ItkFile(path, case)
    raise BadInputError(f"{display_name(path)} is not an image this pipeline reads "
                        f"(endings: {', '.join(NIFTI_ENDINGS + ITK_ENDINGS)}, or a {DICOM_ENDING} folder)", case)


def read_volume(path, case: str | None = None, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Load one image as a RAS array (3D, or 4D with channels last) and its original geometry."""
    image = open_image(path, case)
    geometry = image.geometry
    return to_ras(image.read(dtype), geometry), geometry


# ---------------------------------------------------------------- writing


def write_volume(data_ras: np.ndarray, geometry: Geometry, path, reference=None) -> None:
    """Write a RAS array in the format `path`'s ending names, in the original orientation and grid.

    With `reference` (the input the array was computed from) the output copies its grid as the
    file stores it (NIfTI: its header; ITK formats: spacing, origin and direction; DICOM: each
    slice's position and orientation tags and the patient and study). Nothing appears under the
    final name until it is whole (a `.mhd`'s data file is moved into place before its header)."""
    path = as_path(path)
    if is_nifti(path):
        write_nifti(data_ras, geometry, path, reference if reference is not None and is_nifti(reference) else None)
        return
    ending = ending_of(path.name)
    if ending not in ITK_ENDINGS and ending != DICOM_ENDING:
        raise SegPipeError(f"cannot write {display_name(path)}: unknown image ending")
    sitk = simpleitk(path)
    data = from_ras(np.asarray(data_ras), geometry)
    ref = _reference_grid(reference, geometry, sitk)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    spacing, direction, origin = (ref.spacing, ref.direction, ref.origin) if ref is not None else itk_grid(geometry)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    with _writing(path) as tmp:
        if ending == DICOM_ENDING:
            with keeping_locale():
                _write_series(sitk, image, tmp, ref.slice_tags if ref is not None else ())
        else:
            sitk.WriteImage(image, str(tmp), useCompression=True)
            if ref is not None and ref.nrrd_fields and ending in (".nrrd", ".nhdr"):
                _set_nrrd_fields(tmp, ref.nrrd_fields)


def itk_grid(geometry: Geometry) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction row-major, origin) in SimpleITK's LPS terms for a Geometry's affine."""
    linear = LPS_TO_RAS @ np.asarray(geometry.affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = LPS_TO_RAS @ np.asarray(geometry.affine, dtype=np.float64)[:3, 3]
    return tuple(map(float, spacing)), tuple(map(float, direction.ravel())), tuple(map(float, origin))


@dataclass(frozen=True)
class ReferenceGrid:
    """An ITK reference image's grid as SimpleITK reads it (written back unchanged), and for a
    DICOM series the tags of each slice in k order."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    slice_tags: tuple[dict, ...] = ()
    nrrd_fields: tuple[str, ...] = ()  # a 3D NRRD reference's grid lines, copied as text


def _reference_grid(reference, geometry: Geometry, sitk) -> ReferenceGrid | None:
    """The reference's own grid when it is an ITK image on the same grid as `geometry`, else None."""
    if reference is None or is_nifti(reference) or ending_of(as_path(reference).name) is None:
        return None
    try:
        ref = ItkFile(reference)
    except (BadInputError, SegPipeError):
        return None
    if ref.shape[:3] != tuple(geometry.shape) or not np.allclose(ref.affine, geometry.affine, atol=1e-4):
        return None
    info = ref.info
    dim = info.GetDimension()
    return ReferenceGrid(spacing=tuple(info.GetSpacing()[:3]), origin=tuple(info.GetOrigin()[:3]),
                         direction=tuple(np.asarray(info.GetDirection()).reshape(dim, dim)[:3, :3].ravel().tolist()),
                         slice_tags=tuple(_slice_tags(ref, sitk)) if ref.dicom else (),
                         nrrd_fields=_nrrd_grid_fields(ref.local) if dim == 3 else ())


# NRRD stores spacing x direction as one vector per axis: SimpleITK splits it into spacing and
# direction on reading and multiplies them again on writing, which can move the last bit. A label
# written beside a NRRD copies these header lines as text instead, so its grid is the input's exactly.
NRRD_GRID_FIELDS = ("space", "space directions", "space origin")


def _nrrd_header(path: Path, limit: int | None = None) -> tuple[list[str], bytes]:
    """(header lines, everything after the blank line that ends the header) of a NRRD file
    (its first `limit` bytes only, when given)."""
    with open(path, "rb") as f:
        raw = f.read(limit) if limit else f.read()
    end = raw.find(b"\n\n")
    head, rest = (raw, b"") if end < 0 else (raw[:end], raw[end:])
    return head.decode("latin-1").split("\n"), rest


def _nrrd_grid_fields(path: Path) -> tuple[str, ...]:
    if not path.name.endswith((".nrrd", ".nhdr")):
        return ()
    lines, _ = _nrrd_header(path, limit=65536)
    return tuple(line for line in lines if line.split(":", 1)[0].strip() in NRRD_GRID_FIELDS)


def _set_nrrd_fields(path: Path, fields: tuple[str, ...]) -> None:
    """Replace the grid lines of the NRRD (header) file `path` by `fields`."""
    lines, rest = _nrrd_header(path)
    by_key = {f.split(":", 1)[0].strip(): f for f in fields}
    lines = [by_key.get(line.split(":", 1)[0].strip(), line) if ":" in line else line for line in lines]
    path.write_bytes("\n".join(lines).encode("latin-1") + rest)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[Path]:
    """A local temporary path named like `path` to write (a file, two files or a folder); on
    success moved into place whole (data files before the header that names them)."""
    if path.name.endswith((".mha", ".nrrd")):
        with replacing(path, ending_of(path.name)) as tmp:
            yield tmp
        return
    staging_root = path.parent if not is_url(path) else None
    if staging_root is not None:
        staging_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp", dir=staging_root) as tmpdir:
        tmp = Path(tmpdir) / path.name
        if path.name.endswith(DICOM_ENDING):
            tmp.mkdir()
        yield tmp
        if is_url(path):
            if path.name.endswith(DICOM_ENDING):
                if path.exists():
                    path.fs.rm(path.path, recursive=True)
                for f in sorted(tmp.iterdir()):
                    path.fs.put_file(str(f), (path / f.name).path)
            else:
                for f in sorted(Path(tmpdir).iterdir(), key=lambda f: f.name == path.name):  # header last
                    path.fs.put_file(str(f), (path.parent / f.name).path)
        elif path.name.endswith(DICOM_ENDING):
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            for f in sorted(Path(tmpdir).iterdir(), key=lambda f: f.name == path.name):
                os.replace(f, path.parent / f.name)


def _ds(value: float) -> str:
    """A number as a DICOM decimal string: as many digits as 16 characters hold."""
    for digits in range(17, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= DS_MAX_CHARS:
            return text
    raise ValueError(value)


def _slice_tags(ref: ItkFile, sitk) -> list[dict[str, str]]:
    """Per slice of a reference series (in its k order): the tags a derived series copies."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(ref.local), reader.GetGDCMSeriesIDs(str(ref.local))[0])
    tags = []
    for name in files:
        one = sitk.ImageFileReader()
        one.SetFileName(name)
        one.ReadImageInformation()
        keys = [*DICOM_SHARED_TAGS, "0020|0032", "0020|0037"]
        tags.append({k: one.GetMetaData(k).strip() for k in keys if one.HasMetaDataKey(k)})
    return tags


def _write_series(sitk, image, folder: Path, per_slice: tuple[dict, ...]) -> None:
    """`image` as a DICOM series, one file per k slice, with the position tags readers sort by."""
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16):
        if image.GetPixelID() in (sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkInt64, sitk.sitkUInt64):
            array = sitk.GetArrayViewFromImage(image)
            if array.size and (array.min() < -32768 or array.max() > 65535):
                raise SegPipeError(f"{folder.name}: values beyond 16 bits cannot be written as DICOM")
            cast = sitk.sitkUInt16 if not array.size or array.min() >= 0 else sitk.sitkInt16
            image = sitk.Cast(image, cast)
        else:
            raise SegPipeError(f"{folder.name}: DICOM series are written for integer volumes (labels) only, "
                               f"not {image.GetPixelIDTypeAsString()}")
    study = per_slice[0] if per_slice else {}
    root = "2.25."  # UIDs derived from a UUID (DICOM PS3.5 B.2): unique without a registered root
    series_uid = root + str(uuid.uuid4().int)
    d = image.GetDirection()
    common = {"0008|0060": "OT", "0008|0008": "DERIVED\\SECONDARY", "0008|103e": "segpipe",
              "0020|000e": series_uid, "0020|0011": "1001",
              "0020|000d": study.get("0020|000d", root + str(uuid.uuid4().int)),
              "0020|0052": study.get("0020|0052", root + str(uuid.uuid4().int)),
              "0020|0037": "\\".join(_ds(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    common.update({k: v for k, v in study.items() if k in DICOM_SHARED_TAGS})
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    depth = image.GetDepth()
    for k in range(depth):
        plane = image[:, :, k]
        for tag, value in common.items():
            plane.SetMetaData(tag, value)
        own = per_slice[k] if per_slice and len(per_slice) == depth else {}
        position = own.get("0020|0032") or "\\".join(_ds(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        plane.SetMetaData("0020|0032", position)
        if "0020|0037" in own:
            plane.SetMetaData("0020|0037", own["0020|0037"])
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", root + str(uuid.uuid4().int))
        writer.SetFileName(str(folder / f"{k + 1:05d}.dcm"))
        writer.Execute(plane)
