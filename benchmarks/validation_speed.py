"""How long `segpipe validate` takes on the 208 hippocampus cases, by number of reader threads.

Interleaves the settings over several rounds and keeps the best wall time of each (the machine is
shared, so the minimum is the least noisy estimate), with the process CPU time of that run: when
other work loads the machine, CPU time still tells how much work each setting does, and
wall < CPU shows real overlap between threads.

    .venv/bin/python benchmarks/validation_speed.py [ROUNDS]   (default 5)

Writes benchmarks/results/validation_speed.{json,md,png}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SHARED, Clock, bar_panel, machine_info, machine_line, write_results  # noqa: E402

from pipeline.data.validation import check_dataset  # noqa: E402

DATA = SHARED / "Task04_Hippocampus"


def main(rounds: int = 5) -> dict:
    if not (DATA / "dataset.json").is_file():
        sys.exit(f"{DATA} not found")
    settings = {"headers only": dict(check_voxels=False), "1 thread": dict(workers=1),
                "2 threads": dict(workers=2), "4 threads": dict(workers=4)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in settings}
    n = 0
    machine = machine_info()
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for name, kwargs in settings.items():
            with Clock() as clock:
                report = check_dataset(DATA, progress=False, **kwargs)
            times[name].append((clock.wall, clock.cpu))
            assert report.ok, report.problems[:3]
            n = report.num_cases
    result = {"dataset": str(DATA.name), "cases": n, "cpus": len(os.sched_getaffinity(0)), "rounds": rounds,
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
              "best_s": {k: round(min(v)[0], 3) for k, v in times.items()},
              "cpu_s_of_best": {k: round(min(v)[1], 3) for k, v in times.items()},
              "median_s": {k: round(sorted(v)[len(v) // 2][0], 3) for k, v in times.items()},
              "machine": machine}
    lines = [f"# validate: {n} {DATA.name} cases, {result['cpus']} CPUs, best/median of {rounds}, "
             f"load average {result['load_average'][0]} -> {result['load_average'][1]}", "",
             "| setting | best wall s | its CPU s | median wall s | ms/case (best) |", "| --- | --- | --- | --- | --- |"]
    for k in settings:
        lines.append(f"| {k} | {result['best_s'][k]} | {result['cpu_s_of_best'][k]} | {result['median_s'][k]} "
                     f"| {1000 * result['best_s'][k] / n:.1f} |")
    lines += ["", f"Machine: {machine_line(machine | {'load_after': [round(x, 2) for x in os.getloadavg()]})}"]

    def plot(new_figure):
        fig, axes = new_figure(6, 3.2)
        names = list(settings)
        bar_panel(axes[0][0], names, [1000 * result["best_s"][k] / n for k in names], ylabel="ms per case (best)",
                  title=f"segpipe validate, {n} cases")
        return fig

    write_results("validation_speed", result, "\n".join(lines), plot)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
