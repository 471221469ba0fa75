"""Root folders from environment variables, read lazily (on use, not at import).

nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``; medimgen
adds ``medimgen_results``. A missing variable is reported by name, with the line that
sets it, only when a command actually needs that folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from medimgen.core.errors import MedimgenError

ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results")
CONFIG_NAME = "medimgen_config.yaml"  # medimgen's plan, beside nnU-Net's in the preprocessed dataset folder


def _root(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise MedimgenError(
            f"environment variable {name} is not set: run `export {name}=/path/to/{name}` "
            f"(see README, 'Environment variables')"
        )
    return Path(value).expanduser()


def nnunet_raw() -> Path:
    return _root("nnUNet_raw")


def nnunet_preprocessed() -> Path:
    return _root("nnUNet_preprocessed")


def nnunet_results() -> Path:
    return _root("nnUNet_results")


def medimgen_results() -> Path:
    return _root("medimgen_results")


_DATASET_DIR = re.compile(r"^Dataset(\d{3})_(.+)$")


def dataset_name_from_id(dataset_id: int | str, root: Path | None = None) -> str:
    """``DatasetXXX_Name`` for a numeric id (or a full name), looked up in raw and preprocessed.

    Unlike nnU-Net's own lookup this does not require all roots to be set: it searches
    whichever of nnUNet_preprocessed / nnUNet_raw are set (or ``root`` if given).
    """
    text = str(dataset_id)
    m = _DATASET_DIR.match(text)
    if m:
        return text
    try:
        num = int(text)
    except ValueError:
        raise MedimgenError(f"dataset id must be a number like 1 or 001, or a name like Dataset001_Name; got {text!r}")
    roots = [root] if root is not None else [p for p in (_maybe("nnUNet_preprocessed"), _maybe("nnUNet_raw")) if p]
    if not roots:
        nnunet_preprocessed()  # raises the env-var message
    found: set[str] = set()
    for r in roots:
        if r.is_dir():
            for child in r.iterdir():
                cm = _DATASET_DIR.match(child.name)
                if cm and int(cm.group(1)) == num and child.is_dir():
                    found.add(child.name)
    if not found:
        where = " or ".join(str(r) for r in roots)
        raise MedimgenError(f"dataset {num:03d} not found in {where}: no folder named Dataset{num:03d}_*")
    if len(found) > 1:
        raise MedimgenError(f"dataset id {num:03d} is ambiguous: {sorted(found)}")
    return found.pop()


def _maybe(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def preprocessed_dataset_dir(dataset_id: int | str, plans_identifier: str = "nnUNetPlans") -> Path:
    """nnUNet_preprocessed/DatasetXXX_Name, checked to exist and to hold nnU-Net's ``<plans_identifier>.json``."""
    root = nnunet_preprocessed()
    name = dataset_name_from_id(dataset_id)
    folder = root / name
    plans_file = folder / f"{plans_identifier}.json"
    if plans_file.is_file():
        return folder
    num = int(name[7:10])
    not_plans = ("dataset", "dataset_fingerprint", "splits_final", "medimgen_splits")
    others = sorted(p.stem for p in folder.glob("*.json") if p.stem not in not_plans) if folder.is_dir() else []
    if others:
        raise MedimgenError(
            f"{name} has no nnU-Net plans {plans_identifier!r} ({plans_file} missing; plans there: "
            f"{', '.join(others)}): plan with one of them (`medimgen plan -d {num} --plans {others[0]}`), or create "
            f"{plans_identifier!r} with nnU-Net (`nnUNetv2_plan_and_preprocess -d {num} -pl <planner>`)")
    raise MedimgenError(
        f"{name} is not preprocessed yet ({plans_file} missing): "
        f"run `nnUNetv2_plan_and_preprocess -d {num} --verify_dataset_integrity` first")


def config_path(dataset_id: int | str) -> Path:
    """nnUNet_preprocessed/DatasetXXX_Name/medimgen_config.yaml (whichever nnU-Net plans it was planned from)."""
    return nnunet_preprocessed() / dataset_name_from_id(dataset_id) / CONFIG_NAME


def planned_datasets() -> list[str]:
    """The datasets `medimgen plan` has planned (those with a medimgen_config.yaml in nnUNet_preprocessed)."""
    root = nnunet_preprocessed()
    return sorted(p.parent.name for p in root.glob(f"Dataset*/{CONFIG_NAME}")) if root.is_dir() else []


def the_planned_dataset(option: str = "-d") -> str:
    """The one planned dataset, for a command given no dataset; else one line listing the choices."""
    found = planned_datasets()
    if len(found) == 1:
        return found[0]
    if not found:
        raise MedimgenError(f"no dataset is planned yet: run `medimgen plan -d ID` first (or pass {option} ID)")
    raise MedimgenError(f"{len(found)} datasets are planned: choose one with {option} ({', '.join(found)})")
