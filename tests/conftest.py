"""Shared fixtures: tiny synthetic nnU-Net datasets, really planned and preprocessed by nnU-Net (CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.nnunet.synthetic import make_synthetic_dataset

ANISO_3D = 201  # 3D, 2 MRI channels, anisotropic spacing (z 3.75x coarser)
FLAT_2D = 202  # 2D CT

_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results")


@pytest.fixture(scope="session", autouse=True)
def simulation_cache(tmp_path_factory):
    """The memory simulations of this session are cached in its own folder (not the user's cache dir)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDIMGEN_CACHE_DIR", str(tmp_path_factory.mktemp("medimgen-cache")))
    yield
    mp.undo()


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
    """The session folders, with the nnU-Net env vars guaranteed set for this test.

    medimgen_results is left as it is: the session-wide training workspace may have moved it."""
    for k, v in nnunet_roots.items():
        if k != "medimgen_results":
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


_PLANNED: dict[Path, tuple[object, bytes]] = {}


def plan_once(dataset_id: int):
    """``plan_dataset(dataset_id, force=True)`` computed once per session (about a minute on 2 cores): a later call
    puts the same medimgen_config.yaml back (planning is deterministic) and returns the same result."""
    from medimgen.planning import plan_dataset
    from medimgen.nnunet.plans import DatasetPlans

    path = DatasetPlans.from_id(dataset_id).folder / "medimgen_config.yaml"
    if path not in _PLANNED:
        result = plan_dataset(dataset_id, force=True)
        _PLANNED[path] = (result, path.read_bytes())
    else:
        path.write_bytes(_PLANNED[path][1])
    return _PLANNED[path][0]


@pytest.fixture(scope="session")
def workspace(nnunet_roots, tmp_path_factory):
    """Own medimgen_results, MLflow database and cwd (./mlruns) for the training/sampling tests."""
    base = tmp_path_factory.mktemp("train")
    mp = pytest.MonkeyPatch()
    mp.setenv("medimgen_results", str(base / "results"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
    mp.chdir(base)
    cfg = plan_once(ANISO_3D).config
    yield {"base": base, "config": cfg}
    mp.undo()


def _flow(dim: str, workspace):
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    sets = tiny_overrides(workspace["config"].get(dim))
    return {model: train(model, ANISO_3D, "train-val-test", dim, overrides=sets, echo=lambda *_: None)
            for model in ("autoencoder", "ldm", "ddpm")}


@pytest.fixture(scope="session")
def flow_3d(workspace):
    """The seed's flow on the 3D dataset: autoencoder -> LDM, and DDPM (tiny networks, 2 epochs)."""
    return _flow("3d", workspace)


@pytest.fixture(scope="session")
def flow_2d(workspace):
    return _flow("2d", workspace)
