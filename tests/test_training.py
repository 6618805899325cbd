"""Training: settings from the command line, recipes, run folders, and real data-parallel training
with two Ray workers on a tiny hippocampus subset (6 cases, a 4..16-feature U-Net on 16x24x16 patches)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch
from test_sampling import make_tiny_workdir

from pipeline.cli import build_parser
from pipeline.errors import BadInputError
from pipeline.planning.plans import Plans
from pipeline.precision import precision_name
from pipeline.training.launch import prepare_run, prepare_storage, run_name, run_training
from pipeline.training.loop import (
    RECIPES,
    TrainSettings,
    epoch_iterations,
    epoch_learning_rates,
    load_trained_network,
    poly_lr,
    supervision_weights,
    training_progress,
)
from pipeline.workdir import TRAINING_LOG


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, hippocampus):
    return make_tiny_workdir(tmp_path_factory.mktemp("tiny_train"), hippocampus)


def test_settings_come_from_the_train_command_line(tmp_path):
    args = build_parser().parse_args(["train", "--workdir", str(tmp_path), "--config", "3d_lean", "--fold", "all",
                                      "--num-workers", "2", "--iterations-per-epoch", "7", "--resume",
                                      "--recipe", "nnunet", "--seed", "3", "--checkpoint-every", "2", "--precision", "fp32"])
    s = TrainSettings.from_args(args)
    assert (s.workdir, s.config, s.fold, s.num_workers, s.iterations_per_epoch, s.resume) == \
        (str(tmp_path), "3d_lean", "all", 2, 7, True)
    assert (s.recipe, s.seed, s.checkpoint_every, s.val_iterations, s.epochs) == ("nnunet", 3, 2, None, None)
    assert s.precision == "fp32" and TrainSettings.from_args(build_parser().parse_args(
        ["train", "--workdir", str(tmp_path)])).precision == "auto"
    assert TrainSettings.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_recipes_fill_what_was_not_given(tiny):
    plans = Plans.load(tiny.plans)
    lean = TrainSettings(str(tiny.root), config="3d_lean").resolved(plans)
    assert lean.recipe == "lean" and lean.time_budget_min == 15 and lean.epochs is None  # runs to its budget
    assert TrainSettings(str(tiny.root), config="3d_lean", epochs=3).resolved(plans).time_budget_min is None
    full = TrainSettings(str(tiny.root)).resolved(plans)
    assert (full.recipe, full.epochs, full.iterations_per_epoch, full.val_iterations) == ("nnunet", 1000, 250, 50)
    told = TrainSettings(str(tiny.root), config="3d_lean", recipe="nnunet", time_budget_min=2).resolved(plans)
    assert told.recipe == "nnunet" and told.epochs is None and told.time_budget_min == 2  # the budget sets the length
    assert RECIPES["nnunet"].optimizer == "sgd" and RECIPES["lean"].optimizer == "adamw"
    with pytest.raises(BadInputError, match="epochs"):
        TrainSettings(str(tiny.root), epochs=0).resolved(plans)
    with pytest.raises(BadInputError, match="recipe"):
        TrainSettings(str(tiny.root), recipe="fast").resolved(plans)
    with pytest.raises(BadInputError, match="unknown precision 'fp16'"):
        TrainSettings(str(tiny.root), precision="fp16").resolved(plans)


def test_schedule_and_deep_supervision_weights_follow_nnunet():
    assert poly_lr(0.01, 0.0, 0.9) == 0.01 and poly_lr(0.01, 1.0, 0.9) == 0.0
    assert math.isclose(poly_lr(0.01, 0.5, 0.9), 0.01 * 0.5 ** 0.9)
    assert supervision_weights(3, ddp=False) == pytest.approx([2 / 3, 1 / 3, 0.0])
    ddp = supervision_weights(3, ddp=True)
    assert ddp[-1] > 0 and ddp[-1] < 1e-5 and sum(ddp) == pytest.approx(1.0)


def test_a_time_budget_drives_the_schedule_and_the_end():
    assert training_progress(0, None, 450, 15) == 0.5  # the clock: half of 15 minutes spent
    assert training_progress(5, 10, 60, 15) == 0.5  # the epochs are further along
    assert training_progress(12, 10, 0, None) == 1.0
    assert epoch_iterations(3, None, 800, 60, 15, 50) == 50  # the next epoch ends at 860 s < 900 s
    assert epoch_iterations(3, None, 870, 60, 15, 50) == 25  # half an epoch fits: the budget is used to its end
    assert epoch_iterations(3, None, 897, 60, 15, 50) == 0  # under a tenth of an epoch: over
    assert epoch_iterations(0, None, 0, 0, 15, 50) == 50  # the first epoch always runs
    assert epoch_iterations(10, 10, 0, 0, None, 50) == 0 and epoch_iterations(9, 10, 1e6, 1, None, 50) == 50


def test_the_learning_rate_decays_every_iteration_along_the_epochs_share_of_training():
    lrs = epoch_learning_rates(0.01, 1.0, 0.5, 0.75, 5)
    assert lrs == pytest.approx([0.005, 0.0045, 0.004, 0.0035, 0.003])
    assert epoch_learning_rates(0.01, 0.9, 0.0, 0.0, 3) == [0.01] * 3  # first epoch of a budget: no estimate yet


def test_a_run_is_checked_before_any_worker_starts(tiny):
    with pytest.raises(BadInputError, match="cannot share"):
        prepare_run(TrainSettings(str(tiny.root), num_workers=5))  # batch 4
    with pytest.raises(BadInputError, match="fold 9"):
        prepare_run(TrainSettings(str(tiny.root), fold="9"))
    settings, _, config = prepare_run(TrainSettings(str(tiny.root), fold="1", epochs=1))
    assert len(config["train_cases"]) + len(config["val_cases"]) == 6
    assert not set(config["train_cases"]) & set(config["val_cases"])
    assert config["run_dir"].endswith("runs/3d_fullres/fold_1") and tiny.splits.is_file()


def test_a_fresh_run_moves_the_earlier_one_aside_and_resume_keeps_it(tmp_path):
    storage, run_dir = tmp_path / "ray", tmp_path / "runs" / "3d_fullres" / "fold_0"
    ray_run = storage / "3d_fullres_fold0"
    ray_run.mkdir(parents=True)
    (ray_run / "checkpoint_000001").mkdir()
    run_dir.mkdir(parents=True)
    (run_dir / "model_final.pt").write_bytes(b"old")
    prepare_storage(storage, "3d_fullres_fold0", run_dir, resume=True)  # Ray Train resumes it: left as it is
    assert (ray_run / "checkpoint_000001").is_dir() and (run_dir / "model_final.pt").read_bytes() == b"old"
    prepare_storage(storage, "3d_fullres_fold0", run_dir, resume=False)
    assert not ray_run.exists() and (storage / "3d_fullres_fold0.previous" / "checkpoint_000001").is_dir()
    assert (run_dir.parent / "fold_0.previous" / "model_final.pt").read_bytes() == b"old"
    assert run_name(TrainSettings("w", config="2d", fold="all")) == "2d_foldall"


def test_two_ray_workers_learn_in_sync_and_a_run_resumes_from_its_checkpoint(tiny, ray_session):
    """Two CPU workers (DDP over gloo) train the lean recipe one epoch, checkpoint, and a resumed run
    carries on at epoch 2 with the optimizer state it saved."""
    settings = TrainSettings(str(tiny.root), config="3d_lean", fold="0", num_workers=2, epochs=1,
                             iterations_per_epoch=8, val_iterations=2, checkpoint_every=1)
    first = run_training(settings)
    assert first.epochs == 1 and first.resumed_from_epoch is None
    grads, params = first.final_metrics["grad_checksums"], first.final_metrics["param_checksums"]
    assert len(grads) == 2 and grads[0] == grads[1] != 0  # DDP averaged the two ranks' different batches
    assert params[0] == params[1]

    second = run_training(dataclasses.replace(settings, epochs=2, resume=True))
    assert second.resumed_from_epoch == 1 and second.epochs == 2
    run_dir = tiny.run_dir("3d_lean", "0")
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_dice_1", "val_dice_2", "lr", "seconds"} <= set(rows[0])
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns
    assert float(rows[1]["lr"]) == pytest.approx(poly_lr(3e-3, 0.5, 0.9))  # the schedule went on at epoch 2
    assert second.final_metrics["grad_checksums"][0] == second.final_metrics["grad_checksums"][1]

    # AdamW counts its steps: 16 means the first run's 8 were restored, not restarted
    snapshot = json.loads((tiny.root / "runs" / "ray" / "3d_lean_fold0" / "checkpoint_manager_snapshot.json").read_text())
    latest = tiny.root / "runs" / "ray" / "3d_lean_fold0" / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["metrics"]) == 2
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {16}

    for name in ("model_best.pt", "model_final.pt", "plans.json", "train_settings.json", "training_curves.png"):
        assert (run_dir / name).is_file(), name
    # the default precision: mixed where this CPU computes bfloat16 itself (pipeline.precision), said in the log
    assert f"torch thread(s), {precision_name(None, 'cpu')}" in (run_dir / TRAINING_LOG).read_text()
    net, plans, meta = load_trained_network(run_dir)
    assert meta["epoch"] == 2 and meta["label_values"] == [0, 1, 2]
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 16, 24, 16))
    assert out.shape == (1, 3, 16, 24, 16)
