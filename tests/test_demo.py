"""What a new user meets first: `segpipe demo` runs every stage and leaves a report that renders.

One real end-to-end run through the installed command line (a subprocess, as a user would start
it), with a tiny training budget: it checks the workdir layout of the CLI contract, the
`summary.json` schema, that re-running skips every finished stage, and that `report/index.html`
renders in headless Chromium with every picture loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEMO = ["demo", "--cases", "8", "--epochs", "1", "--iterations-per-epoch", "3", "--no-tta", "--workers", "2"]


def segpipe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    wd = tmp_path_factory.mktemp("demo") / "work"
    result = segpipe(*DEMO, "--workdir", str(wd))
    assert result.returncode == 0, result.stderr[-3000:]
    return wd, result


def test_demo_leaves_the_contracted_workdir_layout(demo_workdir):
    wd, _ = demo_workdir
    for name in ("fingerprint.json", "plans.json", "splits.json", "store.zarr", "logs", "report/index.html"):
        assert (wd / name).exists(), name
    plans = json.loads((wd / "plans.json").read_text())
    for key in ("patch_size", "batch_size", "spacing", "kernel_sizes", "strides", "features_per_stage",
                "normalization_schemes"):
        assert plans["configurations"]["3d_fullres"][key] is not None, key
    run = wd / "runs" / "3d_lean" / "fold_0"
    for name in ("model_final.pt", "model_best.pt", "plans.json", "metrics.csv", "training_curves.png"):
        assert (run / name).is_file(), name


def test_demo_scores_follow_the_summary_schema(demo_workdir):
    wd, _ = demo_workdir
    summary = json.loads((wd / "evaluation" / "3d_lean_fold0" / "summary.json").read_text())
    assert set(summary) >= {"labels", "mean", "foreground_mean", "cases"}
    assert summary["labels"] == {"1": "organ", "2": "lesion"}
    assert set(summary["mean"]) == {"1", "2"} and set(summary["foreground_mean"]) >= {"dice", "iou"}
    for case in summary["cases"]:
        assert set(case) >= {"case", "metrics"}
        for metrics in case["metrics"].values():
            assert set(metrics) >= {"dice", "iou", "tp", "fp", "fn", "hd95"}
    predicted = sorted(p.name for p in (wd / "predictions" / "3d_lean_fold0").glob("*.nii.gz"))
    assert predicted == sorted(f"{c['case']}.nii.gz" for c in summary["cases"])


def test_rerunning_the_demo_skips_every_finished_stage(demo_workdir):
    wd, _ = demo_workdir
    model = wd / "runs" / "3d_lean" / "fold_0" / "model_final.pt"
    mtime = model.stat().st_mtime_ns
    again = segpipe(*DEMO, "--workdir", str(wd))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds the final model, skipped" in again.stderr
    assert model.stat().st_mtime_ns == mtime
    assert "preprocessed 0 case(s)" in again.stderr and "8 already complete" in again.stderr, again.stderr[-2000:]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(demo_workdir, tmp_path):
    wd, _ = demo_workdir
    report = wd / "report"
    images = re.findall(r'<img[^>]+src="([^"]+)"', (report / "index.html").read_text())
    assert {"dice_boxplot.png", "training_curves.png"} <= set(images)
    assert any(name.startswith("overlay_") for name in images)
    # a copy of the page that records, once loaded, how many of its images actually decoded
    probe = report / "_probe.html"
    probe.write_text((report / "index.html").read_text().replace(
        "</body>", '<script>addEventListener("load",()=>{const i=[...document.images];'
        'document.body.dataset.loaded=i.filter(x=>x.complete&&x.naturalWidth>0).length+"/"+i.length})</script></body>'))
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    probe.unlink()
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-500:]
    assert loaded.group(1) == loaded.group(2) == str(len(images))
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}", "--window-size=1200,2000",
                    (report / "index.html").as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
