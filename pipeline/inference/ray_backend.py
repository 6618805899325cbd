"""Cases spread over Ray workers: an ActorPool of predictors, each loading the model once.

Thin wiring over `inference.case_pipeline.predict_cases`: the actors start once per folder; each
builds a `Predictor` from the picklable `ModelSpec` once and is streamed chunks of cases, which it
runs through its own pipeline (reading, network and export overlapped, windows of consecutive cases
batched), reading the files and writing the outputs itself, so only (absolute) file paths and
small results travel. Actors may run on other machines: every node must see the model folders,
the input files and the output folder at the same paths (checked on each node before the actors
start, `parallel.check_ray_nodes_see`). An already-initialised Ray (a session, a test fixture) is
reused as it is; otherwise Ray is started on 127.0.0.1 without a dashboard (or joined at
`ray_address`) and shut down afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.console import progress_bar
from pipeline.inference.case_pipeline import StageSeconds, predict_cases
from pipeline.inference.predictor import (
    CaseResult,
    ModelSpec,
    Predictor,
)
from pipeline.parallel import (
    SharedPath,
    assigned_cpus,
    check_ray_nodes_see,
    cpu_count,
    ray_session,
    wait_for_resources,
    whereami,
)
from pipeline.storage import absolute

log = logging.getLogger("segpipe.predict")


class _PredictorActor:
    """One model in one worker process; torch keeps to the CPU share Ray gave the actor."""

    def __init__(self, spec: ModelSpec):
        import torch

        torch.set_num_threads(assigned_cpus())
        self.predictor = Predictor.from_spec(spec)

    def where(self) -> dict:
        return whereami()

    def predict(self, cases: list, output_dir: str, save_probabilities: bool) -> tuple[list[CaseResult], dict]:
        """A chunk of cases through this actor's pipeline: (one result per case, seconds per stage)."""
        stages = StageSeconds()
        try:
            results = predict_cases(self.predictor, cases, output_dir, save_probabilities, isolate=True, stages=stages)
        except Exception as exc:  # noqa: BLE001 - one line naming each case; the other chunks go on
            results = [CaseResult(c.case_id, False, 0.0, f"{type(exc).__name__}: {exc}") for c in cases]
        return results, stages.to_json()


def chunk_cases(cases: Sequence, workers: int, most: int = 8) -> list[list]:
    """Cases in chunks for the actors: about three per worker (so a slow chunk does not hold the
    end back), at most `most` cases each (a chunk's results come back together)."""
    size = max(1, min(most, math.ceil(len(cases) / (3 * workers))))
    return [list(cases[i:i + size]) for i in range(0, len(cases), size)]


def predict_cases_ray(spec: ModelSpec, cases: Sequence, output_dir: str | Path, save_probabilities: bool,
                      num_workers: int | None, ray_address: str | None, progress: bool, use_gpu: bool | None = None,
                      cpus_per_worker: int | None = None, resources_timeout_s: float = 600.0,
                      stages: StageSeconds | None = None) -> tuple[list[CaseResult], int]:
    """Predict `cases` (CaseFiles) on an ActorPool; returns the per-case results and the worker count.

    Each actor asks for `cpus_per_worker` CPUs (and a GPU with `use_gpu`; None: GPUs if the cluster
    has some now) and the pool waits up to `resources_timeout_s` for the cluster to provide them.
    """
    import ray
    from ray.util import ActorPool

    # the actors may run in another folder or on another machine: absolute paths only
    output_dir = absolute(output_dir)
    cases = [dataclasses.replace(c, images=tuple(absolute(p) for p in c.images),
                                 label=absolute(c.label) if c.label else None) for c in cases]
    local_ray = not ray_address and not ray.is_initialized()
    with ray_session(ray_address, num_cpus=max(num_workers or 1, cpu_count())):
        resources = ray.cluster_resources()
        cpus_now, gpus_now = int(resources.get("CPU", 0)), resources.get("GPU", 0.0)
        if use_gpu is None:
            use_gpu = (spec.device or "").startswith("cuda") or (bool(gpus_now) and not (spec.device or "").startswith("cpu"))
        if num_workers:
            workers = num_workers
        elif local_ray or cpus_now:
            workers = max(1, int(gpus_now) if use_gpu else cpus_now // (cpus_per_worker or 1))
        else:
            workers = 1  # nothing up yet (an autoscaled cluster): one worker, waited for below
        workers = max(1, min(len(cases), workers))
        cpus = cpus_per_worker or (max(1, cpus_now // workers) if local_ray else 1)
        options: dict = {"num_cpus": cpus}
        if use_gpu:  # share the GPUs there are; with none up yet, ask for one each
            options["num_gpus"] = min(1.0, gpus_now / workers) if gpus_now else 1.0
        wait_for_resources({"CPU": cpus, "GPU": options.get("num_gpus", 0)}, workers, resources_timeout_s,
                           f"{workers} prediction worker(s)")
        inputs = sorted({str(p.parent) for c in cases for p in c.images})
        check_ray_nodes_see([*(SharedPath("model folder", d) for d in spec.run_dirs),
                             *(SharedPath("input folder", d) for d in inputs),
                             SharedPath("output folder", str(output_dir), "write")])
        actor_cls = ray.remote(_PredictorActor).options(**options)
        actors = [actor_cls.remote(spec) for _ in range(workers)]
        try:
            places = ray.get([a.where.remote() for a in actors])
            log.info("predicting %d case(s) on %d Ray worker(s) on %d node(s)", len(cases), workers,
                     len({p.get("node_id") for p in places}))
            pool = ActorPool(actors)
            results = []
            with progress_bar(len(cases), progress, desc=f"predict ({workers} Ray workers)", unit="case") as bar:
                for chunk_results, chunk_stages in pool.map_unordered(
                        lambda actor, chunk: actor.predict.remote(chunk, str(output_dir), save_probabilities),
                        chunk_cases(cases, workers)):
                    results.extend(chunk_results)
                    if stages is not None:
                        stages.add(StageSeconds(**chunk_stages))
                    bar.update(len(chunk_results))
        finally:
            for actor in actors:
                ray.kill(actor)
    return results, workers
