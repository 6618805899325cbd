"""An embedded phantom dataset, so `segpipe demo` and the tests run anywhere without downloads.

Each case is a small anisotropic MRI-like volume (default 48 x 48 x 24 voxels at about
1 x 1 x 2.5 mm) holding a randomly rotated ellipsoid "organ" (label 1) that contains a "lesion"
(label 2), plus an unlabelled structure touching the organ (a distractor the network must learn to
leave out). Intensities are distinct per structure but blurred at the edges (partial volume),
multiplied by a smooth bias field, scaled arbitrarily per case, and corrupted by Rician noise: easy
enough for a small U-Net to pass Dice 0.8 in minutes on a laptop, realistic enough to exercise
z-score normalisation, anisotropic planning and resampling. A few cases are stored in other axis
orientations (LPS, PSR, LAS) so the reorientation path is exercised.

`labels="regions"` declares the same voxels as nnU-Net v2 regions (`organ+lesion` = [1, 2] and `lesion`
= 2, painted in that order), `labels="ignore"` keeps only scribbles (a few thin slabs of each
structure's interior) and marks every other voxel `ignore` (3): both in the nnU-Net v2 raw layout,
where those declarations live.

Generation is seeded per case (`default_rng([seed, case])`), so a dataset is reproducible bit for
bit, and crash-safe: written to a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.spatial.transform import Rotation

from pipeline.errors import BadInputError

GENERATOR = "segpipe.synthetic"
VERSION = 1  # bump when the generated data changes, so stale demo datasets are rebuilt
DEFAULT_SHAPE = (48, 48, 24)
BASE_SPACING = (1.0, 1.0, 2.5)  # mm, RAS axes; z is the thick-slice axis
LABELS = {"0": "background", "1": "organ", "2": "lesion"}
LABEL_SCHEMES = ("classes", "regions", "ignore")
# nnU-Net v2 declarations of the other schemes (the voxels of "regions" are those of "classes")
REGION_LABELS = {"background": 0, "organ+lesion": [1, 2], "lesion": 2}
REGIONS_CLASS_ORDER = [1, 2]
IGNORE_LABELS = {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
IGNORE_VALUE = 3
SCRIBBLE_EVERY = 4  # "ignore": every 4th sagittal slice is annotated, inside each structure's eroded interior
# Case i is stored in ORIENTATIONS[i % 8]: mostly RAS, some mirrored and one permuted (as SCT's T2).
ORIENTATIONS = ("RAS", "RAS", "LPS", "RAS", "RAS", "PSR", "RAS", "LAS")
# Mean intensity of each structure before bias field, scaling and noise.
INTENSITY = {"background": 0.2, "distractor": 0.4, "organ": 0.65, "lesion": 1.0}
NOISE_SIGMA = 0.05  # of the Rician noise, same units as INTENSITY


def make_demo_dataset(out_dir: str | os.PathLike, num_cases: int = 24, seed: int = 0,
                      shape: tuple[int, int, int] = DEFAULT_SHAPE, labels: str = "classes") -> Path:
    """The phantom dataset at `out_dir` (Decathlon layout; nnU-Net v2 layout for `labels` "regions"
    or "ignore"), generating it unless already there.

    An existing dataset made with the same parameters is returned untouched; one made with other
    parameters is replaced. A folder that is not empty and holds something else is refused.
    """
    out = Path(out_dir).absolute()
    shape = tuple(int(s) for s in shape)
    if num_cases < 1:
        raise BadInputError(f"num_cases must be at least 1, got {num_cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise BadInputError(f"shape must be 3 sizes of at least 16 voxels, got {shape}")
    if labels not in LABEL_SCHEMES:
        raise BadInputError(f"labels must be one of {', '.join(LABEL_SCHEMES)}, got {labels!r}")
    params = {"generator": GENERATOR, "version": VERSION, "num_cases": int(num_cases), "seed": int(seed),
              "shape": list(shape)}
    if labels != "classes":  # the classes dataset keeps its parameters (and so its existing copies)
        params["labels"] = labels
    if _is_complete(out, params):
        return out
    if out.exists() and not _replaceable(out):
        raise BadInputError(f"{out} exists and is not a synthetic dataset made by segpipe; choose another folder")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
    try:
        _write_dataset(tmp, params)
        _move_into_place(tmp, out, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_complete(out: Path, params: dict) -> bool:
    try:
        meta = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("synthetic") != params:
        return False
    try:
        return all((out / e[k]).is_file() for e in meta["training"] for k in ("image", "label"))
    except (KeyError, TypeError):
        return False


def _replaceable(out: Path) -> bool:
    """Ours to overwrite: an empty folder, or a phantom dataset made with other parameters."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        meta = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("synthetic"), dict) \
        and meta["synthetic"].get("generator") == GENERATOR


def _move_into_place(tmp: Path, out: Path, params: dict) -> None:
    """Rename the finished folder to `out`; a concurrent maker that got there first wins."""
    if out.exists():
        if _is_complete(out, params):  # another process finished the same dataset meanwhile
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError:  # created by someone else between the check and the rename
        if not _is_complete(out, params):
            raise


def _write_dataset(root: Path, params: dict) -> None:
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    scheme = params.get("labels", "classes")
    nnunet = scheme != "classes"
    training = []
    for i in range(params["num_cases"]):
        case_id = f"phantom_{i:03d}"
        image, label, affine = make_case(params["seed"], i, tuple(params["shape"]), scribbles=scheme == "ignore")
        header = nib.Nifti1Header()
        header.set_qform(affine, code=1)  # scanner coordinates, as both forms of a real scan
        header.set_sform(affine, code=1)
        header.set_xyzt_units("mm", "sec")
        image_name = f"{case_id}_0000.nii.gz" if nnunet else f"{case_id}.nii.gz"
        for data, folder, name in ((image, "imagesTr", image_name), (label, "labelsTr", f"{case_id}.nii.gz")):
            img = nib.Nifti1Image(data, affine, header)
            img.set_data_dtype(data.dtype)  # a header passed in would impose its own (float32)
            nib.save(img, str(root / folder / name))
        training.append({"image": f"./imagesTr/{image_name}", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {
        "name": "Phantom",
        "description": "Synthetic MRI-like phantoms: a rotated ellipsoid organ containing a lesion, a touching "
                       "unlabelled structure, partial volume, bias field and Rician noise (pipeline.data.synthetic).",
        "reference": "generated by seg-pipeline",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
    }
    if nnunet:  # the nnU-Net v2 raw layout: `training` only lists the files for `_is_complete`
        meta.update({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                     "labels": dict(REGION_LABELS if scheme == "regions" else IGNORE_LABELS)})
        if scheme == "regions":
            meta["regions_class_order"] = list(REGIONS_CLASS_ORDER)
    else:
        meta.update({"modality": {"0": "MRI"}, "labels": dict(LABELS)})
    meta.update({"numTraining": len(training), "numTest": 0, "training": training, "test": [], "synthetic": params})
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def scribble_label(label: np.ndarray, every: int = SCRIBBLE_EVERY) -> np.ndarray:
    """Sparse annotation of a full label map: each structure's interior (eroded by one voxel, so
    no boundary is annotated) on every `every`-th slice of axis 0 keeps its value, everything else
    becomes `IGNORE_VALUE`. Background is scribbled the same way, so every class is seen."""
    out = np.full(label.shape, IGNORE_VALUE, dtype=np.uint8)
    slices = np.zeros(label.shape, dtype=bool)
    slices[every // 2::every] = True
    for value in np.unique(label):
        interior = binary_erosion(label == value, iterations=1)
        out[interior & slices] = value
    return out


def make_case(seed: int, index: int, shape: tuple[int, int, int] = DEFAULT_SHAPE, scribbles: bool = False):
    """(image float32, label uint8, affine) of one phantom, in its stored (possibly non-RAS) orientation;
    with `scribbles`, the label is `scribble_label` of the full one (the image is the same)."""
    rng = np.random.default_rng([seed, index])
    base = np.asarray(shape)
    dims = tuple(int(s) for s in base + np.rint(base * rng.uniform(-0.08, 0.08, 3)).astype(int))
    spacing = np.asarray(BASE_SPACING) * rng.uniform(0.95, 1.05, 3)
    extent = np.asarray(dims) * spacing  # mm
    # Voxel-centre coordinates in mm, origin at the volume centre (RAS axes).
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(dims, spacing)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    # Organ: 25..38% of the smallest extent per semi-axis, randomly rotated, near the centre.
    small = float(extent.min())
    organ_axes = rng.uniform(0.25, 0.38, 3) * small
    organ_rot = Rotation.random(random_state=rng).as_matrix()
    organ_centre = rng.uniform(-0.06, 0.06, 3) * extent
    organ = _ellipsoid(points, organ_centre, organ_axes, organ_rot)

    # Lesion: well inside the organ. In the organ's normalised frame its centre is within 0.2 of the
    # organ's and its extent below 0.5, leaving a margin wider than one thick slice: organ tissue
    # always surrounds it, so it never touches the background.
    direction = _unit(rng.normal(size=3))
    lesion_centre = organ_centre + organ_rot @ (direction * organ_axes * rng.uniform(0.0, 0.2))
    lesion_axes = rng.uniform(0.35, 0.5, 3) * organ_axes.min()
    lesion = _ellipsoid(points, lesion_centre, lesion_axes, Rotation.random(random_state=rng).as_matrix()) & organ

    # Distractor: a smaller ellipsoid centred just outside the organ's surface, so the two touch.
    direction = _unit(rng.normal(size=3))
    metric = organ_rot @ np.diag(1.0 / organ_axes**2) @ organ_rot.T
    surface = organ_centre + direction / np.sqrt(direction @ metric @ direction)
    radius = rng.uniform(0.15, 0.22) * small
    distractor = _ellipsoid(points, surface + direction * 0.8 * radius, np.full(3, radius), np.eye(3)) & ~organ

    clean = np.full(dims, INTENSITY["background"], dtype=np.float64)
    clean[distractor] = INTENSITY["distractor"]
    clean[organ] = INTENSITY["organ"]
    clean[lesion] = INTENSITY["lesion"]
    clean = gaussian_filter(clean, sigma=0.6 / (spacing / spacing.min()))  # partial volume, ~0.6 mm

    # Smooth multiplicative bias field: exp of a random quadratic over the normalised coordinates.
    unit = points / (extent / 2)
    terms = np.concatenate([unit, unit**2 - 1 / 3, unit[..., [0, 0, 1]] * unit[..., [1, 2, 2]]], axis=-1)
    bias = np.exp(terms @ rng.uniform(-0.12, 0.12, terms.shape[-1]))
    signal = clean * bias
    noise = rng.normal(0.0, NOISE_SIGMA, (2, *dims))
    image = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2) * rng.uniform(200.0, 600.0)  # Rician, arbitrary units

    label = np.zeros(dims, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    if scribbles:
        label = scribble_label(label)

    origin = -(np.asarray(dims) - 1) / 2 * spacing + rng.uniform(-20.0, 20.0, 3)
    ras_affine = np.diag([*spacing, 1.0])
    ras_affine[:3, 3] = origin
    target = ORIENTATIONS[index % len(ORIENTATIONS)]
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(target)))
    image_img = nib.Nifti1Image(image.astype(np.float32), ras_affine).as_reoriented(ornt)
    label_img = nib.Nifti1Image(label, ras_affine).as_reoriented(ornt)
    return (np.asarray(image_img.dataobj, dtype=np.float32), np.asarray(label_img.dataobj, dtype=np.uint8),
            image_img.affine)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _ellipsoid(points: np.ndarray, centre, semi_axes, rotation: np.ndarray) -> np.ndarray:
    """Voxels whose centres lie inside the ellipsoid (semi-axes along the columns of `rotation`)."""
    flat = points.reshape(-1, 3) - centre
    local = flat @ (rotation / np.asarray(semi_axes))  # along the ellipsoid's own axes, in semi-axis units
    return (np.einsum("ij,ij->i", local, local) <= 1.0).reshape(points.shape[:-1])
