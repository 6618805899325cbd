"""Training losses and the validation pseudo-Dice counters, after nnU-Net v2.

* `SoftDiceLoss`: nnU-Net's MemoryEfficientSoftDiceLoss (softmax, one-hot built without gradient,
  background excluded, batch Dice, smooth 1e-5), reported as 1 - Dice so a perfect prediction is 0
  (nnU-Net returns -Dice; the gradients are identical).
* `DiceCELoss`: Dice + cross-entropy, weights 1:1 (nnU-Net's DC_and_CE_loss), the SGD recipe.
* `CELoss`: plain cross-entropy for the Adam recipe.
* `DeepSupervisionLoss`: weighted sum over the network's output list; each target is produced by
  strided slicing of the full-resolution label (a view, no interpolation kernel), which picks the
  same voxels as nnU-Net's `nearest-exact` downsampling.

* `DiceBCELoss`: region-based training (nnU-Net's DC_and_BCE_loss): sigmoid per region.
* An ignore label (`ignore_index`) is masked out of every term and of `pseudo_dice`.

Targets are integer store indices (B, *spatial) or (B, 1, *spatial); region masks are made from them
here (`region_targets`), so the store and the deep-supervision downsampling stay the same for both kinds.
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


def region_targets(index: torch.Tensor, region_indices: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, R, *sp) bool region masks from (B, *sp) store indices: region r is where the index is any of
    `region_indices[r]`. Made here, at loss time, so the store keeps one label map for every kind of training."""
    return torch.stack([torch.isin(index, torch.as_tensor(list(r), device=index.device)) for r in region_indices], 1)


def annotated_mask(index: torch.Tensor, ignore_index: int | None) -> torch.Tensor | None:
    """(B, 1, *sp) True where a voxel is annotated (not the ignore label); None without an ignore label."""
    return None if ignore_index is None else (index != ignore_index).unsqueeze(1)


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor | None, batch_dice: bool,
              smooth: float) -> torch.Tensor:
    """1 - mean soft Dice over channels (nnU-Net's MemoryEfficientSoftDiceLoss), voxels outside `mask` left out."""
    axes = tuple(range(2, probs.ndim))
    onehot = onehot.to(probs.dtype)
    if mask is not None:
        probs, onehot = probs * mask, onehot * mask
    with torch.no_grad():
        sum_gt = onehot.sum(axes)
    intersect = (probs * onehot).sum(axes)
    sum_pred = probs.sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dice = (2 * intersect + smooth) / torch.clip(sum_gt + sum_pred + smooth, 1e-8)
    return 1 - dice.mean()


class SoftDiceLoss(nn.Module):
    """Softmax Dice over the foreground classes; with `ignore_index`, those voxels count nowhere."""

    def __init__(self, batch_dice: bool = True, do_bg: bool = False, smooth: float = 1e-5,
                 ignore_index: int | None = None):
        super().__init__()
        self.batch_dice, self.do_bg, self.smooth, self.ignore_index = batch_dice, do_bg, smooth, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), 1)
        index = _as_index(target, logits)
        mask = annotated_mask(index, self.ignore_index)
        with torch.no_grad():
            if mask is not None:
                index = torch.where(mask[:, 0], index, 0)
            onehot = torch.zeros_like(probs, dtype=torch.bool)
            onehot.scatter_(1, index.unsqueeze(1), True)
        if not self.do_bg:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        return soft_dice(probs, onehot, mask, self.batch_dice, self.smooth)


class CELoss(nn.Module):
    """Cross-entropy on integer targets (nnU-Net's RobustCrossEntropyLoss: accepts a channel axis of 1);
    ignored voxels left out, and 0 when a batch holds nothing else (as nnU-Net)."""

    def __init__(self, ignore_index: int | None = None):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = _as_index(target, logits)
        if self.ignore_index is None:
            return F.cross_entropy(logits.float(), index)
        if not (index != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), index, ignore_index=self.ignore_index)


class DiceCELoss(nn.Module):
    def __init__(self, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True,
                 ignore_index: int | None = None):
        super().__init__()
        self.weight_ce, self.weight_dice = weight_ce, weight_dice
        self.dice = SoftDiceLoss(batch_dice=batch_dice, ignore_index=ignore_index)
        self.ce = CELoss(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight_ce * self.ce(logits, target) + self.weight_dice * self.dice(logits, target)


class DiceBCELoss(nn.Module):
    """Region-based training (nnU-Net's DC_and_BCE_loss): per region a sigmoid output, binary cross-entropy
    plus soft Dice over every region (no background channel), weights 1:1. Targets are store indices,
    turned into region masks here; with `ignore_index`, ignored voxels count in neither term.
    `weight_dice=0` gives plain BCE (the `ce` recipe's counterpart). One deliberate difference: nnU-Net
    divides the masked BCE sum by the annotated voxels only, so its BCE grows R-fold (R regions) the
    moment an ignore label exists; here it is the mean over annotated (voxel, region) pairs, which
    equals the unmasked loss when nothing is ignored."""

    def __init__(self, region_indices: Sequence[Sequence[int]], batch_dice: bool = True,
                 ignore_index: int | None = None, weight_bce: float = 1.0, weight_dice: float = 1.0,
                 smooth: float = 1e-5):
        super().__init__()
        self.region_indices = tuple(tuple(int(i) for i in r) for r in region_indices)
        self.batch_dice, self.ignore_index, self.smooth = batch_dice, ignore_index, smooth
        self.weight_bce, self.weight_dice = weight_bce, weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        index = _as_index(target, logits)
        with torch.no_grad():
            regions = region_targets(index, self.region_indices).to(logits.dtype)
            mask = annotated_mask(index, self.ignore_index)
        bce = F.binary_cross_entropy_with_logits(logits, regions, reduction="none")
        if mask is None:
            bce = bce.mean()
        else:
            bce = (bce * mask).sum() / torch.clip(mask.sum() * logits.shape[1], min=1e-8)
        loss = self.weight_bce * bce
        if self.weight_dice:
            loss = loss + self.weight_dice * soft_dice(torch.sigmoid(logits), regions, mask, self.batch_dice,
                                                       self.smooth)
        return loss


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


def build_loss(kind: str = "dice_ce", deep_supervision: bool = True, batch_dice: bool = True,
               label_map=None) -> nn.Module:
    """`dice_ce` (nnU-Net SGD recipe) or `ce` (Adam recipe), wrapped for deep supervision if asked.

    With a `pipeline.data.labels.LabelMap` of regions, the sigmoid counterparts (Dice + BCE, or BCE);
    with an ignore label, its voxels masked out of every term.
    """
    if kind not in ("dice_ce", "ce"):
        raise ValueError(f"unknown loss {kind!r} (dice_ce | ce)")
    ignore = None if label_map is None else label_map.ignore_index
    if label_map is not None and label_map.has_regions:
        loss: nn.Module = DiceBCELoss(label_map.region_indices, batch_dice=batch_dice, ignore_index=ignore,
                                      weight_dice=1.0 if kind == "dice_ce" else 0.0)
    elif kind == "dice_ce":
        loss = DiceCELoss(batch_dice=batch_dice, ignore_index=ignore)
    else:
        loss = CELoss(ignore)
    return DeepSupervisionLoss(loss) if deep_supervision else loss


@torch.no_grad()
def pseudo_dice(logits: torch.Tensor, target: torch.Tensor, num_classes: int, region_indices=None,
                ignore_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scored output true positives, false positives, false negatives, summed over the batch.

    Classes (softmax): per foreground class (indices 1..K-1) of argmax(logits); one bincount of
    (target, prediction) pairs gives the confusion matrix. Regions (`region_indices`): per region,
    sigmoid > 0.5 (logit > 0) against the region mask. Ignored voxels (`ignore_index`) count
    nowhere. As nnU-Net's online validation: accumulate over batches, then `dice_from_counts`.
    """
    index = _as_index(target, logits).to(logits.device)
    keep = None if ignore_index is None else index != ignore_index
    if region_indices is not None:
        pred = logits > 0
        true = region_targets(index, region_indices)
        if keep is not None:
            pred, true = pred & keep.unsqueeze(1), true & keep.unsqueeze(1)
        axes = (0, *range(2, logits.ndim))
        tp = (pred & true).sum(axes)
        fp = (pred & ~true).sum(axes)
        fn = (~pred & true).sum(axes)
        return tp.cpu(), fp.cpu(), fn.cpu()
    pred = logits.argmax(1).reshape(-1)
    true = index.reshape(-1)
    if keep is not None:
        keep = keep.reshape(-1)
        pred, true = pred[keep], true[keep]
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
