"""Where the seconds of `segpipe predict` go: each step of predicting a case, timed, with its share.

Each case set is predicted in a fresh child process (so the interpreter and its imports are part
of the profile), calling the same public functions `predict_folder` calls, one step at a time, each
under its own timer:

  interpreter and imports | Ray start (Ray path only) | model load | read | preprocess |
  windows (network forward, unmirrored) | mirroring (the 7 flipped forwards of TTA) |
  window bookkeeping (slicing, Gaussian weighting, accumulation) | softmax | resample back |
  argmax | export (label values, post-processing, file orientation) | write (NIfTI encode, gzip, rename)

The forwards are timed by wrapping the network (with mirroring, 1 in 8 inputs of every batch is
unmirrored, so 1/8 of the forward time counts as windows, 7/8 as mirroring); softmax is timed on an array of the accumulator's shape and subtracted from the sliding
window's total, which includes it. Then, in the same child, the whole `predict_folder` on the
same cases (`--whole`): its wall seconds next to the sum of the steps show what running the steps
as a pipeline (overlapping reading, the network and export) gains.

Sets (`--sets`):
* `hippocampus`: `--cases` Task04 cases (../shared/data) with our planner's 3d_fullres plan (equal
  to nnU-Net's), mirroring on: the small-case profile, where per-process costs matter.
* `ct`: the TotalSegmentator CT case (122x101x30 at 3 mm, 42 classes) resampled to 1.5 mm before
  predicting with the 3 mm plan: preprocessing and export must really resample (42 probability
  channels back onto 244x202x60). Mirroring off.
* `SIZE` (e.g. `256`): a SIZE^3 volume tiled from a hippocampus image, predicted with the
  hippocampus `--large-config` (default 3d_lean: the same sliding-window machinery at 1/4 of
  3d_fullres's forward cost). Mirroring off.

Networks are seeded untrained ones: time does not depend on the weights.

    python benchmarks/profile_predict.py [--sets hippocampus,ct,256] [--cases 10] [--threads 2] [--device cpu|cuda]
        [--name profile_predict]

Writes benchmarks/results/<name>.{json,md,png}. `benchmarks/profile_stages.py` runs it with the
preprocessing profile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the code a child measures: this checkout, or a --compare checkout (SEGPIPE_PROFILE_CODE). It goes first on
# sys.path: on PYTHONPATH alone it would come after this checkout, and both sides would run this one's code
CODE = Path(os.environ.get("SEGPIPE_PROFILE_CODE") or REPO).resolve()
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(CODE))

STEPS = ["interpreter and imports", "Ray start", "model load", "read", "preprocess", "windows (network)",
         "mirroring", "window bookkeeping", "softmax", "resample back", "argmax", "export", "write", "other"]


def process_age_s() -> float:
    """Seconds since this process started (from /proc: the interpreter's own start-up included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


# ---------------------------------------------------------------- the child: one set, step by step


def child(workdir: str, config: str, input_dir: str, output_dir: str, tta: bool, threads: int, ray_start: bool,
          whole: bool, device: str = "cpu") -> dict:
    import numpy as np
    import torch

    from pipeline.data.dataset import read_case
    from pipeline.data.nifti import from_ras
    from pipeline.inference.export import restore_probabilities, write_prediction
    from pipeline.inference.predict import group_input_files, predict_folder
    from pipeline.inference.predictor import ModelSpec, Predictor, find_model, input_dataset
    from pipeline.inference.sliding_window import softmax_
    from pipeline.preprocessing.preprocess import preprocess_case

    imports_s = process_age_s()
    torch.set_num_threads(threads)
    steps = dict.fromkeys(STEPS, 0.0)
    cpu = dict.fromkeys(STEPS, 0.0)  # CPU seconds of this process (all threads): steadier on a loaded machine
    steps["interpreter and imports"] = imports_s
    cpu["interpreter and imports"] = time.process_time()

    @contextlib.contextmanager
    def timed(name: str):
        t, c = time.perf_counter(), time.process_time()
        yield
        steps[name] += time.perf_counter() - t
        cpu[name] += time.process_time() - c

    run_dirs = find_model(workdir, config, "0")
    spec = ModelSpec(run_dirs=tuple(str(r) for r in run_dirs), tta=tta, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if ray_start:  # what the Ray path pays before its first case: a local Ray and one actor with the model
        import ray

        from pipeline.parallel import ray_session

        class Loader:
            def __init__(self, spec):
                self.predictor = Predictor.from_spec(spec)

            def ready(self) -> bool:
                return True

        with timed("Ray start"), ray_session(None, num_cpus=threads):
            actor = ray.remote(Loader).options(num_cpus=1).remote(spec)
            ray.get(actor.ready.remote())
            ray.kill(actor)
    with timed("model load"):
        predictor = Predictor.from_spec(spec)
    # as finish_case resamples (several channels at once), where the code measured has that option
    resample_threads = ({"threads": torch.get_num_threads()}
                        if "threads" in inspect.signature(restore_probabilities).parameters else {})
    forwards = {"plain_cpu": 0.0, "mirrored_cpu": 0.0}
    lock = threading.Lock()
    passes = 8 if tta else 1

    class TimedNetwork(torch.nn.Module):
        """The network, its forward calls timed."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            # A forward lane (sliding_window.auto_lanes) is a thread of its own with one torch thread, and two
            # run at once: the process's CPU clock would count the other lane as well, the thread's does not.
            # On the calling thread (one lane) the process's clock also counts torch's intra-op threads.
            clock = time.process_time if threading.current_thread() is threading.main_thread() else time.thread_time
            c = clock()
            out = self.net(x)
            sync()
            # every window has 1 plain and passes - 1 mirrored inputs, however they are batched
            cpu_s = clock() - c
            with lock:
                forwards["plain_cpu"] += cpu_s / passes
                forwards["mirrored_cpu"] += cpu_s * (passes - 1) / passes
            return out

    network = predictor.network
    predictor.network = TimedNetwork(network)
    cases = group_input_files(input_dir, predictor.num_channels)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = []
    for case in cases:
        with timed("read"):
            data = read_case(input_dataset(predictor.plans, Path(case.images[0]).parent, [case]), case, with_label=False)
        with timed("preprocess"):
            pre = preprocess_case(dataclasses.replace(data, label=None), predictor.plans, predictor.config_name,
                                  predictor.label_map)
        before = dict(forwards)
        t, c = time.perf_counter(), time.process_time()
        probs = predictor.store_probabilities(pre.image)
        sync()
        window_s, window_cpu = time.perf_counter() - t, time.process_time() - c
        scratch = np.array(probs, dtype=np.float32, copy=True)
        t, c = time.perf_counter(), time.process_time()
        for row in range(scratch.shape[1]):  # as the accumulator does it
            softmax_(scratch[:, row])
        softmax_s, softmax_cpu = time.perf_counter() - t, time.process_time() - c
        del scratch
        plain_cpu, mirrored_cpu = forwards["plain_cpu"] - before["plain_cpu"], forwards["mirrored_cpu"] - before["mirrored_cpu"]
        # lanes overlap, so the forwards' own wall seconds would add up to more than the window loop took:
        # the loop's wall seconds are split by the CPU seconds instead
        share = min(1.0, (plain_cpu + mirrored_cpu) / window_cpu) if window_cpu > 0 else 0.0
        plain = window_s * share * plain_cpu / max(plain_cpu + mirrored_cpu, 1e-12)
        mirrored = window_s * share - plain
        steps["windows (network)"] += plain
        steps["mirroring"] += mirrored
        steps["softmax"] += softmax_s
        steps["window bookkeeping"] += max(0.0, window_s - plain - mirrored - softmax_s)
        cpu["windows (network)"] += plain_cpu
        cpu["mirroring"] += mirrored_cpu
        cpu["softmax"] += softmax_cpu
        cpu["window bookkeeping"] += max(0.0, window_cpu - plain_cpu - mirrored_cpu - softmax_cpu)
        with timed("resample back"):
            probabilities = restore_probabilities(np.asarray(probs), pre.meta, **resample_threads)
        with timed("argmax"):
            index = probabilities.argmax(0)
        with timed("export"):
            label = predictor.label_map.to_values(index)
            if predictor.rule is not None:
                from pipeline.inference.postprocessing import apply_postprocessing

                label = apply_postprocessing(label, predictor.rule)
            from_ras(label, data.geometry)
        with timed("write"):
            write_prediction(label, data.geometry, out / f"{case.case_id}.nii.gz", case.images[0])
        shapes.append({"case": case.case_id, "input": list(data.image.shape[1:]), "store": list(pre.image.shape[1:]),
                       "classes": predictor.label_map.num_classes})
        del probs, probabilities, pre, data
    steps["other"] = max(0.0, process_age_s() - sum(steps.values()))
    cpu["other"] = max(0.0, time.process_time() - sum(cpu.values()))
    import pipeline

    result = {"cases": len(cases), "steps": {k: round(v, 4) for k, v in steps.items()},
              "pipeline_from": str(Path(pipeline.__file__).resolve().parents[1]),
              "cpu": {k: round(v, 4) for k, v in cpu.items()}, "shapes": shapes[:3],
              "sequential_total_s": round(process_age_s(), 3), "threads": threads, "tta": tta, "config": config}
    if whole:
        predictor.network = network
        t, c = time.perf_counter(), time.process_time()
        report = predict_folder(workdir, input_dir, str(out) + "_whole", config=config, fold="0", tta=tta,
                                progress=False, device=device)
        result["predict_folder_s"] = round(time.perf_counter() - t, 3)
        result["predict_folder_cpu_s"] = round(time.process_time() - c, 3)
        result["predict_folder_cases"] = len(report.predicted)
    return result


# ---------------------------------------------------------------- the parent: inputs, models, the table


def ct_input(dest: Path, spacing: float) -> dict:
    """The TotalSegmentator CT case resampled (linear) from 3 mm to `spacing` mm: CT_0000.nii.gz."""
    import nibabel as nib
    import numpy as np
    from harness import SHARED
    from scipy.ndimage import zoom

    src = SHARED / "TotalSegmentator_CT" / "imagesTr" / "totalseg_ct_sm.nii.gz"
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    factor = zooms / spacing
    out = np.round(zoom(data, factor, order=1)).astype(np.int16)
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, :3] / factor
    dest.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, affine), str(dest / "CT_0000.nii.gz"))
    return {"source_shape": list(data.shape), "source_spacing": zooms.tolist(), "shape": list(out.shape),
            "spacing": [spacing] * 3}


def prepare(sets: list[str], cases: int, large_config: str, tmp: Path, ct_spacing: float) -> list[dict]:
    """Workdirs with plans and seeded models, and input folders, for every set."""
    from harness import SHARED
    from inference import make_model
    from predict import hippocampus_inputs, large_volume

    from pipeline.data.dataset import load_dataset

    jobs = []
    hippo_wd = None
    hippo = SHARED / "Task04_Hippocampus"
    has_ray = importlib.util.find_spec("ray") is not None  # a GPU image may lack Ray: then its start is not timed
    if not has_ray and "hippocampus" in sets:
        print("Ray is not installed: the hippocampus set's Ray start is not measured")
    for name in sets:
        if name == "ct":
            root = SHARED / "TotalSegmentator_CT"
            if not (root / "dataset.json").is_file():
                print(f"skipping ct: {root} not found")
                continue
            wd, plans = make_model(tmp / "work_ct", load_dataset(root), ["3d_fullres"])
            info = ct_input(tmp / "in_ct", ct_spacing)
            info["patch_size"] = plans.configuration("3d_fullres").patch_size
            info["plan_spacing"] = plans.configuration("3d_fullres").spacing
            jobs.append({"set": "ct", "label": f"TotalSegmentator CT at {ct_spacing} mm (3 mm plan)", "workdir": wd.root,
                         "config": "3d_fullres", "inputs": tmp / "in_ct", "tta": False, "info": info})
            continue
        if not (hippo / "dataset.json").is_file():
            print(f"skipping {name}: {hippo} not found")
            continue
        dataset = load_dataset(hippo)
        if hippo_wd is None:
            hippo_wd, _ = make_model(tmp / "work_hippo", dataset, ["3d_fullres", large_config])
        if name == "hippocampus":
            ids = hippocampus_inputs(dataset, cases, tmp / "in_hippo")
            jobs.append({"set": "hippocampus", "label": f"hippocampus, {len(ids)} cases", "workdir": hippo_wd.root,
                         "config": "3d_fullres", "inputs": tmp / "in_hippo", "tta": True, "ray": has_ray,
                         "info": {"cases": ids}})
        else:
            size = int(name)
            info = large_volume(dataset, size, tmp / f"in_{size}")
            jobs.append({"set": name, "label": f"{size}^3 volume ({large_config})", "workdir": hippo_wd.root,
                         "config": large_config, "inputs": tmp / f"in_{size}", "tta": False, "info": info})
    return jobs


def markdown(result: dict) -> str:
    from harness import machine_line, md_table

    sets = [s for s in result["sets"] if "steps" in s]
    header = ["step"] + [f"{s['label']}: wall s (share) / CPU s" for s in sets]
    rows = []
    for step in STEPS:
        cells = []
        for s in sets:
            v, c = s["steps"].get(step, 0.0), s.get("cpu", {}).get(step)
            cpu = f" / {c:.2f}" if c is not None else ""
            if step == "Ray start":
                cells.append(f"{v:.2f} (Ray path only)" if v else "–")
            else:
                cells.append(f"{v:.2f} ({100 * v / s['total_s']:.1f}%){cpu}" if v else "–")
        rows.append([step] + cells)
    rows.append(["**total (sequential, in-process)**"] + [
        f"**{s['total_s']:.2f}**" + (f" / {sum(s['cpu'].values()):.2f}" if "cpu" in s else "") for s in sets])
    rows.append(["per case"] + [f"{s['total_s'] / s['cases']:.2f}" for s in sets])
    if any("predict_folder_s" in s for s in sets):
        rows.append(["`predict_folder` on the same cases (same process, warm)"] +
                    [f"{s['predict_folder_s']:.2f} ({s['predict_folder_s'] / s['cases']:.2f}/case)"
                     + (f" / {s['predict_folder_cpu_s']:.2f}" if "predict_folder_cpu_s" in s else "")
                     if "predict_folder_s" in s else "–" for s in sets])
    lines = [f"# Prediction profile ({result['meta']['when']})", "", machine_line(result["machine"]), "",
             md_table(header, rows), ""]
    for s in sets:
        lines.append(f"* **{s['label']}**: {s['cases']} case(s), config {s['config']}, mirroring "
                     f"{'on' if s['tta'] else 'off'}, {s['threads']} torch threads; {json.dumps(s.get('info', {}))[:300]}; "
                     f"shapes {json.dumps(s.get('shapes', []))[:300]}")
    for s in result["sets"]:
        if "error" in s:
            lines.append(f"* {s['label']}: FAILED {s['error']}")
    lines += ["", "Every step calls the public function `predict_folder` uses, in a fresh process; Ray start (a local "
              "Ray and one actor with the model loaded) is paid only by `--num-workers`/`--ray-address` runs, once "
              "per folder, and is left out of the total. `other`: the remainder of the process's life (Python "
              "overhead between steps, garbage collection). Command: `" + result["meta"]["command"] + "`."]
    return "\n".join(lines) + "\n"


def plot(result: dict, new_figure):
    import numpy as np

    sets = [s for s in result["sets"] if "steps" in s]
    if not sets:
        return None
    fig, ax = new_figure(9, 4.5)
    ax = ax.flat[0] if hasattr(ax, "flat") else ax
    steps = [st for st in STEPS if st != "Ray start" and any(s["steps"].get(st) for s in sets)]
    left = np.zeros(len(sets))
    cmap = __import__("matplotlib").colormaps["tab20"]
    for i, step in enumerate(steps):
        share = np.array([100 * s["steps"].get(step, 0.0) / s["total_s"] for s in sets])
        ax.barh([s["label"] for s in sets], share, left=left, label=step, color=cmap(i % 20))
        left += share
    ax.set_xlabel("share of the sequential in-process total (%)")
    ax.set_title("Where prediction time goes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("WORKDIR", "CONFIG", "INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    ap.add_argument("--tta", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    ap.add_argument("--no-whole", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ray", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sets", default="hippocampus,ct,256", help="hippocampus, ct and/or an edge length (e.g. 256)")
    ap.add_argument("--cases", type=int, default=10, help="hippocampus cases")
    ap.add_argument("--large-config", default="3d_lean", help="configuration for the SIZE^3 volume")
    ap.add_argument("--ct-spacing", type=float, default=1.5, help="mm of the resampled CT input")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the network, the accumulators)")
    ap.add_argument("--whole", default="hippocampus,ct",
                    help="sets whose cases are also predicted by the whole predict_folder after the steps")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--compare", default=None, metavar="DIR",
                    help="another checkout (e.g. before a change): every set is profiled with its `pipeline` too, "
                         "interleaved with this one's, rows labelled (before) / (after)")
    ap.add_argument("--name", default="profile_predict")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, tta=args.tta == "on", threads=args.threads, ray_start=args.ray,
                               whole=not args.no_whole, device=args.device)), flush=True)
        return 0

    from harness import RESULTS, machine_info, python_env, run_command, write_results

    machine = machine_info()
    command = "python benchmarks/profile_predict.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"benchmark": args.name, "device": args.device, "machine": machine, "sets": [],
              "meta": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command.strip(),
                       "args": vars(args)}}
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="segpipe_profile_predict_") as d:
        tmp = Path(d)
        print("preparing models and inputs ...", flush=True)
        jobs = prepare(sets, args.cases, args.large_config, tmp, args.ct_spacing)
        codes = [("before", args.compare), ("after", None)] if args.compare else [("", None)]
        for job, (tag, code) in [(j, c) for j in jobs for c in codes]:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(job["workdir"]), job["config"],
                   str(job["inputs"]), str(tmp / f"out_{job['set']}{tag}"), "--tta", "on" if job["tta"] else "off",
                   "--threads", str(args.threads), "--device", args.device] + (["--ray"] if job.get("ray") else []) + \
                  ([] if job["set"] in args.whole.split(",") else ["--no-whole"])
            load_before = [round(x, 2) for x in os.getloadavg()]
            env = python_env(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
            env["SEGPIPE_PROFILE_CODE"] = str(Path(code or REPO).resolve())
            run = run_command(cmd, env=env, cwd=REPO, timeout=args.timeout)
            entry = {"set": job["set"], "label": job["label"] + (f" ({tag})" if tag else ""), "code": code or str(REPO), "info": job["info"], "load_before": load_before,
                     "load_after": [round(x, 2) for x in os.getloadavg()], "peak_rss_tree_mib": round(run.peak_rss_tree_mib, 1)}
            if not run.ok or not run.output:
                entry["error"] = run.error()
                print(f"{entry['label']}: FAILED {entry['error']}\n{run.stderr_tail[-2000:]}", flush=True)
            elif run.output.get("pipeline_from") != env["SEGPIPE_PROFILE_CODE"]:
                entry["error"] = f"measured {run.output.get('pipeline_from')}'s code instead of {env['SEGPIPE_PROFILE_CODE']}"
                print(f"{entry['label']}: FAILED {entry['error']}", flush=True)
            else:
                entry.update(run.output)
                entry["total_s"] = sum(v for k, v in run.output["steps"].items() if k != "Ray start")
                print(f"{entry['label']}: {entry['total_s']:.1f} s sequential"
                      + (f", predict_folder {entry['predict_folder_s']:.1f} s" if "predict_folder_s" in entry else ""),
                      flush=True)
            result["sets"].append(entry)
            # after every set: a run cut off by a time limit keeps the sets it finished
            paths = write_results(args.name, result, markdown(result), lambda nf: plot(result, nf), args.out or RESULTS)
    if not result["sets"]:
        paths = write_results(args.name, result, markdown(result), lambda nf: plot(result, nf), args.out or RESULTS)
    print(paths["md"].read_text())
    return 0 if all("steps" in s for s in result["sets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
