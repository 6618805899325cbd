"""nnU-Net v2 model folders in and out (issue 16).

The nnU-Net side is written here by hand from nnU-Net v2's documented formats (plans.json,
dataset.json, fold_K/checkpoint_final.pth as its trainer saves it: weights under nnU-Net's module
names, numpy floats in the training log, the trainer's name and init arguments), with the weights of
one of our networks mapped to nnU-Net's names. Importing it must give back a model that predicts
exactly what ours predicts; what does not map one to one is refused with exit 2 and a message.
The comparison with nnU-Net's own predictor is benchmarks/nnunet_interop.py (nnunetv2 lives in
another environment).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import stages
from pipeline.cli import main as cli_main
from pipeline.interop.nnunet_files import read_postprocessing_pkl
from pipeline.interop.nnunet_plans import plans_from_nnunet
from pipeline.interop.nnunet_weights import nnunet_to_ours, ours_to_nnunet
from pipeline.planning.plans import Plans
from pipeline.training.loop import save_model_file
from pipeline.training.model import build_network
from pipeline.workdir import Workdir

REFERENCE = Path(__file__).parent / "reference" / "nnunet_v2_state_dict_keys.json"
CONFIG = "3d_fullres"
# nnU-Net v2 plans for the phantoms, as nnUNetv2_plan_experiment writes them (SimpleITK axis order z, y, x)
ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
RESAMPLING = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
NNUNET_PLANS = {
    "dataset_name": "Dataset900_Phantom", "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [2.5, 1.0, 1.0], "original_median_shape_after_transp": [24, 48, 48],
    "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {CONFIG: {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 32, 32], "median_image_size_in_voxels": [24.0, 48.0, 48.0], "spacing": [2.5, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": RESAMPLING, "resampling_fn_seg_kwargs": {**RESAMPLING, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**RESAMPLING, "order": 1},
        "architecture": ARCH, "batch_dice": False}},
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {"0": {"max": 1.4, "mean": 0.8, "median": 0.7, "min": 0.0,
                                                          "percentile_00_5": 0.3, "percentile_99_5": 1.2, "std": 0.2}},
}
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 8, "file_ending": ".nii.gz", "name": "Phantom"}


class _RunsCodeWhenUnpickled:
    """What an attacker would put into a checkpoint: unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def our_network(seed: int = 0):
    plans = plans_from_nnunet(NNUNET_PLANS, DATASET_JSON, CONFIG, "test")
    torch.manual_seed(seed)
    net = build_network(plans.configuration(CONFIG), 1, 3)
    with torch.no_grad():  # an untrained net predicts near ties; make the classes clearly apart
        for p in net.seg_layers.parameters():
            p.mul_(20)
    return net, plans


def nnunet_checkpoint(net, trainer="nnUNetTrainer", fold=0, dataset_json=DATASET_JSON, **extra) -> dict:
    """A checkpoint as nnUNetTrainer.save_checkpoint writes it."""
    return {"network_weights": ours_to_nnunet(net.state_dict()), "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float32(0.5)], "ema_fg_dice": [np.float32(0.5)], "lrs": [0.01]},
            "_best_ema": np.float32(0.5), "current_epoch": 1,
            "init_args": {"plans": NNUNET_PLANS, "configuration": CONFIG, "fold": fold, "dataset_json": dataset_json,
                          "device": torch.device("cpu")},
            "trainer_name": trainer, "inference_allowed_mirroring_axes": (0, 1, 2), **extra}


def nnunet_folder(root: Path, nets: dict, plans=NNUNET_PLANS, dataset_json=DATASET_JSON, **ckpt_extra) -> Path:
    """nnUNet_results/Dataset900_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres with one fold per net."""
    folder = root / "Dataset900_Phantom" / f"nnUNetTrainer__nnUNetPlans__{CONFIG}"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    for fold, net in nets.items():
        (folder / f"fold_{fold}").mkdir()
        torch.save(nnunet_checkpoint(net, fold=fold, dataset_json=dataset_json, **ckpt_extra), folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def own_workdir(root: Path, nets: dict, plans: Plans) -> Workdir:
    wd = Workdir.at(root)
    plans.save(wd.plans)
    for fold, net in nets.items():
        run_dir = wd.run_dir(CONFIG, fold)
        plans.save(run_dir / "plans.json")
        for which in ("final", "best"):
            save_model_file(run_dir / f"model_{which}.pt", net, configuration=CONFIG, epoch=1, ema_dice=0.5,
                            num_input_channels=1, num_classes=plans.label_map().num_outputs,
                            label_values=list(plans.label_values), plans_hash=plans.hash(CONFIG))
    return wd


@pytest.fixture(scope="module")
def inputs(synthetic_dataset, tmp_path_factory) -> Path:
    """One phantom image named as nnU-Net's predictor reads it (CASE_0000.nii.gz); stored in PSR voxel
    order, so nnU-Net's axis order and geometry differ from RAS in every axis."""
    folder = tmp_path_factory.mktemp("inputs")
    image = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[5]
    assert nib.aff2axcodes(nib.load(image).affine) == ("P", "S", "R")
    os.symlink(image, folder / image.name.replace(".nii.gz", "_0000.nii.gz"))
    return folder


def labels_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def cli(*args) -> int:
    return cli_main([*map(str, args)])


# ---------------------------------------------------------------- weights and plans map one to one


def test_weights_map_to_exactly_the_keys_and_shapes_nnunet_writes():
    """Recorded from checkpoint_final.pth of nnU-Net 2.8.1 (dynamic_network_architectures 0.4.4) on Task04
    3d_fullres: our network of that plan, under nnU-Net's names, has its 188 keys and shapes exactly."""
    ref = json.loads(REFERENCE.read_text())
    plans = copy.deepcopy(NNUNET_PLANS)
    plans["configurations"][CONFIG].update(ref["configuration"])
    ours = plans_from_nnunet(plans, {**DATASET_JSON, "labels": {"background": 0, "a": 1, "b": 2}}, CONFIG, "ref")
    net = build_network(ours.configuration(CONFIG), 1, 3)
    mapped = ours_to_nnunet(net.state_dict())
    assert {k: list(v.shape) for k, v in mapped.items()} == ref["keys"]
    back = nnunet_to_ours(mapped)
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


def test_an_alias_that_differs_from_its_weight_is_refused():
    net, _ = our_network()
    state = ours_to_nnunet(net.state_dict())
    key = next(k for k in state if k.startswith("decoder.encoder.") and k.endswith("conv.weight"))
    state[key] = state[key] + 1
    with pytest.raises(Exception, match="differs from the weight"):
        nnunet_to_ours(state)


def test_plans_become_ours_in_our_axis_frame():
    plans = plans_from_nnunet(NNUNET_PLANS, DATASET_JSON, CONFIG, "test")
    conf = plans.configuration(CONFIG)
    assert plans.transpose_forward == [2, 1, 0]  # store axes = nnU-Net's (z, y, x) = RAS (S, A, R)
    assert (conf.spacing, conf.patch_size, conf.strides) == ([2.5, 1.0, 1.0], [16, 32, 32], ARCH["arch_kwargs"]["strides"])
    assert plans.labels == {"0": "background", "1": "organ", "2": "lesion"} and plans.channels == ["MRI"]
    assert [n.scheme for n in plans.normalization] == ["zscore"]


# ---------------------------------------------------------------- import, predict, export


def test_imported_model_predicts_exactly_what_our_model_predicts(tmp_path, inputs):
    """Two folds as nnU-Net writes them -> import -> predict (default: both folds ensembled, as
    nnUNetv2_predict) gives the labels our own two-fold model gives; the post-processing JSON comes along."""
    net0, plans = our_network(0)
    net1, _ = our_network(1)
    folder = nnunet_folder(tmp_path / "results", {"0": net0, "1": net1})
    pp = folder / "crossval_results_folds_0_1"
    pp.mkdir()
    (pp / "postprocessing.json").write_text(json.dumps({
        "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * 2,
        "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]}))
    assert cli("import-nnunet", folder.parent, "--workdir", tmp_path / "imported") == 0
    rule = json.loads((tmp_path / "imported/runs/3d_fullres/fold_1/postprocessing.json").read_text())
    assert (rule["keep_largest_foreground"], rule["keep_largest_per_class"]) == (True, [2])
    record = json.loads((tmp_path / "imported/runs/3d_fullres/fold_0/nnunet_import.json").read_text())
    assert record["trainer"] == "nnUNetTrainer" and len(record["checkpoints"]["final"]["sha256"]) == 64

    own = own_workdir(tmp_path / "own", {"0": net0, "1": net1}, plans)
    for fold in ("0", "1"):  # the same rule beside our own folds
        (own.run_dir(CONFIG, fold) / "postprocessing.json").write_text(json.dumps(rule))
    report = stages.predict(tmp_path / "imported", inputs, tmp_path / "pred_imported", tta=False, progress=False)
    assert report.folds == ["0", "1"]
    stages.predict(own, inputs, tmp_path / "pred_own", fold="0,1", tta=False, progress=False)
    imported, ours = labels_of(tmp_path / "pred_imported"), labels_of(tmp_path / "pred_own")
    assert imported.keys() == ours.keys() and len(ours) == 1
    for name in ours:
        assert np.array_equal(imported[name], ours[name]), name
        assert len(np.unique(ours[name])) > 1  # the model predicts something, so the comparison means something


def test_export_then_import_round_trip_and_probabilities_for_nnunet_ensemble(tmp_path, inputs):
    """Our run folder -> an nnU-Net results folder (its checkpoint as nnU-Net's loader reads it) -> imported
    again predicts the same labels; --save-probabilities adds nnU-Net's .npz/.pkl layout beside ours."""
    net, plans = our_network(3)
    own = own_workdir(tmp_path / "own", {"0": net}, plans)
    code = cli("export-nnunet", "--workdir", own.root, tmp_path / "nnUNet_results", "--dataset-id", "900")
    assert code == 0
    folder = tmp_path / "nnUNet_results/Dataset900_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres"
    ckpt = torch.load(folder / "fold_0/checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["init_args"]["configuration"] == CONFIG
    exported_plans = json.loads((folder / "plans.json").read_text())
    assert exported_plans["foreground_intensity_properties_per_channel"].keys() == {"0"}  # nnU-Net reads every channel's
    exported = exported_plans["configurations"][CONFIG]
    for key in ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm"):
        assert exported[key] == NNUNET_PLANS["configurations"][CONFIG][key], key
    assert exported["architecture"]["arch_kwargs"] == ARCH["arch_kwargs"]

    assert cli("import-nnunet", folder, "--workdir", tmp_path / "back") == 0
    stages.predict(tmp_path / "back", inputs, tmp_path / "pred_back", tta=False, checkpoint="best", step=0.75,
                   progress=False)
    out = tmp_path / "pred_own"
    assert cli("predict", "--workdir", own.root, inputs, out, "--no-tta", "--save-probabilities", "--checkpoint",
               "best", "--step-size", "0.75") == 0
    back, ours = labels_of(tmp_path / "pred_back"), labels_of(out)
    assert all(np.array_equal(back[n], ours[n]) for n in ours)

    case = sorted(ours)[0].removesuffix(".nii.gz")
    image = nib.load(inputs / f"{case}_0000.nii.gz")
    with np.load(out / f"{case}.npz") as f:  # ours stays: (classes, *RAS)
        ras = f["probabilities"].astype(np.float32)
    with np.load(out / "nnunet" / f"{case}.npz") as f:
        probs = f["probabilities"]
    assert probs.shape == (3, *image.shape[::-1])  # nnU-Net's (classes, z, y, x): the file's voxel axes reversed
    to_file = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.io_orientation(image.affine))
    for c in range(3):
        assert np.array_equal(probs[c].T, nib.orientations.apply_orientation(ras[c], to_file))
    properties = pickle.loads((out / "nnunet" / f"{case}.pkl").read_bytes())
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK checks the geometry nnU-Net writes with")
    reference = sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz"))
    np.testing.assert_allclose(properties["sitk_stuff"]["spacing"], reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(properties["sitk_stuff"]["origin"], reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(properties["sitk_stuff"]["direction"], reference.GetDirection(), atol=1e-5)
    assert json.loads((out / "nnunet" / "dataset.json").read_text())["labels"] == DATASET_JSON["labels"]


# ---------------------------------------------------------------- refusals: exit 2, a message, nothing written


def _refused(capsys, tmp_path, folder, *, match: str, workdir_name: str = "w") -> None:
    workdir = tmp_path / workdir_name
    assert cli("import-nnunet", folder, "--workdir", workdir) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not (workdir / "plans.json").exists() and not (workdir / "runs").exists()


def test_unknown_trainer_is_refused(tmp_path, capsys):
    net, _ = our_network()
    folder = nnunet_folder(tmp_path / "r", {"0": net}, trainer_name="nnUNetTrainerDA5")
    _refused(capsys, tmp_path, folder, match="trainer 'nnUNetTrainerDA5' is not supported")


def test_resenc_architecture_is_refused_saying_why(tmp_path, capsys):
    net, _ = our_network()
    plans = copy.deepcopy(NNUNET_PLANS)
    plans["configurations"][CONFIG]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    folder = nnunet_folder(tmp_path / "r", {"0": net}, plans=plans)
    _refused(capsys, tmp_path, folder, match="ResidualEncoderUNet (nnU-Net's ResEnc presets) is not supported")


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    net, _ = our_network()
    marker = tmp_path / "code_ran"
    folder = nnunet_folder(tmp_path / "r", {"0": net}, payload=_RunsCodeWhenUnpickled(marker))
    _refused(capsys, tmp_path, folder, match="refused to load")
    assert not marker.exists()
    live = tmp_path / "payload_is_live"  # the same payload, unpickled plainly, does run
    pickle.loads(pickle.dumps(_RunsCodeWhenUnpickled(live))).close()
    assert live.exists()


def test_postprocessing_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    net, _ = our_network()
    folder = nnunet_folder(tmp_path / "r", {"0": net})
    (folder / "crossval_results_folds_0").mkdir()
    marker = tmp_path / "code_ran"
    (folder / "crossval_results_folds_0" / "postprocessing.pkl").write_bytes(
        pickle.dumps(([_RunsCodeWhenUnpickled(marker)], [{}])))
    _refused(capsys, tmp_path, folder, match="io.open, which is not nnU-Net's largest-component")
    assert not marker.exists()


def test_nnunet_postprocessing_pickle_is_read_without_nnunet(tmp_path, monkeypatch):
    """The pickle nnU-Net's save_pickle((fns, kwargs)) writes names its function by module and name;
    made here with a stand-in module of that name, read back with nnunetv2 absent."""
    import sys
    import types

    name = "nnunetv2.postprocessing.remove_connected_components"
    module = types.ModuleType(name)

    def remove_all_but_largest_component_from_segmentation(segmentation, labels_or_regions, background_label=0):
        raise AssertionError("never called")

    remove_all_but_largest_component_from_segmentation.__module__ = name
    remove_all_but_largest_component_from_segmentation.__qualname__ = "remove_all_but_largest_component_from_segmentation"
    module.remove_all_but_largest_component_from_segmentation = remove_all_but_largest_component_from_segmentation
    for parent in ("nnunetv2", "nnunetv2.postprocessing"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, name, module)
    fn = module.remove_all_but_largest_component_from_segmentation
    blob = pickle.dumps(([fn, fn], [{"labels_or_regions": [1, 2]}, {"labels_or_regions": np.int64(2)}]))
    for stand_in in (name, "nnunetv2.postprocessing", "nnunetv2"):
        monkeypatch.delitem(sys.modules, stand_in)
    path = tmp_path / "postprocessing.pkl"
    path.write_bytes(blob)
    assert [s.labels for s in read_postprocessing_pkl(path)] == [(1, 2), 2]


def test_missing_fold_is_refused_naming_the_available_ones(tmp_path, capsys):
    net, _ = our_network()
    folder = nnunet_folder(tmp_path / "r", {"0": net})
    workdir = tmp_path / "w"
    assert cli("import-nnunet", folder, "--workdir", workdir, "--fold", "0,3") == 2
    assert "fold(s) 3 have no checkpoint (available: 0)" in capsys.readouterr().err
    assert not (workdir / "runs").exists()


def test_import_never_overwrites_a_model_trained_here(tmp_path, capsys):
    net, plans = our_network()
    own = own_workdir(tmp_path / "own", {"0": net}, plans)
    before = (own.run_dir(CONFIG, "0") / "model_final.pt").read_bytes()
    folder = nnunet_folder(tmp_path / "r", {"0": our_network(5)[0]})
    assert cli("import-nnunet", folder, "--workdir", own.root) == 2
    assert "already holds a model trained here" in capsys.readouterr().err
    assert (own.run_dir(CONFIG, "0") / "model_final.pt").read_bytes() == before


def test_predict_refuses_a_step_size_outside_0_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli("predict", "--workdir", tmp_path, tmp_path / "in", tmp_path / "out", "--step-size", "1.5")
    assert exc.value.code == 2
    assert "must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_probabilities_for_nnunet_are_written_for_every_image_format(ending, tmp_path, inputs):
    """An input in a SimpleITK format gets nnU-Net's .npz/.pkl as a NIfTI input does: the same voxels in
    nnU-Net's (classes, z, y, x) order and the grid SimpleITK reads from that file."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (the [itk] extra) writes and reads these formats")
    net, plans = our_network(4)
    own = own_workdir(tmp_path / "own", {"0": net}, plans)
    nifti = next(inputs.glob("*_0000.nii.gz"))
    case = nifti.name.removesuffix("_0000.nii.gz")
    converted = tmp_path / "converted"
    converted.mkdir()
    image = sitk.ReadImage(str(nifti))
    sitk.WriteImage(image, str(converted / f"{case}_0000{ending}"))
    for folder, out in ((inputs, tmp_path / "p_nii"), (converted, tmp_path / "p_itk")):
        assert cli("predict", "--workdir", own.root, folder, out, "--no-tta", "--save-probabilities") == 0
    assert (tmp_path / "p_itk" / f"{case}{ending}").is_file()
    with np.load(tmp_path / "p_nii" / "nnunet" / f"{case}.npz") as a, np.load(tmp_path / "p_itk" / "nnunet" / f"{case}.npz") as b:
        assert a["probabilities"].shape == (3, *sitk.GetArrayViewFromImage(image).shape)
        np.testing.assert_allclose(b["probabilities"], a["probabilities"], atol=1e-3)
    properties = pickle.loads((tmp_path / "p_itk" / "nnunet" / f"{case}.pkl").read_bytes())
    written = sitk.ReadImage(str(converted / f"{case}_0000{ending}"))
    np.testing.assert_allclose(properties["sitk_stuff"]["spacing"], written.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(properties["sitk_stuff"]["origin"], written.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(properties["sitk_stuff"]["direction"], written.GetDirection(), atol=1e-6)


REGIONS_JSON = {**DATASET_JSON, "labels": {"background": 0, "organ+lesion": [1, 2], "lesion": [2]},
                "regions_class_order": [1, 2]}
IGNORE_JSON = {**DATASET_JSON, "labels": {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}}


@pytest.mark.parametrize(("dataset_json", "outputs"), [(REGIONS_JSON, 2), (IGNORE_JSON, 3)], ids=["regions", "ignore"])
def test_region_based_and_ignore_label_models_import_and_export_one_to_one(dataset_json, outputs, tmp_path, inputs):
    """A region-based model (one sigmoid output per region, painted in regions_class_order) and an ignore-label
    model (softmax over the real classes, never predicting `ignore`) import to a model that predicts exactly what
    ours with the same plans predicts, and export back with nnU-Net's labels."""
    plans = plans_from_nnunet(NNUNET_PLANS, dataset_json, CONFIG, "test")
    assert plans.label_map().num_outputs == outputs
    torch.manual_seed(2)
    net = build_network(plans.configuration(CONFIG), 1, outputs)
    with torch.no_grad():
        for p in net.seg_layers.parameters():
            p.mul_(20)
    folder = nnunet_folder(tmp_path / "results", {"0": net}, dataset_json=dataset_json)
    assert cli("import-nnunet", folder, "--workdir", tmp_path / "imported") == 0
    own = own_workdir(tmp_path / "own", {"0": net}, plans)
    stages.predict(tmp_path / "imported", inputs, tmp_path / "pred_imported", tta=False, progress=False)
    stages.predict(own, inputs, tmp_path / "pred_own", tta=False, progress=False)
    imported, ours = labels_of(tmp_path / "pred_imported"), labels_of(tmp_path / "pred_own")
    assert imported.keys() == ours.keys() and len(ours) == 1
    for name in ours:
        assert np.array_equal(imported[name], ours[name]), name
        assert set(np.unique(ours[name]).tolist()) == {0, 1, 2}  # both regions painted / never the ignore label

    assert cli("export-nnunet", "--workdir", tmp_path / "imported", tmp_path / "exported", "--dataset-id", "901") == 0
    exported = json.loads((tmp_path / "exported/Dataset901_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres/"
                                       "dataset.json").read_text())
    assert exported["labels"] == dataset_json["labels"]
    assert exported.get("regions_class_order") == dataset_json.get("regions_class_order")
