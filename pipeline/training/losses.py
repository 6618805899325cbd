"""Training losses and the validation pseudo-Dice counters, after nnU-Net v2.

* `SoftDiceLoss`: nnU-Net's MemoryEfficientSoftDiceLoss (softmax, one-hot built without gradient,
  background excluded, batch Dice, smooth 1e-5), reported as 1 - Dice so a perfect prediction is 0
  (nnU-Net returns -Dice; the gradients are identical).
* `DiceCELoss`: Dice + cross-entropy, weights 1:1 (nnU-Net's DC_and_CE_loss), the SGD recipe.
* `CELoss`: plain cross-entropy for the Adam recipe.
* `DeepSupervisionLoss`: weighted sum over the network's output list; each target is produced by
  strided slicing of the full-resolution label (a view, no interpolation kernel), which picks the
  same voxels as nnU-Net's `nearest-exact` downsampling.

Targets are integer class indices (B, *spatial) or (B, 1, *spatial).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training.model import deep_supervision_weights


def _as_index(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, *sp) int64 class indices from (B, *sp) or (B, 1, *sp)."""
    if target.ndim == logits.ndim:
        target = target[:, 0]
    return target.long()


class SoftDiceLoss(nn.Module):
    def __init__(self, batch_dice: bool = True, do_bg: bool = False, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice, self.do_bg, self.smooth = batch_dice, do_bg, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), 1)
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            onehot = torch.zeros_like(probs, dtype=torch.bool)
            onehot.scatter_(1, _as_index(target, logits).unsqueeze(1), True)
            if not self.do_bg:
                onehot = onehot[:, 1:]
            sum_gt = onehot.sum(axes, dtype=probs.dtype)
        if not self.do_bg:
            probs = probs[:, 1:]
        intersect = (probs * onehot).sum(axes)
        sum_pred = probs.sum(axes)
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        dice = (2 * intersect + self.smooth) / torch.clip(sum_gt + sum_pred + self.smooth, 1e-8)
        return 1 - dice.mean()


class CELoss(nn.Module):
    """Cross-entropy on integer targets (nnU-Net's RobustCrossEntropyLoss: accepts a channel axis of 1)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), _as_index(target, logits))


class DiceCELoss(nn.Module):
    def __init__(self, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True):
        super().__init__()
        self.weight_ce, self.weight_dice = weight_ce, weight_dice
        self.dice, self.ce = SoftDiceLoss(batch_dice=batch_dice), CELoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight_ce * self.ce(logits, target) + self.weight_dice * self.dice(logits, target)


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The label at a deep-supervision output's spatial `shape`: nearest neighbour, as nnU-Net.

    When the size ratio is an integer `s` per axis, `nearest-exact` picks voxels s//2, s//2 + s, ...,
    which a strided slice gives for free; other ratios fall back to interpolation.
    """
    spatial = target.shape[-len(shape):]
    if tuple(spatial) == tuple(shape):
        return target
    steps = [n // m if m and n % m == 0 else 0 for n, m in zip(spatial, shape)]
    if all(steps):
        index = (...,) + tuple(slice(s // 2, None, s) for s in steps)
        return target[index]
    lead = target.shape[: target.ndim - len(shape)]
    flat = target.reshape(-1, 1, *spatial).float()
    out = F.interpolate(flat, size=tuple(shape), mode="nearest-exact")
    return out.reshape(*lead, *shape).to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss` over the network's outputs (highest resolution first).

    Weights default to nnU-Net's (`deep_supervision_weights`); outputs with weight 0 are skipped.
    A single tensor (deep supervision off) is passed straight to `loss`.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outputs))
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(weights)} deep supervision weights")
        if target.ndim == outputs[0].ndim:
            target = target[:, 0]
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for out, w in zip(outputs, weights):
            if w:
                total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
        return total


def build_loss(kind: str = "dice_ce", deep_supervision: bool = True, batch_dice: bool = True) -> nn.Module:
    """`dice_ce` (nnU-Net SGD recipe) or `ce` (Adam recipe), wrapped for deep supervision if asked."""
    if kind == "dice_ce":
        loss: nn.Module = DiceCELoss(batch_dice=batch_dice)
    elif kind == "ce":
        loss = CELoss()
    else:
        raise ValueError(f"unknown loss {kind!r} (dice_ce | ce)")
    return DeepSupervisionLoss(loss) if deep_supervision else loss


@torch.no_grad()
def pseudo_dice(logits: torch.Tensor, target: torch.Tensor, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per foreground class (indices 1..K-1) true positives, false positives, false negatives of argmax(logits).

    Summed over the whole batch, as nnU-Net's online validation: accumulate over batches, then
    `dice_from_counts`. One bincount of (target, prediction) pairs gives the confusion matrix.
    """
    pred = logits.argmax(1).reshape(-1)
    true = _as_index(target, logits).reshape(-1).to(pred.device)
    confusion = torch.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    confusion = confusion[: num_classes * num_classes].reshape(num_classes, num_classes)
    tp = confusion.diagonal()
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    return tp[1:].cpu(), fp[1:].cpu(), fn[1:].cpu()


def dice_from_counts(tp, fp, fn) -> torch.Tensor:
    """2TP / (2TP + FP + FN) per class; NaN where the class is absent from both prediction and truth."""
    tp, fp, fn = (torch.as_tensor(v, dtype=torch.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(denom, float("nan")))
