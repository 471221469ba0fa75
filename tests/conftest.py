"""Shared fixtures: tiny synthetic nnU-Net datasets, really planned and preprocessed by nnU-Net (CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medimgen.nnunet import plan_and_preprocess
from medimgen.synthetic import make_synthetic_dataset

ANISO_3D = 201  # 3D, 2 MRI channels, anisotropic spacing (z 3.75x coarser)
FLAT_2D = 202  # 2D CT

_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results")


@pytest.fixture(scope="session")
def nnunet_roots(tmp_path_factory) -> dict[str, Path]:
    """Session-wide nnU-Net folders with the two test datasets raw and preprocessed."""
    base = tmp_path_factory.mktemp("nnunet")
    roots = {v: base / v for v in _VARS}
    for p in roots.values():
        p.mkdir()
    old = {v: os.environ.get(v) for v in _VARS}
    os.environ.update({k: str(v) for k, v in roots.items()})
    make_synthetic_dataset(roots["nnUNet_raw"], ANISO_3D, "Aniso", num_cases=6, shape=(48, 48, 16),
                           spacing=(0.8, 0.8, 3.0), channels=2, modality="MRI", seed=1)
    make_synthetic_dataset(roots["nnUNet_raw"], FLAT_2D, "Flat", num_cases=6, shape=(64, 64),
                           spacing=(0.7, 0.7), channels=1, modality="CT", seed=2)
    plan_and_preprocess(ANISO_3D, quiet=True)
    plan_and_preprocess(FLAT_2D, configurations=("2d",), quiet=True)
    yield roots
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def nnunet_env(nnunet_roots, monkeypatch) -> dict[str, Path]:
    """The session folders, with the env vars guaranteed set for this test."""
    for k, v in nnunet_roots.items():
        monkeypatch.setenv(k, str(v))
    return nnunet_roots


@pytest.fixture
def empty_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """Fresh, empty nnU-Net folders (for bad-input tests)."""
    roots = {v: tmp_path / v for v in _VARS}
    for k, p in roots.items():
        p.mkdir()
        monkeypatch.setenv(k, str(p))
    return roots
