"""The README's demo: a synthetic dataset taken through the whole pipeline on an embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import click

from medimgen import paths
from medimgen.nnunet import plan_and_preprocess
from medimgen.planning.api import plan_dataset
from medimgen.plans import DatasetPlans
from medimgen.sampling import sample_to_folder
from medimgen.synthetic import make_synthetic_dataset
from medimgen.tracking import resolve_uri
from medimgen.training.api import run_dir_for, train

DEMO_ID = 990
DEMO_NAME = "Phantom"
DEMO_EPOCHS = 3
# short runs so the demo finishes in minutes on a CPU; architectures and everything else are as planned
DEMO_OVERRIDES = [
    *[f"train_{m}.{k}={v}" for m in ("autoencoder", "ddpm", "ldm")
      for k, v in (("epochs", DEMO_EPOCHS), ("iterations_per_epoch", 4), ("val_plot_interval", DEMO_EPOCHS))],
    "losses.adversarial_warmup_epochs=1",
    "ddpm_scheduler.num_inference_steps=20",
    "ldm_scheduler.num_inference_steps=20",
]


def ensure_env(workspace: Path) -> dict[str, str]:
    """Use the user's nnU-Net/medimgen folders when set, else folders inside ``workspace``."""
    chosen = {}
    for var in paths.ENV_VARS:
        if not os.environ.get(var):
            os.environ[var] = str((workspace / var).resolve())
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
        chosen[var] = os.environ[var]
    return chosen


def run_demo(workspace: Path | str = "demo_workspace", dataset_id: int = DEMO_ID, echo=click.echo,
             progress: bool = True, train_models: bool = True) -> dict:
    workspace = Path(workspace)
    env = ensure_env(workspace)
    for var, value in env.items():
        echo(f"{var}={value}")
    raw = paths.nnunet_raw() / f"Dataset{dataset_id:03d}_{DEMO_NAME}"
    if not (raw / "dataset.json").exists():
        echo(f"[1/6] writing a synthetic 3D MRI dataset (anisotropic spacing) to {raw}")
        make_synthetic_dataset(paths.nnunet_raw(), dataset_id, DEMO_NAME, num_cases=8, shape=(48, 48, 20),
                               spacing=(1.0, 1.0, 2.5), modality="MRI", seed=0)
    else:
        echo(f"[1/6] synthetic dataset already at {raw}")
    pre = paths.nnunet_preprocessed() / raw.name
    if not (pre / "nnUNetPlans.json").exists():
        echo("[2/6] nnUNetv2_plan_and_preprocess (nnU-Net fingerprint, plans, preprocessing)")
        plan_and_preprocess(dataset_id)
    else:
        echo(f"[2/6] nnU-Net preprocessing already at {pre}")
    echo("[3/6] medimgen plan")
    result = plan_dataset(dataset_id, force=True)
    echo(f"generation config: {result.path}" + (f" (previous edited file kept as {result.backup})" if result.backup else ""))

    if not train_models:
        return {"config": result.path, "env": env}
    runs = {}
    for step, model in ((4, "autoencoder"), (5, "ldm"), (5, "ddpm")):
        run = run_dir_for(DatasetPlans.from_id(dataset_id), model, "3d", "train-val-test")
        if (run.root / "checkpoints" / "best.pt").is_file():
            echo(f"[{step}/6] {model} already trained: {run.root}")
        else:
            echo(f"[{step}/6] training the 3D {model} (demo length: {DEMO_EPOCHS} short epochs; real runs use the planned epochs)")
            train(model, dataset_id, "train-val-test", "3d", overrides=DEMO_OVERRIDES, progress=progress, echo=echo)
        runs[model] = run.root
    samples = workspace / "samples"
    echo(f"[6/6] sampling 2 images from the LDM and the DDPM into {samples}")
    files = []
    for model in ("ldm", "ddpm"):
        files += sample_to_folder(samples / model, 2, model, dataset_id, "3d", progress=progress)
    echo("")
    echo("Done. Outputs:")
    for model, root in runs.items():
        echo(f"  {model:<11} {root}")
    echo(f"  samples     {samples} ({len(files)} NIfTI files with JSON sidecars)")
    echo(f"  registry    models:/Dataset{dataset_id:03d}_{DEMO_NAME}_ldm_3d and ..._ddpm_3d (latest versions)")
    echo(f"  MLflow UI   mlflow ui --backend-store-uri {resolve_uri(None)}  (then open http://127.0.0.1:5000)")
    return {"config": result.path, "env": env, "runs": runs, "samples": files}
