"""Reading nnU-Net's pickled files without running what they might hold, and writing the ones nnU-Net reads.

* `checkpoint_*.pth`: `torch.load(weights_only=True)` with exactly the extra globals nnU-Net's
  checkpoints need: numpy's scalar constructor, `numpy.dtype` and numpy's number dtype classes (its
  training log holds numpy floats). Anything else (a class, a function: code that would run when unpickled) is refused, naming it.
* `postprocessing.pkl`: a restricted unpickler that resolves only the name of nnU-Net's
  largest-component function (to a marker, never importing nnunetv2) and numpy scalars.
* The pickles we write for nnU-Net (`postprocessing.pkl`, the `.pkl` beside probabilities) hold
  plain values, plus the function reference nnU-Net expects as `importlib.import_module` + `getattr`.
"""

from __future__ import annotations

import importlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import BadInputError
from pipeline.storage import local_file

# numpy >= 2 names its scalar constructor numpy._core.multiarray.scalar; checkpoints written under numpy 1
# name it numpy.core.multiarray.scalar (the same function)
_NUMPY_SCALAR = np._core.multiarray.scalar  # noqa: SLF001 (numpy's public pickling constructor lives there)
# numpy scalars in nnU-Net's training log pickle as scalar(dtype, bytes); the dtype as its class (numpy >= 1.25)
CHECKPOINT_GLOBALS = [_NUMPY_SCALAR, (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"), np.dtype,
                      *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_))]

LARGEST_COMPONENT_MODULE = "nnunetv2.postprocessing.remove_connected_components"
LARGEST_COMPONENT_FUNCTION = "remove_all_but_largest_component_from_segmentation"


def load_checkpoint(path: str | Path) -> dict:
    """An nnU-Net checkpoint as a dict, loaded with `weights_only=True` and CHECKPOINT_GLOBALS only."""
    try:
        with local_file(path) as local, torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            data = torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line), "")
        detail = detail.split(" was not")[0].replace("WeightsUnpickler error: ", "")
        raise BadInputError(f"{path}: refused to load: it holds more than tensors, numbers and numpy scalars "
                            f"({detail or type(exc).__name__}); building other objects may run code while unpickling, and "
                            "an nnU-Net checkpoint needs only numpy scalars besides tensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("network_weights"), dict):
        raise BadInputError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return data


@dataclass(frozen=True)
class LargestComponentStep:
    """One step of nnU-Net's post-processing: keep the largest component of `labels` (a list: their union)."""

    labels: int | tuple[int, ...]


class _LargestComponentMarker:
    """Stands for nnU-Net's function while unpickling: never called, never imported."""


class _PostprocessingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == (LARGEST_COMPONENT_MODULE, LARGEST_COMPONENT_FUNCTION):
            return _LargestComponentMarker
        if (module, name) in (("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")):
            return _NUMPY_SCALAR
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_postprocessing_pkl(path: str | Path) -> list[LargestComponentStep]:
    """nnU-Net's postprocessing.pkl ((functions, kwargs)) as steps, unpickled with a restricted unpickler."""
    with local_file(path) as local:
        data = Path(local).read_bytes()
    try:
        fns, kwargs = _PostprocessingUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise BadInputError(f"{path}: refused: it names {exc}, which is not nnU-Net's largest-component "
                            "post-processing (a pickle that would run code when loaded)") from None
    except (ValueError, TypeError, EOFError) as exc:
        raise BadInputError(f"{path}: not nnU-Net's post-processing pickle ({type(exc).__name__}: {exc})") from None
    return _steps(path, fns, kwargs, lambda f: f is _LargestComponentMarker)


def read_postprocessing_json(path: str | Path, d: dict) -> list[LargestComponentStep]:
    """The same steps from nnU-Net's postprocessing.json (function names and kwargs)."""
    return _steps(path, d.get("postprocessing_fns"), d.get("postprocessing_kwargs"),
                  lambda f: f == LARGEST_COMPONENT_FUNCTION)


def _steps(path, fns, kwargs, is_largest) -> list[LargestComponentStep]:
    if not isinstance(fns, (list, tuple)) or not isinstance(kwargs, (list, tuple)) or len(fns) != len(kwargs):
        raise BadInputError(f"{path}: not nnU-Net's post-processing (functions and their arguments do not pair up)")
    steps = []
    for fn, kw in zip(fns, kwargs):
        labels = kw.get("labels_or_regions") if isinstance(kw, dict) else None
        if not is_largest(fn) or set(kw) - {"labels_or_regions", "background_label"} or kw.get("background_label", 0) != 0:
            raise BadInputError(f"{path}: post-processing step {fn!r} {kw!r} is not nnU-Net's keep-the-largest-component")
        if isinstance(labels, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in labels):
            steps.append(LargestComponentStep(tuple(int(v) for v in labels)))
        elif isinstance(labels, (int, np.integer)):
            steps.append(LargestComponentStep(int(labels)))
        else:
            raise BadInputError(f"{path}: post-processing of regions ({labels!r}) is not supported: region-based "
                                "models are not imported")
    return steps


class _FunctionByName:
    """Pickles as `getattr(importlib.import_module(module), name)`: nnU-Net's function, without importing it here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce__(self):
        return getattr, (_ModuleByName(self.module), self.name)


class _ModuleByName:
    def __init__(self, module: str):
        self.module = module

    def __reduce__(self):
        return importlib.import_module, (self.module,)


def postprocessing_pickle(steps: list[LargestComponentStep]) -> bytes:
    """nnU-Net's postprocessing.pkl content for `steps`: ([function, ...], [{"labels_or_regions": ...}, ...])."""
    fns = [_FunctionByName(LARGEST_COMPONENT_MODULE, LARGEST_COMPONENT_FUNCTION) for _ in steps]
    kwargs = [{"labels_or_regions": list(s.labels) if isinstance(s.labels, tuple) else s.labels} for s in steps]
    return pickle.dumps((fns, kwargs), protocol=4)
