"""Cases through one loaded model as a pipeline: reading and preprocessing the next cases (a thread)
and exporting the previous ones (another) overlap with the network on the current one.

    reader thread: prepare_case ──(queue, `prefetch` cases)──> this thread: sliding_window_stream
        ──> export thread: finish_case (at most `max_exports` cases waiting) ──> CASE.nii.gz

The network's batches take windows (and mirrored copies) from consecutive cases, so a folder of
small cases fills them. Memory stays bounded: at most `prefetch` preprocessed cases wait, the
cases whose windows are in the current batch are open, and `max_exports` wait for export. Outputs
are written (in the input's format) atomically by `finish_case`, so a stopped run leaves whole files only and resumes.
The same function serves in-process prediction and each Ray actor (`ray_backend`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.errors import BadInputError
from pipeline.inference.predictor import (
    OUTPUT_ENDING,
    CaseResult,
    Predictor,
    PreparedCase,
    finish_case,
    prediction_name,
    prepare_case,
)
from pipeline.storage import as_path


@dataclass
class StageSeconds:
    """Seconds spent per pipeline stage (summed over cases; the stages overlap, so they may add up
    to more than the wall time): where a folder's time went."""

    read_preprocess: float = 0.0  # reader thread
    network: float = 0.0  # this thread, sliding windows (forward passes, accumulation, softmax)
    export_write: float = 0.0  # export thread: resample back, argmax, post-processing, NIfTI write
    waiting_for_input: float = 0.0  # the network idle, waiting for the reader
    waiting_for_export: float = 0.0  # the network idle, `max_exports` cases waiting for the export thread
    cases: int = 0

    def add(self, other: StageSeconds) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class _Failed:
    case_id: str
    error: BaseException


@dataclass
class _Tracker:
    """Per-case start times and results, shared by the three threads (dict updates are atomic)."""

    started: dict[str, float] = field(default_factory=dict)
    results: dict[str, CaseResult] = field(default_factory=dict)


_END = object()


def failure_message(exc: BaseException) -> str | None:
    """The one-line message of a per-case failure, or None for an error that is not the case's fault."""
    if isinstance(exc, BadInputError):
        return "; ".join(p.message for p in exc.problems)
    if isinstance(exc, MemoryError):
        return "out of memory predicting this case"
    return None


def predict_cases(predictor: Predictor, cases: Sequence, output_dir, save_probabilities: bool = False,
                  on_result: Callable[[CaseResult], None] | None = None, isolate: bool = False,
                  prefetch: int = 2, max_exports: int = 2, progress_windows: bool = False,
                  stages: StageSeconds | None = None) -> list[CaseResult]:
    """Predict `cases` (CaseFiles) into OUTPUT_DIR/CASE.<the input's ending>; one CaseResult per case, in order.

    Bad input (and running out of memory) fails that case only; with `isolate` any error of a
    case's reading or export does (Ray actors: the other cases go on). `on_result` is called as
    each case is written (progress). `stages`, when given, accumulates the seconds per stage.
    """
    output_dir = as_path(output_dir)
    total, stages = stages, StageSeconds()
    track = _Tracker()
    prepared_q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                prepared_q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for case in cases:
                if stop.is_set():
                    return
                t = track.started[case.case_id] = time.perf_counter()
                try:
                    item = prepare_case(predictor, case)
                except Exception as exc:  # noqa: BLE001 - classified by the network thread
                    item = _Failed(case.case_id, exc)
                stages.read_preprocess += time.perf_counter() - t
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the network thread, which raises it
            put(_Failed("", exc))
        finally:
            put(_END)

    def fail(case_id: str, message: str) -> None:
        result = CaseResult(case_id, False, time.perf_counter() - track.started.get(case_id, time.perf_counter()), message)
        track.results[case_id] = result
        if on_result is not None:
            on_result(result)

    def prepared_stream() -> Iterator[tuple[PreparedCase, object]]:
        while True:
            t = time.perf_counter()
            item = prepared_q.get()
            stages.waiting_for_input += time.perf_counter() - t
            if item is _END:
                return
            if isinstance(item, _Failed):
                message = failure_message(item.error)
                if message is None and isolate and item.case_id:
                    message = f"{type(item.error).__name__}: {item.error}"
                if message is None:
                    raise item.error
                fail(item.case_id, message)
                continue
            yield item, item.image

    def export(prepared: PreparedCase, probs) -> CaseResult:
        t = time.perf_counter()
        try:
            name = prediction_name(prepared.case_id, prepared.reference) if prepared.reference is not None else \
                f"{prepared.case_id}{OUTPUT_ENDING}"
            finish_case(predictor, prepared, probs, output_dir / name, save_probabilities)
        except Exception as exc:
            message = failure_message(exc) or (f"{type(exc).__name__}: {exc}" if isolate else None)
            if message is None:
                raise
            return CaseResult(prepared.case_id, False, time.perf_counter() - track.started[prepared.case_id], message)
        finally:
            stages.export_write += time.perf_counter() - t
        return CaseResult(prepared.case_id, True, time.perf_counter() - track.started[prepared.case_id])

    def collect(future: Future) -> None:
        t = time.perf_counter()
        result = future.result()
        stages.waiting_for_export += time.perf_counter() - t
        track.results[result.case_id] = result
        if on_result is not None:
            on_result(result)

    thread = threading.Thread(target=reader, name="segpipe-predict-reader", daemon=True)
    exports: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segpipe-predict-export") as pool:
        thread.start()
        try:
            t = time.perf_counter()
            for prepared, probs in predictor.stream_probabilities(prepared_stream(), progress=progress_windows):
                prepared.image = None  # the network is done with it
                exports.append(pool.submit(export, prepared, probs))
                del probs
                while len(exports) > max_exports:
                    collect(exports.pop(0))
            stages.network += time.perf_counter() - t - stages.waiting_for_input - stages.waiting_for_export
            while exports:
                collect(exports.pop(0))
        finally:
            stop.set()
            for future in exports:
                future.cancel()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                try:
                    prepared_q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)
    stages.cases = len(track.results)
    if total is not None:
        total.add(stages)
    return [track.results[c.case_id] for c in cases if c.case_id in track.results]
