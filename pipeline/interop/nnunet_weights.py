"""nnU-Net v2's PlainConvUNet state dict <-> ours (`training.model.PlainConvUNet`), key by key.

nnU-Net's module tree (dynamic_network_architectures) names every convolution and norm twice
(`convs.I.conv` and `convs.I.all_modules.0`) and its decoder holds the encoder again
(`decoder.encoder.*`): the same tensors under several names. Ours names each once. The mapping is
strict both ways: every key must match a known pattern, every alias must hold exactly the values of
its primary name, and the result must fill the target network exactly (`load_state_dict(strict=True)`);
anything else is refused naming the key, never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from pipeline.errors import BadInputError

# encoder.stages.S.0.convs.I.conv.weight (dynamic_network_architectures >= 0.3; older ones lack the ".0")
_ENCODER = re.compile(r"^encoder\.stages\.(\d+)\.(?:0\.)?convs\.(\d+)\.(conv|norm|all_modules\.\d+)\.(weight|bias)$")
_DECODER = re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm|all_modules\.\d+)\.(weight|bias)$")
_HEADS = re.compile(r"^decoder\.(transpconvs|seg_layers)\.(\d+)\.(weight|bias)$")
# inside nnU-Net's ConvDropoutNormReLU: conv, norm and their positions in `all_modules` without dropout
_PART = {"conv": "0", "norm": "1", "all_modules.0": "0", "all_modules.1": "1"}
_OUR_BLOCK = re.compile(r"^(encoder|decoder)\.(\d+)\.(\d+)\.([01])\.(weight|bias)$")
_OUR_HEADS = re.compile(r"^(transpconvs|seg_layers)\.(\d+)\.(weight|bias)$")


def nnunet_to_ours(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """nnU-Net's PlainConvUNet state dict under our module names (BadInputError naming every odd key)."""
    primary: dict[str, torch.Tensor] = {}
    aliases: list[tuple[str, str, torch.Tensor]] = []
    problems: list[str] = []
    for key, value in state.items():
        name = key.removeprefix("decoder.") if key.startswith("decoder.encoder.") else key
        alias = name != key
        ours = None
        if m := _ENCODER.match(name):
            stage, conv, part, what = m.groups()
            if part in _PART:
                ours, alias = f"encoder.{stage}.{conv}.{_PART[part]}.{what}", alias or part.startswith("all_modules")
        elif m := _DECODER.match(name):
            stage, conv, part, what = m.groups()
            if part in _PART:
                ours, alias = f"decoder.{stage}.{conv}.{_PART[part]}.{what}", alias or part.startswith("all_modules")
        elif m := _HEADS.match(name):
            ours = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        if ours is None:
            problems.append(f"{source}: network weight {key!r} is not part of nnU-Net's PlainConvUNet "
                            "(another architecture, dropout or a changed module)")
        elif alias:
            aliases.append((key, ours, value))
        elif ours in primary:
            problems.append(f"{source}: network weight {key!r} appears twice")
        else:
            primary[ours] = value
    for key, ours, value in aliases:
        if ours not in primary:
            problems.append(f"{source}: network weight {key!r} is a second name of a weight the checkpoint lacks")
        elif primary[ours].shape != value.shape or not torch.equal(primary[ours], value):
            problems.append(f"{source}: network weight {key!r} differs from the weight it should be a second name of")
    if problems:
        raise BadInputError(problems[:10] + ([f"{source}: ... and {len(problems) - 10} more"] if len(problems) > 10 else []))
    return primary


def ours_to_nnunet(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under nnU-Net's names, every alias included, as nnU-Net's own state_dict() holds them
    (its `load_state_dict` is strict). The aliases share the tensor, as in nnU-Net's checkpoints."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, list[tuple[str, torch.Tensor]]] = {"encoder": [], "decoder": []}
    heads: dict[str, list[tuple[str, torch.Tensor]]] = {"transpconvs": [], "seg_layers": []}
    for key, value in state.items():
        if m := _OUR_BLOCK.match(key):
            where, stage, conv, part, what = m.groups()
            prefix = f"encoder.stages.{stage}.0.convs.{conv}" if where == "encoder" else f"decoder.stages.{stage}.convs.{conv}"
            blocks[where].append((f"{prefix}.{'conv' if part == '0' else 'norm'}.{what}", value))
            blocks[where].append((f"{prefix}.all_modules.{part}.{what}", value))
        elif m := _OUR_HEADS.match(key):
            heads[m.group(1)].append((f"decoder.{key}", value))
        else:
            raise BadInputError(f"network weight {key!r} has no counterpart in nnU-Net's PlainConvUNet")
    out.update(blocks["encoder"])
    out.update((f"decoder.{k}", v) for k, v in blocks["encoder"])
    for part in (blocks["decoder"], heads["transpconvs"], heads["seg_layers"]):
        out.update(part)
    return out


def load_nnunet_weights(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Fill our `network` from nnU-Net's state dict, every weight exactly once (BadInputError otherwise)."""
    mapped = nnunet_to_ours(state, source)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(mapped[k].shape)}, plans {tuple(expected[k].shape)}"
              for k in sorted(set(mapped) & set(expected)) if mapped[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"] if unexpected else []) + \
                ([f"shapes differ ({'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''})"] if shapes else [])
        raise BadInputError(f"{source}: the weights do not fit the network its plans describe: {'; '.join(parts)}")
    network.load_state_dict(mapped, strict=True)
