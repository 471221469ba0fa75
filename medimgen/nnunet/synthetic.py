"""Synthetic nnU-Net raw datasets of smooth, anatomy-like phantoms (for the demo and the tests).

Each case is a body ellipsoid holding an "organ" (label 1) and a "lesion" (label 2),
with randomised size, position and orientation, smooth texture and a bias field, so
that nnU-Net's fingerprinting, planning and preprocessing run on it unchanged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal, Sequence

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from medimgen.core.atomic import publish_folder, scratch_folder
from medimgen.core.devices import check_host_memory
from medimgen.core.errors import MedimgenError
from medimgen.core.names import check_name

Modality = Literal["MRI", "CT"]

# mean intensity of (background, body, organ, lesion) per modality
_TISSUE = {
    "MRI": (0.0, 300.0, 600.0, 150.0),
    "CT": (-1000.0, 40.0, 120.0, 700.0),
}


def _ellipsoid(grid: list[np.ndarray], center, radii, rotation: np.ndarray) -> np.ndarray:
    coords = np.stack([g - c for g, c in zip(grid, center)], axis=-1)
    coords = coords @ rotation.T
    return np.sum((coords / np.asarray(radii)) ** 2, axis=-1) <= 1.0


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q


def make_phantom(
    shape: Sequence[int],
    spacing: Sequence[float],
    channels: int = 1,
    modality: Modality = "MRI",
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One case: image (C, *shape) float32 and label (*shape) uint8, axes in NIfTI (x, y[, z]) order."""
    rng = rng or np.random.default_rng()
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=float)
    ndim = len(shape)
    extent = np.asarray(shape) * spacing  # mm
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    center = extent / 2 + rng.uniform(-0.05, 0.05, ndim) * extent

    body = _ellipsoid(grid, center, extent * rng.uniform(0.36, 0.46, ndim), _rotation(rng, ndim))
    organ_c = center + rng.uniform(-0.08, 0.08, ndim) * extent
    organ = _ellipsoid(grid, organ_c, extent * rng.uniform(0.14, 0.22, ndim), _rotation(rng, ndim)) & body
    lesion_c = organ_c + rng.uniform(-0.06, 0.06, ndim) * extent
    lesion = _ellipsoid(grid, lesion_c, extent * rng.uniform(0.04, 0.08, ndim), _rotation(rng, ndim)) & organ

    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[lesion] = 2
    if not lesion.any():  # keep every label present in every case
        idx = tuple(int(round(c / s)) for c, s in zip(organ_c, spacing))
        idx = tuple(min(max(i, 0), n - 1) for i, n in zip(idx, shape))
        label[idx] = 2
        lesion[idx] = True

    sigma = 2.0 / spacing  # ~2 mm texture regardless of spacing
    images = []
    bg, tb, to, tl = _TISSUE[modality]
    for c in range(channels):
        contrast = 1.0 + 0.35 * c * (-1) ** c  # channels differ in contrast
        img = np.full(shape, bg, np.float32)
        img[body] = tb
        img[organ] = to * contrast
        img[lesion] = tl * (2 - contrast)
        texture = gaussian_filter(rng.normal(size=shape), sigma) * 40.0
        img = img + np.where(body, texture, 0)
        img = gaussian_filter(img, 0.6 / spacing * spacing.min())
        if modality == "MRI":
            bias = 1 + 0.15 * np.sin(grid[0] / extent[0] * np.pi * rng.uniform(0.5, 1.5))
            img = img * bias + np.abs(rng.normal(0, 5, shape))
        else:
            img = img + rng.normal(0, 10, shape)
        images.append(img.astype(np.float32))
    return np.stack(images), label


def _affine(spacing: Sequence[float], rotation=None, origin=None) -> np.ndarray:
    """NIfTI (RAS) affine: ``rotation`` (direction cosines, columns per axis; default identity) times the spacing."""
    n = len(spacing)
    aff = np.eye(4)
    aff[:n, :n] = (np.eye(n) if rotation is None else np.asarray(rotation, float)) @ np.diag(spacing)
    if origin is not None:
        aff[:n, 3] = origin
    return aff


def make_synthetic_dataset(
    nnunet_raw: Path | str,
    dataset_id: int = 1,
    name: str = "Phantom",
    num_cases: int = 10,
    shape: Sequence[int] = (48, 48, 32),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    channels: int = 1,
    modality: Modality = "MRI",
    seed: int = 0,
    overwrite: bool = False,
    rotation: Sequence[Sequence[float]] | None = None,
    origin: Sequence[float] | None = None,
) -> Path:
    """Write ``nnunet_raw/DatasetXXX_name`` (imagesTr, labelsTr, dataset.json) and return it.

    ``shape``/``spacing`` are in NIfTI (x, y[, z]) order; 2 values make a 2D dataset
    (2D NIfTI files, which nnU-Net plans as 2d only). ``rotation`` (an orthonormal matrix, columns the RAS
    direction of each axis) and ``origin`` (mm, RAS) give the files a real-like oblique geometry.
    """
    check_name(name, "--name")
    if len(shape) not in (2, 3) or len(spacing) != len(shape):
        raise MedimgenError(f"shape and spacing must both have 2 or 3 values, got {tuple(shape)} and {tuple(spacing)}")
    if min(shape) < 1 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MedimgenError(f"shape must be >= 1 voxel and spacing > 0 mm (finite) on every axis, got {tuple(shape)} "
                            f"and {tuple(spacing)}")
    if any(abs(s) > 1e6 for s in spacing):
        raise MedimgenError(f"spacing must be at most 1e6 mm per axis, got {tuple(spacing)}")
    if channels < 1:
        raise MedimgenError(f"channels must be >= 1, got {channels}")
    if modality not in _TISSUE:
        raise MedimgenError(f"modality must be MRI or CT, got {modality!r}")
    if num_cases < 2:
        raise MedimgenError("num_cases must be at least 2")
    voxels = math.prod(int(v) for v in shape)
    # one case in memory: the float64 grids and ellipsoid masks of make_phantom (~(ndim + 8) arrays of the shape)
    check_host_memory(voxels * max(channels, 1) * 8 * (len(shape) + 8), f"a phantom of shape {tuple(shape)}")
    folder = Path(nnunet_raw) / f"Dataset{int(dataset_id):03d}_{name}"
    if folder.exists() and not overwrite:
        raise MedimgenError(f"{folder} already exists: choose another dataset id or name, or pass --force (the "
                            f"existing dataset is kept as a backup)")
    _check_disk(Path(nnunet_raw), num_cases * (channels + 1) * voxels * 4 // 2, num_cases)
    with scratch_folder(folder.with_name(f".{folder.name}.writing-{os.getpid()}")) as tmp:  # hidden until complete
        _write_cases(tmp, folder.name, num_cases, shape, spacing, channels, modality, seed, rotation, origin)
        publish_folder(tmp, folder, overwrite)  # an existing dataset (overwrite) is kept as a hidden backup
    return folder


def _check_disk(root: Path, need: int, num_cases: int) -> None:
    """Refuse a dataset the disk cannot hold (estimated at half the raw float32 size: phantoms compress well)."""
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        return
    if need > free:
        raise MedimgenError(f"{num_cases} cases need about {need / 1e9:.1f} GB in {root}, {free / 1e9:.1f} GB is "
                            f"free: use fewer --cases or a smaller --shape")


def _write_cases(folder: Path, dataset_name: str, num_cases: int, shape, spacing, channels: int, modality: str, seed: int,
                 rotation, origin) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_cases):
        image, label = make_phantom(shape, spacing, channels, modality, rng)
        case = f"case_{i:03d}"
        for c in range(channels):
            nib.save(nib.Nifti1Image(image[c], _affine(spacing, rotation, origin)),
                     folder / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, _affine(spacing, rotation, origin)), folder / "labelsTr" / f"{case}.nii.gz")
    if modality == "CT":
        channel_names = {str(c): "CT" for c in range(channels)}
    else:
        channel_names = {str(c): f"MRI{c}" if channels > 1 else "MRI" for c in range(channels)}
    generate_dataset_json(
        str(folder),
        channel_names=channel_names,
        labels={"background": 0, "organ": 1, "lesion": 2},
        num_training_cases=num_cases,
        file_ending=".nii.gz",
        dataset_name=dataset_name,
        description="synthetic phantoms made by medimgen",
    )


def read_dataset_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())
