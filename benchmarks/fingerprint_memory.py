"""Peak memory of `compute_fingerprint` on 20, 100 and 208 hippocampus cases (2-worker LocalCluster).

The claim to check: memory does not grow with the case count, because each task reads one case
and returns a few kilobytes, futures are released as they complete, and the pooled intensity
sample has a fixed budget. A thread samples VmRSS from /proc for this process and every
descendant (the nannies and workers of the LocalCluster) every 20 ms; psutil is not needed.
Each case count gets a fresh cluster, so every run starts from the same baseline.
Writes benchmarks/results/fingerprint_memory.{json,md}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

from pipeline.dataset import load_dataset
from pipeline.fingerprint import compute_fingerprint
from pipeline.parallel import dask_client

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEGPIPE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "Task04_Hippocampus"
MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident set size of one process from /proc (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from the parent ids in /proc/<pid>/stat."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces; fields after the closing parenthesis are fixed
        fields = stat[stat.rfind(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        tree.extend(children)
        frontier = children
    return tree


class TreeSampler:
    """Samples the RSS of this process tree in a thread; keeps the peak of the sum and of the driver."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_total = self.peak_driver = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        pids = descendants(me)
        last_scan = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_scan > 0.5:  # rescan: workers may be restarted
                pids, last_scan = descendants(me), time.monotonic()
            sizes = {p: rss_bytes(p) for p in pids}
            self.peak_total = max(self.peak_total, sum(sizes.values()))
            self.peak_driver = max(self.peak_driver, sizes.get(me, 0))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(n: int) -> dict:
    dataset = load_dataset(DATA)
    dataset = dataclasses.replace(dataset, cases=dataset.cases[:n])
    with dask_client(workers=2) as client:
        time.sleep(1.0)  # let the workers settle
        tree = descendants(os.getpid())
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
        "peak_tree_mib": round(sampler.peak_total / MIB, 1),
        "peak_tree_above_baseline_mib": round((sampler.peak_total - baseline_total) / MIB, 1),
        "baseline_driver_mib": round(baseline_driver / MIB, 1),
        "peak_driver_mib": round(sampler.peak_driver / MIB, 1),
        "rss_samples": sampler.samples,
    }


def main(counts=(20, 100, 208)) -> dict:
    if not (DATA / "dataset.json").is_file():
        sys.exit(f"{DATA} not found")
    load_before = os.getloadavg()[0]
    runs = [measure(n) for n in counts]
    result = {"dataset": DATA.name, "workers": 2, "cpus": len(os.sched_getaffinity(0)),
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)], "runs": runs}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fingerprint_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# fingerprint memory: {DATA.name}, 2-worker LocalCluster, {result['cpus']} CPUs, "
             f"load average {result['load_average'][0]} -> {result['load_average'][1]}", "",
             "RSS of the driver and every descendant process (nannies, workers), sampled every 20 ms.", "",
             "| cases | seconds | samples/case | pooled samples | tree baseline MiB | tree peak MiB | peak - baseline MiB "
             "| driver baseline MiB | driver peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['cases']} | {r['seconds']} | {r['samples_per_case']} | {r['pooled_samples']} "
                     f"| {r['baseline_tree_mib']} | {r['peak_tree_mib']} | {r['peak_tree_above_baseline_mib']} "
                     f"| {r['baseline_driver_mib']} | {r['peak_driver_mib']} |")
    (out / "fingerprint_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (20, 100, 208))
