"""Where generated arrays sit in patient space: spacing, axis order and orientation of the training data.

Training writes this as JSON into the run folder (``geometry.json``); a logged model carries it in
its ``meta.json``. Sampling reads only these JSON files: it needs no nnU-Net folder and never
unpickles anything (nnU-Net keeps a case's orientation in a pickle, which only nnU-Net's own
dataset class reads, at training time, from the preprocessed data being trained on).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from medimgen.core.atomic import write_bytes_atomic
from medimgen.core.errors import MedimgenError
from medimgen.core.names import short_repr

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
                raise MedimgenError(f"{where}: '{k}' must be a list of numbers, got {short_repr(v)}")
            if not all(math.isfinite(x) and abs(x) <= 1e7 for x in v):
                raise MedimgenError(f"{where}: '{k}' must hold finite numbers of at most 1e7, got {short_repr(v)}")
            out[k] = tuple(int(x) for x in v) if k == "transpose_backward" else tuple(float(x) for x in v)
        geometry = cls(**out)
        geometry.check(where)
        return geometry

    def check(self, where: str = "geometry") -> None:
        """Spacings > 0, transpose_backward a permutation, a direction of n x n values with a non-zero
        determinant, an origin of n values (one line naming the key, else)."""
        tb = self.transpose_backward
        if sorted(tb) != list(range(len(tb))) or len(tb) not in (2, 3):
            raise MedimgenError(f"{where}: 'transpose_backward' must be a permutation of 0..{max(len(tb), 2) - 1}, "
                                f"got {short_repr(list(tb))}")
        for k in ("spacing", "original_spacing"):
            v = getattr(self, k)
            if not v or len(v) > 3 or any(x <= 0 for x in v):
                raise MedimgenError(f"{where}: '{k}' must be 1 to 3 spacings > 0 mm, got {short_repr(list(v))}")
        if self.direction is not None:
            n = int(round(len(self.direction) ** 0.5))
            if n not in (2, 3) or n * n != len(self.direction):
                raise MedimgenError(f"{where}: 'direction' must be a 2x2 or 3x3 matrix (4 or 9 numbers), got "
                                    f"{len(self.direction)}")
            if abs(np.linalg.det(np.asarray(self.direction, float).reshape(n, n))) < 1e-6:
                raise MedimgenError(f"{where}: 'direction' {short_repr(list(self.direction))} is singular "
                                    f"(determinant 0): not an orientation")
            if self.origin is not None and len(self.origin) != n:
                raise MedimgenError(f"{where}: 'origin' must have {n} values (the direction's size), got "
                                    f"{len(self.origin)}")


def training_geometry(plans: dict, spacing, properties: dict | None) -> Geometry:
    """Geometry from nnU-Net's plans (axis order, original spacing), the config's spacing and one case's
    properties as nnU-Net's dataset class returns them (``sitk_stuff``: direction and origin).

    The origin is that of the case's preprocessed data: the raw image's origin moved to the first voxel of
    the region nnU-Net kept when it cropped the case to its nonzero bounding box."""
    properties = properties or {}
    stuff = properties.get("sitk_stuff") or {}
    direction, origin = stuff.get("direction"), stuff.get("origin")
    tb = [int(a) for a in plans.get("transpose_backward", range(3))]
    bbox, raw_spacing = properties.get("bbox_used_for_cropping"), properties.get("spacing")
    if direction is not None and origin is not None and bbox is not None and raw_spacing is not None:
        n = len(origin)  # bbox: transposed axes; raw spacing: file (numpy) axes; the last n are the image's
        lower = [float(bbox[tb[i]][0]) for i in range(len(tb))][-n:][::-1]  # SimpleITK (x, y[, z]) order
        step = [float(s) for s in raw_spacing][-n:][::-1]
        origin = np.asarray(origin, float) + np.asarray(direction, float).reshape(n, n) @ (np.asarray(lower) * step)
    return Geometry(
        tuple(float(s) for s in spacing),
        tuple(int(a) for a in plans.get("transpose_backward", range(3))),
        tuple(float(s) for s in plans.get("original_median_spacing_after_transp", spacing)),
        tuple(float(x) for x in direction) if direction is not None else None,
        tuple(float(x) for x in origin) if origin is not None else None,
    )


def _direction(geometry: Geometry, n: int) -> np.ndarray:
    d = geometry.direction
    return np.asarray(d, float).reshape(n, n) if d is not None and len(d) == n * n else np.eye(n)


def to_file_image(geometry: Geometry, volume: np.ndarray, spacing: Sequence[float], shift=None):
    """(array in SimpleITK numpy order, spacing, direction, origin; the last two None when unknown) of a
    preprocessed-order volume, the way nnU-Net writes its images back.

    ``shift``: per axis of ``volume``, mm from the data's first voxel (the geometry's origin) to ``volume``'s
    first voxel (negative where the volume has padding before the data). A 2D sample of a 3D dataset (the
    geometry's direction has 9 values) is a one-slice 3D image: nnU-Net's 2d configuration slices along the
    first preprocessed axis, so the sample is that slice (at the case's first one) with the source's
    direction cosines, in-plane spacing and origin, and the raw median spacing as its thickness."""
    volume = np.asarray(volume)
    shift = [float(x) for x in shift] if shift is not None else [0.0] * volume.ndim
    spacing = [float(s) for s in spacing]
    three_d_source = geometry.direction is not None and len(geometry.direction) == 9
    if volume.ndim == 2 and three_d_source:
        volume, spacing, shift = volume[None], [geometry.original_spacing[0], *spacing], [0.0, *shift]
    if volume.ndim == 3:
        tb = list(geometry.transpose_backward)
        array, sp, sh = volume.transpose(tb), [spacing[i] for i in tb], [shift[i] for i in tb]
    else:  # a 2D dataset (or a run without orientation): keep the two in-plane axes in original order
        tf = np.argsort(geometry.transpose_backward)
        flip = len(tf) == 3 and tf[1] > tf[2]
        array, sp, sh = (volume.T, spacing[::-1], shift[::-1]) if flip else (volume, spacing, shift)
    n = array.ndim
    if geometry.direction is None or len(geometry.direction) != n * n or geometry.origin is None:
        return array, sp, None, None
    origin = np.asarray(geometry.origin, float) + _direction(geometry, n) @ np.asarray(sh[::-1])
    return array, sp, tuple(geometry.direction), tuple(float(o) for o in origin)


def radiological_view(geometry: Geometry | None, axes: Sequence[int]) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) that show a 2D slice as a radiologist views it.

    ``axes``: the preprocessed axes of the slice's rows and columns. Convention (patient coordinates as
    SimpleITK/DICOM, LPS): the patient's left on the image's right and anterior up (axial), the patient's
    left on the right and superior up (coronal), anterior on the left and superior up (sagittal). Each
    slice axis is matched to the patient axis its direction cosine is closest to; without an orientation
    the array axes are taken as LPS (nnU-Net's SimpleITK order), which is what nnU-Net's arrays are for
    data stored without rotation."""
    if geometry is None:
        return False, False, False
    tf = np.argsort(geometry.transpose_backward)
    n = 3 if geometry.direction is None or len(geometry.direction) == 9 else 2
    d = _direction(geometry, n)
    vecs = []
    for a in axes:  # preprocessed axis -> file numpy axis -> SimpleITK axis -> direction column
        file_axis = int(tf[a]) if a < len(tf) else a
        vecs.append(d[:, min(n - 1, max(0, len(tf) - 1 - file_axis))])
    patient = [int(np.argmax(np.abs(v))) for v in vecs]
    right = 0 if 0 in patient else 1  # L-R is horizontal; else (sagittal) A-P is
    transpose = patient[1] != right and patient[0] == right
    if transpose:
        vecs, patient = vecs[::-1], patient[::-1]
    # wanted sign of each displayed axis' index direction: right -> +L (or +P), down -> +P (axial) or -S
    want_col = 1.0
    want_row = 1.0 if patient[0] == 1 and right == 0 else -1.0
    flip_rows = np.sign(vecs[0][patient[0]]) != want_row
    flip_cols = np.sign(vecs[1][patient[1]]) != want_col
    return bool(transpose), bool(flip_rows), bool(flip_cols)


def case_geometry(plans, dim: str, identifier: str, spacing) -> Geometry:
    """Training time: the geometry of preprocessed case ``identifier`` (``plans``: medimgen.nnunet.plans.DatasetPlans),
    its properties read by nnU-Net's own dataset class, the reader that feeds training its data."""
    from medimgen.data.cases import open_cases
    from medimgen.data.loader import CheckedCases

    ds = CheckedCases(open_cases(plans.preprocessed_folder(dim), [identifier]))
    return training_geometry(plans.plans_dict, spacing, ds.load_case(identifier)[3])


def resample(volume: np.ndarray, current: Sequence[float], target: Sequence[float],
             is_seg: bool = False) -> np.ndarray:
    """(C, *spatial), 2D or 3D, from spacing ``current`` to ``target`` as nnU-Net's preprocessing resamples
    (``resample_data_or_seg_to_shape`` with the default plans' arguments: images cubic, segmentations linear per
    label, nearest-neighbour along the separate axis of anisotropic data)."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    nd = volume.ndim - 1
    current, target = [float(c) for c in current[-nd:]], [float(t) for t in target[-nd:]]
    shape = [int(round(n * c / t)) for n, c, t in zip(volume.shape[1:], current, target)]
    flat = nd == 2  # nnU-Net resamples (C, z, y, x): a 2D image is one slice
    data = volume[:, None] if flat else volume
    if flat:
        shape, current, target = [1, *shape], [1.0, *current], [1.0, *target]
    out = resample_data_or_seg_to_shape(data, shape, current, target, is_seg=is_seg,
                                        order=1 if is_seg else 3, order_z=0, force_separate_z=None)
    return out[:, 0] if flat else out


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
        geometry = training_geometry(plans if isinstance(plans, dict) else {}, spacing, None)
        geometry.check(str(plans_file))
        return geometry
    except (TypeError, ValueError):
        raise MedimgenError(f"{plans_file}: transpose_backward and original_median_spacing_after_transp must be "
                            f"lists of numbers") from None

