"""The workdir layout every stage agrees on (part of the CLI contract; other tools read it).

```
W/fingerprint.json  W/plans.json  W/splits.json  W/store.zarr/  W/logs/  W/report/
W/runs/<config>/fold_<k>/   model_final.pt  model_best.pt  plans.json  metrics.csv  ...
W/runs/ray/                 Ray Train's storage (checkpoints of every run)
W/crossval/<config>/        pooled cross-validation (`segpipe evaluate-cv`)
W/find_best/                configurations and ensembles compared, the choice (`segpipe find-best`)
W/runs/<previous>/predicted_next_stage/<config>.zarr/   a cascade's inputs: the previous stage's
                            cross-validated segmentations in <config>'s store frame (pipeline.training.cascade)
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.storage import AnyPath, absolute, as_path

# the files of a run folder W/runs/<config>/fold_<k>/
MODEL_FINAL = "model_final.pt"
MODEL_BEST = "model_best.pt"
RUN_PLANS = "plans.json"
METRICS_CSV = "metrics.csv"
TRAINING_CURVES = "training_curves.png"
TRAINING_LOG = "training_log.txt"
TRAIN_SETTINGS = "train_settings.json"


def model_file(run_dir: str | os.PathLike, which: str = "final") -> Path:
    """`model_final.pt` or `model_best.pt` of a run folder."""
    return as_path(run_dir) / f"model_{which}.pt"


@dataclass(frozen=True)
class Workdir:
    root: AnyPath  # a local Path, or a UPath for a URL (s3://bucket/work)

    @classmethod
    def at(cls, path: str | os.PathLike | Workdir) -> Workdir:
        if isinstance(path, Workdir):
            return path
        return cls(absolute(path))

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

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def ray_storage(self) -> Path:
        """Ray Train's `storage_path`: every run's checkpoints, by run name."""
        return self.runs / "ray"

    def run_dir(self, config: str, fold: int | str) -> Path:
        return self.runs / config / f"fold_{fold}"

    def next_stage_predictions(self, previous: str, config: str) -> Path:
        """The segmentations configuration `previous` made for the cascade stage `config` (each case by
        the fold that did not train on it), beside `previous`'s run folders, as nnU-Net keeps them."""
        return self.runs / previous / "predicted_next_stage" / f"{config}.zarr"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report"


NUMERIC_FOLDS = tuple(str(k) for k in range(5))


def trained_folds(workdir: str | os.PathLike | Workdir, config: str) -> list[str]:
    """Folds 0-4 of `config` with a final model; `all` only when no numbered fold has one."""
    wd = Workdir.at(workdir)
    have = [f for f in NUMERIC_FOLDS if (wd.run_dir(config, f) / MODEL_FINAL).is_file()]
    if not have and (wd.run_dir(config, "all") / MODEL_FINAL).is_file():
        have = ["all"]
    return have
