"""Peak memory of `compute_fingerprint` on 20, 100 and 208 hippocampus cases (2-worker LocalCluster).

The claim to check: memory does not grow with the case count, because each task reads one case
and returns a few kilobytes, futures are released as they complete, and the pooled intensity
sample has a fixed budget. The harness's `TreeSampler` reads VmRSS from /proc for this process and
every descendant (the nannies and workers of the LocalCluster) every 20 ms.
Each case count gets a fresh cluster, so every run starts from the same baseline.

    .venv/bin/python benchmarks/fingerprint_memory.py [COUNT ...]   (default 20 100 208)

Writes benchmarks/results/fingerprint_memory.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MIB, SHARED, TreeSampler, bar_panel, machine_info, machine_line, process_tree, rss_bytes, write_results  # noqa: E402

from pipeline.data.dataset import load_dataset  # noqa: E402
from pipeline.parallel import dask_client  # noqa: E402
from pipeline.planning.fingerprint import compute_fingerprint  # noqa: E402

DATA = SHARED / "Task04_Hippocampus"


def measure(n: int) -> dict:
    dataset = load_dataset(DATA)
    dataset = dataclasses.replace(dataset, cases=dataset.cases[:n])
    with dask_client(workers=2) as client:
        time.sleep(1.0)  # let the workers settle
        tree = process_tree(os.getpid())
        baseline_total = sum(rss_bytes(p) for p in tree)
        baseline_driver = rss_bytes(os.getpid())
        start = time.perf_counter()
        with TreeSampler() as sampler:
            fp = compute_fingerprint(dataset, client=client, progress=False)
        elapsed = time.perf_counter() - start
    assert len(fp.cases) == n
    return {
        "cases": n,
        "processes": len(tree),
        "seconds": round(elapsed, 2),
        "samples_per_case": fp.samples_per_case,
        "pooled_samples": fp.foreground_intensity_properties[0].count,
        "baseline_tree_mib": round(baseline_total / MIB, 1),
        "peak_tree_mib": round(sampler.peak_tree / MIB, 1),
        "peak_tree_above_baseline_mib": round((sampler.peak_tree - baseline_total) / MIB, 1),
        "baseline_driver_mib": round(baseline_driver / MIB, 1),
        "peak_driver_mib": round(sampler.peak_root / MIB, 1),
        "cpu_seconds": round(sampler.cpu_seconds, 2),
        "rss_samples": sampler.samples,
    }


def main(counts=(20, 100, 208)) -> dict:
    if not (DATA / "dataset.json").is_file():
        sys.exit(f"{DATA} not found")
    machine = machine_info()
    load_before = os.getloadavg()[0]
    runs = [measure(n) for n in counts]
    result = {"dataset": DATA.name, "workers": 2, "cpus": len(os.sched_getaffinity(0)),
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)], "runs": runs, "machine": machine}
    lines = [f"# fingerprint memory: {DATA.name}, 2-worker LocalCluster, {result['cpus']} CPUs, "
             f"load average {result['load_average'][0]} -> {result['load_average'][1]}", "",
             "RSS of the driver and every descendant process (nannies, workers), sampled every 20 ms "
             "(benchmarks/harness.py).", "",
             "| cases | seconds | CPU s | samples/case | pooled samples | tree baseline MiB | tree peak MiB "
             "| peak - baseline MiB | driver baseline MiB | driver peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['cases']} | {r['seconds']} | {r['cpu_seconds']} | {r['samples_per_case']} | {r['pooled_samples']} "
                     f"| {r['baseline_tree_mib']} | {r['peak_tree_mib']} | {r['peak_tree_above_baseline_mib']} "
                     f"| {r['baseline_driver_mib']} | {r['peak_driver_mib']} |")
    lines += ["", f"Machine: {machine_line(result['machine'] | {'load_after': [round(x, 2) for x in os.getloadavg()]})}"]

    def plot(new_figure):
        fig, axes = new_figure(8, 3.2, 1, 2)
        labels = [f"{r['cases']} cases" for r in runs]
        bar_panel(axes[0][0], labels, [r["peak_tree_mib"] for r in runs], ylabel="MiB",
                  title="peak RSS, driver + Dask workers")
        bar_panel(axes[0][1], labels, [r["peak_tree_above_baseline_mib"] for r in runs], ylabel="MiB",
                  title="peak above the idle cluster")
        return fig

    write_results("fingerprint_memory", result, "\n".join(lines), plot)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (20, 100, 208))
