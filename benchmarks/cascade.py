"""What the 3D cascade costs next to 3d_fullres: time and peak memory of every step, side by side in one run.

On phantoms large enough that the planner makes `3d_lowres` (and so `3d_cascade_fullres`), each
step runs as the `segpipe` command a user would type, under the harness (benchmarks/harness.py:
wall and CPU seconds, peak RSS of the whole process tree, Ray's and Dask's workers included):

* 3d_fullres: preprocess, train fold 0, predict the held-out cases.
* cascade: preprocess 3d_lowres (3d_fullres's data is shared), train 3d_lowres folds 0-4, make
  3d_lowres's cross-validated segmentations (`stages.previous_stage`), train 3d_cascade_fullres
  fold 0, predict the same held-out cases (3d_lowres then the cascade).

Every training runs the same fixed number of epochs and iterations, so the ratios say what the
cascade's extra stage costs at equal training length (not what either reaches in quality: that
needs nnU-Net's 1000 epochs). Prediction runs without mirroring, in-process.

    .venv/bin/python benchmarks/cascade.py [--cases 6] [--shape 96,96,40] [--gpu-memory-gb 0.1]
        [--epochs 1] [--iterations 4] [--quick]

Results: benchmarks/results/cascade.{json,md,png} (`--quick`: benchmarks/results/quick/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import (  # noqa: E402
    RESULTS,
    bar_panel,
    finish_machine,
    machine_info,
    machine_line,
    md_table,
    python_env,
    run_command,
    write_results,
)

SEGPIPE = [sys.executable, "-m", "pipeline.cli"]


def make_data(root: Path, cases: int, shape: tuple[int, ...], gpu_memory_gb: float) -> tuple[Path, Path, dict]:
    """Phantoms, their plans (checked to hold the cascade) and a folder of the held-out (fold 0 validation) images."""
    sys.path.insert(0, str(ROOT))
    from pipeline import stages
    from pipeline.data.synthetic import make_demo_dataset
    from pipeline.training.splits import load_or_create_splits

    data = make_demo_dataset(root / "phantoms", num_cases=cases, shape=shape)
    workdir = root / "work"
    dataset = stages.load_dataset(data)
    plans = stages.plan(dataset, workdir, gpu_memory_gb=gpu_memory_gb, workers=1, progress=False)
    if "3d_cascade_fullres" not in plans.configurations:
        raise SystemExit(f"no cascade planned for {shape} phantoms at {gpu_memory_gb} GB: "
                         f"{plans.explanations.get('3d_lowres')}; use larger --shape or smaller --gpu-memory-gb")
    heldout = load_or_create_splits(workdir, dataset.case_ids).validation_cases("0")
    inputs = root / "heldout"
    inputs.mkdir(exist_ok=True)
    for case in heldout:
        shutil.copy(dataset.case(case).images[0], inputs / f"{case}.nii.gz")
    conf = {n: plans.configuration(n) for n in ("3d_fullres", "3d_lowres")}
    facts = {n: {"patch_size": c.patch_size, "spacing": [round(s, 3) for s in c.spacing], "median_shape": c.median_shape}
             for n, c in conf.items()}
    return data, inputs, {"configurations": facts, "heldout": heldout}


def steps(data: Path, workdir: Path, inputs: Path, out: Path, epochs: int, iterations: int) -> dict[str, list[tuple[str, list[str]]]]:
    train = ["--epochs", str(epochs), "--iterations-per-epoch", str(iterations), "--val-iterations", "1"]
    w = ["--workdir", str(workdir)]
    full = [("preprocess", [*SEGPIPE, "preprocess", data, *w, "--config", "3d_fullres", "--workers", "1"]),
            ("train fold 0", [*SEGPIPE, "train", *w, "--config", "3d_fullres", "--fold", "0", *train]),
            ("predict", [*SEGPIPE, "predict", *w, "--config", "3d_fullres", "--fold", "0", "--no-tta", inputs,
                         out / "3d_fullres"])]
    previous = ("from pipeline import stages; "
                f"print(stages.previous_stage({str(workdir)!r}, '3d_cascade_fullres', '0', progress=False))")
    cascade = [("preprocess 3d_lowres", [*SEGPIPE, "preprocess", data, *w, "--config", "3d_lowres", "--workers", "1"])]
    cascade += [(f"train 3d_lowres fold {k}", [*SEGPIPE, "train", *w, "--config", "3d_lowres", "--fold", str(k), *train])
                for k in range(5)]
    cascade += [("3d_lowres cross-validated segmentations", [sys.executable, "-c", previous]),
                ("train cascade fold 0", [*SEGPIPE, "train", *w, "--config", "3d_cascade_fullres", "--fold", "0", *train]),
                ("predict", [*SEGPIPE, "predict", *w, "--config", "3d_cascade_fullres", "--fold", "0", "--no-tta",
                             inputs, out / "3d_cascade_fullres"])]
    return {"3d_fullres": full, "3d_cascade_fullres": cascade}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--shape", default="96,96,40", help="phantom shape (RAS voxels at 1x1x2.5 mm)")
    ap.add_argument("--gpu-memory-gb", type=float, default=0.1, help="memory budget of the plans (small: 3d_lowres)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="results under benchmarks/results/quick/")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    machine = machine_info()
    root = args.keep or Path(tempfile.mkdtemp(prefix="segpipe-bench-cascade-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        data, inputs, facts = make_data(root, args.cases, shape, args.gpu_memory_gb)
        plan = steps(data, root / "work", inputs, root / "predictions", args.epochs, args.iterations)
        env = python_env()
        rows: dict[str, list[dict]] = {}
        for config, commands in plan.items():
            rows[config] = []
            for name, cmd in commands:
                run = run_command(cmd, env=env, cwd=ROOT, timeout=3600)
                print(f"{config:20s} {name:42s} {run.wall_s:8.1f} s  {run.peak_rss_tree_mib:8.0f} MiB"
                      f"{'' if run.ok else '  FAILED ' + run.error()}", flush=True)
                if not run.ok:
                    raise SystemExit(f"{config} {name} failed: {run.error()}\n{run.stderr_tail}")
                rows[config].append({"step": name, "wall_s": round(run.wall_s, 2), "cpu_s": round(run.cpu_s, 2),
                                     "peak_rss_tree_mib": round(run.peak_rss_tree_mib, 1),
                                     "command": " ".join(str(c) for c in cmd[2:] if not str(c).startswith("/tmp"))})
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    def total(config, key, pick=lambda r: True):
        return round(sum(r[key] for r in rows[config] if pick(r)), 2)

    def peak(config, pick=lambda r: True):
        return max(r["peak_rss_tree_mib"] for r in rows[config] if pick(r))

    is_train = lambda r: r["step"].startswith("train") or "segmentations" in r["step"]  # noqa: E731
    is_predict = lambda r: r["step"] == "predict"  # noqa: E731
    n = len(facts["heldout"])
    summary = {}
    for config in rows:
        summary[config] = {"total_s": total(config, "wall_s"), "cpu_s": total(config, "cpu_s"),
                           "train_s": total(config, "wall_s", is_train),
                           "predict_s_per_case": round(total(config, "wall_s", is_predict) / n, 2),
                           "peak_rss_mib": peak(config), "train_peak_rss_mib": peak(config, is_train),
                           "predict_peak_rss_mib": peak(config, is_predict)}
    f, c = summary["3d_fullres"], summary["3d_cascade_fullres"]
    ratios = {k: round(c[k] / f[k], 2) for k in f if f[k]}
    result = {"settings": vars(args) | {"keep": str(args.keep) if args.keep else None}, "facts": facts, "steps": rows,
              "summary": summary, "cascade_over_fullres": ratios, "machine": finish_machine(machine)}

    lines = [f"# 3D cascade vs 3d_fullres ({args.cases} phantoms of {shape} voxels, plans at {args.gpu_memory_gb} GB)", "",
             f"Command: `python benchmarks/cascade.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             machine_line(result["machine"]), "",
             f"Each training: {args.epochs} epoch(s) of {args.iterations} iterations (equal length for every stage); "
             f"prediction of {n} held-out case(s) without mirroring. Patch / spacing / median shape: "
             + "; ".join(f"{k} {v['patch_size']} / {v['spacing']} mm / {v['median_shape']}" for k, v in facts["configurations"].items()),
             "", "## Totals", "",
             md_table(["", "3d_fullres", "3d_cascade_fullres", "cascade / fullres"],
                      [[k.replace("_", " "), f[k], c[k], f"{ratios.get(k, '–')}x"] for k in f]),
             "", "## Every step", ""]
    for config in rows:
        lines += [f"### {config}", "", md_table(["step", "wall s", "CPU s", "peak RSS (MiB, process tree)"],
                                                [[r["step"], r["wall_s"], r["cpu_s"], r["peak_rss_tree_mib"]] for r in rows[config]]), ""]
    lines += ["The cascade trains six networks (five 3d_lowres folds, then the cascade) where 3d_fullres trains one, "
              "and predicts with two; its memory is that of its largest step."]

    def plot(new_figure):
        fig, axes = new_figure(11, 3.6, ncols=3)
        labels = ["3d_fullres", "cascade"]
        bar_panel(axes[0, 0], labels, [f["total_s"], c["total_s"]], ylabel="seconds", title="all steps (wall)")
        bar_panel(axes[0, 1], labels, [f["predict_s_per_case"], c["predict_s_per_case"]], ylabel="seconds per case",
                  title="prediction")
        bar_panel(axes[0, 2], labels, [f["peak_rss_mib"], c["peak_rss_mib"]], ylabel="MiB", title="peak RSS (any step)")
        return fig

    out = RESULTS / "quick" if args.quick else RESULTS
    paths = write_results("cascade", result, "\n".join(lines), plot, out_dir=out)
    print(json.dumps({"summary": summary, "cascade_over_fullres": ratios}))
    print(f"-> {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
