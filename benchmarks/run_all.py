"""Run the benchmark suite, then write benchmarks/results/SUMMARY.md (and optionally the README's results table).

    python benchmarks/run_all.py --quick        # `make bench-quick`: small case counts, one repetition, < 10 min on 2 cores
    python benchmarks/run_all.py                # `make bench`: the full suite (long: includes quality vs nnU-Net)
    python benchmarks/run_all.py --summary-only --readme README.md   # rewrite SUMMARY.md and the README table only

Every benchmark script runs as its own process under benchmarks/harness.py, so the suite table in
SUMMARY.md has the wall time, CPU time and peak RSS (whole process tree) of each script, beside the
load average (the development machine is shared). The scripts write their own results
(benchmarks/results/<name>.{json,md,png}); SUMMARY.md collects the headline figures from those
JSON files, each marked CPU or GPU and dated, so a figure that this run did not refresh shows its age.

nnU-Net side by side: with an nnU-Net v2 interpreter (`--nnunet-venv PATH`; otherwise
benchmarks/.nnunet-venv or ../nnunet_ref/venv when they exist; `--setup-nnunet` creates
benchmarks/.nnunet-venv with one `pip install nnunetv2 torch==2.13.0`) and nnU-Net's raw and
preprocessed hippocampus data (`--nnunet-ref`, default ../nnunet_ref; `--setup-nnunet` also makes
benchmarks/.nnunet-ref with `segpipe convert` + `nnUNetv2_plan_and_preprocess`), the preprocessing and
training-step benchmarks add nnU-Net rows, and the full suite trains both for the same wall-clock
budget (benchmarks/quality_vs_nnunet.py). On a machine with an NVIDIA GPU the full suite also runs
benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

from harness import NNUNET_REF, RESULTS, Run, gpu_names, machine_info, machine_line, md_table, python_env, run_command  # noqa: E402

QUICK_BUDGET_S = 570.0  # --quick must finish in under 10 minutes, summary included
SUMMARY_RESERVE_S = 15.0
NNUNET_VENV_LOCAL = BENCH / ".nnunet-venv"
NNUNET_REF_LOCAL = BENCH / ".nnunet-ref"
QUICK_SUBDIR = "quick"  # make bench-quick writes here (results_dir)
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Context:
    quick: bool
    workdir: Path
    nnunet_python: str | None
    nnunet_ref: Path | None
    quality_budget_min: float


@dataclass
class Step:
    """One benchmark script: its arguments in quick and full mode (None: not run in that mode)."""

    name: str
    script: str
    quick: Callable[[Context], list[str]] | None
    full: Callable[[Context], list[str]] | None
    timeout_quick: float
    timeout_full: float
    needs_workdir: bool = False
    results: tuple[str, ...] = ()  # the result files it writes (default: its name)


def _nn_pre(ctx: Context) -> list[str]:
    return ["--with-nnunet", str(Path(ctx.nnunet_python).parents[1]), "--nnunet-ref", str(ctx.nnunet_ref)] \
        if ctx.nnunet_python and ctx.nnunet_ref else []


def _nn_step(ctx: Context) -> list[str]:
    return ["--nnunet-python", ctx.nnunet_python] if ctx.nnunet_python else []


def _nn_predict(ctx: Context) -> list[str]:
    return ["--nnunet-python", ctx.nnunet_python, "--nnunet-ref", str(ctx.nnunet_ref)] \
        if ctx.nnunet_python and ctx.nnunet_ref else []


def _quality(ctx: Context) -> list[str]:
    args = ["--workdir", str(ctx.workdir), "--budget-min", str(ctx.quality_budget_min)]
    if ctx.nnunet_python and ctx.nnunet_ref:
        return args + ["--nnunet-venv", str(Path(ctx.nnunet_python).parents[1]), "--nnunet-ref", str(ctx.nnunet_ref)]
    return args + ["--skip-nnunet"]


# in the order they run: the figures SUMMARY.md leads with come first, so a quick run that meets a
# busy machine still measures those before its time budget is spent
STEPS = [
    Step("workdir", "loader.py", lambda c: ["--build-only", "--workdir", str(c.workdir), "--cases", "40"],
         lambda c: ["--build-only", "--workdir", str(c.workdir)], 180, 900, results=()),
    Step("preprocess", "preprocess.py",
         lambda c: ["--cases", "40", "--workers", "2", "--synthetic-cases", "0", "--no-in-process"] + _nn_pre(c),
         lambda c: ["--synthetic-cases", "4", "--ct-cases", "20", "--rounds", "2"] + _nn_pre(c), 200, 4 * 3600),
    Step("profile_preprocess", "profile_preprocess.py", None, lambda c: [], 0, 1800),
    Step("train_step", "train_step.py",
         lambda c: ["--variants", "fp32", "--threads", "1", "--min-time", "15", "--max-steps", "2", "--aug-seconds", "0.5",
                    "--budget", "120"] + _nn_step(c),
         lambda c: ["--budget", "600", "--full-batch"] + _nn_step(c), 150, 900),
    Step("loader", "loader.py", lambda c: ["--workdir", str(c.workdir), "--configs", "3d_lean", "--batches", "4",
                                           "--steps", "2"],
         lambda c: ["--workdir", str(c.workdir)], 90, 1200, needs_workdir=True),
    Step("train_memory", "train_memory.py", lambda c: ["--workdir", str(c.workdir), "--sizes", "20,400", "--repeats", "1",
                                                       "--epochs", "1", "--iterations", "2", "--val-iterations", "1"],
         lambda c: ["--workdir", str(c.workdir)], 150, 2400, needs_workdir=True),
    Step("inference", "inference.py", lambda c: ["--cases", "2", "--configs", "3d_lean", "--tta", "off", "--size", "96"],
         lambda c: ["--forward-variants", "fp32,compile"], 90, 1800),
    Step("predict", "predict.py",
         lambda c: ["--cases", "3", "--lean-cases", "3", "--workers", "1,2", "--tta", "off,on", "--ray-tta", "off",
                    "--nnunet-procs", "0", "--size", "0", "--ct-tta", "off"] + _nn_predict(c),
         lambda c: ["--cases", "60", "--lean-cases", "60", "--nnunet-procs", "3,0", "--size", "256"] + _nn_predict(c),
         300, 4 * 3600),
    Step("profile_predict", "profile_predict.py", lambda c: ["--sets", "hippocampus", "--cases", "2", "--whole", "none"],
         lambda c: [], 120, 3600),
    Step("allocator", "allocator.py", None, lambda c: [], 0, 1800),
    Step("network_rate", "network_rate.py", None, lambda c: [], 0, 1200),
    Step("validation_speed", "validation_speed.py", lambda c: ["1"], lambda c: ["5"], 60, 600),
    Step("fingerprint_memory", "fingerprint_memory.py", lambda c: ["20", "60"], lambda c: [], 60, 600),
    Step("scaling", "scaling.py", lambda c: ["--workdir", str(c.workdir), "--cases", "20", "--epochs", "2", "--iterations", "2",
                                             "--memory-sizes", ""],
         lambda c: ["--workdir", str(c.workdir)], 300, 3600, needs_workdir=True),
    Step("codec_choice", "codec_choice.py", lambda c: ["--hippocampus-cases", "10", "--reads", "50", "--repeats", "1"],
         lambda c: [], 60, 1800),
    Step("preprocess_vs_nnunet", "preprocess_vs_nnunet.py", None,
         lambda c: (["--nnunet-python", c.nnunet_python, "--nnunet-preprocessed", str(c.nnunet_ref / "preprocessed")]
                    if c.nnunet_python and c.nnunet_ref else []), 0, 1800),
    Step("quality_vs_nnunet", "quality_vs_nnunet.py", None, _quality, 0, 6 * 3600, needs_workdir=True),
    Step("nnunet_interop", "nnunet_interop.py", None, lambda c: [], 0, 2 * 3600),
    Step("cascade", "cascade.py", None, lambda c: [], 0, 3 * 3600),
]


# ---------------------------------------------------------------- nnU-Net reference environment


def find_nnunet(args) -> tuple[str | None, Path | None, list[str]]:
    """(nnU-Net interpreter, reference data folder, notes); creates them only with --setup-nnunet."""
    notes = []
    venv = args.nnunet_venv
    if venv is None:
        venv = next((v for v in (NNUNET_VENV_LOCAL, NNUNET_REF / "venv") if (v / "bin" / "python").exists()), None)
    if venv is None and args.setup_nnunet:
        venv = setup_nnunet_venv(NNUNET_VENV_LOCAL)
    python = None
    if venv is not None:
        py = Path(venv) / "bin" / "python"
        check = subprocess.run([str(py), "-c", "import nnunetv2"], capture_output=True, text=True) if py.exists() else None
        if check is not None and check.returncode == 0:
            python = str(py)
        else:
            notes.append(f"{venv} has no working nnunetv2: nnU-Net rows skipped")
    else:
        notes.append("no nnU-Net venv (pass --nnunet-venv PATH, or --setup-nnunet to create benchmarks/.nnunet-venv): "
                     "nnU-Net rows skipped")
    ref = args.nnunet_ref
    if ref is None:
        ref = next((r for r in (NNUNET_REF, NNUNET_REF_LOCAL)
                    if (r / "preprocessed" / "Dataset004_Hippocampus" / "nnUNetPlans.json").is_file()), None)
    if ref is None and python and args.setup_nnunet:
        ref = setup_nnunet_ref(python, NNUNET_REF_LOCAL)
    if python and ref is None:
        notes.append("no nnU-Net reference data (raw + preprocessed Dataset004_Hippocampus; --nnunet-ref, or "
                     "--setup-nnunet to make benchmarks/.nnunet-ref): nnU-Net rows skipped")
        python = None
    return python, ref, notes


def setup_nnunet_venv(venv: Path) -> Path:
    """benchmarks/.nnunet-venv with nnunetv2 beside the pinned torch, in ONE pip command (pip keeps that torch)."""
    print(f"creating {venv} (pip install nnunetv2 torch==2.13.0) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "nnunetv2", "torch==2.13.0"], check=True)
    return venv


def setup_nnunet_ref(python: str, ref: Path) -> Path:
    """nnU-Net's raw, plans and 3d_fullres data of the hippocampus in `ref` (about a minute on 2 cores)."""
    from harness import SHARED

    print(f"creating {ref} (segpipe convert + nnUNetv2_plan_and_preprocess) ...", flush=True)
    raw = ref / "raw" / "Dataset004_Hippocampus"
    if not (raw / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "convert", str(SHARED / "Task04_Hippocampus"), str(raw),
                        "--to", "nnunetv2"], check=True, env=python_env())
    env = dict(os.environ, nnUNet_raw=str(ref / "raw"), nnUNet_preprocessed=str(ref / "preprocessed"),
               nnUNet_results=str(ref / "results"))
    tool = Path(python).parent / "nnUNetv2_plan_and_preprocess"
    subprocess.run([str(tool), "-d", "4", "-c", "3d_fullres", "-np", "2"], check=True, env=env)
    return ref


# ---------------------------------------------------------------- running the suite


def results_dir(quick: bool) -> Path:
    """Quick runs write into results/quick/: a smoke test never overwrites the full suite's figures."""
    return RESULTS / QUICK_SUBDIR if quick else RESULTS


def run_steps(steps: list[Step], ctx: Context, deadline: float | None, log) -> list[dict]:
    records = []
    env = python_env(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", SEGPIPE_BENCH_RESULTS=str(results_dir(ctx.quick)))
    workdir_ok = (ctx.workdir / "store.zarr").is_dir()
    for step in steps:
        args_fn = step.quick if ctx.quick else step.full
        if args_fn is None:
            continue
        limit = step.timeout_quick if ctx.quick else step.timeout_full
        record = {"name": step.name, "script": f"benchmarks/{step.script}", "status": "skipped", "load_before": _load()}
        cut = False
        if deadline is not None:
            left = deadline - time.monotonic() - SUMMARY_RESERVE_S
            if left < 20:
                record["note"] = "suite time budget spent"
                records.append(record)
                log(f"[{step.name}] skipped: suite time budget spent")
                continue
            cut, limit = left < limit, min(limit, left)
        if step.needs_workdir and not workdir_ok:
            record["note"] = "no workdir (its build failed)"
            records.append(record)
            continue
        cmd = [sys.executable, str(BENCH / step.script), *args_fn(ctx)]
        record["command"] = " ".join(c if c else "''" for c in cmd[1:]).replace(str(REPO) + "/", "")
        log(f"[{step.name}] {record['command']} (limit {limit:.0f} s, load {record['load_before'][0]:.1f})")
        run = run_command(cmd, env=env, cwd=REPO, timeout=limit)
        record.update(_run_fields(run), load_after=_load())
        if run.timed_out and cut:  # the suite's budget, not the benchmark, ran out: what it saved is kept
            record.update(status="cut", note=f"stopped at the suite's time budget after {run.wall_s:.0f} s")
        if step.name == "workdir":
            workdir_ok = run.ok and (ctx.workdir / "store.zarr").is_dir()
        log(f"[{step.name}] {record['status']} in {run.wall_s:.0f} s, CPU {run.cpu_s:.0f} s, "
            f"peak RSS {run.peak_rss_tree_mib:.0f} MiB{'' if run.ok else ': ' + run.error()}")
        if not run.ok:
            logs = results_dir(ctx.quick) / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"{step.name}.log").write_text(run.stdout_tail + "\n--- stderr ---\n" + run.stderr_tail)
        records.append(record)
    return records


def _run_fields(run: Run) -> dict:
    return {"status": "ok" if run.ok else ("timed out" if run.timed_out else "failed"), "wall_s": round(run.wall_s, 1),
            "cpu_s": round(run.cpu_s, 1), "peak_rss_tree_mib": round(run.peak_rss_tree_mib, 1),
            "processes": run.processes, **({} if run.ok else {"note": run.error()})}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- the summary


def _read(name: str) -> dict | None:
    """A benchmark's result: the full suite's when there is one, else the quick run's (marked `_quick`)."""
    for folder, quick in ((RESULTS, False), (RESULTS / QUICK_SUBDIR, True)):
        try:
            data = json.loads((folder / f"{name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            data["_quick"] = quick
            return data
    return None


def _date(data: dict | None, name: str | None = None) -> str:
    """When a result was measured: its machine record, its own date, else the file's modification time."""
    m = (data or {}).get("machine")
    if isinstance(m, dict) and m.get("date"):
        return m["date"].replace(" UTC", "")
    if (data or {}).get("date"):
        return str(data["date"])
    path = RESULTS / f"{name}.json" if name else None
    if path is not None and path.is_file():
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(path.stat().st_mtime)) + " (file time)"
    return "–"


def _num(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _ratio(a, b, better: str = "higher") -> str:
    """'2.3x higher' style comparison of ours (a) against nnU-Net (b)."""
    if not a or not b:
        return "–"
    r = a / b if better == "higher" else b / a
    word = {"higher": "faster" if r >= 1 else "slower", "lower": "less" if r >= 1 else "more"}[better]
    return f"{r if r >= 1 else 1 / r:.1f}x {word}"


def _device(data: dict | None, default: str = "CPU") -> str:
    dev = str((data or {}).get("device") or "").lower()
    return "GPU" if dev.startswith("cuda") else default


def headline_rows() -> list[tuple]:
    """(figure, seg-pipeline, nnU-Net v2, comparison, device, source) for SUMMARY.md and the README."""
    rows: list[tuple] = []

    def add(figure, ours, theirs, comparison, device, source, data):
        partial = ", partial: the run was stopped early" if (data or {}).get("complete") is False else ""
        if (data or {}).get("_quick"):
            source, partial = f"{QUICK_SUBDIR}/{source}", partial + ", quick run"
        rows.append((figure, ours, theirs, comparison, device,
                     f"[{source}]({source}) ({_date(data, source.rsplit('.', 1)[0])}{partial})"))

    pre = _read("preprocess")
    hippo = (pre or {}).get("sets", {}).get("Task04_Hippocampus")
    if hippo:
        runs = hippo["runs"]
        nn = [r for r in runs if r["tool"] != "seg-pipeline"]
        cli = [r for r in runs if r["tool"] == "seg-pipeline" and "CLI" in r["mode"]]
        dask = [r for r in runs if r["tool"] == "seg-pipeline" and r["mode"] == "dask"]
        ours = max(cli or dask, key=lambda r: r["workers"], default=None)
        theirs = next((r for r in nn if ours and r["workers"] == ours["workers"]), max(nn, key=lambda r: r["workers"], default=None))
        if ours:
            what = "whole command" if "CLI" in ours["mode"] else "run_preprocessing on a running cluster"
            add(f"Preprocessing throughput, {hippo['cases']} hippocampus cases, {ours['workers']} workers ({what}), cases/s",
                _num(ours["cases_per_s"]), _num(theirs["cases_per_s"]) if theirs else "not run",
                _ratio(ours["cases_per_s"], theirs["cases_per_s"]) if theirs else "–", "CPU", "preprocess.md", pre)
            add("Preprocessing peak RSS, whole process tree (MiB)", _num(ours["peak_rss_tree_MiB"], 0),
                _num(theirs["peak_rss_tree_MiB"], 0) if theirs else "not run",
                _ratio(ours["peak_rss_tree_MiB"], theirs["peak_rss_tree_MiB"], "lower") if theirs else "–", "CPU",
                "preprocess.md", pre)
            add("Preprocessing CPU seconds per case", _num(ours["cpu_s_per_case"], 3),
                _num(theirs["cpu_s_per_case"], 3) if theirs else "not run",
                _ratio(ours["cpu_s_per_case"], theirs["cpu_s_per_case"], "lower") if theirs else "–", "CPU",
                "preprocess.md", pre)
    step = _read("train_step")
    if step:
        ok = [r for r in step.get("runs", []) if "samples_per_s" in r and r.get("variant") == "fp32"]
        pairs = [(o, n) for o in ok if o["impl"] == "seg-pipeline" for n in ok
                 if n["impl"] == "nnunet" and (n["batch"], n["threads"]) == (o["batch"], o["threads"])]
        if pairs:
            o, n = min(pairs, key=lambda p: p[0]["threads"])
            add(f"Training step (nnU-Net's 3d_fullres hippocampus plan, fp32, batch {o['batch']}, {o['threads']} thread), samples/s",
                _num(o["samples_per_s"], 3), _num(n["samples_per_s"], 3), _ratio(o["samples_per_s"], n["samples_per_s"]),
                _device(step), "train_step.md", step)
        elif ok:
            o = max(ok, key=lambda r: r["samples_per_s"])
            add(f"Training step (fp32, batch {o['batch']}, {o['threads']} thread(s)), samples/s", _num(o["samples_per_s"], 3),
                "not run", "–", _device(step), "train_step.md", step)
    for name in ("train_step", "train_step_bf16"):  # mixed precision (CPU autocast) vs nnU-Net's CPU default, float32
        mixed = _read(name)
        runs = [r for r in (mixed or {}).get("runs", []) if "samples_per_s" in r]
        for o in (r for r in runs if r["impl"] == "seg-pipeline" and r["variant"] == "bf16_autocast"):
            n = next((r for r in runs if r["impl"] == "nnunet" and r["variant"] == "fp32"
                      and (r["batch"], r["threads"]) == (o["batch"], o["threads"])), None)
            add(f"Training step, ours in bfloat16 (what `segpipe train` runs on this CPU) vs nnU-Net's float32, batch "
                f"{o['batch']}, {o['threads']} threads, samples/s", _num(o["samples_per_s"], 3),
                _num(n["samples_per_s"], 3) if n else "not run",
                _ratio(o["samples_per_s"], n["samples_per_s"]) if n else "–", _device(mixed), f"{name}.md", mixed)
    gstep = _read("gpu_train_step")
    if gstep:
        # a non-finite loss (null in the JSON) means GradScaler skipped the optimizer steps: not a training step's time
        ok = [r for r in gstep.get("runs", []) if "samples_per_s" in r
              and all(r.get(k) is not None and math.isfinite(r[k]) for k in ("loss_first", "loss_last"))]
        ours = [r for r in ok if r["impl"] == "seg-pipeline"]
        theirs = {(r["variant"], r["batch"]): r for r in ok if r["impl"] == "nnunet"}
        gpu = next((r["gpu"] for r in ok if r.get("gpu")), "GPU")
        for o in ours:  # same variant, same batch, measured interleaved with nnU-Net's
            n = theirs.get((o["variant"], o["batch"]))
            if n:
                ratio = next((v["ratio_samples_per_s"] for c in gstep.get("comparisons", []) for v in c["versus"]
                              if (c["variant"], c["batch"], v["impl"], v["variant"]) == (o["variant"], o["batch"], "nnunet",
                                                                                          o["variant"])), None)
                add(f"Training step on {gpu} ({o['variant']}, batch {o['batch']}, interleaved with nnU-Net), samples/s",
                    _num(o["samples_per_s"], 1), _num(n["samples_per_s"], 1),
                    f"{ratio['median']:.2f}x (median of {ratio['n']} interleaved rounds)" if ratio and ratio.get("median")
                    else _ratio(o["samples_per_s"], n["samples_per_s"]), _device(gstep), "gpu_train_step.md", gstep)
        if ours:
            best = max(ours, key=lambda r: r["samples_per_s"])
            if (best["variant"], best["batch"]) not in theirs:
                add(f"Training step on {gpu} (best variant: {best['variant']}, batch {best['batch']}), samples/s",
                    _num(best["samples_per_s"], 1), "–", "–", _device(gstep), "gpu_train_step.md", gstep)
    loader = _read("loader")
    for r in (loader or {}).get("rows", []):
        add(f"Patch loader vs train step, {r['config']} ({r['augmentation']} augmentation), loader/step ratio (target >= 5x)",
            f"{r['ratio']}x ({r['loader_patches_per_s']} vs {r['step_patches_per_s']} patches/s)", "–", "–", "CPU",
            "loader.md", loader)
    mem = _read("train_memory")
    if mem and mem.get("rows"):
        sizes = [r["cases"] for r in mem["rows"]]
        peaks = [r["peak_rss_mb"] for r in mem["rows"]]
        add(f"Training worker peak RSS, {min(sizes)} → {max(sizes)} cases ({mem.get('config')})",
            f"{min(peaks):.0f}-{max(peaks):.0f} MB, spread {100 * mem['spread']:.1f}% "
            f"({'flat' if mem.get('flat_within_10_percent') else 'NOT flat'} within 10%)", "–", "–", "CPU",
            "train_memory.md", mem)
    inf = _read("inference")
    for r in (inf or {}).get("hippocampus", []):
        add(f"Inference, hippocampus `predict_folder` ({r['config']}, TTA {'on' if r['tta'] else 'off'}), s/case",
            _num(r["seconds_per_case_mean"]), "–", "–", _device(inf), "inference.md", inf)
    pred = _read("predict")
    pred_ct = _read("predict_ct")  # a CT-only run (`--cases 0 --size 0 --name predict_ct`) replaces predict's CT rows
    compared = [(c, pred, "predict.md") for c in (pred or {}).get("comparisons", [])
                if not (pred_ct and c["set"] == "ct")]
    compared += [(c, pred_ct, "predict_ct.md") for c in (pred_ct or {}).get("comparisons", []) if c["set"] == "ct"]
    for c, source, page in compared:  # ours fastest vs theirs; and in float32 (--precision fp32), where measured
        if c["pairing"] != "fastest of each" and not (c["pairing"] == "ours in-process vs nnU-Net's fastest"
                                                      and c["ours"].endswith(" fp32")):
            continue
        what = {"hippocampus": f"{source['meta']['cases']} hippocampus cases",
                "ct": "the TotalSegmentator CT case (42 classes, nnU-Net's plan for it)"}.get(
                    c["set"], f"one {source['meta'].get('size')}^3 volume")
        add(f"Prediction, {what}, whole command, TTA {'on' if c['tta'] else 'off'} ({c['ours']} vs {c['nnunet']}), s/case",
            _num(c["ours_s_per_case"]), _num(c["nnunet_s_per_case"]),
            c["ratio"], _device(source), page, source)
        if c["ours_peak_pss_tree_mib"] and c["nnunet_peak_pss_tree_mib"] and c["pairing"] == "fastest of each":
            add(f"Prediction peak memory, {what}, TTA {'on' if c['tta'] else 'off'}: PSS of the process tree (MiB)",
                _num(c["ours_peak_pss_tree_mib"], 0), _num(c["nnunet_peak_pss_tree_mib"], 0),
                _ratio(c["ours_peak_pss_tree_mib"], c["nnunet_peak_pss_tree_mib"], "lower"), _device(source), page, source)
    for s in (pred or {}).get("summary", []):
        if s["set"] == "lean" and s.get("s_per_case"):
            add(f"Prediction, {s['cases']} hippocampus cases, 3d_lean with mirroring TTA, whole command"
                f"{'' if s.get('precision', 'auto') == 'auto' else ', --precision ' + s['precision']}, s/case",
                _num(s["s_per_case"], 3), "–", "–", _device(pred), "predict.md", pred)
        if s["set"] == "large" and s["tool"] == "seg-pipeline" and s.get("s_per_case") and not any(
                c["set"] == "large" and c["tta"] == s["tta"] for c in pred.get("comparisons", [])):
            add(f"Prediction, one {pred['meta'].get('size')}^3 volume, whole command, TTA {'on' if s['tta'] else 'off'}, "
                f"seconds (peak PSS MiB)", f"{_num(s['s_per_case'], 1)} ({_num(s.get('peak_pss_tree_mib'), 0)})",
                "not run", "–", _device(pred), "predict.md", pred)
    gpred = _read("gpu_predict")  # the GPU run (predict.py --device cuda): its own rows beside the CPU run's
    for c in (gpred or {}).get("comparisons", []):
        if c["pairing"] != "fastest of each" or c["set"] != "hippocampus":
            continue
        what, tta = f"{gpred['meta']['cases']} hippocampus cases", "on" if c["tta"] else "off"
        add(f"Prediction on GPU, {what}, whole command, TTA {tta} ({c['ours']} vs {c['nnunet']}), s/case",
            _num(c["ours_s_per_case"]), _num(c["nnunet_s_per_case"]), c["ratio"], _device(gpred), "gpu_predict.md", gpred)
        if c["ours_peak_pss_tree_mib"] and c["nnunet_peak_pss_tree_mib"]:
            add(f"Prediction peak memory on GPU, {what}, TTA {tta}: PSS of the process tree (MiB)",
                _num(c["ours_peak_pss_tree_mib"], 0), _num(c["nnunet_peak_pss_tree_mib"], 0),
                _ratio(c["ours_peak_pss_tree_mib"], c["nnunet_peak_pss_tree_mib"], "lower"), _device(gpred),
                "gpu_predict.md", gpred)
    for s in (gpred or {}).get("summary", []):
        if s["set"] == "lean" and s.get("s_per_case"):
            add(f"Prediction on GPU, {s['cases']} hippocampus cases, 3d_lean with mirroring TTA, whole command, s/case",
                _num(s["s_per_case"], 3), "–", "–", _device(gpred), "gpu_predict.md", gpred)
    ginf = _read("gpu_inference")
    seen_configs = set()
    for r in (ginf or {}).get("hippocampus", []):
        # throughput (the folder's wall seconds / cases): windows of consecutive cases share forward passes,
        # so a case's own latency says little; without warm-up, a configuration's first row holds one-time costs
        first = r["config"] not in seen_configs
        seen_configs.add(r["config"])
        note = ", incl. one-time CUDA start-up" if first and not r.get("warmed_up") else ""
        add(f"Inference on GPU, {r['cases']} hippocampus cases in one `predict_folder` ({r['config']}, "
            f"TTA {'on' if r['tta'] else 'off'}{note}), wall s/case",
            _num(r["wall_seconds_total"] / r["cases"], 3), "–", "–", _device(ginf), "gpu_inference.md", ginf)
    ok_fwd = [r for r in (ginf or {}).get("forward", []) if "windows_per_s" in r]
    if ok_fwd:
        best = max(ok_fwd, key=lambda r: r["windows_per_s"])
        add(f"Network forward on GPU (best: {best['variant']}, batch {best['batch']}), windows/s", _num(best["windows_per_s"], 1),
            "–", "–", _device(ginf), "gpu_inference.md", ginf)
    val = _read("validation_speed")
    if val:
        best = min(val["best_s"], key=val["best_s"].get)
        full = {k: v for k, v in val["best_s"].items() if k != "headers only"}
        fastest = min(full, key=full.get) if full else best
        add(f"`segpipe validate`, {val['cases']} hippocampus cases (voxels checked, {fastest}), seconds",
            f"{full.get(fastest, val['best_s'][best]):.2f} ({1000 * full.get(fastest, 0) / max(1, val['cases']):.1f} ms/case)",
            "–", "–", "CPU", "validation_speed.md", val)
    sc = _read("scaling")
    if sc:
        d = sc.get("dask") or []
        if len(d) > 1:
            add(f"Dask preprocessing {d[0]['workers']} → {d[-1]['workers']} workers, cases/s",
                f"{d[0]['cases_per_s']:.2f} → {d[-1]['cases_per_s']:.2f} ({d[-1]['speedup']}x)", "–", "–", "CPU",
                "scaling.md", sc)
        r = [x for x in sc.get("ray") or [] if "samples_per_s" in x]
        if len(r) > 1:
            add(f"Ray Train {r[0]['workers']} → {r[-1]['workers']} workers (3d_lean), samples/s",
                f"{r[0]['samples_per_s']:.2f} → {r[-1]['samples_per_s']:.2f} ({r[-1]['speedup']}x)", "–", "–", "CPU",
                "scaling.md", sc)
    fp = _read("fingerprint_memory")
    if fp and fp.get("runs"):
        above = [r["peak_tree_above_baseline_mib"] for r in fp["runs"]]
        cases = [r["cases"] for r in fp["runs"]]
        add(f"Fingerprint peak RSS above the idle Dask cluster, {min(cases)} → {max(cases)} cases (MiB)",
            " / ".join(f"{a:.0f}" for a in above), "–", "–", "CPU", "fingerprint_memory.md", fp)
    pvn = _read("preprocess_vs_nnunet")
    h = (pvn or {}).get("summary", {}).get("Task04_Hippocampus")
    if h:
        add("Preprocessed hippocampus agrees with nnU-Net's (same shape / min image r / min label agreement)",
            f"{h['same_shape']}/{h['cases']} / {h['image_r_min']:.5f} / {h['label_agreement_min']:.4f}", "–", "–", "CPU",
            "preprocess_vs_nnunet.md", pvn)
    q = _read("quality_vs_nnunet")
    if q and q.get("rows"):
        ours = next((r for r in q["rows"] if r["tool"] == "seg-pipeline"), None)
        nn = next((r for r in q["rows"] if r["tool"] != "seg-pipeline"), None)
        dice = lambda r: r.get("dice_mean") if r else None  # noqa: E731
        add(f"Mean Dice after {q['budget_min']} min of training each, fold 0 ({q['val_cases']} val cases)",
            f"{_num(dice(ours), 3)} ({ours['config']})" if ours else "not run",
            _num(dice(nn), 3) if nn else "not run",
            f"{dice(ours) - dice(nn):+.3f}" if dice(ours) is not None and dice(nn) is not None else "–",
            _device(q), "quality_vs_nnunet.md", q)
    ni = _read("nnunet_interop")
    if ni and ni.get("agreement"):
        a = ni["agreement"].get("ours (in-process) vs nnUNetv2_predict", {})
        e = ni["agreement"].get("nnUNetv2_predict on our export vs on nnU-Net's own folder", {})
        add(f"nnU-Net model imported: min voxel agreement with nnUNetv2_predict ({a.get('cases')} cases; our export "
            "run by nnUNetv2_predict), target >= 0.999",
            f"{_num(a.get('min'), 4)} ({_num(e.get('min'), 4)})", "–", "–", "CPU", "nnunet_interop.md", ni)
    cas = _read("cascade")
    if cas and cas.get("summary"):
        f, c = cas["summary"]["3d_fullres"], cas["summary"]["3d_cascade_fullres"]
        add("3D cascade vs 3d_fullres on phantoms, equal training length: all steps wall s / prediction s per case / "
            "peak RSS MiB (3d_fullres → cascade)",
            f"{f['total_s']:.0f} → {c['total_s']:.0f} / {f['predict_s_per_case']:.1f} → {c['predict_s_per_case']:.1f} / "
            f"{f['peak_rss_mib']:.0f} → {c['peak_rss_mib']:.0f}", "–", "–", "CPU", "cascade.md", cas)
    th = _read("train_hippocampus")
    if th and th.get("foreground_mean_dice") is not None:
        pseudo = th.get("pseudo_foreground_dice")
        add(f"Hippocampus fold 0 after {th['budget_min']:g} min of training ({th['config']}, {th['validation_cases']} "
            f"val cases scored whole; training pseudo-Dice), mean Dice (target >= 0.85)",
            f"{_num(th['foreground_mean_dice'], 3)} ({'–' if pseudo is None else _num(pseudo, 3)})", "–", "–",
            "CPU", "train_hippocampus.md", th)
    return rows


def headline_table(rows: list[tuple]) -> str:
    return md_table(["figure", "seg-pipeline", "nnU-Net v2", "ours vs nnU-Net", "device", "source (date)"], rows)


def write_summary(records: list[dict], machine: dict, mode: str, command: str, notes: list[str]) -> str:
    rows = headline_rows()
    prefix = f"{QUICK_SUBDIR}/" if mode == "quick" else ""
    lines = ["# Benchmark summary", "",
             f"Generated by `{command}` ({mode}) on {machine['date']}.", "",
             f"Machine: {machine_line(machine)}.", "",
             "## Headline figures", "",
             "Each figure is marked CPU or GPU and dated by the run that produced it (older results are kept when this "
             "run did not refresh them). Wall-clock figures depend on the load average: compare figures of one run. "
             f"Figures of the full suite (`make bench`) come first; `make bench-quick` writes into `{QUICK_SUBDIR}/`, "
             "whose figures appear only where the full suite has none, marked \"quick run\".",
             "", headline_table(rows), ""]
    if records:
        lines += ["## This run", "",
                  md_table(["benchmark", "status", "wall s", "CPU s", "peak RSS tree MiB", "load before → after", "note"],
                           [(f"[{r['name']}]({prefix}{r['name']}.md)" if (RESULTS / f"{prefix}{r['name']}.md").is_file()
                             else r["name"],
                             r["status"], r.get("wall_s"), r.get("cpu_s"), r.get("peak_rss_tree_mib"),
                             f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}" if r.get("load_after") else
                             f"{r['load_before'][0]:.1f}", r.get("note", "")) for r in records]), ""]
        lines += ["Commands:", ""] + [f"* `{r['name']}`: `{r['command']}`" for r in records if r.get("command")] + [""]
    for note in notes:
        lines.append(f"* {note}")
    text = "\n".join(lines).rstrip() + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / ".SUMMARY.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, RESULTS / "SUMMARY.md")
    return text


def update_readme(readme: Path, machine: dict, command: str) -> None:
    """Rewrite the README between the results markers with the headline table."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} lacks the {README_START} ... {README_END} markers (put them under '## Measured results')")
    block = "\n".join([
        README_START,
        f"Table written by `{command}` from the result files; each source names the command and machine that "
        f"measured it (this machine: {machine_line(machine)}). "
        "Details, plots and every other figure: [benchmarks/results/SUMMARY.md](benchmarks/results/SUMMARY.md).",
        "", headline_table(headline_rows()).replace("](", "](benchmarks/results/"), README_END])
    new = re.sub(re.escape(README_START) + r".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[1])
    parser.add_argument("--quick", action="store_true", help="small case counts, one repetition; under 10 minutes")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (default: all of the mode)")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    parser.add_argument("--nnunet-venv", type=Path, default=None, help="a venv with nnunetv2 for the side-by-side rows")
    parser.add_argument("--nnunet-ref", type=Path, default=None,
                        help="nnU-Net raw/ and preprocessed/ holding Dataset004_Hippocampus (default ../nnunet_ref)")
    parser.add_argument("--setup-nnunet", action="store_true",
                        help="create benchmarks/.nnunet-venv (pip install nnunetv2 torch==2.13.0) and benchmarks/.nnunet-ref if missing")
    parser.add_argument("--quality-budget-min", type=float, default=30.0, help="training minutes per tool (full suite)")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto", help="run benchmarks/gpu_suite.sh (full suite)")
    parser.add_argument("--summary-only", action="store_true", help="only rewrite SUMMARY.md (and --readme) from results/")
    parser.add_argument("--readme", type=Path, default=None, help="rewrite this README's results section too")
    parser.add_argument("--workdir", type=Path, default=None, help="shared preprocessed workdir (default: a temporary one)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    command = "python benchmarks/run_all.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    mode = "quick" if args.quick else "full"
    machine = machine_info()
    log = lambda msg: print(f"{time.monotonic() - start:6.0f}s {msg}", flush=True)  # noqa: E731
    log(f"{mode} suite on {machine_line(machine)}")
    records: list[dict] = []
    notes: list[str] = []
    if not args.summary_only:
        python, ref, notes = find_nnunet(args)
        for note in notes:
            log(note)
        only = set(args.only.split(",")) if args.only else None
        skip = set(filter(None, args.skip.split(",")))
        steps = [s for s in STEPS if (only is None or s.name in only or s.name == "workdir") and s.name not in skip]
        if not any(s.needs_workdir for s in steps):
            steps = [s for s in steps if s.name != "workdir"]
        if not (python and ref):
            steps = [s for s in steps if s.name != "preprocess_vs_nnunet"]
        tmp = None
        workdir = args.workdir
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="segpipe-bench-suite-")
            workdir = Path(tmp.name) / "work"
        elif (workdir / "store.zarr").is_dir():
            steps = [s for s in steps if s.name != "workdir"]
        ctx = Context(args.quick, workdir, python, ref, args.quality_budget_min)
        deadline = start + QUICK_BUDGET_S if args.quick else None
        try:
            records = run_steps(steps, ctx, deadline, log)
            want_gpu = args.gpu == "yes" or (args.gpu == "auto" and not args.quick and gpu_names())
            if want_gpu and "gpu" not in skip and (only is None or "gpu" in only):
                log("[gpu] benchmarks/gpu_suite.sh")
                run = run_command(["bash", str(BENCH / "gpu_suite.sh")], env=python_env(), cwd=REPO, timeout=600)
                records.append({"name": "gpu", "script": "benchmarks/gpu_suite.sh", "command": "bash benchmarks/gpu_suite.sh",
                                "load_before": machine["load_before"], **_run_fields(run), "load_after": _load()})
        finally:
            if tmp is not None:
                tmp.cleanup()
    machine = {**machine, "load_after": _load()}
    write_summary(records, machine, mode, command, notes)
    log(f"-> {RESULTS / 'SUMMARY.md'}")
    if args.readme:
        update_readme(args.readme, machine, command)
        log(f"-> {args.readme} (results section)")
    failed = [r["name"] for r in records if r["status"] not in ("ok", "skipped", "cut")]
    log(f"done in {time.monotonic() - start:.0f} s; load average {' / '.join(map(str, _load()))}"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
