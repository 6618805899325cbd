"""Where a preprocessed case's time goes: seconds and share of each stage, small and large cases.

Each case runs through the product's own `preprocess_and_write` (read, preprocess, hash, write into a
fresh Zarr store, in this process) with a `StageTimes` clock, so the stages timed are the code that
runs, not a copy of it:

* read and decompress, reorient - `read_case` does both; the reorientation to RAS (`to_ras`) is
  timed again on its own on the case's file-order arrays and split off the read, then the store
  axis order and label value -> index mapping are added to it;
* crop, normalise, resample image, resample labels, pad, foreground locations;
* hashing (the raw files' sha256 stamps), Zarr encode and write (the case encoded in memory and
  its files written), metadata (opening the store - once for the hippocampus cases, as a batch
  task does - the `complete` flag, `CaseMeta`);
* other: the rest of the task's wall time (error handling, summaries).

Cases: hippocampus (small 1 mm MRI, no resampling; per-case mean over `--hippocampus` cases), the
TotalSegmentator CT case rebuilt at 0.8 x 0.8 x 1.5 mm (457x379x60) and planned with CT cases at
other spacings (benchmarks/preprocess.py `make_ct_dataset`), so it is resampled to the median
target, and a 256^3 volume at ~0.5 mm (`make_large_dataset`). Large cases: median of `--repeats`.

    python benchmarks/profile_preprocess.py [--hippocampus 40] [--repeats 3] [--size 256] [--name profile_preprocess]

Writes benchmarks/results/<name>.{json,md,png}. benchmarks/profile_stages.py calls
`profile_preprocessing()` and `stage_table()`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import RESULTS, SHARED, machine_info, machine_line, write_results  # noqa: E402
from preprocess import make_ct_dataset, make_large_dataset  # noqa: E402

from pipeline.data.dataset import load_dataset  # noqa: E402
from pipeline.data.nifti import geometry_of, to_ras  # noqa: E402
from pipeline.planning.fingerprint import compute_fingerprint  # noqa: E402
from pipeline.planning.planner import plan_experiment  # noqa: E402
from pipeline.preprocessing.preprocess import StageTimes, open_config_store, preprocess_and_write  # noqa: E402
from pipeline.preprocessing.store import config_attrs, open_store  # noqa: E402

CONFIG = "3d_fullres"
STAGES = ["read and decompress", "reorient", "crop", "normalise", "resample image", "resample labels", "pad",
          "foreground locations", "hashing", "Zarr encode and write", "metadata", "other"]


def _reorient_seconds(dataset, case_id: str) -> float:
    """`to_ras` of the case's image and label files, timed apart from reading them."""
    case = dataset.case(case_id)
    seconds = 0.0
    for path in [*case.images, case.label]:
        img = nib.load(str(path))
        data, geometry = np.asarray(img.dataobj), geometry_of(img)
        start = time.perf_counter()
        to_ras(data, geometry)
        seconds += time.perf_counter() - start
    return seconds


def profile_case(dataset, plans, case_id: str, store_path: Path, config_store=None) -> dict:
    """One run of `preprocess_and_write` on one case: seconds per stage, wall and CPU seconds.
    `config_store`: the store opened once for several cases, as `preprocess_batch` does."""
    clock = StageTimes()
    cpu, start = time.process_time(), time.perf_counter()
    result = preprocess_and_write(dataset, case_id, plans, CONFIG, str(store_path), clock=clock,
                                  config_store=config_store)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if not result["ok"]:
        raise RuntimeError(f"{case_id}: {result['message']}")
    stages = dict(clock.seconds)
    reorient = min(_reorient_seconds(dataset, case_id), stages.get("read and decompress", 0.0))
    stages["read and decompress"] = stages.get("read and decompress", 0.0) - reorient
    stages["reorient"] = stages.get("reorient", 0.0) + reorient
    stages["other"] = max(0.0, wall - sum(stages.values()))
    return {"stages": {s: stages.get(s, 0.0) for s in STAGES}, "wall_s": wall, "cpu_s": cpu,
            "shape": result["shape"]}


def _fresh_store(tmp: Path, dataset, plans) -> Path:
    store = tmp / "profile.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(store.with_name(store.name + ".lock"), ignore_errors=True)
    s = open_store(store, "a", dataset_name=plans.dataset_name)
    s.config(plans.configuration(CONFIG).data_identifier, plans.hash(CONFIG), create=True, **config_attrs(plans, CONFIG))
    return store


def _profile_set(name: str, description: str, dataset, plans, case_ids: list[str], repeats: int, tmp: Path) -> dict:
    """Per-stage seconds of one case: the median over repeats (one case) or the mean over cases (several)."""
    store = _fresh_store(tmp, dataset, plans)
    profile_case(dataset, plans, case_ids[0], store)  # warm-up: caches (resampling weights), imports
    # several cases share one open store, as the cases of a Dask task do (`preprocess_batch`)
    shared = open_config_store(str(store), plans, CONFIG) if len(case_ids) > 1 else None
    runs = [profile_case(dataset, plans, cid, store, shared) for cid in case_ids
            for _ in range(repeats if len(case_ids) == 1 else 1)]
    pick = statistics.median if len(case_ids) == 1 else statistics.fmean
    stages = {s: pick([r["stages"][s] for r in runs]) for s in STAGES}
    shutil.rmtree(store, ignore_errors=True)
    conf = plans.configuration(CONFIG)
    return {"name": name, "description": description, "cases": len(case_ids), "runs": len(runs),
            "stages": stages, "total_s": sum(stages.values()), "wall_s": pick([r["wall_s"] for r in runs]),
            "cpu_s": pick([r["cpu_s"] for r in runs]), "shape_in": list(dataset_shape(dataset, case_ids[0])),
            "shape_out": runs[0]["shape"][1:], "target_spacing": list(conf.spacing)}


def dataset_shape(dataset, case_id: str) -> tuple[int, ...]:
    return tuple(int(n) for n in nib.load(str(dataset.case(case_id).images[0])).shape[:3])


def profile_preprocessing(hippocampus_cases: int = 40, repeats: int = 3, size: int = 256,
                          tmp: Path | None = None) -> dict:
    """Per-stage profile of a small, a large CT and a size^3 case; a JSON-able dict (`stage_table`)."""
    result = {"machine": machine_info(), "stages": STAGES, "sets": []}
    with tempfile.TemporaryDirectory(prefix="profile_preprocess_", dir=tmp) as tmp_name:
        tmp = Path(tmp_name)
        hippo = load_dataset(SHARED / "Task04_Hippocampus")
        plans = plan_experiment(compute_fingerprint(hippo, progress=False), hippo)
        ids = [c.case_id for c in hippo.cases[:hippocampus_cases]]
        result["sets"].append(_profile_set("hippocampus", "Task04 MRI, 1 mm, no resampling; mean of the cases",
                                           hippo, plans, ids, 1, tmp))
        ct = load_dataset(make_ct_dataset(tmp / "ct", count=5))
        ct_plans = plan_experiment(compute_fingerprint(ct, progress=False), ct)
        result["sets"].append(_profile_set("CT 0.8x0.8x1.5 mm", "TotalSegmentator CT rebuilt at 0.8x0.8x1.5 mm, "
                                           "41 labels, resampled to the 5-case plan's target; median of repeats",
                                           ct, ct_plans, [ct.cases[0].case_id], repeats, tmp))
        large = load_dataset(make_large_dataset(replace(hippo, cases=hippo.cases[:3]), tmp / "large", 3, size))
        large_plans = plan_experiment(compute_fingerprint(large, progress=False), large)
        result["sets"].append(_profile_set(f"{size}^3", f"hippocampus upsampled to {size}^3 at ~0.5 mm, resampled "
                                           "to the 3-case plan's target; median of repeats",
                                           large, large_plans, [large.cases[0].case_id], repeats, tmp))
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def stage_table(result: dict, before: dict | None = None) -> str:
    """Markdown: one row per stage, seconds and share per case set (with `before`: before -> now)."""
    sets = result["sets"]
    old = {s["name"]: s for s in (before or {}).get("sets", [])}
    header = "| stage | " + " | ".join(f"{s['name']} s (share)" for s in sets) + " |"
    lines = [header, "|---|" + "---:|" * len(sets)]

    def cell(s: dict, stage: str | None) -> str:
        value = s["total_s"] if stage is None else s["stages"][stage]
        share = "" if stage is None else f" ({100 * value / s['total_s']:.0f}%)"
        was = old.get(s["name"])
        prefix = ""
        if was is not None:
            prefix = f"{was['total_s'] if stage is None else was['stages'][stage]:.4f} -> "
        return f"{prefix}{value:.4f}{share}"

    for stage in result["stages"]:
        lines.append(f"| {stage} | " + " | ".join(cell(s, stage) for s in sets) + " |")
    lines.append("| **total (wall)** | " + " | ".join(cell(s, None) for s in sets) + " |")
    lines.append("| CPU s | " + " | ".join(
        (f"{old[s['name']]['cpu_s']:.4f} -> " if s["name"] in old else "") + f"{s['cpu_s']:.4f}" for s in sets) + " |")
    return "\n".join(lines)


def markdown(result: dict, before: dict | None = None) -> str:
    lines = ["# Preprocessing profile per case (benchmarks/profile_preprocess.py)", "",
             f"Machine: {machine_line(result['machine'])}. Seconds per case of `preprocess_and_write` in one process "
             "(one thread), by stage; the share is of the case's wall time." +
             (" Before -> after: the earlier profile given with `--before`." if before else ""), ""]
    for s in result["sets"]:
        lines.append(f"* **{s['name']}**: {s['description']}; {s['shape_in']} -> {s['shape_out']} "
                     f"(target spacing {[round(x, 3) for x in s['target_spacing']]}), {s['runs']} run(s)")
    lines += ["", stage_table(result, before), ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, new_figure):
    """A stacked bar of stage shares per case set."""
    fig, axes = new_figure(9, 4)
    ax = axes[0][0]
    sets = result["sets"]
    bottom = np.zeros(len(sets))
    for stage in result["stages"]:
        shares = np.array([100 * s["stages"][stage] / s["total_s"] for s in sets])
        ax.bar([s["name"] for s in sets], shares, bottom=bottom, label=stage)
        bottom += shares
    ax.set_ylabel("% of the case's wall time")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title("Where a preprocessed case's time goes", fontsize=10)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hippocampus", type=int, default=40, help="hippocampus cases to average over")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each large case (median)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--name", default="profile_preprocess", help="result file name")
    parser.add_argument("--before", type=Path, default=None, help="an earlier result JSON to show beside this one")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result = profile_preprocessing(args.hippocampus, args.repeats, args.size)
    before = json.loads(args.before.read_text()) if args.before else None
    if before:
        result["before"] = {"date": before.get("machine", {}).get("date"), "sets": before["sets"]}
    paths = write_results(args.name, result, markdown(result, before), lambda nf: plot(result, nf), args.out)
    print(stage_table(result, before))
    print(f"-> {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
