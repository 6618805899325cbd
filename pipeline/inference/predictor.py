"""A trained model loaded once (one fold or an ensemble of folds) and one case predicted with it:
raw files -> the model's own preprocessing -> sliding window -> restored to the input's geometry,
label values and post-processing -> written atomically."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.allocator import reuse_freed_memory
from pipeline.errors import BadInputError, SegPipeError
from pipeline.inference.sliding_window import network_logits, sliding_window_predict, sliding_window_stream
from pipeline.storage import as_path, replacing
from pipeline.workdir import MODEL_BEST, Workdir, model_file

log = logging.getLogger("segpipe.predict")

POSTPROCESSING_FILE = "postprocessing.json"  # beside the model; applied when present
OUTPUT_ENDING = ".nii.gz"  # for inputs without an image ending of their own


# ---------------------------------------------------------------- a trained model


@dataclass(frozen=True)
class ModelSpec:
    """Where a predictor loads from and how it predicts: small and picklable, so Ray workers can
    each load the model once from it."""

    run_dirs: tuple[str, ...]  # one per fold; several folds form an ensemble (logits averaged, as nnU-Net)
    checkpoint: str = "final"  # model_<checkpoint>.pt
    tta: bool = True
    step: float = 0.5
    batch_size: int | None = None  # network inputs (windows x mirrorings) per forward; None: sized to the patch
    device: str | None = None  # "cpu", "cuda", "cuda:1", or None / "auto": CUDA when available, else CPU
    accumulate: str = "auto"  # memory | device | zarr | auto (sliding_window.sliding_window_stream)
    amp: bool | None = None  # mixed-precision forward passes; None: pipeline.precision.auto_mixed_precision
    lanes: int | None = None  # forward passes at once (CPU threads); None: sliding_window.auto_lanes
    postprocess: bool = True  # apply the postprocessing.json beside the model, when there is one


def parse_folds(fold: str | int | Sequence) -> list[str]:
    """'0', 0, '0,1,2' or ['0', '1'] -> ['0', ...] (duplicates dropped, order kept)."""
    items = fold.split(",") if isinstance(fold, str) else [fold] if isinstance(fold, int) else list(fold)
    folds = [str(f).strip() for f in items if str(f).strip()]
    if not folds:
        raise BadInputError(f"no fold given ({fold!r})")
    return list(dict.fromkeys(folds))


def available_folds(workdir, config: str, checkpoint: str = "final") -> list[str]:
    """The folds of `config` with a model_<checkpoint>.pt, as nnUNetv2_predict finds them: the numbered
    folds in order ('all' only when there is no numbered one), or a SegPipeError saying how to make one."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
    root = wd.runs / config
    names = [d.name.removeprefix("fold_") for d in root.iterdir() if d.is_dir() and d.name.startswith("fold_")
             and model_file(d, checkpoint).is_file()] if root.is_dir() else []
    numbered = sorted((n for n in names if n.isdigit()), key=int)
    if numbered or names:
        return numbered or sorted(names)
    train = f"segpipe train --workdir {wd.root}" + (f" --config {config}" if config != "3d_fullres" else "") + " --fold 0"
    raise SegPipeError(f"no trained model for configuration {config} in {root} (no fold_K/{model_file(root, checkpoint).name}): "
                       f"train one with `{train}` or import one with `segpipe import-nnunet`")


def find_model(workdir, config: str, fold: str | int | Sequence | None = None, checkpoint: str = "final") -> list[Path]:
    """The run folders of the requested folds (None: every available fold, `available_folds`), or a
    SegPipeError saying which command makes them."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
    if fold is None:
        fold = available_folds(wd, config, checkpoint)
    run_dirs = []
    for f in parse_folds(fold):
        run_dir = wd.run_dir(config, f)
        model = model_file(run_dir, checkpoint)
        train = f"segpipe train --workdir {wd.root}" + (f" --config {config}" if config != "3d_fullres" else "") + f" --fold {f}"
        if not model.is_file():
            if checkpoint == "final" and (run_dir / MODEL_BEST).is_file():
                raise SegPipeError(f"fold {f} of {config} has not finished training ({model} is missing, only "
                                   f"model_best.pt): finish it with `{train} --resume`")
            raise SegPipeError(f"no trained model for configuration {config} fold {f} ({model} is missing): "
                               f"train it first with `{train}`")
        if not (run_dir / "plans.json").is_file():
            raise SegPipeError(f"{run_dir / 'plans.json'} is missing beside the model: re-run `{train}`")
        run_dirs.append(run_dir)
    return run_dirs


class _Ensemble(torch.nn.Module):
    """Several folds' networks as one: the mean of their logits, as nnU-Net v2 ensembles folds
    (one pass over the windows for all folds)."""

    def __init__(self, networks: Sequence[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(network_logits(net, x).float() for net in self.members) / len(self.members)


class Predictor:
    """A trained model loaded once: plans, label map, network(s), post-processing rule."""

    def __init__(self, network: torch.nn.Module, plans, config_name: str, label_map, rule=None,
                 spec: ModelSpec | None = None, previous: Predictor | None = None):
        self.spec = spec or ModelSpec(run_dirs=())
        self.device = torch.device(resolve_device(self.spec.device))
        self.network = network.to(self.device).eval()
        self.plans = plans
        self.config_name = config_name
        self.config = plans.configuration(config_name)
        self.label_map = label_map
        self.rule = rule
        self.previous = previous  # a cascade stage's previous stage (3d_lowres), run first

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Predictor:
        """The model `spec` describes, loaded; also sets this process's allocator up to reuse the memory of
        each forward pass (`pipeline.allocator`): a predictor is loaded before its forward threads start."""
        from pipeline.inference.cascade import previous_stage_run_dirs
        from pipeline.training.cascade import num_input_channels
        from pipeline.training.loop import load_trained_network

        if not spec.run_dirs:
            raise SegPipeError("a model needs at least one run folder")
        reuse_freed_memory()
        device = resolve_device(spec.device)
        networks, first = [], None
        for run_dir in spec.run_dirs:
            net, plans, payload = load_trained_network(run_dir, spec.checkpoint, device)
            facts = (payload["configuration"], payload["num_input_channels"], tuple(payload["label_values"]),
                     plans.hash(payload["configuration"]))
            if first is None:
                first, first_plans = facts, plans
            elif facts != first:
                raise SegPipeError(f"{run_dir} was trained with other plans, channels or labels than "
                                   f"{spec.run_dirs[0]}: these folds cannot form an ensemble")
            networks.append(net)
        config_name, channels, label_values, _ = first
        expected = num_input_channels(first_plans, config_name)
        if channels != expected:
            raise SegPipeError(f"{spec.run_dirs[0]}: the model takes {channels} channel(s) but its plans declare "
                               f"{expected}")
        network = networks[0] if len(networks) == 1 else _Ensemble(networks)
        rule = _load_rule(spec.run_dirs) if spec.postprocess else None
        previous_name = first_plans.configuration(config_name).previous_stage
        previous = None if previous_name is None else cls.from_spec(dataclasses.replace(
            spec, run_dirs=tuple(previous_stage_run_dirs(spec.run_dirs, previous_name, spec.checkpoint)),
            postprocess=False))
        return cls(network, first_plans, config_name, first_plans.label_map(), rule,
                   dataclasses.replace(spec, device=str(device)), previous)

    @classmethod
    def load(cls, workdir, config: str = "3d_fullres", fold: str | int | Sequence | None = "0", **options) -> Predictor:
        """`options` are ModelSpec fields (checkpoint, tta, step, batch_size, device, accumulate)."""
        checkpoint = options.get("checkpoint", "final")
        run_dirs = find_model(workdir, config, fold, checkpoint)
        return cls.from_spec(ModelSpec(run_dirs=tuple(str(r) for r in run_dirs), **options))

    @property
    def num_channels(self) -> int:
        return len(self.plans.channels)

    def store_probabilities(self, image: np.ndarray, progress: bool = False):
        """Sliding-window probabilities of a preprocessed image (store frame, padded)."""
        s = self.spec
        return sliding_window_predict(self.network, image, self.config.patch_size, self.label_map.num_outputs,
                                      step=s.step, tta_mirror=s.tta, batch_size=s.batch_size, device=self.device,
                                      accumulate=s.accumulate, progress=progress, amp=s.amp,
                                      nonlinearity=self.label_map.nonlinearity, lanes=s.lanes)

    def stream_probabilities(self, images: Iterable[tuple[object, np.ndarray]], progress: bool = False):
        """(key, probabilities) per (key, preprocessed image), in order; the windows of consecutive
        images share forward batches (`sliding_window_stream`)."""
        s = self.spec
        return sliding_window_stream(self.network, images, self.config.patch_size, self.label_map.num_outputs,
                                     step=s.step, tta_mirror=s.tta, batch_size=s.batch_size, device=self.device,
                                     accumulate=s.accumulate, progress=progress, amp=s.amp,
                                     nonlinearity=self.label_map.nonlinearity, lanes=s.lanes)


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | None) -> str:
    """'auto' / None: CUDA when torch sees a GPU, else CPU; 'cuda' without a GPU is an error saying so."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                            "use --device cpu or auto")
    try:
        return str(torch.device(device))
    except RuntimeError as exc:
        raise BadInputError(f"--device {device!r} is not a device ({', '.join(DEVICES)}, cuda:N)") from exc


def _load_rule(run_dirs: Sequence[str]):
    """The post-processing rule beside the model; an ensemble uses one only when every fold agrees."""
    from pipeline.inference.postprocessing import PostprocessingRule

    rules = []
    for run_dir in run_dirs:
        path = as_path(run_dir) / POSTPROCESSING_FILE
        if not path.is_file():
            return None
        rules.append(PostprocessingRule.load(path))
    steps = {(r.labels, r.keep_largest_foreground, r.keep_largest_per_class) for r in rules}
    if len(steps) != 1:
        log.info("the folds' post-processing rules differ: the ensemble is not post-processed")
        return None
    return rules[0]


# ---------------------------------------------------------------- one case


def input_dataset(plans, root: Path, cases: Sequence = ()):
    """A `Dataset` describing prediction inputs, so `read_case` checks and reads them like training data."""
    from pipeline.data.dataset import Dataset

    return Dataset(root=as_path(root), name=plans.dataset_name, layout="predict", channels=tuple(plans.channels),
                   labels={int(k): v for k, v in plans.labels.items()}, cases=tuple(cases))


@dataclass
class PreparedCase:
    """One case read and preprocessed, waiting for the network: what `finish_case` needs to undo the
    preprocessing and write the result in the input's own geometry."""

    case_id: str
    image: np.ndarray  # (C, *store frame, padded) float32
    meta: object  # preprocessing.CaseMeta
    geometry: object  # data.nifti.Geometry of the input
    reference: Path | None  # the first input file (its header is reused on writing)


def prepare_case(predictor: Predictor, case) -> PreparedCase:
    """Read a `CaseFiles` (or take a loaded `CaseData`) and preprocess it with the model's plans."""
    from pipeline.data.dataset import CaseData, read_case
    from pipeline.preprocessing.preprocess import preprocess_case

    reference = None
    if not isinstance(case, CaseData):
        reference = case.images[0]
        case = read_case(input_dataset(predictor.plans, as_path(reference).parent, [case]), case, with_label=False)
    if case.image.shape[0] != predictor.num_channels:
        raise BadInputError(f"image has {case.image.shape[0]} channel(s); the model expects {predictor.num_channels}",
                            case.case_id)
    case = dataclasses.replace(case, label=None)
    pre = preprocess_case(case, predictor.plans, predictor.config_name, predictor.label_map)
    image = pre.image
    if predictor.previous is not None:  # a cascade: the previous stage's segmentation as extra channels
        from pipeline.inference.cascade import cascade_input

        image = cascade_input(predictor.previous, case, pre.meta, image, predictor.config.anisotropy_threshold)
    return PreparedCase(case.case_id, image, pre.meta, case.geometry, reference)


def finish_case(predictor: Predictor, prepared: PreparedCase, store_probs, output_path: str | os.PathLike | None = None,
                save_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Store-frame probabilities -> (label in the input file's voxel order, probabilities on the RAS
    grid or None); written to `output_path` (and CASE.npz) atomically when given."""
    from pipeline.data.nifti import from_ras
    from pipeline.inference.export import restore_label, restore_probabilities, write_prediction
    from pipeline.inference.postprocessing import apply_postprocessing

    meta, label_map = prepared.meta, predictor.label_map
    probabilities = None
    if save_probabilities or isinstance(store_probs, np.ndarray):
        # the process's torch threads are its share of the cores (Ray actors: cores // actors)
        probabilities = restore_probabilities(np.asarray(store_probs[...]), meta,
                                              background_channel=not label_map.has_regions,
                                              threads=torch.get_num_threads())
        del store_probs
        label = label_map.probabilities_to_values(probabilities)
    else:  # too large for memory: labels chunk by chunk in the store frame, restore the label only
        label = restore_label(segment_chunked(store_probs, label_map), meta, label_map)
        del store_probs
    if predictor.rule is not None:
        label = apply_postprocessing(label, predictor.rule)
    if output_path is not None:
        output_path = as_path(output_path)
        if save_probabilities:
            save_probabilities_npz(probabilities, label_map, npz_path(output_path))
        write_prediction(label, prepared.geometry, output_path, prepared.reference)
    return from_ras(label, prepared.geometry), probabilities if save_probabilities else None


def predict_case(model, case, output_path: str | os.PathLike | None = None, save_probabilities: bool = False,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One case from raw input to a label map in its own geometry: `prepare_case`, the sliding
    window, `finish_case` (a folder of cases runs the three as a pipeline: `inference.predict`).

    `model` is a run folder (W/runs/<config>/fold_<k>), a ModelSpec or a loaded Predictor; `case`
    a `CaseFiles` (files in the layout of the training data) or a loaded `CaseData`. Returns
    (label, probabilities): the label holds the dataset's own values in the voxel order of the input
    file - the array the written file holds; probabilities (K, *RAS shape) float32 on the original
    grid, or None unless asked for. With `output_path` (CASE plus the input's ending, `prediction_name`)
    the label is written there in the input's grid and header (atomically), and with
    `save_probabilities` also CASE.npz.
    """
    predictor = _as_predictor(model)
    prepared = prepare_case(predictor, case)
    store_probs = predictor.store_probabilities(prepared.image, progress=progress)
    prepared.image = None
    return finish_case(predictor, prepared, store_probs, output_path, save_probabilities)


def _as_predictor(model) -> Predictor:
    if isinstance(model, Predictor):
        return model
    if isinstance(model, ModelSpec):
        return Predictor.from_spec(model)
    return Predictor.from_spec(ModelSpec(run_dirs=(str(model),)))


def segment_chunked(probs, label_map) -> np.ndarray:
    """Store indices from a (Zarr) array of probabilities, one chunk of the spatial axes at a time
    (`LabelMap.probabilities_to_index`: argmax, or regions painted in order)."""
    spatial = probs.shape[1:]
    chunks = getattr(probs, "chunks", probs.shape)[1:]
    out = np.empty(spatial, dtype=label_map.index_dtype)
    for block in itertools.product(*(range(0, s, c) for s, c in zip(spatial, chunks))):
        index = tuple(slice(b, b + c) for b, c in zip(block, chunks))
        out[index] = label_map.probabilities_to_index(probs[(slice(None), *index)])
    return out


def prediction_name(case_id: str, image) -> str:
    """CASE plus the ending of the case's (first) image: a prediction comes back in its input's format."""
    from pipeline.data.files import ending_of

    return f"{case_id}{ending_of(as_path(image).name) or OUTPUT_ENDING}"


def npz_path(output_path: Path) -> Path:
    from pipeline.data.dataset import strip_ending

    return output_path.with_name(strip_ending(output_path.name) + ".npz")


def save_probabilities_npz(probabilities: np.ndarray, label_map, path: Path) -> None:
    """CASE.npz: `probabilities` (K, *RAS shape) float16 on the original grid and `nonlinearity`.
    Softmax: `labels` the value of each channel. Regions (sigmoid, channels independent): `regions`
    the name of each channel, `labels` the value it paints (`regions_class_order`), `region_values`
    (K, max members) each region's label values padded with -1. `LabelMap.probabilities_to_values`
    turns an (averaged) array back into labels. Written under a temporary name, then renamed."""
    extra = {}
    if label_map.has_regions:
        width = max(len(r.values) for r in label_map.regions)
        extra = {"regions": np.asarray([r.name for r in label_map.regions]),
                 "region_values": np.asarray([list(r.values) + [-1] * (width - len(r.values))
                                              for r in label_map.regions], dtype=np.int32)}
        labels = label_map.regions_class_order
    else:
        labels = label_map.class_values
    with replacing(path, ".npz") as tmp:  # numpy appends .npz to a name without it
        np.savez_compressed(tmp, probabilities=probabilities.astype(np.float16),
                            labels=np.asarray(labels, dtype=np.int32),
                            nonlinearity=np.asarray(label_map.nonlinearity), **extra)


@dataclass
class CaseResult:
    case_id: str
    ok: bool
    seconds: float = 0.0
    message: str = ""


def predict_one(predictor: Predictor, case, output_dir: str | os.PathLike, save_probabilities: bool,
                progress: bool = False) -> CaseResult:
    """Predict and write one case; bad input comes back as a failed result naming the case."""
    start = time.perf_counter()
    try:
        predict_case(predictor, case, as_path(output_dir) / prediction_name(case.case_id, case.images[0]),
                     save_probabilities, progress)
    except BadInputError as exc:
        return CaseResult(case.case_id, False, time.perf_counter() - start, "; ".join(p.message for p in exc.problems))
    except MemoryError:
        return CaseResult(case.case_id, False, time.perf_counter() - start, "out of memory predicting this case")
    return CaseResult(case.case_id, True, time.perf_counter() - start)
