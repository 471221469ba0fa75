"""The README's demo: a synthetic dataset taken through the whole pipeline on an embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import click

from medimgen import paths
from medimgen.nnunet import plan_and_preprocess
from medimgen.planning.api import plan_dataset
from medimgen.synthetic import make_synthetic_dataset

DEMO_ID = 990
DEMO_NAME = "Phantom"


def ensure_env(workspace: Path) -> dict[str, str]:
    """Use the user's nnU-Net/medimgen folders when set, else folders inside ``workspace``."""
    chosen = {}
    for var in paths.ENV_VARS:
        if not os.environ.get(var):
            os.environ[var] = str((workspace / var).resolve())
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
        chosen[var] = os.environ[var]
    return chosen


def run_demo(workspace: Path | str = "demo_workspace", dataset_id: int = DEMO_ID, echo=click.echo) -> dict:
    workspace = Path(workspace)
    env = ensure_env(workspace)
    for var, value in env.items():
        echo(f"{var}={value}")
    raw = paths.nnunet_raw() / f"Dataset{dataset_id:03d}_{DEMO_NAME}"
    if not (raw / "dataset.json").exists():
        echo(f"[1/3] writing a synthetic 3D MRI dataset (anisotropic spacing) to {raw}")
        make_synthetic_dataset(paths.nnunet_raw(), dataset_id, DEMO_NAME, num_cases=8, shape=(48, 48, 20),
                               spacing=(1.0, 1.0, 2.5), modality="MRI", seed=0)
    else:
        echo(f"[1/3] synthetic dataset already at {raw}")
    pre = paths.nnunet_preprocessed() / raw.name
    if not (pre / "nnUNetPlans.json").exists():
        echo("[2/3] nnUNetv2_plan_and_preprocess (nnU-Net fingerprint, plans, preprocessing)")
        plan_and_preprocess(dataset_id)
    else:
        echo(f"[2/3] nnU-Net preprocessing already at {pre}")
    echo("[3/3] medimgen plan")
    result = plan_dataset(dataset_id, force=True)
    echo(f"generation config: {result.path}" + (f" (previous edited file kept as {result.backup})" if result.backup else ""))
    return {"config": result.path, "env": env}
