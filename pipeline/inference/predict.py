"""A folder of cases predicted into a folder of label maps: inputs grouped into cases, cases already
written skipped (resume), the rest in this process or streamed over Ray actors (`ray_backend`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.console import progress_bar
from pipeline.data.files import image_files, split_channel
from pipeline.errors import BadInputError, Problem
from pipeline.inference.case_pipeline import StageSeconds, predict_cases
from pipeline.inference.predictor import (
    ModelSpec,
    Predictor,
    available_folds,
    find_model,
    npz_path,
    parse_folds,
    prediction_name,
)
from pipeline.precision import amp_for, precision_name
from pipeline.storage import absolute, as_path, is_url
from pipeline.workdir import Workdir

log = logging.getLogger("segpipe.predict")

# ---------------------------------------------------------------- a folder of cases


def group_input_files(input_dir: str | os.PathLike, num_channels: int, channel_names: Sequence[str] = ()):
    """Group INPUT_DIR's images (any format `data.images` reads) into cases, each with the model's channel count.

    `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... are one case's channels (nnU-Net v2); any other
    `CASE.nii.gz` is a case on its own (MSD: one channel, or a 4D file with channels last). Every
    problem is collected and raised together as a BadInputError naming the cases.
    """
    from pipeline.data.dataset import CaseFiles, strip_ending
    from pipeline.data.images import open_image

    folder = as_path(input_dir)
    if not folder.is_dir():
        raise BadInputError(f"input folder {folder} does not exist")
    files = image_files(folder)
    if not files:
        raise BadInputError(f"input folder {folder} holds no images (.nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr "
                            "or .dcm series folders)")
    groups: dict[str, dict[int, Path]] = {}
    singles: dict[str, Path] = {}
    problems = []
    seen: dict[str, Path] = {}
    for path in files:
        stem = strip_ending(path.name)
        if stem in seen:  # scan.mha beside scan.nii.gz: which one is the case?
            problems.append(Problem(split_channel(stem)[0] if split_channel(stem) else stem,
                                    f"{seen[stem].name} and {path.name} are two images of one name: keep one"))
            continue
        seen[stem] = path
        channel = split_channel(stem)
        if channel:
            groups.setdefault(channel[0], {})[channel[1]] = path
        else:
            singles[stem] = path
    for base in [b for b, chans in groups.items() if 0 not in chans]:  # e.g. "scan_2019.nii.gz": not a channel
        for c, path in groups.pop(base).items():
            singles[strip_ending(path.name)] = path

    expected = f"{num_channels} channel(s)" + (f" ({', '.join(channel_names)})" if channel_names else "")
    cases = []
    for case_id in sorted(set(groups) | set(singles)):
        if case_id in groups and case_id in singles:
            problems.append(Problem(case_id, f"both {singles[case_id].name} and per-channel files {case_id}_XXXX exist"))
            continue
        if case_id in groups:
            chans = groups[case_id]
            if sorted(chans) != list(range(num_channels)):
                found = ", ".join(p.name for _, p in sorted(chans.items()))
                problems.append(Problem(case_id, f"has channel files {found}; the model expects {expected}: "
                                                 f"{', '.join(f'{case_id}_{c:04d}' for c in range(num_channels))}"))
                continue
            cases.append(CaseFiles(case_id, tuple(chans[c] for c in range(num_channels)), None))
            continue
        path = singles[case_id]
        try:
            shape = open_image(path, case_id).shape
        except BadInputError as exc:
            problems.extend(exc.problems)
            continue
        found = 1 if len(shape) == 3 else shape[3] if len(shape) == 4 else None
        if len(shape) < 3 or found is None:
            problems.append(Problem(case_id, f"{path.name} has shape {tuple(shape)}; expected a 3D volume or 4D with channels last"))
        elif found != num_channels:
            problems.append(Problem(case_id, f"{path.name} has {found} channel(s) (shape {tuple(shape)}); the model expects {expected}"))
        else:
            cases.append(CaseFiles(case_id, (path,), None, four_d=num_channels > 1))
    if problems:
        raise BadInputError(problems)
    return cases


@dataclass
class PredictReport:
    """What `predict_folder` did."""

    output_dir: str
    config: str
    folds: list[str]
    tta: bool
    workers: int
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already written before this run (resume)
    failed: list[dict] = field(default_factory=list)  # {"case", "message"}
    seconds_per_case: dict[str, float] = field(default_factory=dict)  # reading started -> written (cases overlap)
    seconds: float = 0.0
    device: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)  # case_pipeline.StageSeconds, summed over workers
    precision: str = ""  # of the forward passes: "float32", "mixed (bfloat16)", "mixed (float16)"; Ray: as asked

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        per = [self.seconds_per_case[c] for c in self.predicted]
        # cases overlap (reading, the network and writing run side by side), so the throughput and one
        # case's time from read to write are different numbers: say both
        mean = (f" ({self.seconds / len(per):.2f}s per case; each case {np.mean(per):.1f}s from reading to written)"
                if per else "")
        lines = [f"predicted {len(self.predicted)} case(s) with {self.config} fold {','.join(self.folds)}"
                 f"{' (mirroring TTA)' if self.tta else ''}{f', {self.precision}' if self.precision else ''}"
                 f" -> {self.output_dir} in {self.seconds:.1f}s{mean}; "
                 f"{len(self.skipped)} already there, {len(self.failed)} failed"]
        lines.extend(f"  failed {f['case']}: {f['message']}" for f in self.failed)
        return "\n".join(lines)


def _is_done(output_dir: Path, case, save_probabilities: bool) -> bool:
    out = output_dir / prediction_name(case.case_id, case.images[0])  # written last: it marks the case complete
    return out.exists() and (not save_probabilities or npz_path(out).is_file())


def predict_folder(workdir, input_dir, output_dir, config: str = "3d_fullres", fold: str | int | Sequence | None = None,
                   tta: bool = True, save_probabilities: bool = False, num_workers: int | None = None,
                   ray_address: str | None = None, progress: bool = True, checkpoint: str = "final",
                   step: float = 0.5, batch_size: int | None = None, device: str | None = None,
                   postprocess: bool = True, use_gpu: bool | None = None, cpus_per_worker: int | None = None,
                   resources_timeout_s: float = 600.0, precision: str = "auto") -> PredictReport:
    """Predict every case of INPUT_DIR into OUTPUT_DIR/CASE.<the input's ending>, skipping cases already written.

    The cases run as a pipeline (`case_pipeline`): reading the next cases and exporting the previous
    ones overlap with the network, whose batches take windows of consecutive cases. `device`: "cpu",
    "cuda" (window logits accumulated on the GPU, mixed precision) or None / "auto" (CUDA when there
    is one). `precision` (`pipeline.precision.PRECISIONS`): "auto" runs the convolutions in mixed precision
    where the hardware computes it itself (CUDA; a CPU with bfloat16 instructions), "fp32" never,
    "mixed" always. Several folds ('0,1,2') average their probabilities; `fold=None` uses every fold with a model, as
    nnUNetv2_predict does (`predictor.available_folds`). The post-processing rule beside the model
    (decided by `segpipe evaluate-cv`) is applied unless `postprocess` is False. With `num_workers` > 1 or a `ray_address`
    the cases are spread over Ray workers, each loading the model once (`pipeline.inference.ray_backend`);
    otherwise they run one after another in this process. Cases with bad input are reported and the
    others still written; the run then ends with a BadInputError listing them (exit 2).
    """
    from pipeline.planning.plans import Plans

    start = time.perf_counter()
    wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
    input_dir, output_dir = absolute(input_dir), absolute(output_dir)
    # the output folder, or its nearest existing parent, must be a folder: a file there is the user's to move
    blocked = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise BadInputError(f"output folder {output_dir} cannot be made: "
                            f"{'it' if blocked == output_dir else blocked} is an existing file, not a folder")
    folds = parse_folds(fold) if fold is not None else available_folds(wd, config, checkpoint)  # nnU-Net's default
    run_dirs = find_model(wd, config, folds, checkpoint)
    if str(input_dir).rstrip("/") == str(output_dir).rstrip("/") or (
            not is_url(output_dir) and output_dir.exists() and input_dir.exists() and output_dir.resolve() == input_dir.resolve()):
        raise BadInputError("the output folder must differ from the input folder (predictions would mix with images)")
    plans = Plans.load(run_dirs[0] / "plans.json")
    previous = plans.configuration(config).previous_stage
    if previous is not None:  # a cascade runs its previous stage first: its folds must be trained too
        from pipeline.inference.cascade import previous_stage_run_dirs

        previous_stage_run_dirs(run_dirs, previous, checkpoint)
    cases = group_input_files(input_dir, len(plans.channels), plans.channels)
    if use_gpu is False and device in (None, "auto"):
        device = "cpu"
    elif use_gpu is False and str(device).startswith("cuda"):
        raise BadInputError(f"--device {device} contradicts --cpu: choose one")
    use_ray = bool(ray_address) or (num_workers or 1) > 1
    if not use_ray:  # checked here, before any work; Ray actors resolve "auto" on their own node
        from pipeline.inference.predictor import resolve_device

        device = resolve_device(device)
    amp = amp_for(precision)
    spec = ModelSpec(run_dirs=tuple(str(r) for r in run_dirs), checkpoint=checkpoint, tta=tta, step=step,
                     batch_size=batch_size, device=device, postprocess=postprocess, amp=amp)
    report = PredictReport(str(output_dir), config, folds, tta, workers=1, device=str(device or "auto"),
                           precision=precision_name(amp, device) if not use_ray else precision)
    report.skipped = [c.case_id for c in cases if _is_done(output_dir, c, save_probabilities)]
    todo = [c for c in cases if c.case_id not in set(report.skipped)]
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = StageSeconds()
    if todo and use_ray:
        from pipeline.inference.ray_backend import predict_cases_ray

        results, report.workers = predict_cases_ray(spec, todo, output_dir, save_probabilities, num_workers,
                                                    ray_address, progress, use_gpu, cpus_per_worker,
                                                    resources_timeout_s, stages=stages)
    elif todo:
        predictor = Predictor.from_spec(spec)
        with progress_bar(len(todo), progress and len(todo) > 1, desc="predict", unit="case") as bar:
            results = predict_cases(predictor, todo, output_dir, save_probabilities, on_result=lambda r: bar.update(),
                                    progress_windows=progress and len(todo) == 1, stages=stages)
    else:
        results = []
    report.stage_seconds = stages.to_json()
    order = {c.case_id: i for i, c in enumerate(todo)}
    for r in sorted(results, key=lambda r: order[r.case_id]):
        if r.ok:
            report.predicted.append(r.case_id)
            report.seconds_per_case[r.case_id] = round(r.seconds, 3)
        else:
            report.failed.append({"case": r.case_id, "message": r.message})
    report.seconds = time.perf_counter() - start
    log.debug("%s", report)
    if report.failed:
        from pipeline.errors import Problem

        raise BadInputError([Problem(f["case"], f["message"]) for f in report.failed])
    return report
