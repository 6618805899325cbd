"""Which cases train and which validate: nnU-Net's seeded 5-fold split, saved once as `W/splits.json`.

The folds are exactly nnU-Net v2's (`generate_crossval_split`: the sorted case ids through scikit-learn's
`KFold(5, shuffle=True, random_state=12345)`), reproduced with numpy so that a split made here equals
the one nnU-Net would make for the same cases. The file is created once and then reused, so adding
a case later never silently reshuffles the folds of runs already trained.

Besides folds 0..4 there are:
* `all`: train on every case; validate (pseudo-Dice only, it is seen in training) on a small seeded subset.
* `holdout`: the seed project's simple split, a held-out test set of N random cases that no fold of
  this split trains or validates on, and a train/val split of the rest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from pipeline.errors import BadInputError, SegPipeError
from pipeline.storage import as_path, write_json_atomic
from pipeline.workdir import Workdir

log = logging.getLogger(__name__)

NNUNET_SEED = 12345
NUM_FOLDS = 5
ALL_VAL_FRACTION = 0.1  # fold 'all' validates on this share of the cases (at least one)
HOLDOUT_VAL_FRACTION = 0.2  # holdout: share of the non-test cases that validate


@dataclass(frozen=True)
class Split:
    """One fold's case lists (test is empty except for the holdout split)."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] = ()


def kfold_splits(case_ids: list[str], n_splits: int = NUM_FOLDS, seed: int = NNUNET_SEED) -> list[dict[str, list[str]]]:
    """nnU-Net's folds: `KFold(shuffle=True, random_state=seed)` over the sorted ids; both lists sorted."""
    keys = sorted(case_ids)
    n = len(keys)
    if n < n_splits:
        raise BadInputError(f"{n} case(s) cannot make {n_splits} cross-validation folds (need at least {n_splits})")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)  # what sklearn's check_random_state(seed).shuffle does
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    folds, start = [], 0
    for size in sizes:
        val_mask = np.zeros(n, dtype=bool)
        val_mask[order[start:start + size]] = True
        start += size
        folds.append({"train": [keys[i] for i in np.flatnonzero(~val_mask)],
                      "val": [keys[i] for i in np.flatnonzero(val_mask)]})
    return folds


def _seeded_subset(keys: list[str], count: int, seed: int) -> list[str]:
    idx = np.random.RandomState(seed).choice(len(keys), size=count, replace=False)
    return sorted(keys[i] for i in idx)


def all_split(case_ids: list[str], seed: int = NNUNET_SEED) -> dict[str, list[str]]:
    keys = sorted(case_ids)
    count = max(1, int(round(len(keys) * ALL_VAL_FRACTION)))
    return {"train": keys, "val": _seeded_subset(keys, count, seed)}


def holdout_split(case_ids: list[str], num_test: int, seed: int = NNUNET_SEED) -> dict[str, list[str]]:
    """`num_test` random cases held out for testing; the rest split train/val (80:20, at least one val)."""
    keys = sorted(case_ids)
    if not 0 < num_test <= len(keys) - 2:
        raise BadInputError(f"a held-out test set of {num_test} case(s) leaves too few of {len(keys)} to train and validate")
    test = _seeded_subset(keys, num_test, seed)
    rest = [k for k in keys if k not in set(test)]
    val = _seeded_subset(rest, max(1, int(round(len(rest) * HOLDOUT_VAL_FRACTION))), seed + 1)
    return {"train": [k for k in rest if k not in set(val)], "val": val, "test": test}


@dataclass
class Splits:
    """The content of `splits.json`: nnU-Net's `folds`, the `all` split and, when asked for, `holdout`."""

    folds: list[dict[str, list[str]]]
    all: dict[str, list[str]]
    cases: list[str]
    seed: int | None = NNUNET_SEED
    holdout: dict[str, list[str]] | None = None

    @classmethod
    def create(cls, case_ids: list[str], seed: int = NNUNET_SEED, holdout_test_cases: int = 0) -> Splits:
        if len(set(case_ids)) != len(case_ids):
            raise BadInputError("duplicate case ids in the split")
        # fewer cases than folds: no cross-validation, but fold 'all' (and a holdout) still train
        folds = kfold_splits(case_ids, seed=seed) if len(case_ids) >= NUM_FOLDS else []
        return cls(folds=folds, all=all_split(case_ids, seed), cases=sorted(case_ids),
                   seed=seed, holdout=holdout_split(case_ids, holdout_test_cases, seed) if holdout_test_cases else None)

    def to_json(self) -> dict:
        d = {"seed": self.seed, "cases": self.cases, "folds": self.folds, "all": self.all}
        if self.holdout is not None:
            d["holdout"] = self.holdout
        return d

    @classmethod
    def from_json(cls, data, where: str = "splits.json") -> Splits:
        if isinstance(data, list):  # nnU-Net's own splits_final.json: a bare list of folds
            data = {"seed": None, "folds": data}
        if not isinstance(data, dict) or not isinstance(data.get("folds"), list):
            raise BadInputError(f"{where} has no list of 'folds'; delete it to make a new split")
        cases = data.get("cases") or sorted({c for f in data["folds"] for c in f["train"] + f["val"]})
        return cls(folds=data["folds"], all=data.get("all") or all_split(cases), cases=list(cases),
                   seed=data.get("seed"), holdout=data.get("holdout"))

    def split(self, fold: int | str, available: list[str] | None = None) -> Split:
        """Fold `0..4`, `all` or `holdout`; cases it names that are not `available` are an error."""
        name = str(fold)
        if name == "all":
            entry = self.all
        elif name == "holdout":
            if self.holdout is None:
                raise SegPipeError("splits.json has no 'holdout' split (create it with holdout_test_cases=N)")
            entry = self.holdout
        else:
            try:
                index = int(name)
            except ValueError:
                raise BadInputError(f"fold must be 0..{len(self.folds) - 1}, 'all' or 'holdout', not {fold!r}") from None
            if not self.folds:
                raise BadInputError(f"{len(self.cases)} case(s) are too few for {NUM_FOLDS} cross-validation folds: "
                                    "train with --fold all")
            if not 0 <= index < len(self.folds):
                raise BadInputError(f"fold {index} does not exist: splits.json has folds 0..{len(self.folds) - 1}")
            entry = self.folds[index]
        split = Split(name, tuple(entry["train"]), tuple(entry["val"]), tuple(entry.get("test", ())))
        if available is not None:
            have = set(available)
            missing = sorted(c for c in split.train + split.val if c not in have)
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise BadInputError(f"fold {name} names {len(missing)} case(s) not in the store ({shown}): "
                                    "re-run `segpipe preprocess`, or delete splits.json to split the stored cases anew")
            unused = have - set(self.cases)
            if unused:
                log.warning("%d stored case(s) are in no split of splits.json and are not used", len(unused))
        if not split.train or not split.val:
            raise BadInputError(f"fold {name} has no training or no validation cases")
        return split

    def training_cases(self, fold: int | str) -> list[str]:
        return list(self.split(fold).train)

    def validation_cases(self, fold: int | str) -> list[str]:
        return list(self.split(fold).val)

    def test_cases(self) -> list[str]:
        return list(self.holdout["test"]) if self.holdout else []


def load_or_create_splits(where: Workdir | str | os.PathLike, case_ids: list[str],
                          holdout_test_cases: int = 0) -> Splits:
    """Read `splits.json` (a Workdir, a folder or the file itself), or create it from `case_ids`.

    An existing file is never reshuffled; a holdout split asked for but missing is added to it.
    """
    path = where.splits if isinstance(where, Workdir) else as_path(where)
    if path.is_dir():
        path = path / "splits.json"
    if not path.is_file():
        splits = Splits.create(list(case_ids), holdout_test_cases=holdout_test_cases)
        write_json_atomic(path, splits.to_json())
        log.info("created a %d-fold split of %d cases -> %s", NUM_FOLDS, len(splits.cases), path)
        return splits
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc}); delete it to make a new split") from exc
    splits = Splits.from_json(data, str(path))
    if holdout_test_cases and splits.holdout is None:
        splits.holdout = holdout_split(splits.cases, holdout_test_cases, splits.seed or NNUNET_SEED)
        write_json_atomic(path, splits.to_json())
    return splits
