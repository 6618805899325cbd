"""benchmarks/gpu_suite.sh runs with a given interpreter (PYTHON=, e.g. a GPU image's python3 with the
project's dependencies carried as wheels on PYTHONPATH) instead of a venv, and says at once, before any
step, what that interpreter lacks. Stand-in interpreters make these checks take no time; the real
suite's Python side is the `--device cpu --tiny` smoke run. Its results are read with care: a training
step whose loss was not finite is flagged, never a headline figure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def run_suite(tmp_path: Path, python: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), "--device", "cpu", "--tiny"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHON=python, SEGPIPE_BENCH_RESULTS=str(tmp_path / "results"), **env))


def stand_in_python(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def test_an_interpreter_that_does_not_exist_is_refused_with_exit_2(tmp_path):
    result = run_suite(tmp_path, str(tmp_path / "no-such-python"))
    assert result.returncode == 2
    assert "no-such-python is not an interpreter" in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_missing_package_is_named_before_any_step_runs_and_no_venv_is_made(tmp_path):
    seen = tmp_path / "pythonpath.txt"
    python = stand_in_python(tmp_path / "python", f'echo "$PYTHONPATH" > {seen}\n'
                             "echo \"ModuleNotFoundError: No module named 'zarr'\" >&2\nexit 1\n")
    result = run_suite(tmp_path, str(python), PYTHONPATH="/carried/wheels")
    assert result.returncode == 1
    assert "No module named 'zarr'" in result.stderr
    assert "put them on PYTHONPATH" in result.stderr
    assert "creating it" not in result.stdout + result.stderr  # the given interpreter is used as it is
    assert "training step" not in result.stdout  # nothing ran
    # the repository first, then what the caller carried
    assert seen.read_text().strip().split(os.pathsep) == [str(REPO), "/carried/wheels"]


def load_benchmark(name: str):
    """A benchmarks/ script as a module (they import `harness` by name, so benchmarks/ goes on the path)."""
    if f"benchmarks_{name}" in sys.modules:
        return sys.modules[f"benchmarks_{name}"]
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def gpu_step_row(impl: str, variant: str, samples_per_s: float, loss: float | None) -> dict:
    spread = {"n": 6, "median": samples_per_s, "min": samples_per_s, "max": samples_per_s, "q1": samples_per_s,
              "q3": samples_per_s}
    return {"impl": impl, "variant": variant, "batch": 7, "threads": 2, "device": "cuda", "s_per_step": 7 / samples_per_s,
            "samples_per_s": samples_per_s, "samples_per_cpu_s": samples_per_s, "samples_per_s_spread": spread,
            "samples_per_cpu_s_spread": spread, "first_step_s": 3.0, "steps_timed": 60, "loss_first": loss,
            "loss_last": loss, "gpu": "NVIDIA H200", "interleaved": True}


def comparison(variant: str, ratio: float) -> dict:
    s = {"n": 6, "median": ratio, "min": ratio, "max": ratio, "q1": ratio, "q3": ratio}
    return {"variant": variant, "batch": 7, "threads": 2, "device": "cuda", "rounds": 6, "steps_per_turn": 10,
            "load_before": [0.3, 0.1, 0.0], "load_after": [0.7, 0.2, 0.1],
            "versus": [{"impl": "nnunet", "variant": variant, "rounds": 6, "ratio_samples_per_s": s,
                        "ratio_samples_per_cpu_s": s, "ratios_wall": [ratio] * 6, "ratios_cpu": [ratio] * 6}]}


def test_a_training_step_whose_loss_overflowed_is_flagged_and_kept_out_of_the_headline(tmp_path, monkeypatch):
    # what the first H200 run showed: nnU-Net's Dice summed float16 probabilities outside autocast -> NaN,
    # and GradScaler skipped every optimizer step (the JSON stores the NaN as null)
    train_step, run_all = load_benchmark("train_step"), load_benchmark("run_all")
    result = {"benchmark": "gpu_train_step", "device": "cuda", "plan_source": "test plan",
              "plan": {"patch_size": [40, 56, 40], "features_per_stage": [32, 64, 128, 256], "strides": [[1, 1, 1]] * 4},
              "machine": {"cores": 16, "cpu_model": "x", "memory_gib": 125.8, "gpus": ["NVIDIA H200"],
                          "load_before": [0.3, 0.1, 0.0], "date": "2026-12-04 10:46 UTC", "torch": "2.11.0",
                          "native_bf16": True},
              "runs": [gpu_step_row("seg-pipeline", "fp32", 317.8, 2.06), gpu_step_row("nnunet", "fp32", 325.1, 1.0),
                       gpu_step_row("seg-pipeline", "amp", 408.5, 2.06), gpu_step_row("nnunet", "amp", 383.2, None)],
              "comparisons": [comparison("fp32", 0.97), comparison("amp", 1.08)], "augmentation": []}
    assert train_step.loss_problem(result["runs"][3]) and not train_step.loss_problem(result["runs"][1])
    lines = train_step.markdown(result).splitlines()
    assert "loss not finite" in next(line for line in lines if line.startswith("| nnunet | amp |"))
    assert "not comparable" in next(line for line in lines if line.startswith("| ours amp | nnU-Net amp |"))
    assert "not comparable" not in next(line for line in lines if line.startswith("| ours fp32 | nnU-Net fp32 |"))

    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    (tmp_path / "gpu_train_step.json").write_text(json.dumps(result))
    rows = [r for r in run_all.headline_rows() if "H200" in r[0]]
    assert [r[0] for r in rows] == [
        "Training step on NVIDIA H200 (fp32, batch 7, interleaved with nnU-Net), samples/s",
        "Training step on NVIDIA H200 (best variant: amp, batch 7), samples/s"]  # no amp-vs-nnU-Net row
    assert rows[0][1:4] == ("317.8", "325.1", "0.97x (median of 6 interleaved rounds)")
    assert rows[1][1:4] == ("408.5", "–", "–")
