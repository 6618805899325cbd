"""Where each stage's seconds go, per case: the preprocessing profile and the prediction profile, one
after the other under the same load, collected into one page.

A thin driver: `profile_preprocess.py` (read and decompress, reorient, crop, normalise, resample
image and labels, foreground locations, hashing, Zarr encode and write, metadata; present once
the preprocessing work lands) and `profile_predict.py` (interpreter and imports, Ray start, model
load, read, preprocess, windows, mirroring, softmax/argmax, resample back, export, write), each
in its own process with its own arguments, each writing its own result files.

    python benchmarks/profile_stages.py [--only predict,preprocess] [--predict-args "--sets hippocampus,ct,256"]
        [--preprocess-args "..."] [--name profile_stages]

Writes benchmarks/results/profile_stages.md (the two tables) and .json (what ran, exit codes, load).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROFILES = {"preprocess": "profile_preprocess.py", "predict": "profile_predict.py"}


def main(argv: list[str] | None = None) -> int:
    from harness import RESULTS, machine_info, machine_line, python_env, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="preprocess,predict", help="which profiles, in order")
    ap.add_argument("--predict-args", default="", help="arguments for profile_predict.py (quoted)")
    ap.add_argument("--preprocess-args", default="", help="arguments for profile_preprocess.py (quoted)")
    ap.add_argument("--name", default="profile_stages")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS
    machine = machine_info()
    runs, sections = [], []
    for stage in [s.strip() for s in args.only.split(",") if s.strip()]:
        if stage not in PROFILES:
            ap.error(f"unknown profile {stage!r}: choose from {', '.join(PROFILES)}")
        script = HERE / PROFILES[stage]
        name = f"profile_{stage}"
        if not script.is_file():
            runs.append({"stage": stage, "skipped": f"{script.name} is not in this checkout"})
            sections.append(f"## {stage}\n\nnot run: `benchmarks/{script.name}` is not in this checkout.\n")
            continue
        extra = shlex.split(getattr(args, f"{stage}_args"))
        cmd = [sys.executable, str(script), *extra, "--name", name, "--out", str(out)]
        print(f"profile_stages: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, env=python_env(), check=False).returncode
        runs.append({"stage": stage, "command": cmd[1:], "exit": rc, "seconds": round(time.perf_counter() - start, 1)})
        md = out / f"{name}.md"
        body = md.read_text() if md.is_file() and rc == 0 else f"FAILED (exit {rc}); see the output above.\n"
        sections.append(f"## {stage}\n\n{body}")
    text = "\n".join([f"# Per-stage profiles ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
                      machine_line(machine), "", *sections])
    write_results(args.name, {"benchmark": args.name, "machine": machine, "runs": runs}, text, None, out)
    print(text)
    return 0 if all(r.get("exit", 0) == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
