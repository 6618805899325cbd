"""How figures and long work show to a person: numbers with a fixed precision, progress bars."""

from __future__ import annotations

import math


def number(x, digits: int = 4, missing: str = "n/a") -> str:
    """`x` with `digits` decimals; `missing` for None, NaN and infinities (an undefined score)."""
    if x is None or not math.isfinite(x):
        return missing
    return f"{x:.{digits}f}"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress_bar(total: int, enabled: bool, desc: str, unit: str, leave: bool = True):
    """A tqdm bar on stderr, or a do-nothing stand-in with the same `update` when not `enabled`."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)
