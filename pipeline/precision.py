"""Mixed precision: which device computes what in which float type, for prediction and training.

"auto" runs the convolutions in a short float type where the hardware computes it itself: float16 on
CUDA (nnU-Net's own default there, with a GradScaler in training) and bfloat16 on a CPU with
AVX512-BF16 or AMX. Elsewhere PyTorch emulates bfloat16, slower than float32, so "auto" stays float32.
Under CPU autocast the instance norms, activations and segmentation heads still compute in float32
(pipeline.training.model).
"""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 itself (AVX512-BF16 or AMX); elsewhere PyTorch emulates it,
    slower than float32."""
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


# Precisions of `segpipe predict/train --precision`: "auto" (mixed where the hardware computes it itself,
# `auto_mixed_precision`), "mixed" (autocast: float16 on CUDA, bfloat16 on a CPU) or "fp32".
PRECISIONS = ("auto", "mixed", "fp32")


def auto_mixed_precision(device: str | torch.device) -> bool:
    """Whether "auto" means mixed precision on this device: CUDA, or a CPU with native bfloat16. On the
    CPU of benchmarks/results/predict.md a hippocampus case predicts 1.5-1.8x faster, and a trained
    model's labels agree with float32 on 99.99% of voxels."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and native_bf16())


def uses_mixed_precision(amp: bool | None, device: str | torch.device) -> bool:
    """Whether passes autocast: `amp` when given (ModelSpec.amp, `amp_for`), else what "auto" means here."""
    return auto_mixed_precision(device) if amp is None else amp


def amp_for(precision: str) -> bool | None:
    """A `PRECISIONS` name as ModelSpec.amp: None (decide per device), True or False."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"auto": None, "mixed": True, "fp32": False}[precision]


def precision_name(amp: bool | None, device: str | torch.device) -> str:
    """What the forward passes compute in, for reports: "float32", "mixed (bfloat16)" or "mixed (float16)"."""
    device = torch.device(device)
    if not uses_mixed_precision(amp, device):
        return "float32"
    return f"mixed ({str(torch.get_autocast_dtype(device.type)).removeprefix('torch.')})"
