"""nnU-Net's PlainConvUNet, built from a resolved `ConfigurationPlan`.

Same topology, initialisation and output order as nnU-Net v2 (dynamic_network_architectures), so
that a plan produced here and nnU-Net's own plans give the same network:

* encoder stage s: `n_conv` x (conv k_s, padding k_s//2 -> InstanceNorm(affine, eps 1e-5) -> LeakyReLU 0.01);
  its first conv carries the stage's stride (strided-conv downsampling; stage 0 has stride 1);
* decoder: transposed conv (kernel = stride = the encoder stage's stride) -> concat skip -> `n_conv` blocks
  with the skip stage's kernel;
* deep supervision: a 1x1 conv head at every decoder resolution, outputs ordered highest resolution first.

Plans are in store axis order and so is every tensor: the network is agnostic to which axis is which.

On CPU the activations run channels-last (NDHWC) inside `forward` (`channels_last_cpu`, on by default;
the same parameters and the same function, only faster: benchmarks/train_step.py). From NCDHW oneDNN
computes the weight gradients of the full-resolution convolutions with an im2col GEMM about 3x slower
than from NDHWC. Keeping the activations NDHWC takes three more pieces, each computing exactly what the
module it stands in for computes:
* `InstanceNorm3d/2d`: PyTorch's instance norm turns NDHWC back into NCDHW; this one works on the
  channels-last layout directly (`_ChannelsLastInstanceNorm`);
* the decoder's first convolution over cat(upsampled, skip) is computed as the sum of two convolutions
  with the two halves of its weight, so the concatenation and its copies disappear; the transposed
  convolution (kernel = stride) is one matrix product over channels plus a reordering of blocks;
* the 1x1 heads are matrix products over the channel axis.
Callers see the usual layout: inputs of any layout are accepted and the logits come back contiguous.
Without autograd (inference) each block normalises its convolution's output in place and the decoder
lets go of each skip and upsampled tensor once used: the same bits, about 40% less activation memory.
Under CPU autocast (mixed precision in prediction and training, `pipeline.precision`) the convolutions
run in bfloat16 while each instance norm, activation and segmentation head computes in float32.
On other devices, and for a batch of one (which PyTorch's oneDNN convolution computes NCDHW whatever
the strides), the network runs as nnU-Net's, in the layout it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import SegPipeError
from pipeline.planning.plans import ConfigurationPlan

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


class _ChannelsLastInstanceNorm(torch.autograd.Function):
    """Affine instance norm of a channels-last tensor, kept channels-last, forward and backward.

    Channels-last, each sample is a (voxels, channels) matrix, so the statistics are column sums of a
    view (PyTorch's pairwise summation: as accurate as its own instance norm, unlike the naive float sums
    of ATen's channels-last batch-norm kernel, whose ~1e-5 errors compounded to 2% in the first layer's
    weight gradient), and the rest is two fused multiply-adds each way. The centred input is kept for
    the backward instead of the input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        n, c, *spatial = x.shape
        v = _voxels_by_channels(x)
        voxels = v.shape[1]
        centred = v - v.sum(1, keepdim=True).div_(voxels)
        invstd = _invstd(centred, eps)
        out = torch.empty_like(x, memory_format=_CHANNELS_LAST[x.ndim - 2])  # a tensor of its own, not a view:
        torch.addcmul(bias, centred, invstd * weight, out=_voxels_by_channels(out))  # LeakyReLU works in place
        ctx.save_for_backward(centred, invstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        centred, invstd, weight = ctx.saved_tensors
        n, voxels, c = centred.shape
        g = _voxels_by_channels(grad_out.contiguous(memory_format=_CHANNELS_LAST[grad_out.ndim - 2]))
        sum_g = g.sum(1, keepdim=True)
        dot = (g * centred).sum(1, keepdim=True)  # sum of g * xhat, over invstd
        scale = invstd * weight
        # d/dx of w * xhat + b: scale * (g - mean(g) - xhat * mean(g * xhat))
        grad_x = torch.empty_like(grad_out, memory_format=_CHANNELS_LAST[grad_out.ndim - 2])
        gx = torch.addcmul(scale * sum_g.div(-voxels), g, scale, out=_voxels_by_channels(grad_x))
        gx.addcmul_(centred, scale * invstd.square() * dot.div(-voxels))
        return grad_x, (dot * invstd).sum((0, 1)), sum_g.sum((0, 1)), None


def _invstd(centred: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(variance + eps) per sample and channel of a centred (N, voxels, C) matrix."""
    return centred.square().sum(1, keepdim=True).div_(centred.shape[1]).add_(eps).rsqrt_()


def _voxels_by_channels(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, *spatial) tensor as the (N, voxels, C) matrix it is in memory: a view."""
    return x.permute(0, *range(2, x.ndim), 1).view(x.shape[0], -1, x.shape[1])


def _channels_last_norm_applies(norm: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor) -> bool:
    return (norm.affine and not norm.track_running_stats and x.ndim in (4, 5) and x.device.type == "cpu"
            and x.dtype == norm.weight.dtype == torch.float32
            and x.is_contiguous(memory_format=_CHANNELS_LAST[x.ndim - 2]) and not x.is_contiguous())


def _instance_norm_forward(norm: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor) -> torch.Tensor:
    if _channels_last_norm_applies(norm, x):
        return _ChannelsLastInstanceNorm.apply(x, norm.weight, norm.bias, norm.eps)
    return nn.modules.instancenorm._InstanceNorm.forward(norm, x)


def _instance_norm_inplace_(norm: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor) -> torch.Tensor:
    """`_ChannelsLastInstanceNorm.forward` computed in `x`'s own memory, for inference: the same
    operations in the same order (so the same bits), without the centred copy and the output
    tensor, two full-resolution activations fewer at the network's memory peak."""
    v = _voxels_by_channels(x)
    v.sub_(v.sum(1, keepdim=True).div_(v.shape[1]))
    torch.addcmul(norm.bias, v, _invstd(v, norm.eps) * norm.weight, out=v)
    return x


def _norm_act(norm: nn.Module, act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """act(norm(y)); without autograd, on a channels-last CPU `y` that the caller owns, normalised in place.

    Under CPU autocast the convolution hands over bfloat16: the statistics and everything up to the
    next convolution are computed in float32 (bfloat16 sums of 90k voxels lose 3 digits; and the
    float32 path is also the faster one here)."""
    if y.device.type == "cpu" and y.dtype != norm.weight.dtype and y.is_floating_point():
        y = y.to(norm.weight.dtype)
    if not torch.is_grad_enabled() and _channels_last_norm_applies(norm, y):
        return act(_instance_norm_inplace_(norm, y))
    return act(norm(y))


class InstanceNorm3d(nn.InstanceNorm3d):
    """nn.InstanceNorm3d that keeps a channels-last CPU input channels-last (see the module docstring)."""

    forward = _instance_norm_forward


class InstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d that keeps a channels-last CPU input channels-last (see the module docstring)."""

    forward = _instance_norm_forward


_NORM = {2: InstanceNorm2d, 3: InstanceNorm3d}


class ConvBlock(nn.Sequential):
    """conv -> InstanceNorm -> LeakyReLU, nnU-Net's ConvDropoutNormReLU without dropout."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__(
            _CONV[dims](in_ch, out_ch, tuple(kernel), tuple(stride), padding=tuple(k // 2 for k in kernel), bias=True),
            _NORM[dims](out_ch, eps=1e-5, affine=True),
            nn.LeakyReLU(negative_slope=1e-2, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self
        return _norm_act(norm, act, conv(x))  # the conv output is ours alone: inference normalises it in place


class StackedConvBlocks(nn.Sequential):
    """`n` ConvBlocks; only the first one strides (and changes the channel count)."""

    def __init__(self, n: int, dims: int, in_ch: int, out_ch: int, kernel: Sequence[int], first_stride: Sequence[int]):
        blocks = [ConvBlock(dims, in_ch, out_ch, kernel, first_stride)]
        blocks += [ConvBlock(dims, out_ch, out_ch, kernel, [1] * dims) for _ in range(n - 1)]
        super().__init__(*blocks)


def _head(conv: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A segmentation head's logits; under CPU autocast in float32 all the same: the head is a few
    multiply-adds per voxel, and bfloat16's 8-bit mantissa would round near-ties between classes.
    (CUDA autocast is left as nnU-Net has it.)"""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return _head(conv, x.float(), channels_last)
    return _head_channels_last(conv, x) if channels_last else conv(x)


def _head_channels_last(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 segmentation head as the matrix product over the channel axis that it is, without the NCDHW
    copy of `x` PyTorch's own 1x1 path makes; the logits (a few channels) come back contiguous."""
    out = F.linear(x.permute(0, *range(2, x.ndim), 1), conv.weight.flatten(1), conv.bias)
    return out.permute(0, x.ndim - 1, *range(1, x.ndim - 1)).contiguous()


def _upsample_channels_last(up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transposed convolution (kernel = stride, no padding: every input voxel writes its own block of
    output voxels) as one matrix product over the channel axis and a reordering of the blocks into place.
    oneDNN's kernel for it computes the weight gradient several times slower (benchmarks/train_step.py)."""
    n, c, *sp = x.shape
    k, o, nd = list(up.kernel_size), up.out_channels, len(sp)
    blocks = int(np.prod(k))
    # weight (C, O, *k) -> (*k, O, C): output features ordered block voxel first, channel last
    w = up.weight.permute(*range(2, 2 + nd), 1, 0).reshape(blocks * o, c)
    y = F.linear(x.permute(0, *range(2, 2 + nd), 1), w, up.bias.repeat(blocks))  # (N, *sp, *k * O)
    y = y.view(n, *sp, *k, o)
    interleave = [0] + [i for a in range(nd) for i in (1 + a, 1 + nd + a)] + [1 + 2 * nd]  # n, d, kd, h, kh, ...
    y = y.permute(interleave).reshape(n, *[a * b for a, b in zip(sp, k)], o)
    return y.permute(0, nd + 1, *range(1, nd + 1))  # (N, O, *spatial), channels-last strides


def _decoder_stage_channels_last(up: nn.Module, stage: nn.Sequential, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """`stage(cat(up(x), skip))` without the concatenation: the first convolution over the concatenated
    channels is the sum of one convolution per part, with the matching slices of the same weight. The
    concatenated tensor and the copies its backward makes are never needed, and oneDNN's GEMM path for
    the weight gradient is faster on the two halves than on the whole."""
    if tuple(up.kernel_size) == tuple(up.stride) and not any(up.padding) and not any(up.output_padding) \
            and up.groups == 1 and all(d == 1 for d in up.dilation):
        upsampled = _upsample_channels_last(up, x)
    else:
        upsampled = up(x)
    conv, norm, act = stage[0]
    c = upsampled.shape[1]
    y = conv._conv_forward(upsampled, conv.weight[:, :c], conv.bias)
    del upsampled  # inference frees it here, before the norm's temporaries (training keeps it for backward)
    y = y.add_(conv._conv_forward(skip, conv.weight[:, c:], None))  # conv outputs are not saved for backward
    del skip
    y = _norm_act(norm, act, y)
    for block in list(stage)[1:]:
        y = block(y)
    return y


def _channels_last_strides(x: torch.Tensor) -> torch.Tensor:
    """`x` with channels-last strides, also where it has one channel: oneDNN picks its layout from the
    strides, and `x.contiguous(memory_format=...)` leaves a 1-channel NCDHW tensor as it is (both layouts
    hold it the same way), so the whole network would run NCDHW."""
    fmt = _CHANNELS_LAST[x.ndim - 2]
    if x.is_contiguous(memory_format=fmt) and (x.shape[1] > 1 or x.stride(1) == 1):
        return x
    return torch.empty_like(x, memory_format=fmt).copy_(x)


class PlainConvUNet(nn.Module):
    def __init__(self, dims: int, in_channels: int, num_classes: int, features: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_conv_per_stage: int = 2, n_conv_per_stage_decoder: int | None = None,
                 deep_supervision: bool = True, channels_last_cpu: bool = True):
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
        self.channels_last_cpu = channels_last_cpu  # activations NDHWC on CPU (module docstring); off: as given

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
        # oneDNN computes a batch of one in NCDHW whatever the strides say, so there is nothing to gain
        channels_last = self.channels_last_cpu and x.device.type == "cpu" and x.shape[0] > 1
        if channels_last:
            x = _channels_last_strides(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        skips.pop()  # the bottleneck's output is x; each skip leaves the list when used (inference frees it)
        outputs = []
        last = len(self.decoder) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.decoder)):
            if channels_last:
                x = _decoder_stage_channels_last(up, stage, x, skips.pop())
            else:
                x = stage(torch.cat((up(x), skips.pop()), 1))
            if self.deep_supervision or s == last:
                outputs.append(_head(self.seg_layers[s], x, channels_last))
        outputs.reverse()  # highest resolution first, as the loss weights expect
        return outputs if self.deep_supervision else outputs[0]


def init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's InitWeights_He: Kaiming-normal conv weights (leaky-ReLU gain), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


def build_network(config_plan: ConfigurationPlan, num_input_channels: int, num_classes: int,
                  deep_supervision: bool = True, channels_last_cpu: bool = True) -> PlainConvUNet:
    """The U-Net a configuration plan describes (resolved plan: use `Plans.configuration(name)`).

    `channels_last_cpu=False` keeps the activations in the input's layout (the speed comparison).
    """
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
                        n_conv_per_stage=p.n_conv_per_stage or 2, deep_supervision=deep_supervision,
                        channels_last_cpu=channels_last_cpu)
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
