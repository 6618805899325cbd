"""The planner reproduces nnU-Net v2's default ExperimentPlanner.

Reference values: nnunetv2 2.8.1 (dynamic-network-architectures 0.4.4, torch 2.13.0 CPU), from
`nnUNetv2_plan_and_preprocess -d 4 501 502 --verify_dataset_integrity -c 2d 3d_fullres -np 2` on the
shared datasets converted to nnU-Net's raw layout (channel names MRI / MRI / CT; TotalSegmentator's
labels relabelled 0..41), and `nnUNetv2_plan_experiment -d 900 901` on two hand-written synthetic
fingerprints; recorded with provenance in tests/reference/nnunet_v2_plans.json.

Axes: nnU-Net plans in the axis order SimpleITK reads each file in, (z, y, x) of the voxel array,
without reorienting. Our store order is RAS permuted by transpose_forward, coarsest axis first and
ties resolved as nnU-Net sees a RAS file (S, A, R), so for RAS-stored files (hippocampus,
TotalSegmentator, the synthetic fingerprints) every per-axis value compares one to one. The SCT
dataset mixes RAS, PSR and LAS files: nnU-Net's median shape mixes physical axes there, ours does
not, so its patch differs, deliberately (see test_sct_differs_from_nnunet_only_by_its_frame).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.dataset import CaseFiles, Dataset, load_dataset
from pipeline.errors import BadInputError
from pipeline.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, compute_fingerprint
from pipeline.planning.planner import (
    _plan_configuration,
    explain_plans,
    feature_map_voxels,
    plan_experiment,
    pool_and_conv_props,
)
from pipeline.planning.plans import Plans

S2, S3 = [2, 2], [2, 2, 2]
K2, K3 = [3, 3], [3, 3, 3]


def _planned(path: Path, gpu_memory_gb: float = 8.0):
    dataset = load_dataset(path)
    fingerprint = compute_fingerprint(dataset, progress=False)
    return fingerprint, dataset, plan_experiment(fingerprint, dataset, gpu_memory_gb)


@pytest.fixture(scope="module")
def hippo_plans(hippocampus):
    return _planned(hippocampus)


@pytest.fixture(scope="module")
def totalseg_planned(totalseg):
    return _planned(totalseg)


@pytest.fixture(scope="module")
def sct_plans(spinalcord):
    return _planned(spinalcord)[2]


def test_hippocampus_matches_nnunet(hippo_plans):
    _, _, plans = hippo_plans
    # nnU-Net transpose_forward [0, 1, 2] on (z, y, x): our store axes are S, A, R of RAS
    assert plans.transpose_forward == [2, 1, 0]
    full = plans.configuration("3d_fullres")
    assert full.spacing == [1.0, 1.0, 1.0]
    assert full.median_shape == [36, 50, 35]
    assert full.patch_size == [40, 56, 40]
    assert full.batch_size == 7
    assert full.strides == [[1, 1, 1], S3, S3, S3]
    assert full.kernel_sizes == [K3] * 4
    assert full.features_per_stage == [32, 64, 128, 256]
    assert full.normalization_schemes == ["zscore"] and full.use_mask_for_norm == [False]
    two = plans.configuration("2d")
    assert two.spacing == [1.0, 1.0]
    assert two.patch_size == [56, 40]
    assert two.batch_size == 292
    assert two.strides == [[1, 1], S2, S2, S2]
    assert two.kernel_sizes == [K2] * 4
    assert two.features_per_stage == [32, 64, 128, 256]
    assert two.normalization_schemes == ["zscore"] and two.use_mask_for_norm == [False]
    assert "3d_lowres" not in plans.configurations  # the patch covers the whole median image


def test_totalsegmentator_ct_matches_nnunet(totalseg_planned):
    _, _, plans = totalseg_planned
    assert plans.transpose_forward == [2, 1, 0]
    full = plans.configuration("3d_fullres")
    assert full.spacing == [3.0, 3.0, 3.0]
    assert full.median_shape == [30, 101, 122]
    assert full.patch_size == [32, 112, 128]
    assert full.batch_size == 2
    assert full.strides == [[1, 1, 1], S3, S3, S3, [1, 2, 2]]
    assert full.kernel_sizes == [K3] * 5
    assert full.features_per_stage == [32, 64, 128, 256, 320]
    two = plans.configuration("2d")
    assert two.patch_size == [112, 128] and two.batch_size == 2
    assert two.strides == [[1, 1], S2, S2, S2, S2]
    assert two.features_per_stage == [32, 64, 128, 256, 512]
    assert full.normalization_schemes == two.normalization_schemes == ["ct"]
    assert full.use_mask_for_norm == [False]


def test_ct_normalisation_uses_foreground_statistics_close_to_nnunets(totalseg_planned):
    _, _, plans = totalseg_planned
    (norm,) = plans.normalization
    assert norm.scheme == "ct" and not norm.use_nonzero_mask
    # nnU-Net's fingerprint (1e8 voxels drawn with replacement from the one case); ours samples
    # 200,000: within 0.5 % of the clipping range
    tolerance = 0.005 * (390.0 - -995.0)
    assert norm.mean == pytest.approx(-48.089, abs=tolerance)
    assert norm.std == pytest.approx(278.284, abs=tolerance)
    assert norm.lower == pytest.approx(-995.0, abs=tolerance)
    assert norm.upper == pytest.approx(390.0, abs=tolerance)


def test_sct_matches_nnunet_where_frames_agree(sct_plans):
    plans = sct_plans
    assert plans.transpose_forward == [2, 1, 0]  # median spacing 1 mm isotropic: no axis stands out
    full = plans.configuration("3d_fullres")
    assert full.spacing == [1.0, 1.0, 1.0]  # nnU-Net: [1, 1, 1] too (T2*'s 7.5 mm is outvoted)
    assert full.normalization_schemes == ["zscore"] and full.use_mask_for_norm == [False]
    assert full.batch_size == 2  # nnU-Net: 2
    two = plans.configuration("2d")
    assert two.spacing == [1.0, 1.0]
    assert two.strides == [[1, 1], S2, S2, S2] and two.kernel_sizes == [K2] * 4  # nnU-Net: the same
    assert two.features_per_stage == [32, 64, 128, 256]


def test_sct_differs_from_nnunet_only_by_its_frame(sct_plans):
    """nnU-Net reads the PSR-stored T2 without reorienting, so its median shape [67, 55, 42] puts
    T2's S extent (55) on the axis where the other cases have A. Reoriented to RAS the median is
    [67, 60, 42] (S, A, R), hence our larger patch. Given nnU-Net's median shape, our rules give
    nnU-Net's plan exactly."""
    full = sct_plans.configuration("3d_fullres")
    assert full.median_shape == [67, 60, 42]
    assert full.patch_size == [80, 64, 48]
    assert sct_plans.configuration("2d").patch_size == [64, 48]
    n_voxels = 67 * 55 * 42 * 3.0
    theirs = _plan_configuration("3d_fullres", [1.0, 1.0, 1.0], [67, 55, 42], n_voxels, 2, 8.0, {})
    assert theirs.patch_size == [72, 56, 48] and theirs.batch_size == 2
    assert theirs.strides == [[1, 1, 1], S3, S3, S3]
    assert theirs.features_per_stage == [32, 64, 128, 256]
    theirs_2d = _plan_configuration("2d", [1.0, 1.0], [55, 42], n_voxels, 2, 8.0, {})
    assert theirs_2d.patch_size == [56, 48] and theirs_2d.batch_size == 9


REFERENCE = Path(__file__).parent / "reference" / "nnunet_v2_plans.json"


@pytest.mark.parametrize("name", ["Task04_Hippocampus", "TotalSegmentator_CT"])
def test_every_field_matches_the_recorded_nnunet_plans(name, hippo_plans, totalseg_planned):
    """Field by field against nnU-Net's plans file, for the RAS-stored datasets (identical frames:
    nnU-Net's transpose [0, 1, 2] of (z, y, x) is our [2, 1, 0] of RAS)."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    import json

    ref = json.loads(REFERENCE.read_text())[name]
    plans = {"Task04_Hippocampus": hippo_plans, "TotalSegmentator_CT": totalseg_planned}[name][2]
    assert ref["transpose_forward"] == [0, 1, 2] and plans.transpose_forward == [2, 1, 0]
    schemes = {"ZScoreNormalization": "zscore", "CTNormalization": "ct"}
    for config in ("3d_fullres", "2d"):
        theirs, ours = ref["configurations"][config], plans.configuration(config)
        assert ours.spacing == pytest.approx(theirs["spacing"])
        assert ours.patch_size == theirs["patch_size"]
        assert ours.batch_size == theirs["batch_size"]
        assert ours.median_shape == [round(m) for m in theirs["median_image_size_in_voxels"]]
        assert ours.strides == theirs["strides"] and ours.kernel_sizes == theirs["kernel_sizes"]
        assert ours.features_per_stage == theirs["features_per_stage"]
        assert [ours.n_conv_per_stage] * ours.num_stages == theirs["n_conv_per_stage"]
        assert ours.normalization_schemes == [schemes[s] for s in theirs["normalization_schemes"]]
        assert ours.use_mask_for_norm == theirs["use_mask_for_norm"]
        assert (ours.image_order, ours.label_order, ours.order_z) == (
            theirs["resampling_fn_data_kwargs"]["order"], theirs["resampling_fn_seg_kwargs"]["order"],
            theirs["resampling_fn_data_kwargs"]["order_z"])
    assert ("3d_lowres" in plans.configurations) == ref["has_3d_lowres"]
    assert ("3d_cascade_fullres" in plans.configurations) == ref["has_3d_lowres"]


# ------------------------------------------------------------------ synthetic fingerprints


def _synthetic(name: str, channel: str, num_labels: int, spacings_zyx, shapes_zyx, relative_crop: float = 1.0):
    """A fingerprint (and matching dataset description) without images, given in nnU-Net's
    (z, y, x) order as if every file were stored RAS; ours is RAS, so both lists are reversed."""
    cases, dataset_cases = [], []
    for i, (sp, sh) in enumerate(zip(spacings_zyx, shapes_zyx)):
        cid = f"c{i:03d}"
        crop = [int(s) for s in sh[::-1]]
        full = [int(round(s / relative_crop ** (1 / 3))) for s in crop]
        cases.append(CaseFingerprint(cid, [float(s) for s in sp[::-1]], full, crop, [[0, s] for s in crop],
                                     ["R", "A", "S"], {"0": 1}, [IntensityStats(100.0, 200.0, 90.0, -1000.0, 1000.0,
                                                                               -900.0, 800.0, 10)]))
        dataset_cases.append(CaseFiles(cid, (), None))
    labels = {v: ("background" if v == 0 else f"c{v}") for v in range(num_labels)}
    fp = Fingerprint(name, [channel], sorted(labels), cases,
                     [IntensityStats(100.0, 200.0, 90.0, -1000.0, 1000.0, -900.0, 800.0, 10 * len(cases))], 10)
    dataset = Dataset(Path("/nonexistent"), name, "nnunetv2", (channel,), labels, tuple(dataset_cases))
    return fp, dataset


def test_anisotropic_axis_uses_tenth_percentile_spacing_and_matches_nnunet():
    """nnU-Net Dataset900_SynthAniso: thick-slice MRI, the median z spacing 9 mm would interpolate
    heavily; the 10th percentile 5 mm is used."""
    fp, dataset = _synthetic(
        "SynthAniso", "MRI", 4,
        [[10.0, 1.5, 1.5], [10.0, 1.4, 1.4], [5.0, 1.6, 1.6], [6.5, 1.25, 1.25], [10.0, 1.5, 1.5],
         [8.0, 1.3, 1.3], [5.0, 1.5, 1.5], [10.0, 1.7, 1.7], [10.0, 1.5, 1.5], [7.0, 1.45, 1.45]],
        [[10, 230, 210], [9, 256, 216], [18, 200, 180], [14, 240, 240], [10, 210, 190], [12, 236, 200],
         [20, 224, 224], [8, 180, 180], [10, 256, 256], [13, 216, 196]], relative_crop=0.6)
    plans = plan_experiment(fp, dataset)
    assert plans.transpose_forward == [2, 1, 0]
    full = plans.configuration("3d_fullres")
    assert full.spacing == pytest.approx([5.0, 1.5, 1.5])
    assert full.patch_size == [20, 224, 224] and full.batch_size == 2
    assert full.strides == [[1, 1, 1], [1, 2, 2], S3, S3, [1, 2, 2], [1, 2, 2]]
    assert full.kernel_sizes == [[1, 3, 3]] + [K3] * 5
    assert full.features_per_stage == [32, 64, 128, 256, 320, 320]
    assert full.use_mask_for_norm == [True]  # cropping kept 60 % < 75 %: z-score inside the nonzero mask
    two = plans.configuration("2d")
    assert two.patch_size == [224, 224] and two.batch_size == 8
    assert two.features_per_stage == [32, 64, 128, 256, 512, 512]
    assert "10th percentile" in full.explanations["spacing"]


def test_large_ct_gets_a_lowres_configuration_like_nnunet():
    """nnU-Net Dataset901_SynthLargeCT: the fullres patch covers < 25 % of the median image."""
    plans = plan_experiment(*_large_ct())
    full = plans.configuration("3d_fullres")
    assert full.spacing == pytest.approx([1.75, 0.79, 0.79])
    assert full.patch_size == [80, 160, 160] and full.batch_size == 2
    assert full.strides == [[1, 1, 1], [1, 2, 2], S3, S3, S3, S3]
    assert full.kernel_sizes == [[1, 3, 3]] + [K3] * 5
    low = plans.configuration("3d_lowres")
    assert low.spacing == pytest.approx([3.068635592884928, 1.5591333437900183, 1.5591333437900183])
    assert low.patch_size == [96, 160, 160] and low.batch_size == 2
    assert low.median_shape == [145, 252, 252]
    assert low.strides == [[1, 1, 1], S3, S3, S3, S3, [1, 2, 2]]
    assert low.data_identifier == "3d_lowres"
    two = plans.configuration("2d")
    assert two.patch_size == [512, 512] and two.batch_size == 12
    cascade = plans.configurations["3d_cascade_fullres"]  # nnU-Net plans the cascade wherever 3d_lowres exists
    assert (cascade.inherits_from, cascade.previous_stage) == ("3d_fullres", "3d_lowres")
    assert "3d_lowres exists" in plans.explanations["3d_cascade_fullres"]


# ------------------------------------------------------------------ budget, lean preset, explanations


def _large_ct():
    return _synthetic(
        "SynthLargeCT", "CT", 3,
        [[2.5, 0.8, 0.8], [1.0, 0.7, 0.7], [1.25, 0.78, 0.78], [5.0, 0.9, 0.9], [1.5, 0.75, 0.75], [2.0, 0.82, 0.82]],
        [[180, 512, 512], [420, 512, 512], [350, 480, 480], [90, 512, 512], [300, 500, 500], [220, 512, 512]])


def test_smaller_memory_budget_gives_a_smaller_patch():
    fingerprint, dataset = _large_ct()
    plans8 = plan_experiment(fingerprint, dataset, gpu_memory_gb=8.0)
    plans2 = plan_experiment(fingerprint, dataset, gpu_memory_gb=2.0)
    big, small = plans8.configuration("3d_fullres"), plans2.configuration("3d_fullres")
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    assert all(s <= b for s, b in zip(small.patch_size, big.patch_size))
    assert small.batch_size >= 2
    estimate = feature_map_voxels(small.patch_size, small.strides, small.features_per_stage, len(dataset.labels))
    assert estimate <= 560_000_000 * 2 / 8  # fits the 2 GB budget at batch 2
    assert "2 GB" in small.explanations["patch_size"]
    assert plans2.gpu_memory_gb == 2.0
    # the 2D patch (512^2) fits either way: the smaller budget buys a smaller batch instead
    assert plans2.configuration("2d").batch_size < plans8.configuration("2d").batch_size


def test_lean_preset_shares_the_fullres_store_with_a_thinner_net(hippo_plans):
    _, _, plans = hippo_plans
    lean, full = plans.configuration("3d_lean"), plans.configuration("3d_fullres")
    assert plans.configurations["3d_lean"].inherits_from == "3d_fullres"
    assert lean.data_identifier == "3d_fullres" and lean.preset == "lean"
    assert lean.patch_size == full.patch_size and lean.spacing == full.spacing and lean.strides == full.strides
    assert plans.hash("3d_lean") == plans.hash("3d_fullres")  # same preprocessed data
    assert lean.features_per_stage == [16, 32, 64, 128]
    assert lean.batch_size == 4  # 5 % of 208 hippocampi allows 7
    assert "0.84" in lean.explanations["preset"]


def test_lean_batch_is_capped_by_the_five_percent_rule(sct_plans):
    # three SCT cases: 5 % of the data is less than one patch, so the floor of 2 applies
    assert sct_plans.configuration("3d_lean").batch_size == 2


def test_explain_mentions_every_planned_field_with_its_reason(hippo_plans):
    _, _, plans = hippo_plans
    text = explain_plans(plans)
    for name in plans.configurations:
        assert f"\n{name}" in text
        conf = plans.configuration(name)
        for field in ("spacing", "patch_size", "batch_size", "median_shape", "kernel_sizes", "strides",
                      "features_per_stage", "normalization_schemes", "use_mask_for_norm", "image_order",
                      "label_order", "order_z", "anisotropy_threshold", "preset", "data_identifier"):
            assert getattr(conf, field) is not None, (name, field)
            assert conf.explanations.get(field), f"{name}.{field} has no explanation"
            assert f"  {field} = " in text
    assert "transpose_forward" in text
    full = plans.configuration("3d_fullres")
    assert "560,000,000" in full.explanations["patch_size"]  # the numbers, not just the rule
    assert "208" in full.explanations["spacing"]


def test_plans_round_trip_through_json(hippo_plans, tmp_path):
    _, _, plans = hippo_plans
    plans.save(tmp_path / "plans.json")
    again = Plans.load(tmp_path / "plans.json")
    assert again == plans
    assert again.hash("3d_fullres") == plans.hash("3d_fullres")


def test_fingerprint_of_another_dataset_is_refused(hippo_plans, spinalcord):
    fingerprint, _, _ = hippo_plans
    with pytest.raises(BadInputError, match="re-run `segpipe fingerprint`"):
        plan_experiment(fingerprint, load_dataset(spinalcord))


def test_nonpositive_budget_is_bad_input(hippo_plans):
    fingerprint, dataset, _ = hippo_plans
    with pytest.raises(BadInputError, match="gpu-memory-gb"):
        plan_experiment(fingerprint, dataset, gpu_memory_gb=0)


# ------------------------------------------------------------------ plans.json is checked when loaded (issue 13)


def _set(path: str, value):
    """An edit of the plans' JSON: set the field at 'a.b.c' (None deletes it)."""
    def edit(d):
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        if value is None:
            del d[last]
        else:
            d[last] = value
    return edit


FULL = "configurations.3d_fullres"
BROKEN_PLANS = [
    # (edit of the JSON, or of the text; a line the CLI must print after the file's path)
    ("patch_abc", _set(f"{FULL}.patch_size", "abc"),
     rf"{FULL}\.patch_size must be a list of 2 or 3 whole numbers >= 1, got 'abc'"),
    ("patch_zero", _set(f"{FULL}.patch_size", [0, 24, 24]), rf"{FULL}\.patch_size must be .*, got \[0, 24, 24\]"),
    ("patch_fraction", _set(f"{FULL}.patch_size", [20.5, 24, 24]), rf"{FULL}\.patch_size must be .*, got \[20\.5, 24, 24\]"),
    ("patch_2d_in_3d", _set(f"{FULL}.patch_size", [64, 48]),
     rf"{FULL}\.patch_size has 2 entries \[64, 48\]: a 3D configuration needs 3"),
    ("batch_zero", _set(f"{FULL}.batch_size", 0), rf"{FULL}\.batch_size must be a whole number >= 1, got 0"),
    ("lean_batch_zero", _set("configurations.3d_lean.batch_size", 0),
     r"configurations\.3d_lean\.batch_size must be a whole number >= 1, got 0"),
    ("spacing_zero", _set(f"{FULL}.spacing", [0, 1, 1]), rf"{FULL}\.spacing must be a list of 2 or 3 positive numbers"),
    ("no_configurations", _set("configurations", None), r"configurations is missing"),
    ("truncated", lambda text: text[: len(text) // 2], r"is not valid JSON \(.*\)"),
    ("huge_patch", _set(f"{FULL}.patch_size", [4096, 4096, 4096]),
     rf"{FULL}\.patch_size \[4096, 4096, 4096\] is 68,719,476,736 voxels, more than the 134,217,728 \(512\^3\)"),
    ("patch_past_median", _set(f"{FULL}.patch_size", [80, 64, 1024]),
     rf"{FULL}\.patch_size \[80, 64, 1024\] is more than 4x the median image"),
    ("patch_off_stride", _set(f"{FULL}.patch_size", [80, 64, 44]),
     rf"{FULL}\.patch_size \[80, 64, 44\] is not a multiple of the network's total stride"),
    ("identifier_escapes", _set(f"{FULL}.data_identifier", "../../elsewhere"),
     rf"{FULL}\.data_identifier must be a folder name"),
    ("inherits_nothing", _set("configurations.3d_lean.inherits_from", "3d_gone"),
     r"configurations\.3d_lean\.inherits_from names '3d_gone', which is not a configuration"),
]


@pytest.mark.parametrize("edit, phrase", [b[1:] for b in BROKEN_PLANS], ids=[b[0] for b in BROKEN_PLANS])
def test_a_broken_plans_json_is_exit_2_naming_the_file_and_the_field(sct_plans, tmp_path, capsys, edit, phrase,
                                                                       reliability):
    work = tmp_path / "W"
    work.mkdir()
    sct_plans.save(work / "plans.json")
    text = (work / "plans.json").read_text()
    if edit.__name__ == "<lambda>":  # of the text
        text = edit(text)
    else:
        data = json.loads(text)
        edit(data)
        text = json.dumps(data)
    (work / "plans.json").write_text(text)
    reliability["bad_inputs"] += 1

    code = main(["train", "--workdir", str(work), "--config", "3d_lean", "--epochs", "1"])

    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert err and all(line.startswith(f"error {work / 'plans.json'}") for line in err), err
    assert any(re.search(phrase, line) for line in err), err
    assert err[-1].endswith("(re-run `segpipe plan`, or correct the file)"), err
    assert not (work / "runs").exists()


def test_a_configuration_the_plans_lack_is_bad_input_naming_those_there_are(sct_plans):
    with pytest.raises(BadInputError, match=r"plans have no configuration '3d_lowres' \(have: 3d_fullres, 3d_lean, "
                                            r"2d\): no 3d_lowres: .*; choose one of them with --config"):
        sct_plans.configuration("3d_lowres")


# ------------------------------------------------------------------ the topology rule itself


def test_pooling_skips_a_coarse_axis_until_the_others_catch_up():
    topo = pool_and_conv_props([5.0, 1.5, 1.5], [20, 224, 224])
    assert topo.strides[:3] == [[1, 1, 1], [1, 2, 2], [2, 2, 2]]  # 5 vs 3 mm after one pooling: within 2x
    assert topo.kernel_sizes[0] == [1, 3, 3]  # no 3-wide kernel across 5 mm slices at full resolution
    assert topo.kernel_sizes[-1] == [3, 3, 3]  # the bottleneck
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisible_by))


def test_patch_is_padded_to_a_multiple_of_the_pooling():
    topo = pool_and_conv_props([1.0, 1.0, 1.0], [35.5, 50, 35])
    assert topo.patch_size == [40, 56, 40] and topo.divisible_by == [8, 8, 8]
