"""nnU-Net's PlainConvUNet, built from a resolved `ConfigurationPlan`.

Same topology, initialisation and output order as nnU-Net v2 (dynamic_network_architectures), so
that a plan produced here and nnU-Net's own plans give the same network:

* encoder stage s: `n_conv` x (conv k_s, padding k_s//2 -> InstanceNorm(affine, eps 1e-5) -> LeakyReLU 0.01);
  its first conv carries the stage's stride (strided-conv downsampling; stage 0 has stride 1);
* decoder: transposed conv (kernel = stride = the encoder stage's stride) -> concat skip -> `n_conv` blocks
  with the skip stage's kernel;
* deep supervision: a 1x1 conv head at every decoder resolution, outputs ordered highest resolution first.

Plans are in store axis order and so is every tensor: the network is agnostic to which axis is which.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .errors import SegPipeError
from .plans import ConfigurationPlan

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class ConvBlock(nn.Sequential):
    """conv -> InstanceNorm -> LeakyReLU, nnU-Net's ConvDropoutNormReLU without dropout."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__(
            _CONV[dims](in_ch, out_ch, tuple(kernel), tuple(stride), padding=tuple(k // 2 for k in kernel), bias=True),
            _NORM[dims](out_ch, eps=1e-5, affine=True),
            nn.LeakyReLU(negative_slope=1e-2, inplace=True),
        )


class StackedConvBlocks(nn.Sequential):
    """`n` ConvBlocks; only the first one strides (and changes the channel count)."""

    def __init__(self, n: int, dims: int, in_ch: int, out_ch: int, kernel: Sequence[int], first_stride: Sequence[int]):
        blocks = [ConvBlock(dims, in_ch, out_ch, kernel, first_stride)]
        blocks += [ConvBlock(dims, out_ch, out_ch, kernel, [1] * dims) for _ in range(n - 1)]
        super().__init__(*blocks)


class PlainConvUNet(nn.Module):
    def __init__(self, dims: int, in_channels: int, num_classes: int, features: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_conv_per_stage: int = 2, n_conv_per_stage_decoder: int | None = None,
                 deep_supervision: bool = True):
        super().__init__()
        n_stages = len(features)
        if not (len(kernel_sizes) == len(strides) == n_stages) or n_stages < 2:
            raise SegPipeError(f"network needs >= 2 stages with one kernel size and stride each "
                               f"(features {len(features)}, kernels {len(kernel_sizes)}, strides {len(strides)})")
        n_dec = n_conv_per_stage if n_conv_per_stage_decoder is None else n_conv_per_stage_decoder
        self.dims = dims
        self.num_classes = num_classes
        self.strides = [list(s) for s in strides]
        self.deep_supervision = deep_supervision

        self.encoder = nn.ModuleList()
        in_ch = in_channels
        for s in range(n_stages):
            self.encoder.append(StackedConvBlocks(n_conv_per_stage, dims, in_ch, features[s], kernel_sizes[s], strides[s]))
            in_ch = features[s]

        self.transpconvs, self.decoder, self.seg_layers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(1, n_stages):  # from the bottleneck upwards
            below, skip = features[-s], features[-(s + 1)]
            stride = tuple(strides[-s])
            self.transpconvs.append(_TRANSPOSED[dims](below, skip, stride, stride, bias=True))
            self.decoder.append(StackedConvBlocks(n_dec, dims, 2 * skip, skip, kernel_sizes[-(s + 1)], [1] * dims))
            self.seg_layers.append(_CONV[dims](skip, num_classes, 1, 1, 0, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        last = len(self.decoder) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.decoder)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs.reverse()  # highest resolution first, as the loss weights expect
        return outputs if self.deep_supervision else outputs[0]


def init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's InitWeights_He: Kaiming-normal conv weights (leaky-ReLU gain), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


def build_network(config_plan: ConfigurationPlan, num_input_channels: int, num_classes: int,
                  deep_supervision: bool = True) -> PlainConvUNet:
    """The U-Net a configuration plan describes (resolved plan: use `Plans.configuration(name)`)."""
    p = config_plan
    missing = [f for f in ("patch_size", "kernel_sizes", "strides", "features_per_stage") if getattr(p, f) is None]
    if missing:
        raise SegPipeError(f"configuration {p.name!r} lacks {', '.join(missing)} (was it resolved with Plans.configuration?)")
    dims = len(p.patch_size)
    if dims not in _CONV:
        raise SegPipeError(f"configuration {p.name!r}: patch size {p.patch_size} is neither 2d nor 3d")
    for what, per_stage in (("kernel_sizes", p.kernel_sizes), ("strides", p.strides)):
        if any(len(v) != dims for v in per_stage):
            raise SegPipeError(f"configuration {p.name!r}: every entry of {what} needs {dims} values: {per_stage}")
    total = np.prod(np.asarray(p.strides), axis=0)
    if any(ps % t for ps, t in zip(p.patch_size, total)):
        raise SegPipeError(f"configuration {p.name!r}: patch size {p.patch_size} is not divisible by the "
                           f"network's total downsampling {total.tolist()}")
    net = PlainConvUNet(dims, num_input_channels, num_classes, p.features_per_stage, p.kernel_sizes, p.strides,
                        n_conv_per_stage=p.n_conv_per_stage or 2, deep_supervision=deep_supervision)
    net.apply(init_he)
    return net


def downsample_target_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per deep-supervision output (highest resolution first): its size relative to the patch per axis.

    nnU-Net's `_get_deep_supervision_scales`: 1 / cumulative stride, without the bottleneck.
    """
    cum = np.cumprod(np.asarray(strides, dtype=float), axis=0)
    return [(1.0 / row).tolist() for row in cum[:-1]]


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's loss weights over `n` outputs: 1/2^i, the lowest resolution 0, normalised to sum 1."""
    if n < 1:
        raise ValueError("need at least one output")
    if n == 1:
        return [1.0]
    w = np.array([1 / 2**i for i in range(n)])
    w[-1] = 0
    return (w / w.sum()).tolist()
