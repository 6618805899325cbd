"""Getting real data in: Decathlon tarballs, and conversion between the two raw layouts.

`import_msd` unpacks `TaskXX_Name.tar` (a local path or an http(s) URL) safely: members that
would land outside the destination, links and devices are refused (tarfile's "data" filter), and
the macOS `._*` resource-fork files the official tarballs carry are skipped. The result is
validated before it is moved into place, so a broken download never looks like a dataset.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.data.dataset import LAYOUT_MSD, LAYOUT_NNUNET, load_dataset
from pipeline.data.files import NIFTI_ENDINGS
from pipeline.data.nifti import load_header
from pipeline.errors import BadInputError, SegPipeError
from pipeline.storage import as_path, copy_file, is_url, local_file, replacing, write_text_atomic


def _download(url: str, folder: Path) -> Path:
    from tqdm import tqdm

    target = folder / Path(url.split("?")[0]).name
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - scheme checked by caller
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(target, "wb") as fh, tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
            while chunk := response.read(1 << 20):
                fh.write(chunk)
                bar.update(len(chunk))
    return target


def import_msd(source: str, dest_root: Path) -> Path:
    """Unpack a Decathlon task tarball into `dest_root/<TaskXX_Name>` and check it validates."""
    from pipeline.data.validation import validate_dataset

    dest_root = as_path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    # unpacked beside the destination (one rename into place), or locally for a bucket (one upload)
    with tempfile.TemporaryDirectory(dir=None if is_url(dest_root) else dest_root, prefix=".import-") as tmp:
        tmp = Path(tmp)
        if source.startswith(("http://", "https://")):
            archive = _download(source, tmp)
        else:
            archive = Path(source)
            if not archive.is_file():
                raise BadInputError(f"{source}: no such file")
        try:
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if not Path(m.name).name.startswith("._")]
                tar.extractall(tmp / "x", members=members, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise BadInputError(f"{archive.name}: not a readable tar archive ({exc})") from None
        found = [p.parent for p in (tmp / "x").rglob("dataset.json")]
        if len(found) != 1:
            raise BadInputError(f"{archive.name}: expected one dataset.json in the archive, found {len(found)}")
        task = found[0]
        problems = validate_dataset(task)
        if problems:
            raise BadInputError(problems)
        final = dest_root / task.name
        if final.exists():
            raise SegPipeError(f"{final} already exists; remove it or choose another destination")
        if is_url(final):
            final.fs.put(str(task), final.path, recursive=True)
        else:
            os.replace(task, final)
    return final


def _start_conversion(source: Path, dest: Path, layout: str, layout_name: str):
    """The source dataset (checked to be in `layout`) and a fresh destination with its two folders."""
    ds = load_dataset(source)
    if ds.layout != layout:
        raise BadInputError(f"{source} is not in {layout_name}")
    for case in ds.cases:
        other = next((p for p in (*case.images, case.label) if p is not None and not p.name.endswith(NIFTI_ENDINGS)), None)
        if other is not None:
            raise BadInputError(f"{other.name}: convert rewrites NIfTI datasets only; this one is in another image format "
                                "(segpipe reads it as it is, in either layout)", case.case_id)
    dest = as_path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadInputError(f"{dest} already exists and is not empty: choose another destination")
    (dest / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dest / "labelsTr").mkdir(parents=True, exist_ok=True)
    return ds, dest


def _save(img: nib.Nifti1Image, path) -> None:
    with replacing(path, ".nii.gz") as tmp:
        nib.save(img, str(tmp))


def _load(path) -> nib.Nifti1Image:
    """A NIfTI fully in memory (a bucket's file is read once, not kept open)."""
    with local_file(path, ".nii.gz" if str(path).endswith(".gz") else ".nii") as local:
        img = nib.load(str(local))
        return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)


def msd_to_nnunet(source: Path, dest: Path) -> Path:
    """Decathlon -> nnU-Net v2 raw: one file per channel (`CASE_0000.nii.gz`), labels {name: value}."""
    ds, dest = _start_conversion(source, dest, LAYOUT_MSD, "the Decathlon layout")
    for case in ds.cases:
        shape = load_header(case.images[0], case.case_id).shape
        if len(shape) == 4:
            img = _load(case.images[0])
            data = np.asanyarray(img.dataobj)
            for c in range(shape[3]):
                _save(nib.Nifti1Image(data[..., c], img.affine, img.header),
                      dest / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz")
        else:
            copy_file(case.images[0], dest / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        copy_file(case.label, dest / "labelsTr" / f"{case.case_id}.nii.gz")
    meta = {
        "name": ds.name,
        "channel_names": {str(i): m for i, m in enumerate(ds.channels)},
        "labels": {name: value for value, name in sorted(ds.labels.items())},
        "numTraining": len(ds.cases),
        "file_ending": ".nii.gz",
    }
    write_text_atomic(dest / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return dest


def nnunet_to_msd(source: Path, dest: Path) -> Path:
    """nnU-Net v2 raw -> Decathlon: channels stacked into one 4D image when there are several."""
    ds = load_dataset(source)
    if ds.regions or ds.ignore_value is not None:  # before the destination is made: nothing half-written
        raise BadInputError(f"{source} declares {'regions' if ds.regions else 'an ignore label'}, which the "
                            "Decathlon layout cannot express: keep it in the nnU-Net v2 layout")
    ds, dest = _start_conversion(source, dest, LAYOUT_NNUNET, "the nnU-Net v2 raw layout")
    training = []
    for case in ds.cases:
        name = f"{case.case_id}.nii.gz"
        if len(case.images) == 1:
            copy_file(case.images[0], dest / "imagesTr" / name)
        else:
            imgs = [_load(p) for p in case.images]
            data = np.stack([np.asanyarray(i.dataobj) for i in imgs], axis=-1)
            _save(nib.Nifti1Image(data, imgs[0].affine, imgs[0].header), dest / "imagesTr" / name)
        copy_file(case.label, dest / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": ds.name,
        "tensorImageSize": "4D" if ds.num_channels > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(ds.channels)},
        "labels": {str(v): n for v, n in sorted(ds.labels.items())},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    write_text_atomic(dest / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return dest
