"""Losses: nnU-Net's soft Dice + CE, deep supervision over the output list, validation pseudo-Dice counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.planning.plans import ConfigurationPlan
from pipeline.training.losses import (
    CELoss,
    DeepSupervisionLoss,
    DiceCELoss,
    SoftDiceLoss,
    build_loss,
    dice_from_counts,
    downsample_target,
    pseudo_dice,
)
from pipeline.training.model import build_network, deep_supervision_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_target(shape, classes, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, classes, shape)).to(torch.uint8)


def perfect_logits(target: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(target.long(), classes).movedim(-1, 1).float() * 50


def test_dice_of_a_perfect_prediction_is_zero_and_of_a_wrong_one_near_one():
    target = random_target((2, 8, 8, 8), 3)
    dice = SoftDiceLoss()
    assert dice(perfect_logits(target, 3), target).item() == pytest.approx(0, abs=1e-5)
    wrong = perfect_logits((target.long() + 1) % 3, 3)
    assert dice(wrong, target).item() == pytest.approx(1, abs=1e-5)


def test_soft_dice_matches_the_formula_batch_and_per_sample():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 6, 6, 6), random_target((2, 6, 6, 6), 3)
    p = torch.softmax(logits, 1).numpy()[:, 1:]
    onehot = F.one_hot(target.long(), 3).movedim(-1, 1).numpy()[:, 1:]
    axes = (2, 3, 4)
    inter, pred, gt = (p * onehot).sum(axes), p.sum(axes), onehot.sum(axes)
    batch = (2 * inter.sum(0) + 1e-5) / (gt.sum(0) + pred.sum(0) + 1e-5)
    per_sample = (2 * inter + 1e-5) / (gt + pred + 1e-5)
    assert SoftDiceLoss(batch_dice=True)(logits, target).item() == pytest.approx(1 - batch.mean(), rel=1e-5)
    assert SoftDiceLoss(batch_dice=False)(logits, target).item() == pytest.approx(1 - per_sample.mean(), rel=1e-5)


def test_dice_ce_is_the_sum_and_accepts_a_channel_axis_on_the_target():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 4, 5, 7), random_target((2, 5, 7), 4)
    expected = F.cross_entropy(logits, target.long()) + SoftDiceLoss()(logits, target)
    assert DiceCELoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert DiceCELoss()(logits, target[:, None]).item() == pytest.approx(expected.item(), rel=1e-6)
    assert CELoss()(logits, target[:, None]).item() == pytest.approx(F.cross_entropy(logits, target.long()).item())


def test_target_downsampling_picks_the_voxels_nearest_exact_interpolation_picks():
    target = random_target((2, 40, 56, 40), 5)
    for shape in [(20, 28, 20), (10, 14, 10), (40, 28, 10), (13, 19, 7)]:  # the last one is not an integer ratio
        expected = F.interpolate(target[:, None].float(), size=shape, mode="nearest-exact")[:, 0].to(torch.uint8)
        assert torch.equal(downsample_target(target, shape), expected)


def test_deep_supervision_weighs_each_scale_and_skips_the_lowest():
    torch.manual_seed(2)
    target = random_target((2, 16, 16, 16), 3)
    outputs = [torch.randn(2, 3, 16 // s, 16 // s, 16 // s) for s in (1, 2, 4, 8)]
    base = DiceCELoss()
    weights = deep_supervision_weights(4)
    expected = sum(w * base(o, target[:, s // 2::s, s // 2::s, s // 2::s])
                   for w, o, s in zip(weights[:3], outputs[:3], (1, 2, 4)))
    loss = DeepSupervisionLoss(base)
    assert loss(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    outputs[3] = torch.full_like(outputs[3], float("nan"))  # weight 0: never evaluated
    assert torch.isfinite(loss(outputs, target))
    assert loss(outputs[0], target).item() == pytest.approx(base(outputs[0], target).item())  # no list: plain loss
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionLoss(base, weights=[1.0, 0.5])(outputs, target)


def sgd_losses(kind: str, steps: int) -> list[float]:
    """Train a small U-Net on one fixed batch (a ball and a box) and record the loss."""
    torch.manual_seed(0)
    plan = ConfigurationPlan(name="t", patch_size=[16, 16, 16], kernel_sizes=[[3, 3, 3]] * 3,
                             strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], features_per_stage=[4, 8, 16])
    net = build_network(plan, 1, 3)
    zz, yy, xx = np.mgrid[:16, :16, :16]
    target = np.zeros((2, 16, 16, 16), np.uint8)
    target[0][(zz - 8) ** 2 + (yy - 7) ** 2 + (xx - 9) ** 2 < 20] = 1
    target[1, 3:9, 4:12, 5:10] = 2
    image = torch.from_numpy(target.astype(np.float32))[:, None] + 0.3 * torch.randn(2, 1, 16, 16, 16)
    target = torch.from_numpy(target)
    loss_fn = build_loss(kind)
    if kind == "dice_ce":  # nnU-Net's recipe
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["dice_ce", "ce"])
def test_a_few_optimiser_steps_on_a_fixed_batch_lower_the_loss(kind):
    losses = sgd_losses(kind, 12)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.9 * losses[0]


def test_pseudo_dice_counts_per_foreground_class():
    target = torch.tensor([[0, 1, 1, 2, 2, 2, 0, 0]])
    pred = torch.tensor([[0, 1, 2, 2, 2, 0, 1, 0]])
    tp, fp, fn = pseudo_dice(perfect_logits(pred, 3), target, 3)
    assert tp.tolist() == [1, 2] and fp.tolist() == [1, 1] and fn.tolist() == [1, 1]
    assert dice_from_counts(tp, fp, fn).tolist() == pytest.approx([0.5, 2 / 3])
    tp, fp, fn = pseudo_dice(perfect_logits(pred, 4), target[:, None], 4)  # class 3: absent from both
    assert torch.isnan(dice_from_counts(tp, fp, fn)[2])


def test_build_loss_refuses_unknown_kinds():
    assert isinstance(build_loss("ce", deep_supervision=False), CELoss)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal")
