"""benchmarks/gpu_suite.sh runs with a given interpreter (PYTHON=, e.g. a GPU image's python3 with the
project's dependencies carried as wheels on PYTHONPATH) instead of a venv, and says at once, before any
step, what that interpreter lacks. Stand-in interpreters make these checks take no time; the real
suite's Python side is the `--device cpu --tiny` smoke run."""

from __future__ import annotations

import os
import subprocess
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
