"""Image files in a folder, and how their names map to cases and channels.

One place for the naming rules every stage shares: `CASE.nii.gz` is a case (Decathlon; a 4D file
holds its channels), `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... are one case's channels (nnU-Net
v2). Hidden files (a writer's `.name.tmp` in progress) are never images.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.storage import as_path, is_url

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_STEM = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net v2: CASE_0000 is channel 0 of CASE


def strip_ending(name: str) -> str:
    """The case part of a file name: `CASE.nii.gz` -> `CASE`."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The NIfTI files directly in `folder` (a path or URL), sorted by name; hidden files skipped."""
    folder = as_path(folder)
    if is_url(folder):  # one listing with file types, not a request per file
        entries = folder.fs.ls(folder.path, detail=True)
        files = [folder / e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]
    else:
        files = [p for p in folder.iterdir() if p.is_file()]
    return sorted((p for p in files if not p.name.startswith(".") and p.name.endswith(NIFTI_ENDINGS)),
                  key=lambda p: p.name)


def split_channel(stem: str) -> tuple[str, int] | None:
    """`CASE_0001` -> ("CASE", 1); None for a name without a four-digit channel suffix."""
    m = CHANNEL_STEM.match(stem)
    return (m.group(1), int(m.group(2))) if m else None
