"""User-given names and paths built from data: one rule for names, one containment check for paths.

A name (``--name``, a registry alias, an MLflow experiment name, a dataset name read from nnU-Net's plans)
becomes part of a path or an identifier, so it may hold letters, digits, '_' and '-' only (at most
:data:`MAX_NAME` characters): no '/', no '..', no spaces, nothing a shell or a file system reads specially.
Every path medimgen builds from data is resolved (symlinks followed) and must stay inside its root.
"""

from __future__ import annotations

import re
from pathlib import Path

from medimgen.core.errors import MedimgenError

NAME_RULE = r"[A-Za-z0-9_-]+"
NAME_ALLOWED = "letters, digits, '_' and '-' only"
MAX_NAME = 100


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages stay one short line whatever the input)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 8
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_name(value: str, what: str) -> str:
    """``value`` if it is a name (:data:`NAME_RULE`, at most :data:`MAX_NAME` characters), else one line naming
    ``what`` (e.g. '--name', '--alias')."""
    if not isinstance(value, str) or not re.fullmatch(NAME_RULE, value) or len(value) > MAX_NAME:
        raise MedimgenError(f"{what} {short_repr(value)}: use {NAME_ALLOWED} (1 to {MAX_NAME} characters)")
    return value


# an MLflow experiment name medimgen may make a folder of (artifacts beside a sqlite store): a name, or a dataset
# name ('.' allowed as nnU-Net allows it in dataset names, never '..'), which is the default experiment
EXPERIMENT_NAME_RULE = rf"(?!.*\.\.)[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}"
EXPERIMENT_NAME_ALLOWED = f"a name of letters, digits, '_', '-' and '.' (no '..', 1 to {MAX_NAME} characters)"

DATASET_NAME = r"Dataset\d{3}_[A-Za-z0-9_-][A-Za-z0-9_.-]*"


def check_dataset_name(value: str, what: str) -> str:
    """An nnU-Net dataset folder name (DatasetXXX_Name; no '/', no '..') read from data, or one line."""
    if not isinstance(value, str) or not re.fullmatch(DATASET_NAME, value) or ".." in value or len(value) > 200:
        raise MedimgenError(f"{what} is {short_repr(value)}: not a dataset folder name (DatasetXXX_Name of "
                            "letters, digits, '_', '-' and '.')")
    return value


def inside(path: Path | str, root: Path | str, what: str) -> Path:
    """``path``, checked (both resolved, symlinks followed) to lie inside ``root``: a path built from data never
    escapes its root."""
    root_r = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != root_r and root_r not in resolved.parents:
        raise MedimgenError(f"{what} {short_repr(str(path), 120)} resolves to {resolved}, outside {root_r}: refused")
    return Path(path)
