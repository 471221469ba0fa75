"""Train/validation/test splits, saved next to the preprocessed data and reused.

- 'train-val-test': seeded 70/10/20 split of the case identifiers, written once to
  nnUNet_preprocessed/DatasetXXX/medimgen_splits.json and read back on every later run.
- '5-fold': nnU-Net's own splits_final.json (created the nnU-Net way, with nnU-Net's
  function and seed, when it does not exist yet), so generation folds match segmentation folds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medimgen.core.atomic import write_bytes_atomic
from medimgen.core.errors import MedimgenError

SPLITTINGS = ("train-val-test", "5-fold")
SPLIT_FILE = "medimgen_splits.json"
NNUNET_SPLIT_FILE = "splits_final.json"
SEED = 12345


@dataclass(frozen=True)
class Split:
    train: list[str]
    val: list[str]
    test: list[str] = field(default_factory=list)
    name: str = "train-val-test"  # or fold_N

    def __post_init__(self):
        overlap = (set(self.train) & set(self.val)) | (set(self.train) & set(self.test)) | (set(self.val) & set(self.test))
        if overlap:
            raise MedimgenError(f"split {self.name} is not disjoint: {sorted(overlap)[:5]} in more than one subset")


def _write_json(path: Path, data) -> None:
    """Atomically, under a name of its own: ranks of a torchrun job write the same split at once."""
    write_bytes_atomic(path, json.dumps(data, indent=2).encode())


def train_val_test(identifiers: list[str], seed: int = SEED) -> dict[str, list[str]]:
    ids = sorted(identifiers)
    if len(ids) < 3:
        raise MedimgenError(f"train-val-test needs at least 3 cases, the dataset has {len(ids)}")
    order = np.random.RandomState(seed).permutation(len(ids))
    n_test = max(1, int(round(0.2 * len(ids))))
    n_val = max(1, int(round(0.1 * len(ids))))
    test = sorted(ids[i] for i in order[:n_test])
    val = sorted(ids[i] for i in order[n_test:n_test + n_val])
    train = sorted(ids[i] for i in order[n_test + n_val:])
    return {"train": train, "val": val, "test": test, "seed": seed}


def _check_known(path: Path, wanted: list[str], identifiers: list[str]) -> None:
    unknown = sorted(set(wanted) - set(identifiers))
    if unknown:
        raise MedimgenError(
            f"{path} names cases that are not preprocessed ({', '.join(unknown[:3])}...): "
            f"the dataset changed; delete {path.name} to make a new split")


def split_name(splitting: str, fold: int = 0) -> str:
    """The name of a split (and of its run folder): 'train-val-test' or 'fold_N'."""
    if splitting not in SPLITTINGS:
        raise MedimgenError(f"SPLITTING must be one of {', '.join(SPLITTINGS)}, got {splitting!r}")
    return splitting if splitting == "train-val-test" else f"fold_{fold}"


def get_split(dataset_folder: Path | str, identifiers: list[str], splitting: str, fold: int = 0) -> Split:
    """The split for ``splitting`` ('train-val-test' or '5-fold' with ``fold`` 0-4)."""
    dataset_folder = Path(dataset_folder)
    split_name(splitting, fold)  # checks the name
    if splitting == "train-val-test":
        path = dataset_folder / SPLIT_FILE
        if path.exists():
            data = json.loads(path.read_text())
        else:
            data = train_val_test(identifiers)
            _write_json(path, data)
        _check_known(path, data["train"] + data["val"] + data["test"], identifiers)
        return Split(list(data["train"]), list(data["val"]), list(data["test"]), split_name(splitting))

    path = dataset_folder / NNUNET_SPLIT_FILE
    if path.exists():
        splits = json.loads(path.read_text())
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        if len(identifiers) < 5:
            raise MedimgenError(f"5-fold needs at least 5 cases, the dataset has {len(identifiers)}")
        splits = generate_crossval_split(list(np.sort(identifiers)), seed=SEED, n_splits=5)
        _write_json(path, [{k: [str(i) for i in v] for k, v in s.items()} for s in splits])
    if not 0 <= fold < len(splits):
        raise MedimgenError(f"fold {fold} does not exist: {path} has folds 0-{len(splits) - 1}")
    s = splits[fold]
    _check_known(path, s["train"] + s["val"], identifiers)
    return Split(list(s["train"]), list(s["val"]), [], split_name(splitting, fold))
