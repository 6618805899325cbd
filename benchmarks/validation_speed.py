"""How long `segpipe validate` takes on the 208 hippocampus cases, by number of reader threads.

Interleaves the settings over several rounds and keeps the best time of each (the machine is shared,
so the minimum is the least noisy estimate). Writes benchmarks/results/validation_speed.{json,md}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pipeline.validation import check_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEGPIPE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "Task04_Hippocampus"


def main(rounds: int = 5) -> dict:
    if not (DATA / "dataset.json").is_file():
        sys.exit(f"{DATA} not found")
    settings = {"headers only": dict(check_voxels=False), "1 thread": dict(workers=1),
                "2 threads": dict(workers=2), "4 threads": dict(workers=4)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    n = 0
    for _ in range(rounds):
        for name, kwargs in settings.items():
            t = time.perf_counter()
            report = check_dataset(DATA, progress=False, **kwargs)
            times[name].append(time.perf_counter() - t)
            assert report.ok, report.problems[:3]
            n = report.num_cases
    result = {"dataset": str(DATA.name), "cases": n, "cpus": len(os.sched_getaffinity(0)), "rounds": rounds,
              "best_s": {k: round(min(v), 3) for k, v in times.items()},
              "median_s": {k: round(sorted(v)[len(v) // 2], 3) for k, v in times.items()}}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# validate: {n} {DATA.name} cases, {result['cpus']} CPUs, best/median of {rounds}", "",
             "| setting | best s | median s | ms/case |", "| --- | --- | --- | --- |"]
    for k in settings:
        lines.append(f"| {k} | {result['best_s'][k]} | {result['median_s'][k]} | {1000 * result['best_s'][k] / n:.1f} |")
    (out / "validation_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
