"""Image files in a folder, and how their names map to cases and channels.

One place for the naming rules every stage shares: `CASE.nii.gz` is a case (Decathlon; a 4D file
holds its channels), `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... are one case's channels (nnU-Net
v2). The same holds for every ending in `IMAGE_ENDINGS`; a DICOM series is a folder named like a
file, `CASE_0000.dcm/`, holding that one series' slice files. Hidden files (a writer's
`.name.tmp` in progress) are never images.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.storage import as_path, is_url

NIFTI_ENDINGS = (".nii.gz", ".nii")  # read by nibabel
ITK_ENDINGS = (".mha", ".mhd", ".nrrd", ".nhdr")  # read by SimpleITK (the [itk] extra)
DICOM_ENDING = ".dcm"  # a folder holding one DICOM series, read by SimpleITK
IMAGE_ENDINGS = (*NIFTI_ENDINGS, *ITK_ENDINGS, DICOM_ENDING)
CHANNEL_STEM = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net v2: CASE_0000 is channel 0 of CASE


def ending_of(name: str) -> str | None:
    """The image ending of a file name (`.nii.gz`, `.mha`, ...), or None when it has none we read."""
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def strip_ending(name: str) -> str:
    """The case part of a file name: `CASE.nii.gz` -> `CASE`."""
    ending = ending_of(name)
    return name[: -len(ending)] if ending else name


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images directly in `folder` (a path or URL), sorted by name: files with an image ending,
    and `*.dcm` folders (DICOM series); hidden entries skipped."""
    folder = as_path(folder)
    if is_url(folder):  # one listing with file types, not a request per file
        entries = folder.fs.ls(folder.path, detail=True)
        found = [(folder / e["name"].rstrip("/").rsplit("/", 1)[-1], e.get("type") == "directory") for e in entries
                 if e.get("type") in ("file", "directory")]
    else:
        found = [(p, p.is_dir()) for p in folder.iterdir() if p.is_file() or p.is_dir()]
    return sorted((p for p, is_dir in found if not p.name.startswith(".")
                   and (p.name.endswith(DICOM_ENDING) if is_dir else ending_of(p.name) not in (None, DICOM_ENDING))),
                  key=lambda p: p.name)


def split_channel(stem: str) -> tuple[str, int] | None:
    """`CASE_0001` -> ("CASE", 1); None for a name without a four-digit channel suffix."""
    m = CHANNEL_STEM.match(stem)
    return (m.group(1), int(m.group(2))) if m else None
