"""The workdir layout every stage agrees on (part of the CLI contract; other tools read it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> Workdir:
        return cls(Path(path).expanduser().absolute())

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def store(self) -> Path:
        return self.root / "store.zarr"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    def run_dir(self, config: str, fold: int | str) -> Path:
        return self.root / "runs" / config / f"fold_{fold}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report"
