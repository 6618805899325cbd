"""nnU-Net v2 trained-model folders in and out of a seg-pipeline workdir, and probabilities in nnU-Net's layout.

* `import_results_folder`: `RESULTS/{dataset.json, plans.json, fold_K/checkpoint_{final,best}.pth,
  crossval_results_folds_*/postprocessing.{json,pkl}}` -> `W/plans.json`, `W/runs/<config>/fold_K/`
  (model files with the weights under our names, the run's plans, the post-processing rule,
  `nnunet_import.json` saying where they came from). Every fold is read, checked and mapped before
  anything is written, so a refused folder leaves the workdir as it was.
* `export_run`: the reverse, `W/runs/<config>/fold_K/` -> an nnU-Net v2 results folder
  (`DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__<config>/`) that `nnUNetv2_predict` reads.
* `write_probabilities`: `segpipe predict --save-probabilities` also writes `OUTPUT/nnunet/CASE.npz`
  (`probabilities`, nnU-Net's axis order) + `CASE.pkl` (the geometry nnU-Net writes segmentations with)
  + `plans.json` / `dataset.json`, the folder `nnUNetv2_ensemble -i` takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import BadInputError
from pipeline.interop.nnunet_files import (
    LargestComponentStep,
    load_checkpoint,
    postprocessing_pickle,
    read_postprocessing_json,
    read_postprocessing_pkl,
)
from pipeline.interop.nnunet_plans import check_trainer, nnunet_from_plans, plans_from_nnunet
from pipeline.interop.nnunet_weights import load_nnunet_weights, ours_to_nnunet
from pipeline.planning.plans import Plans
from pipeline.storage import as_path, local_file, replacing, write_json_atomic, write_text_atomic
from pipeline.workdir import RUN_PLANS, Workdir, model_file

log = logging.getLogger("segpipe.interop")

IMPORT_RECORD = "nnunet_import.json"  # beside an imported model: where it came from
IMPORT_VERSION = 1
CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
PROBABILITIES_DIR = "nnunet"  # OUTPUT/nnunet/: nnU-Net's probability layout, beside ours


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BadInputError(f"{path.parent}: no {path.name} ({what}); is this an nnU-Net v2 results folder "
                            "(nnUNet_results/DatasetNNN_Name/TRAINER__PLANS__CONFIG)?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: must hold a JSON object")
    return data


def model_folder(results: str | os.PathLike) -> Path:
    """The trained-model folder: `results` itself, or its one TRAINER__PLANS__CONFIG subfolder."""
    root = as_path(results)
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder")
    if (root / "plans.json").is_file():
        return root
    candidates = sorted(d for d in root.iterdir() if d.is_dir() and (d / "plans.json").is_file())
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise BadInputError(f"{root} holds several trained models ({', '.join(d.name for d in candidates)}): "
                            "pass the one to import")
    raise BadInputError(f"{root} is not an nnU-Net v2 results folder: no plans.json in it or in a subfolder")


def fold_names(folder: Path) -> list[str]:
    """Fold names with a checkpoint, numeric ones in order, then 'all'."""
    names = [d.name.removeprefix("fold_") for d in folder.iterdir() if d.is_dir() and d.name.startswith("fold_")
             and any((d / c).is_file() for c in CHECKPOINTS.values())]
    return sorted(names, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


@dataclass
class ImportReport:
    """What `import_results_folder` did."""

    source: str
    workdir: str
    config: str
    trainer: str
    folds: list[str]
    checkpoints: dict[str, list[str]]  # fold -> ["final", "best"] imported
    postprocessing: str | None = None  # the file the rule came from
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        pp = f"; post-processing from {self.postprocessing}" if self.postprocessing else "; no post-processing"
        lines = [f"imported {self.trainer} {self.config} fold(s) {', '.join(self.folds)} from {self.source} -> "
                 f"{self.workdir}/runs/{self.config}{pp}",
                 f"predict with: segpipe predict --workdir {self.workdir} --config {self.config} INPUT_DIR OUTPUT_DIR"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _postprocessing(folder: Path, plans: Plans, folds: list[str]):
    """Our rule from nnU-Net's crossval_results_folds_*/postprocessing.{json,pkl} (the one covering the most
    of the imported folds), or (None, None). The JSON is preferred; the pickle is read restricted."""
    from pipeline.inference.postprocessing import PostprocessingRule

    found = []
    for d in folder.glob("crossval_results_folds_*"):
        covered = set(d.name.removeprefix("crossval_results_folds_").split("_"))
        for name in ("postprocessing.json", "postprocessing.pkl"):
            if (d / name).is_file():
                found.append((len(covered & set(folds)), name.endswith(".json"), d / name))
    if not found:
        return None, None
    *_, path = max(found)
    steps: list[LargestComponentStep] = (read_postprocessing_json(path, _read_json(path, "post-processing"))
                                         if path.suffix == ".json" else read_postprocessing_pkl(path))
    foreground = tuple(int(v) for v in plans.label_map().class_values if v != 0)  # never the ignore label
    keep_foreground, per_class = False, []
    for i, step in enumerate(steps):
        if isinstance(step.labels, tuple):
            if sorted(step.labels) != sorted(foreground) or i != 0:
                raise BadInputError(f"{path}: keeping the largest component of labels {list(step.labels)} is not "
                                    "expressible here (only of the whole foreground, first, or of single labels)")
            keep_foreground = True
        elif step.labels in foreground:
            per_class.append(step.labels)
        else:
            raise BadInputError(f"{path}: post-processing names label {step.labels}, which dataset.json lacks")
    rule = PostprocessingRule(labels=foreground, keep_largest_foreground=keep_foreground,
                              keep_largest_per_class=tuple(per_class))
    return rule, path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_results_folder(results: str | os.PathLike, workdir, folds: list[str] | None = None) -> ImportReport:
    """An nnU-Net v2 trained-model folder into the workdir, ready for `segpipe predict` (see the module docstring)."""
    from pipeline.training.loop import save_model_file
    from pipeline.training.model import build_network

    folder = model_folder(results)
    wd = Workdir.at(workdir)
    where = str(folder)
    dataset_json = _read_json(folder / "dataset.json", "the dataset's labels and channels")
    nnunet_plans = _read_json(folder / "plans.json", "nnU-Net's plans")
    available = fold_names(folder)
    if not available:
        raise BadInputError(f"{where}: no fold_K folder holds checkpoint_final.pth or checkpoint_best.pth")
    wanted = available if folds is None else [str(f) for f in folds]
    missing = [f for f in wanted if f not in available]
    if missing:
        raise BadInputError(f"{where}: fold(s) {', '.join(missing)} have no checkpoint (available: {', '.join(available)})")

    loaded: dict[str, dict[str, dict]] = {}
    trainer = config = None
    for fold in wanted:
        for which, name in CHECKPOINTS.items():
            path = folder / f"fold_{fold}" / name
            if not path.is_file():
                continue
            ckpt = load_checkpoint(path)
            check_trainer(ckpt.get("trainer_name"), str(path))
            conf_name = (ckpt.get("init_args") or {}).get("configuration")
            if not isinstance(conf_name, str):
                raise BadInputError(f"{path}: the checkpoint does not say its configuration (init_args.configuration)")
            if (trainer, config) not in ((None, None), (ckpt["trainer_name"], conf_name)):
                raise BadInputError(f"{path}: trained as {ckpt['trainer_name']} {conf_name}, the other folds as "
                                    f"{trainer} {config}: one model folder holds one trainer and configuration")
            trainer, config = ckpt["trainer_name"], conf_name
            loaded.setdefault(fold, {})[which] = {"path": path, "checkpoint": ckpt}
    plans = plans_from_nnunet(nnunet_plans, dataset_json, config, where)
    conf = plans.configuration(config)
    for fold, items in loaded.items():
        for which, item in items.items():
            axes = item["checkpoint"].get("inference_allowed_mirroring_axes")
            if axes is not None and sorted(axes) != list(range(conf.dims)):
                raise BadInputError(f"{item['path']}: test-time mirroring along axes {axes} only; seg-pipeline mirrors "
                                    f"along all {conf.dims} (predict with --no-tta after importing is not offered)")
            net = build_network(conf, len(plans.channels), plans.label_map().num_outputs, deep_supervision=True)
            load_nnunet_weights(net, item["checkpoint"]["network_weights"], str(item["path"]))
            item["network"] = net
    rule, rule_source = _postprocessing(folder, plans, wanted)

    # checked: now write, refusing to overwrite anything that was not imported from this same folder
    if wd.plans.is_file():
        existing = Plans.load(wd.plans)
        if existing.configurations.keys() != plans.configurations.keys() or \
                existing.hash(config) != plans.hash(config) or existing.label_values != plans.label_values:
            raise BadInputError(f"{wd.plans} holds other plans (configurations {', '.join(existing.configurations)}): "
                                "import into a new workdir")
    for fold in loaded:
        run_dir = wd.run_dir(config, fold)
        if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / IMPORT_RECORD).is_file():
            raise BadInputError(f"{run_dir} already holds a model trained here: import into a new workdir")
    if not wd.plans.is_file():
        plans.save(wd.plans)
    for fold, items in loaded.items():
        run_dir = wd.run_dir(config, fold)
        run_dir.mkdir(parents=True, exist_ok=True)
        plans.save(run_dir / RUN_PLANS)
        for which in CHECKPOINTS:
            stale = model_file(run_dir, which)
            if which not in items and stale.exists():
                stale.unlink()  # an earlier import's file this folder no longer has
        for which, item in items.items():
            ckpt = item["checkpoint"]
            ema = ckpt.get("_best_ema")
            save_model_file(model_file(run_dir, which), item["network"], configuration=config,
                            epoch=int(ckpt.get("current_epoch") or 0),
                            ema_dice=None if ema is None else float(ema), num_input_channels=len(plans.channels),
                            num_classes=plans.label_map().num_outputs, label_values=list(plans.label_values),
                            plans_hash=plans.hash(config))
        pp = run_dir / "postprocessing.json"
        if rule is not None:
            rule.save(pp)
        elif pp.exists():
            pp.unlink()
        write_json_atomic(run_dir / IMPORT_RECORD, {
            "version": IMPORT_VERSION, "source": str(folder), "trainer": trainer, "configuration": config,
            "fold": fold, "plans_name": nnunet_plans.get("plans_name"),
            "checkpoints": {w: {"file": str(i["path"]), "sha256": _sha256(i["path"])} for w, i in items.items()},
            "postprocessing": None if rule_source is None else str(rule_source)})
    notes = []
    if rule is not None:
        notes.append("the post-processing rule is applied by `segpipe predict` (nnUNetv2_predict leaves it to "
                     "nnUNetv2_apply_postprocessing)")
    return ImportReport(source=str(folder), workdir=str(wd.root), config=config, trainer=trainer, folds=list(loaded),
                        checkpoints={f: sorted(i) for f, i in loaded.items()},
                        postprocessing=None if rule_source is None else str(rule_source), notes=notes)


# ---------------------------------------------------------------- export


@dataclass
class ExportReport:
    """What `export_run` wrote."""

    model_folder: str
    config: str
    folds: list[str]
    dataset: str
    postprocessing: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        parent = Path(self.model_folder).parent
        return (f"exported {self.config} fold(s) {', '.join(self.folds)} -> {self.model_folder}\n"
                f"predict with: nnUNet_results={parent.parent} nnUNetv2_predict -d {self.dataset} -c {self.config} "
                f"-i INPUT -o OUTPUT (or nnUNetv2_predict_from_modelfolder -m {self.model_folder})")


def nnunet_dataset_name(plans: Plans, dataset_id: int | None) -> str:
    """`DatasetNNN_Name` from our dataset name: `Task04_Hippocampus` -> `Dataset004_Hippocampus`."""
    m = re.match(r"^(?:Task|Dataset)(\d+)_(.+)$", plans.dataset_name)
    number = dataset_id if dataset_id is not None else int(m.group(1)) if m else 999
    name = re.sub(r"[^A-Za-z0-9]+", "", m.group(2) if m else plans.dataset_name) or "Dataset"
    if not 1 <= number <= 9999:
        raise BadInputError(f"dataset id {number} is outside nnU-Net's 1..9999")
    return f"Dataset{number:03d}_{name}"


def export_run(workdir, output_dir: str | os.PathLike, config: str, folds: list[str] | None = None,
               dataset_id: int | None = None) -> ExportReport:
    """Trained folds of `config` as an nnU-Net v2 results folder under `output_dir` (see the module docstring)."""
    from pipeline.inference.postprocessing import PostprocessingRule
    from pipeline.inference.predictor import available_folds
    from pipeline.training.loop import load_plain

    wd = Workdir.at(workdir)
    folds = [str(f) for f in folds] if folds else available_folds(wd, config)
    plans = Plans.load(wd.run_dir(config, folds[0]) / RUN_PLANS)
    dataset = nnunet_dataset_name(plans, dataset_id)
    nnunet_plans, dataset_json = nnunet_from_plans(plans, config, dataset)
    target = as_path(output_dir) / dataset / f"nnUNetTrainer__nnUNetPlans__{config}"
    checkpoints, rules = {}, []
    for fold in folds:
        run_dir = wd.run_dir(config, fold)
        if Plans.load(run_dir / RUN_PLANS).hash(config) != plans.hash(config):
            raise BadInputError(f"{run_dir}: trained with other plans than fold {folds[0]}; export the folds separately")
        for which, name in CHECKPOINTS.items():
            path = model_file(run_dir, which)
            if not path.is_file():
                continue
            payload = load_plain(path)
            checkpoints[(fold, name)] = {
                "network_weights": ours_to_nnunet(payload["network_weights"]),
                "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": nnunet_plans, "configuration": config, "fold": int(fold) if fold.isdigit() else fold,
                              "dataset_json": dataset_json, "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": tuple(range(plans.configuration(config).dims)),
                "current_epoch": int(payload.get("epoch") or 0),
                "_best_ema": payload.get("ema_pseudo_dice"),
            }
        if (fold, CHECKPOINTS["final"]) not in checkpoints:
            raise BadInputError(f"{run_dir}: no {model_file(run_dir).name}: finish training fold {fold} before exporting")
        pp = run_dir / "postprocessing.json"
        rules.append(PostprocessingRule.load(pp) if pp.is_file() else None)
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / "plans.json", nnunet_plans)
    write_json_atomic(target / "dataset.json", dataset_json)
    for (fold, name), ckpt in checkpoints.items():
        (target / f"fold_{fold}").mkdir(exist_ok=True)
        with replacing(target / f"fold_{fold}" / name) as tmp:
            torch.save(ckpt, tmp)
    rule = rules[0]
    exported_pp = rule is not None and all(r is not None and r.to_json() == rule.to_json() for r in rules)
    if exported_pp:
        steps = ([LargestComponentStep(tuple(rule.labels))] if rule.keep_largest_foreground else []) + \
                [LargestComponentStep(v) for v in rule.keep_largest_per_class]
        pp_dir = target / f"crossval_results_folds_{'_'.join(folds)}"
        pp_dir.mkdir(exist_ok=True)
        with replacing(pp_dir / "postprocessing.pkl") as tmp:
            Path(tmp).write_bytes(postprocessing_pickle(steps))
        write_json_atomic(pp_dir / "postprocessing.json", {
            "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * len(steps),
            "postprocessing_kwargs": [{"labels_or_regions": list(s.labels) if isinstance(s.labels, tuple) else s.labels}
                                      for s in steps]})
    return ExportReport(model_folder=str(target), config=config, folds=folds, dataset=dataset, postprocessing=exported_pp)


# ---------------------------------------------------------------- probabilities in nnU-Net's layout


def sitk_geometry(affine: np.ndarray) -> dict:
    """SimpleITK's spacing, origin and direction (LPS) for a NIfTI affine (RAS), as nnU-Net's `sitk_stuff`."""
    a = np.asarray(affine, dtype=float)
    lps = np.diag([-1.0, -1.0, 1.0]) @ a[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = np.diag([-1.0, -1.0, 1.0]) @ a[:3, 3]
    return {"spacing": tuple(float(s) for s in spacing), "origin": tuple(float(o) for o in origin),
            "direction": tuple(float(d) for d in direction.reshape(-1))}


def write_probabilities(workdir, config: str, fold: str, input_dir, output_dir) -> list[str]:
    """nnU-Net's probability layout in OUTPUT/nnunet/ for every case with our OUTPUT/CASE.npz (see the module
    docstring); cases already there are skipped. Returns the cases written; BadInputError where the
    model's labels or plans do not map onto nnU-Net's (our own probability files are there either way)."""
    from pipeline.data.images import open_image
    from pipeline.data.nifti import from_ras
    from pipeline.inference.predict import group_input_files

    wd = Workdir.at(workdir)
    plans = Plans.load(wd.run_dir(config, fold) / RUN_PLANS)
    nnunet_plans, dataset_json = nnunet_from_plans(plans, config, nnunet_dataset_name(plans, None))
    out = as_path(output_dir) / PROBABILITIES_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "plans.json", nnunet_plans)
    write_json_atomic(out / "dataset.json", dataset_json)
    written = []
    for case in group_input_files(input_dir, len(plans.channels)):
        ours = as_path(output_dir) / f"{case.case_id}.npz"
        npz, pkl = out / f"{case.case_id}.npz", out / f"{case.case_id}.pkl"
        if not ours.is_file() or (npz.is_file() and pkl.is_file()):
            continue
        geometry = open_image(case.images[0], case.case_id).geometry  # every format: NIfTI, .mha, .nrrd, DICOM
        with local_file(ours, ".npz") as local, np.load(local) as f:
            probs = f["probabilities"].astype(np.float32)
        in_file_order = from_ras(np.moveaxis(probs, 0, -1), geometry)  # (i, j, k, K)
        nnunet_order = np.ascontiguousarray(np.transpose(in_file_order, (3, 2, 1, 0)))  # (K, z, y, x): SimpleITK's
        sitk = sitk_geometry(geometry.affine)
        properties = {"sitk_stuff": sitk, "spacing": list(sitk["spacing"][::-1]),
                      "shape_before_cropping": tuple(nnunet_order.shape[1:])}
        with replacing(npz, ".npz") as tmp:
            np.savez_compressed(tmp, probabilities=nnunet_order)
        with replacing(pkl) as tmp:
            Path(tmp).write_bytes(pickle.dumps(properties, protocol=4))
        written.append(case.case_id)
    write_text_atomic(out / "README.txt", "nnU-Net v2's probability layout (CASE.npz 'probabilities' (classes, z, y, x) "
                      "+ CASE.pkl properties + plans.json/dataset.json): nnUNetv2_ensemble -i THIS_FOLDER OTHER -o OUT\n")
    return written
