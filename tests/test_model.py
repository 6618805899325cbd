"""The U-Net is nnU-Net's PlainConvUNet: shapes, deep supervision outputs, initialisation, plan contract."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import SegPipeError
from pipeline.planning.plans import ChannelNormalization, ConfigurationPlan, Plans
from pipeline.training.model import build_network, deep_supervision_weights, downsample_target_scales

pytestmark = pytest.mark.usefixtures("one_torch_thread")


HIPPOCAMPUS = ConfigurationPlan(  # nnU-Net v2 3d_fullres for Task04 (store axis order)
    name="3d_fullres", patch_size=[40, 56, 40], batch_size=9,
    kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    features_per_stage=[32, 64, 128, 256], n_conv_per_stage=2)

SPINALCORD = ConfigurationPlan(  # anisotropic: 0.5 x 0.5 x 7.5 mm, the coarse axis pooled last and once
    name="3d_fullres", patch_size=[96, 64, 8],
    kernel_sizes=[[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    strides=[[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1], [2, 2, 1]],
    features_per_stage=[4, 8, 16, 32, 32, 32])

TOTALSEG = ConfigurationPlan(  # 42 classes (41 organs + background), 5 stages; small patch/width for CPU speed
    name="3d_fullres", patch_size=[32, 32, 32],
    kernel_sizes=[[3, 3, 3]] * 5, strides=[[1, 1, 1]] + [[2, 2, 2]] * 4,
    features_per_stage=[4, 8, 16, 32, 32])

TWO_D = ConfigurationPlan(
    name="2d", patch_size=[56, 40], kernel_sizes=[[3, 3]] * 4, strides=[[1, 1], [2, 2], [2, 2], [2, 2]],
    features_per_stage=[32, 64, 128, 256])


def expected_shapes(plan: ConfigurationPlan, batch: int, classes: int) -> list[tuple[int, ...]]:
    return [(batch, classes, *[round(p * s) for p, s in zip(plan.patch_size, scale)])
            for scale in downsample_target_scales(plan.strides)]


def narrow(plan: ConfigurationPlan) -> ConfigurationPlan:
    """The same plan at an eighth of the width: shapes do not depend on it, CPU time does."""
    return dataclasses.replace(plan, features_per_stage=[f // 8 for f in plan.features_per_stage])


@pytest.mark.parametrize("plan, classes", [(narrow(HIPPOCAMPUS), 3), (SPINALCORD, 2), (TOTALSEG, 42), (narrow(TWO_D), 3)],
                         ids=["hippocampus", "spinalcord-anisotropic", "totalseg-42", "2d"])
def test_deep_supervision_outputs_one_per_decoder_resolution_highest_first(plan, classes):
    net = build_network(plan, num_input_channels=1, num_classes=classes)
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *plan.patch_size))
    assert isinstance(outputs, list) and len(outputs) == len(plan.strides) - 1
    assert [tuple(o.shape) for o in outputs] == expected_shapes(plan, 1, classes)
    conv, other = (nn.Conv2d, nn.Conv3d) if len(plan.patch_size) == 2 else (nn.Conv3d, nn.Conv2d)
    kinds = {type(m) for m in net.modules()}
    assert conv in kinds and other not in kinds


def test_without_deep_supervision_only_the_full_resolution_logits():
    net = build_network(TWO_D, num_input_channels=2, num_classes=4, deep_supervision=False)
    out = net(torch.randn(3, 2, 56, 40))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 4, 56, 40)


def test_topology_matches_nnunet_plain_conv_unet():
    net = build_network(HIPPOCAMPUS, num_input_channels=1, num_classes=3)
    convs = [m for m in net.encoder.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 4 * 2  # n_conv_per_stage per stage
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 256, 256]
    assert [c.stride for c in convs[::2]] == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]  # first conv strides
    assert all(c.stride == (1, 1, 1) for c in convs[1::2])
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(n.affine and n.eps == 1e-5 for n in norms)
    ups = list(net.transpconvs)
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (256, 128, (2, 2, 2), (2, 2, 2)), (128, 64, (2, 2, 2), (2, 2, 2)), (64, 32, (2, 2, 2), (2, 2, 2))]
    assert [d[0][0].in_channels for d in net.decoder] == [256, 128, 64]  # upsampled + skip concatenated
    # counted by hand from the topology: encoder 3,515,040 + decoder (transposed convs, blocks, heads) 2,088,137
    assert sum(p.numel() for p in net.parameters()) == 5_603_177


@pytest.mark.parametrize("plan", [dataclasses.replace(narrow(HIPPOCAMPUS), patch_size=[24, 32, 16]), narrow(TWO_D)],
                         ids=["3d", "2d"])
def test_channels_last_on_cpu_computes_what_the_plain_layout_computes(plan):
    """On CPU the network runs channels-last with its own norm, decoder and heads: the same function, and
    gradients as close to exact (float64) as those of the plain layout PyTorch's own modules compute in."""
    torch.manual_seed(0)
    fast = build_network(plan, 1, 3)
    for m in fast.modules():  # non-zero biases, so that every bias path counts
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.normal_(m.bias)
    plain = build_network(plan, 1, 3, channels_last_cpu=False)
    exact = build_network(plan, 1, 3, channels_last_cpu=False).double()
    plain.load_state_dict(fast.state_dict())
    exact.load_state_dict(fast.state_dict())
    layout = torch.channels_last_3d if len(plan.patch_size) == 3 else torch.channels_last
    seen = []
    fast.encoder[0][0][1].register_forward_hook(
        lambda module, args, out: seen.append(out.is_contiguous(memory_format=layout) and not out.is_contiguous()))
    x = torch.randn(2, 1, *plan.patch_size)
    outputs = [net(x.to(dtype)) for net, dtype in ((fast, torch.float32), (plain, torch.float32), (exact, torch.float64))]
    assert seen == [True]  # the fast path was taken (a 1-channel input is ambiguous about its layout)
    for u, v in zip(outputs[0], outputs[2]):
        assert u.is_contiguous()
        torch.testing.assert_close(u.double(), v, rtol=1e-4, atol=1e-4)
    for out in outputs:
        sum(o.square().mean() for o in out).backward()
    for (name, f), p, e in zip(fast.named_parameters(), plain.parameters(), exact.parameters()):
        if e.grad.norm() > 1e-9:  # conv biases right before a norm have a gradient of exactly 0
            error = lambda g: ((g.double() - e.grad).norm() / e.grad.norm()).item()  # noqa: E731
            assert error(f.grad) <= max(2 * error(p.grad), 1e-3), name


@pytest.mark.parametrize("plan", [dataclasses.replace(narrow(HIPPOCAMPUS), patch_size=[24, 32, 16]), narrow(TWO_D)],
                         ids=["3d", "2d"])
def test_inference_normalises_in_place_and_computes_the_same_bits_as_with_autograd(plan):
    """Prediction (no autograd) normalises each convolution's output in its own memory and frees each
    skip once used; the logits must equal those of the autograd path bit for bit."""
    torch.manual_seed(0)
    net = build_network(plan, 1, 3).eval()
    x = torch.randn(2, 1, *plan.patch_size)
    with torch.inference_mode():
        fast = net(x)
    with torch.enable_grad():
        reference = net(x)
    assert reference[0].requires_grad
    for u, v in zip(fast, reference):
        assert torch.equal(u, v)


def test_anisotropic_kernels_pad_to_keep_the_coarse_axis():
    net = build_network(SPINALCORD, num_input_channels=1, num_classes=2)
    first = net.encoder[0][0][0]
    assert first.kernel_size == (3, 3, 1) and first.padding == (1, 1, 0)
    assert net.transpconvs[-1].stride == (2, 2, 1)


def test_he_initialisation_as_nnunet():
    torch.manual_seed(0)
    net = build_network(HIPPOCAMPUS, 1, 3)
    conv = net.encoder[3][1][0]  # 256 -> 256, 3x3x3: fan_in 6912
    expected_std = math.sqrt(2 / (1 + 0.01**2)) / math.sqrt(256 * 27)
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert all(m.bias.abs().max() == 0 for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)))


def test_builds_from_a_resolved_inheriting_configuration():
    plans = Plans(dataset_name="D", channels=["MRI"], labels={"0": "bg", "1": "a"}, transpose_forward=[0, 1, 2],
                  normalization=[ChannelNormalization("zscore")],
                  configurations={"3d_fullres": HIPPOCAMPUS,
                                  "3d_wide": ConfigurationPlan(name="3d_wide", inherits_from="3d_fullres",
                                                               features_per_stage=[8, 16, 32, 64], n_conv_per_stage=1)})
    net = build_network(plans.configuration("3d_wide"), 1, 2)
    assert [net.encoder[s][0][0].out_channels for s in range(4)] == [8, 16, 32, 64]
    assert len(net.encoder[0]) == 1


def test_rejects_plans_it_cannot_build():
    with pytest.raises(SegPipeError, match="not divisible"):
        build_network(ConfigurationPlan(name="x", patch_size=[40, 41, 40], kernel_sizes=[[3, 3, 3]] * 2,
                                        strides=[[1, 1, 1], [2, 2, 2]], features_per_stage=[4, 8]), 1, 2)
    with pytest.raises(SegPipeError, match="lacks"):
        build_network(ConfigurationPlan(name="x", patch_size=[32, 32]), 1, 2)
    with pytest.raises(SegPipeError, match="needs 3 values"):
        build_network(ConfigurationPlan(name="x", patch_size=[32, 32, 32], kernel_sizes=[[3, 3]] * 2,
                                        strides=[[1, 1, 1], [2, 2, 2]], features_per_stage=[4, 8]), 1, 2)


def test_deep_supervision_weights_and_scales_follow_nnunet():
    assert deep_supervision_weights(4) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    assert downsample_target_scales(HIPPOCAMPUS.strides) == [[1, 1, 1], [0.5] * 3, [0.25] * 3]
    assert downsample_target_scales(SPINALCORD.strides)[2] == [0.25, 0.25, 1.0]


REFERENCE = Path(__file__).parent / "reference" / "nnunet_v2_plans.json"
# Parameter counts of nnU-Net's own network (dynamic_network_architectures 0.4.4 PlainConvUNet, 1 input channel) for
# nnU-Net's plans. Checked once side by side: with nnU-Net's weights copied in, our outputs were bit-identical.
NNUNET_PARAMETERS = {
    ("Task04_Hippocampus", "3d_fullres", 3): 5_603_177,
    ("Task04_Hippocampus", "2d", 3): 1_928_489,
    ("TotalSegmentator_CT", "3d_fullres", 42): 16_239_272,
    ("TotalSegmentator_CT", "2d", 42): 7_785_704,
    ("Dataset900_SynthAniso", "3d_fullres", 2): 30_375_818,
}


@pytest.mark.parametrize("dataset, configuration, classes", list(NNUNET_PARAMETERS), ids=lambda v: str(v))
def test_nnunet_plans_build_nnunets_network(dataset, configuration, classes):
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    ref = json.loads(REFERENCE.read_text())
    conf = (ref.get(dataset) or ref["_synthetic_planning_cases"][dataset])["configurations"][configuration]
    plan = ConfigurationPlan(name=configuration, patch_size=conf["patch_size"], kernel_sizes=conf["kernel_sizes"],
                             strides=conf["strides"], features_per_stage=conf["features_per_stage"],
                             n_conv_per_stage=conf["n_conv_per_stage"][0])
    net = build_network(plan, 1, classes)
    assert sum(p.numel() for p in net.parameters()) == NNUNET_PARAMETERS[dataset, configuration, classes]
