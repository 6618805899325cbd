"""`segpipe find-best`: every cross-validated configuration and every pair ensemble (averaged
validation probabilities) compared on the pooled folds, and `segpipe predict --config best` (or a
comma list) running the choice: folds ensembled, probabilities averaged across configurations,
the chosen post-processing applied."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from test_inference import assert_same_geometry, make_model

from pipeline.cli import main as cli_main
from pipeline.data.dataset import load_dataset
from pipeline.data.images import read_volume
from pipeline.data.synthetic import make_demo_dataset
from pipeline.inference.ensemble import load_probabilities
from pipeline.inference.postprocessing import PostprocessingRule, apply_postprocessing
from pipeline.workdir import Workdir

CONFIGS = ("3d_fullres", "3d_lean")
PAIR = "3d_fullres+3d_lean"


@pytest.fixture(scope="module")
def crossvalidated(tmp_path_factory, one_torch_thread_module):
    """Phantoms, two configurations x two folds (model folders as training leaves them, networks of
    the planned topology at a quarter width: training itself is tested elsewhere), both cross-validated."""
    root = tmp_path_factory.mktemp("find_best")
    data = make_demo_dataset(root / "Phantom", num_cases=4, seed=3, shape=(32, 32, 16))
    wd = Workdir.at(root / "W")
    cases = sorted(load_dataset(data).case_ids)
    folds = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    wd.root.mkdir()
    wd.splits.write_text(json.dumps({"seed": None, "cases": cases, "folds": folds, "all": folds[0]}))
    for config in CONFIGS:
        for fold in ("0", "1"):
            make_model(wd.root, data, num_cases=4, config=config, fold=fold)
        assert cli_main(["evaluate-cv", str(data), "--workdir", str(wd.root), "--config", config, "--no-tta",
                         "--json"]) == 0
    return wd, data, cases


@pytest.fixture(scope="module")
def one_torch_thread_module():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ras(path):
    return read_volume(path, dtype=None)[0]


def test_find_best_compares_each_configuration_and_their_ensemble_on_the_pooled_folds(crossvalidated, capsys):
    wd, data, cases = crossvalidated
    for config in CONFIGS:  # cross-validation kept every case's probabilities beside its prediction
        for fold, case in (("0", cases[0]), ("1", cases[3])):
            assert (wd.run_dir(config, fold) / "validation" / f"{case}.npz").is_file()

    capsys.readouterr()
    assert cli_main(["find-best", str(data), "--workdir", str(wd.root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    table = {c["name"]: c for c in report["candidates"]}
    assert set(table) == {*CONFIGS, PAIR} and table[PAIR]["configs"] == list(CONFIGS)
    assert report["num_cases"] == 4 and report["folds"] == {c: ["0", "1"] for c in CONFIGS}
    score = lambda c: -1 if c["foreground_dice"] is None else c["foreground_dice"]  # noqa: E731
    assert report["best"] == max(report["candidates"], key=score)["name"]
    for config in CONFIGS:  # a configuration's row is its cross-validation
        cv = json.loads((wd.root / "crossval" / config / "crossval.json").read_text())
        assert table[config]["foreground_dice"] == cv["foreground_dice"]

    # the ensemble: each validation case's two probabilities (by the fold that did not train on it) averaged
    ens = wd.root / "find_best" / "ensembles" / PAIR
    for case, fold in zip(cases, "0011"):
        probs = [load_probabilities(wd.run_dir(c, fold) / "validation" / f"{case}.npz") for c in CONFIGS]
        mean = (probs[0][0] + probs[1][0]) / 2
        np.testing.assert_array_equal(_ras(ens / "predictions" / f"{case}.nii.gz"),
                                      np.asarray(probs[0][1])[mean.argmax(0)])
    summary = json.loads((ens / "evaluation" / "summary.json").read_text())
    assert table[PAIR]["foreground_dice"] == summary["foreground_mean"]["dice"]
    assert sorted(c["case"] for c in summary["cases"]) == cases

    choice = json.loads((wd.root / "find_best" / "choice.json").read_text())
    assert choice["schema_version"] == 1 and choice["name"] == report["best"]
    assert choice["configs"] == table[report["best"]]["configs"]
    assert choice["postprocessing"] == table[report["best"]]["postprocessing"]
    md = (wd.root / "find_best" / "find_best.md").read_text()
    assert all(name in md for name in table) and f"**Chosen: {report['best']}**" in md
    assert json.loads((wd.root / "find_best" / "find_best.json").read_text())["schema_version"] == 1
    assert (wd.root / "find_best" / "find_best.png").stat().st_size > 0

    # re-running reuses the ensemble's predictions
    stamp = (ens / "predictions" / f"{cases[0]}.nii.gz").stat().st_mtime_ns
    assert cli_main(["find-best", str(data), "--workdir", str(wd.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"] == report["best"]
    assert (ens / "predictions" / f"{cases[0]}.nii.gz").stat().st_mtime_ns == stamp


def test_predict_runs_the_choice_and_a_comma_list_averages_the_configurations(crossvalidated, tmp_path, capsys):
    wd, data, cases = crossvalidated
    if not (wd.root / "find_best" / "choice.json").is_file():
        assert cli_main(["find-best", str(data), "--workdir", str(wd.root), "--json"]) == 0
    choice = json.loads((wd.root / "find_best" / "choice.json").read_text())
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in cases[:2]:
        os.symlink(data / "imagesTr" / f"{case}.nii.gz", inputs / f"{case}.nii.gz")
    run = lambda out, *extra: cli_main(["predict", "--workdir", str(wd.root), str(inputs), str(tmp_path / out),  # noqa: E731
                                        "--no-tta", "--json", *extra])

    # each configuration alone, both folds, with its probabilities: what the ensemble must average
    for config in CONFIGS:
        assert run(config, "--config", config, "--fold", "0,1", "--save-probabilities") == 0
    capsys.readouterr()
    assert run("pair", "--config", "3d_lean,3d_fullres") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["configs"] == ["3d_lean", "3d_fullres"] and report["folds"] == {c: ["0", "1"] for c in CONFIGS}
    rule = PostprocessingRule.load(wd.root / "find_best" / "ensembles" / PAIR / "postprocessing.json")
    for case in cases[:2]:
        probs = [load_probabilities(tmp_path / c / f"{case}.npz") for c in CONFIGS]
        expected = apply_postprocessing(np.asarray(probs[0][1])[((probs[0][0] + probs[1][0]) / 2).argmax(0)], rule)
        np.testing.assert_array_equal(_ras(tmp_path / "pair" / f"{case}.nii.gz"), expected)
        assert_same_geometry(tmp_path / "pair" / f"{case}.nii.gz", data / "imagesTr" / f"{case}.nii.gz")
    assert not (tmp_path / "pair" / ".ensemble_members").exists()  # the members' files are gone once done

    # an input in another format comes back in it, with the same labels
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (the [itk] extra) writes the .mha input")
    (tmp_path / "mha").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(data / "imagesTr" / f"{cases[0]}.nii.gz")), str(tmp_path / "mha" / f"{cases[0]}.mha"))
    assert cli_main(["predict", "--workdir", str(wd.root), str(tmp_path / "mha"), str(tmp_path / "pair_mha"),
                     "--no-tta", "--config", "3d_lean,3d_fullres"]) == 0
    assert sorted(p.name for p in (tmp_path / "pair_mha").iterdir()) == [f"{cases[0]}.mha"]
    np.testing.assert_array_equal(_ras(tmp_path / "pair_mha" / f"{cases[0]}.mha"), _ras(tmp_path / "pair" / f"{cases[0]}.nii.gz"))

    # --config best runs the choice: the ensemble above, or one configuration with its cross-validated folds
    assert run("best", "--config", "best") == 0
    same_as = "pair" if choice["name"] == PAIR else choice["name"]
    for case in cases[:2]:
        written = tmp_path / "best" / f"{case}.nii.gz"
        assert set(np.unique(np.asarray(nib.load(written).dataobj)).tolist()) <= {0, 1, 2}
        np.testing.assert_array_equal(_ras(written), _ras(tmp_path / same_as / f"{case}.nii.gz"))


def test_find_best_needs_two_cross_validated_configurations_with_probabilities(crossvalidated, tmp_path, capsys):
    wd, data, cases = crossvalidated
    one = tmp_path / "W"
    shutil.copytree(wd.root, one, symlinks=True)
    shutil.rmtree(one / "find_best", ignore_errors=True)
    assert cli_main(["predict", "--workdir", str(one), str(data / "imagesTr"), str(tmp_path / "out"),
                     "--config", "best"]) == 1
    assert "segpipe find-best" in capsys.readouterr().err

    (one / "find_best").mkdir()  # a choice of another layout is refused, not guessed at
    (one / "find_best" / "choice.json").write_text(json.dumps({"schema_version": 99, "name": "3d_lean"}))
    assert cli_main(["predict", "--workdir", str(one), str(data / "imagesTr"), str(tmp_path / "out"),
                     "--config", "best"]) == 2
    assert "schema version 99" in capsys.readouterr().err
    (one / "find_best" / "choice.json").unlink()

    assert cli_main(["find-best", str(data), "--workdir", str(one), "--configs", "3d_lean,2d"]) == 2
    assert "2d not cross-validated" in capsys.readouterr().err
    assert cli_main(["find-best", str(data), "--workdir", str(one), "--configs", "3d_lean"]) == 2
    assert "--configs names 1 configuration (3d_lean): find-best compares two or more" in capsys.readouterr().err

    shutil.rmtree(one / "crossval" / "3d_lean")
    assert cli_main(["find-best", str(data), "--workdir", str(one)]) == 2
    err = capsys.readouterr().err
    assert "two cross-validated configurations or more" in err and "has 1: 3d_fullres" in err
    assert "trained but not cross-validated: 3d_lean" in err and "segpipe evaluate-cv" in err

    shutil.copytree(wd.root / "crossval" / "3d_lean", one / "crossval" / "3d_lean", symlinks=True)
    (one / "runs" / "3d_lean" / "fold_1" / "validation" / f"{cases[2]}.npz").unlink()
    assert cli_main(["find-best", str(data), "--workdir", str(one)]) == 2
    err = capsys.readouterr().err
    assert f"3d_lean has no validation probabilities for 1 case(s) ({cases[2]})" in err
    assert not (one / "find_best" / "choice.json").exists()


def test_post_processed_candidates_are_scored_in_each_files_own_orientation(tmp_path):
    # a PSR-oriented file: the rule runs in RAS and the post-processed file goes back to PSR, not
    # reoriented twice (which would misplace every voxel and score the rule as harmful)
    from types import SimpleNamespace

    from pipeline.evaluation.crossval import score_pooled

    affine = np.array([[0, 0, -1.0, 30], [-1.0, 0, 0, 20], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    ref = np.zeros((20, 24, 12), np.uint8)
    ref[4:12, 5:15, 3:9] = 1
    pred = ref.copy()
    pred[17:19, 20:23, 10:12] = 1  # a speck far away: keeping the largest component removes it
    out = tmp_path / "cand"
    for folder, arr in ((out / "predictions", pred), (tmp_path / "refs", ref)):
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(arr, affine), str(folder / "case_0.nii.gz"))
    summary, rule, after = score_pooled({"case_0": out / "predictions" / "case_0.nii.gz"},
                                        SimpleNamespace(root=tmp_path / "refs", labels={0: "bg", 1: "organ"}), out,
                                        progress=False)
    assert rule.keep_largest_foreground and summary["foreground_mean"]["dice"] < 1.0 and after == 1.0
    written = nib.load(out / "postprocessed" / "case_0.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), ref)
    np.testing.assert_array_equal(written.affine, affine)
