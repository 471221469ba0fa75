"""Where generated arrays sit in patient space: spacing, axis order and orientation of the training data.

Training writes this as JSON into the run folder (``geometry.json``); a logged model carries it in
its ``meta.json``. Sampling reads only these JSON files: it needs no nnU-Net folder and never
unpickles anything (nnU-Net keeps a case's orientation in a pickle, which only nnU-Net's own
dataset class reads, at training time, from the preprocessed data being trained on).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

from medimgen.atomic import write_bytes_atomic
from medimgen.errors import MedimgenError

FILE = "geometry.json"


@dataclass
class Geometry:
    """How preprocessed arrays map back to image files."""

    spacing: tuple[float, ...]  # preprocessed (transposed) order
    transpose_backward: tuple[int, ...]
    original_spacing: tuple[float, ...]  # transposed order, raw median spacing
    direction: tuple[float, ...] | None = None  # SimpleITK direction of a training case (file order)
    origin: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return {k: list(v) if v is not None else None for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: object, where: str = "geometry") -> "Geometry":
        """From JSON data, checked: lists of numbers only (a bad file is one line naming it)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not {"spacing", "transpose_backward", "original_spacing"} <= set(d) \
                or not set(d) <= names:
            raise MedimgenError(f"{where} is not a medimgen geometry (keys {', '.join(sorted(names))})")
        out = {}
        for k, v in d.items():
            if v is None and k in ("direction", "origin"):
                out[k] = None
                continue
            if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise MedimgenError(f"{where}: '{k}' must be a list of numbers, got {v!r}")
            out[k] = tuple(int(x) for x in v) if k == "transpose_backward" else tuple(float(x) for x in v)
        return cls(**out)


def training_geometry(plans: dict, spacing, properties: dict | None) -> Geometry:
    """Geometry from nnU-Net's plans (axis order, original spacing), the config's spacing and one case's
    properties as nnU-Net's dataset class returns them (``sitk_stuff``: direction and origin)."""
    stuff = (properties or {}).get("sitk_stuff") or {}
    direction, origin = stuff.get("direction"), stuff.get("origin")
    return Geometry(
        tuple(float(s) for s in spacing),
        tuple(int(a) for a in plans.get("transpose_backward", range(3))),
        tuple(float(s) for s in plans.get("original_median_spacing_after_transp", spacing)),
        tuple(float(x) for x in direction) if direction is not None else None,
        tuple(float(x) for x in origin) if origin is not None else None,
    )


def case_geometry(plans, dim: str, identifier: str, spacing) -> Geometry:
    """Training time: the geometry of preprocessed case ``identifier`` (``plans``: medimgen.plans.DatasetPlans),
    its properties read by nnU-Net's own dataset class, the reader that feeds training its data."""
    from medimgen.data.cases import open_cases
    from medimgen.data.loader import CheckedCases

    ds = CheckedCases(open_cases(plans.preprocessed_folder(dim), [identifier]))
    return training_geometry(plans.plans_dict, spacing, ds.load_case(identifier)[3])


def save_geometry(geometry: Geometry, folder: Path) -> Path:
    """Write ``folder/geometry.json`` atomically."""
    path = Path(folder) / FILE
    write_bytes_atomic(path, json.dumps(geometry.to_dict(), indent=2).encode())
    return path


def load_geometry(run_root: Path, spacing, plans_identifier: str = "nnUNetPlans") -> Geometry:
    """The run folder's geometry.json. Run folders from before it existed: axis order and spacing from the
    copied ``<plans_identifier>.json`` (JSON), orientation unknown (identity), with a warning."""
    run_root = Path(run_root)
    path = run_root / FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MedimgenError(f"{path} is not valid JSON ({e})") from None
        return Geometry.from_dict(data, str(path))
    warnings.warn(f"{run_root} has no {FILE} (trained by an older medimgen): samples get the dataset's spacing "
                  f"but an identity orientation; continue the run (-c) once to write it", stacklevel=2)
    plans_file = run_root / f"{plans_identifier}.json"
    try:
        plans = json.loads(plans_file.read_text()) if plans_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedimgenError(f"{plans_file} is not valid JSON ({e})") from None
    try:
        return training_geometry(plans if isinstance(plans, dict) else {}, spacing, None)
    except (TypeError, ValueError):
        raise MedimgenError(f"{plans_file}: transpose_backward and original_median_spacing_after_transp must be "
                            f"lists of numbers") from None

