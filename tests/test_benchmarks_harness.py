"""The benchmark harness measures what it claims: a child's memory, its CPU time, and writes its result files;
the prediction benchmark gives nnU-Net consecutive CT labels that map back to the dataset's values."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(script: str):
    """benchmarks/<script>.py as the module `benchmarks_<script>` (the scripts import `harness` by name)."""
    name = f"benchmarks_{script}"
    if name in sys.modules:
        return sys.modules[name]
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def load_harness():
    return load_benchmark("harness")


# holds 200 MiB of touched pages for a moment, burns ~0.3 s of CPU, then reports a figure of its own
ALLOCATE_200MB = (
    "import time\n"
    "block = bytearray(b'\\x01') * (200 * 2**20)\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < 0.3: pass\n"
    "print('{\"items_per_s\": 42.0}')\n"
)


def test_peak_rss_cpu_and_output_of_a_child_are_measured_and_written(tmp_path):
    harness = load_harness()
    m = harness.measure("alloc", [sys.executable, "-c", ALLOCATE_200MB], repeats=1, warmup=0, timeout=60)
    assert m.ok, [r.error() for r in m.warmup + m.runs]
    run = m.runs[0]
    assert run.peak_rss_tree_mib >= 150  # sampled from /proc while the child held the block
    assert run.max_rss_single_mib >= 150  # the kernel's own high-water mark agrees
    assert run.cpu_s >= 0.25
    assert run.output == {"items_per_s": 42.0}
    stats = m.stats()
    assert stats["output"]["items_per_s"]["median"] == 42.0

    machine = harness.machine_info()
    paths = harness.write_results("alloc", {"measurement": m.to_json(), "machine": machine},
                                  harness._markdown("alloc", m, machine), out_dir=tmp_path)
    data = json.loads((tmp_path / "alloc.json").read_text())
    assert data["measurement"]["runs"][0]["peak_rss_tree_mib"] >= 150
    assert data["machine"]["cores"] >= 1 and data["machine"]["load_after"]
    assert "peak RSS of the process tree" in (tmp_path / "alloc.md").read_text()
    assert set(paths) == {"json", "md"}


def test_descendants_are_counted_and_leftovers_ended(tmp_path):
    harness = load_harness()
    # the child starts a grandchild holding 100 MiB, waits until it holds it, and exits without waiting for it
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', \"b = bytearray(b'\\\\x01') * (100 * 2**20); "
            "print('ready', flush=True); import time; time.sleep(30)\"], stdout=subprocess.PIPE)\n"
            "p.stdout.readline()\n"
            "time.sleep(1.0)\n")
    run = harness.run_command([sys.executable, "-c", code], timeout=60)
    assert run.ok, run.error()
    assert run.processes >= 2
    assert run.peak_rss_tree_mib >= 100
    assert len(run.left_running) == 1  # the grandchild outlived its parent: reported, then ended
    pid = int(run.left_running[0].split()[0])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def test_spread_reports_median_range_and_quartiles():
    harness = load_harness()
    s = harness.spread([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] <= s["median"] <= s["q3"]
    assert harness.fmt_spread(s, 1) == "2.5 (1.0-10.0)"
    assert harness.spread([])["median"] is None


def load_run_all():
    load_harness()
    return load_benchmark("run_all")


def test_summary_and_readme_table_come_from_the_result_files(tmp_path, monkeypatch):
    run_all = load_run_all()
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    machine = {"date": "2026-01-02 03:04 UTC", "cores": 2, "cpu_model": "x", "memory_gib": 1, "gpus": [],
               "load_before": [1.0, 1.0, 1.0]}
    runs = [{"tool": "seg-pipeline", "workers": 2, "mode": "segpipe preprocess --workers 2 (CLI)", "cases_per_s": 6.0,
             "peak_rss_tree_MiB": 300.0, "cpu_s_per_case": 0.1},
            {"tool": "nnU-Net v2", "workers": 2, "mode": "nnUNetv2_preprocess -np 2", "cases_per_s": 2.0,
             "peak_rss_tree_MiB": 3000.0, "cpu_s_per_case": 0.5}]
    (tmp_path / "preprocess.json").write_text(json.dumps(
        {"machine": machine, "sets": {"Task04_Hippocampus": {"cases": 40, "runs": runs}}}))
    text = run_all.write_summary([], {**machine, "load_after": [2.0, 2.0, 2.0]}, "quick", "python benchmarks/run_all.py --quick", [])
    row = next(line for line in text.splitlines() if line.startswith("| Preprocessing throughput"))
    assert "| 6.00 | 2.00 | 3.0x faster | CPU |" in row and "2026-01-02 03:04" in row
    assert "10.0x less" in text  # peak RSS 300 vs 3000 MiB
    assert (tmp_path / "SUMMARY.md").read_text() == text

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Measured results\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\n## Next\n")
    run_all.update_readme(readme, {**machine, "load_after": [2.0] * 3}, "python benchmarks/run_all.py --quick")
    new = readme.read_text()
    assert "old" not in new and new.endswith("<!-- results:end -->\n\n## Next\n")
    assert "(benchmarks/results/preprocess.md)" in new and "`python benchmarks/run_all.py --quick`" in new


def test_a_quick_run_never_hides_the_full_suites_figure(tmp_path, monkeypatch):
    run_all = load_run_all()
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    assert run_all.results_dir(True) == tmp_path / "quick" and run_all.results_dir(False) == tmp_path
    (tmp_path / "quick").mkdir()
    val = lambda s: json.dumps({"machine": {"date": "2026-01-02 03:04 UTC"}, "cases": 208,  # noqa: E731
                                "threads": [4], "best_s": {"headers only": 0.1, "full": s}})
    (tmp_path / "quick" / "validation_speed.json").write_text(val(9.0))
    row = next(r for r in run_all.headline_rows() if "validate" in r[0])
    assert "quick/validation_speed.md" in row[-1] and "quick run" in row[-1]
    (tmp_path / "validation_speed.json").write_text(val(1.0))  # the full suite's result wins
    row = next(r for r in run_all.headline_rows() if "validate" in r[0])
    assert "(validation_speed.md)" in row[-1] and "quick" not in row[-1]


# ---------------------------------------------------------------- predict.py: the CT set's inputs


def test_ct_raw_dataset_for_nnunet_renumbers_the_41_labels_and_maps_back_to_their_values(totalseg, tmp_path):
    from pipeline.data.dataset import load_dataset

    bench = load_benchmark("predict")
    dataset = load_dataset(totalseg)
    values = dataset.label_map.values
    raw = tmp_path / "raw" / bench.CT_DATASET
    meta = bench.nnunet_ct_raw(dataset, values, raw)

    # nnU-Net's rule: labels 0..K-1, in the order of the values (so class i is our store index i)
    assert sorted(meta["labels"].values()) == list(range(len(values))) == list(range(42))
    assert json.loads((raw / "dataset.json").read_text()) == meta
    case = dataset.cases[0]
    original = nib.load(str(case.label))
    renumbered = nib.load(str(raw / "labelsTr" / f"{case.case_id}.nii.gz"))
    index = np.asarray(renumbered.dataobj)
    assert index.dtype == np.uint8 and int(index.max()) <= 41
    assert np.allclose(renumbered.affine, original.affine)
    # what the benchmark does to nnU-Net's outputs before comparing: values[index] gives the dataset's labels back
    assert np.array_equal(np.asarray(values)[index], np.asarray(original.dataobj))
    assert (raw / "imagesTr" / f"{case.case_id}_0000.nii.gz").is_file()

    # a second call keeps the folder (nnU-Net's plans beside it stay valid)
    stamp = (raw / "labelsTr" / f"{case.case_id}.nii.gz").stat().st_mtime_ns
    bench.nnunet_ct_raw(dataset, values, raw)
    assert (raw / "labelsTr" / f"{case.case_id}.nii.gz").stat().st_mtime_ns == stamp


def test_label_agreement_compares_renumbered_outputs_as_label_values(tmp_path):
    bench = load_benchmark("predict")
    ours = np.array([[[0, 1, 117], [52, 52, 0]]], dtype=np.int16)  # values
    theirs = np.array([[[0, 1, 3], [2, 1, 0]]], dtype=np.uint8)  # indices into (0, 1, 52, 117)
    for folder, array in (("a", ours), ("b", theirs)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / folder / "case.nii.gz"))
    same = bench.label_agreement(tmp_path / "a", tmp_path / "b", (0, 1, 52, 117))
    assert same["voxel_agreement"] == round(5 / 6, 6)  # one voxel: 52 vs index 1 (= value 1)
    assert bench.label_agreement(tmp_path / "a", tmp_path / "b")["voxel_agreement"] == round(3 / 6, 6)


def test_where_our_plan_differs_from_nnunets_the_benchmark_runs_nnunets_topology(totalseg, tmp_path):
    from pipeline.data.dataset import load_dataset
    from pipeline.planning.fingerprint import compute_fingerprint
    from pipeline.planning.planner import plan_experiment

    bench = load_benchmark("predict")
    dataset = load_dataset(totalseg)
    plans = plan_experiment(compute_fingerprint(dataset, progress=False), dataset)
    ours = plans.configuration("3d_fullres")
    theirs = {"patch_size": [32, 96, 96], "spacing": [3.0, 2.5, 2.5], "architecture": {"arch_kwargs": {
        "strides": ours.strides, "kernel_sizes": ours.kernel_sizes, "features_per_stage": [16, 32, 64, 128, 256],
        "n_conv_per_stage": [ours.n_conv_per_stage] * ours.num_stages}}}
    nnunet_plans = tmp_path / "nnUNetPlans.json"
    nnunet_plans.write_text(json.dumps({"configurations": {"3d_fullres": theirs}}))

    topo = bench.adopt_nnunet_topology(plans, nnunet_plans)
    assert topo["differences"] == ["patch_size", "features_per_stage", "spacing"]  # reported as our planner chose
    assert "nnU-Net's numbers" in topo["adopted"]
    assert bench.topology_check(plans, nnunet_plans)["differences"] == []  # and now built at nnU-Net's
    assert plans.configuration("3d_fullres").features_per_stage == [16, 32, 64, 128, 256]
