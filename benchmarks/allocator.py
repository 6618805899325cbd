"""What `pipeline.allocator` buys: `segpipe predict` with glibc's default malloc settings vs the
settings prediction runs under (freed activations kept and reused instead of faulted back in).

One hippocampus model (our planner's 3d_fullres plan, equal to nnU-Net's; a seeded untrained network:
time does not depend on the weights) predicts the first `--cases` Task04 cases with `predict_folder`
in a fresh child process per run (benchmarks/predict.py's worker: interpreter, imports and model
load included), with mirroring off and on. The two settings alternate within each round, in the
opposite order every other round; glibc's defaults are kept by giving the child an empty
`GLIBC_TUNABLES` (a user's own malloc settings win, so nothing is changed).

    python benchmarks/allocator.py [--cases 60] [--rounds 3] [--tta off,on] [--threads 2] [--name allocator]

Writes benchmarks/results/<name>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import SHARED, machine_info, machine_line, md_table, python_env, run_command, write_results  # noqa: E402

MODES = {"glibc defaults": {"GLIBC_TUNABLES": ""}, "reuse (pipeline.allocator)": {}}


def run_once(mode: str, tta: bool, wd: Path, inputs: Path, out: Path, threads: int, cases: int) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "predict.py"), "--worker", "1", str(wd), str(inputs), str(out),
           "--tta", "on" if tta else "off", "--threads", str(threads)]
    run = run_command(cmd, env=python_env(PYTHONUNBUFFERED="1", **MODES[mode]), timeout=3600)
    if run.returncode != 0 or not run.output:
        raise RuntimeError(f"{mode}, mirroring {tta}: exit {run.returncode}\n{run.stderr_tail}")
    report = run.output
    return {"mode": mode, "tta": tta, "s_per_case": run.wall_s / cases, "cpu_s_per_case": run.cpu_s / cases,
            "network_s": report["stage_seconds"]["network"], "faults_per_case": report["minor_faults"] / cases,
            "peak_rss_tree_mib": run.peak_rss_tree_mib, "wall_s": run.wall_s}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for tta in dict.fromkeys(r["tta"] for r in runs):
        base = None
        for mode in MODES:
            mine = [r for r in runs if r["tta"] == tta and r["mode"] == mode]
            med = {k: statistics.median(r[k] for r in mine) for k in
                   ("s_per_case", "cpu_s_per_case", "network_s", "faults_per_case", "peak_rss_tree_mib")}
            row = {"tta": tta, "mode": mode, "rounds": len(mine), **med,
                   "s_per_case_all": [round(r["s_per_case"], 3) for r in mine]}
            if base is None:
                base = row
            else:
                row["speedup"] = base["s_per_case"] / row["s_per_case"]
                row["speedups_per_round"] = [b["s_per_case"] / r["s_per_case"] for b, r in zip(
                    [x for x in runs if x["tta"] == tta and x["mode"] == base["mode"]], mine)]
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    rows = [[("on" if r["tta"] else "off"), r["mode"], f"{r['s_per_case']:.3f}",
             ", ".join(f"{v:.3f}" for v in r["s_per_case_all"]), f"{r['cpu_s_per_case']:.3f}",
             f"{r['network_s']:.1f}", f"{r['faults_per_case']:.0f}", f"{r['peak_rss_tree_mib']:.0f}",
             f"**{r['speedup']:.2f}x** ({', '.join(f'{v:.2f}' for v in r['speedups_per_round'])})" if "speedup" in r else "–"]
            for r in result["rows"]]
    return "\n".join([
        "# Allocator settings and prediction speed (benchmarks/allocator.py)", "",
        machine_line(result["machine"]), "",
        f"`predict_folder` on the first {result['cases']} Task04 hippocampus cases, 3d_fullres (nnU-Net's plan), "
        f"{result['threads']} torch threads, precision auto; whole child process per run (interpreter, imports, "
        "model load included). Medians over the rounds; the settings alternate within each round.", "",
        md_table(["mirroring", "malloc", "s/case", "each round", "CPU s/case", "network s (lanes' wall)",
                  "page faults/case", "peak RSS tree (MiB)", "faster than glibc defaults (per round)"], rows), "",
        f"Command: `{result['command']}`",
    ])


def plot(result: dict, new_figure):
    from harness import bar_panel

    fig, axes = new_figure(7, 3.5)
    ax = axes[0][0]
    rows = result["rows"]
    bar_panel(ax, [f"{r['mode'].split(' (')[0]}, mirroring {'on' if r['tta'] else 'off'}" for r in rows],
              [r["s_per_case"] for r in rows], ylabel="s/case (whole command)",
              title=f"predict_folder, {result['cases']} hippocampus cases",
              colors=["#999999" if r["mode"] == "glibc defaults" else "#1f77b4" for r in rows])
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tta", default="off,on", help="mirroring settings to measure: off, on or off,on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="allocator")
    args = ap.parse_args(argv)
    root = SHARED / "Task04_Hippocampus"
    if not (root / "dataset.json").is_file():
        print(f"Task04_Hippocampus not found at {root}: nothing to measure")
        return 0
    from predict import hippocampus_model_and_inputs

    from pipeline.data.dataset import load_dataset

    machine = machine_info()
    runs = []
    with tempfile.TemporaryDirectory(prefix="segpipe-allocator-") as tmp:
        tmp = Path(tmp)
        dataset = load_dataset(root)
        wd, ids = hippocampus_model_and_inputs(dataset, args.cases, tmp)
        for rnd in range(args.rounds):
            for tta in [t == "on" for t in args.tta.split(",")]:
                order = list(MODES) if rnd % 2 == 0 else list(MODES)[::-1]
                for mode in order:
                    run = run_once(mode, tta, wd.root, tmp / "in", tmp / f"out{rnd}{tta}{mode[:4]}", args.threads, len(ids))
                    print(f"round {rnd + 1}, mirroring {'on' if tta else 'off'}, {mode}: {run['s_per_case']:.3f} s/case, "
                          f"{run['faults_per_case']:.0f} faults/case", flush=True)
                    runs.append(run)
    result = {"cases": len(ids), "threads": args.threads, "runs": runs, "rows": summarise(runs), "machine": machine,
              "command": "python benchmarks/allocator.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    paths = write_results(args.name, result, markdown(result), lambda new_figure: plot(result, new_figure))
    print(markdown(result))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
