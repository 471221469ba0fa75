"""The README's demo: a synthetic dataset taken through the whole pipeline on an embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import click

from medimgen.core import paths
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.planning.api import plan_dataset
from medimgen.planning.quality_budget import MIN_SAMPLES, MIN_STEPS
from medimgen.nnunet.plans import DatasetPlans
from medimgen.generation.sampler import sample_to_folder
from medimgen.nnunet.synthetic import make_synthetic_dataset
from medimgen.runs.tracking import resolve_uri
from medimgen.core.requests import ModelRef, SampleOptions
from medimgen.runs.folders import RunDir
from medimgen.training.api import train
from medimgen.tuning.api import tune

DEMO_ID = 990
DEMO_NAME = "Phantom"
DEMO_EPOCHS = 3
DEMO_TUNING = {"budget": {"epochs": 2, "iterations_per_epoch": 4, "num_samples": 4, "real": "train", "sampling_steps": 10}}
# short runs so the demo finishes in minutes on a CPU; architectures and everything else are as planned
DEMO_OVERRIDES = [
    *[f"train_{m}.{k}={v}" for m in ("autoencoder", "ddpm", "ldm", "controlnet")
      for k, v in (("epochs", DEMO_EPOCHS), ("iterations_per_epoch", 4), ("val_plot_interval", DEMO_EPOCHS),
                   # one quality check at the end, at the planner's smallest budget (the plan sized it for its epochs)
                   ("eval_interval", 0), ("eval_samples", MIN_SAMPLES), ("eval_steps", MIN_STEPS))],
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
        echo(f"[1/11] writing a synthetic 3D MRI dataset (anisotropic spacing) to {raw}")
        make_synthetic_dataset(paths.nnunet_raw(), dataset_id, DEMO_NAME, num_cases=8, shape=(48, 48, 20),
                               spacing=(1.0, 1.0, 2.5), modality="MRI", seed=0)
    else:
        echo(f"[1/11] synthetic dataset already at {raw}")
    pre = paths.nnunet_preprocessed() / raw.name
    if not (pre / "nnUNetPlans.json").exists():
        echo("[2/11] nnUNetv2_plan_and_preprocess (nnU-Net fingerprint, plans, preprocessing)")
        plan_and_preprocess(dataset_id)
    else:
        echo(f"[2/11] nnU-Net preprocessing already at {pre}")
    echo("[3/11] medimgen plan")
    result = plan_dataset(dataset_id, force=True)
    echo(f"generation config: {result.path}" + (f" (previous edited file kept as {result.backup})" if result.backup else ""))

    if not train_models:
        return {"config": result.path, "env": env}
    runs = {}
    for step, model in ((4, "autoencoder"), (5, "ldm"), (5, "ddpm")):
        run = RunDir.standard(DatasetPlans.planned(dataset_id).name, model, "3d", "train-val-test")
        if run.best.is_file():
            echo(f"[{step}/11] {model} already trained: {run.root}")
        else:
            echo(f"[{step}/11] training the 3D {model} (demo length: {DEMO_EPOCHS} short epochs; real runs use the planned epochs)")
            train(model, dataset_id, "train-val-test", "3d", overrides=DEMO_OVERRIDES, progress=progress, echo=echo)
        runs[model] = run.root
    samples = workspace / "samples"
    echo(f"[6/11] sampling 2 images from the LDM and the DDPM into {samples}")
    files = []
    for model in ("ldm", "ddpm"):
        files += sample_to_folder(samples / model, 2, ModelRef(model, dataset_id, "3d"), SampleOptions(progress=progress))

    from medimgen.evaluation.api import evaluate
    from medimgen.evaluation.features import find_nnunet_model
    from medimgen.nnunet.commands import train_feature_nnunet

    plans = DatasetPlans.planned(dataset_id)
    found = find_nnunet_model(plans.name, 3, plans.plans_identifier)
    if found:
        echo(f"[7/11] a trained nnU-Net is already at {found[0]}: its encoder gives the FID features")
    else:
        echo("[7/11] training nnU-Net for 2 x 10 iterations (demo length; nnU-Net normally trains 1000 x 250) so that "
             f"FID has dataset-specific features on a machine that cannot download pretrained networks "
             f"(`medimgen train-feature-nnunet -d {dataset_id}`)")
        train_feature_nnunet(dataset_id, "3d", epochs=2, iterations=10, device="cpu")
    echo("[8/11] medimgen evaluate: 4 LDM samples against the test cases")
    report = evaluate(ModelRef("ldm", dataset_id, "3d"), real="test", num_samples=4,
                      options=SampleOptions(progress=progress))
    for k, v in report["scores"].items():
        echo(f"  {k} = {v:.4g}")
    echo(f"  features: {report['feature_extractor']} (a demo-length nnU-Net: the numbers show the workflow, not quality)")
    echo("[9/11] medimgen tune: 2 trials of the autoencoder search space (demo budget: 2 short epochs per trial)")
    space = _demo_space(workspace)
    tuned = tune(dataset_id, "autoencoder", "3d", 2, space, overrides=["train_autoencoder.val_plot_interval=2"],
                 echo=lambda m: echo(f"  {m}"))
    existing = sorted(paths.nnunet_raw().glob(f"Dataset*_{DEMO_NAME}Mixed"))
    if existing:
        mixed, mixed_id = existing[0], int(existing[0].name[7:10])
        echo(f"[10/11] the mixed real + synthetic nnU-Net dataset is already at {mixed}")
    else:
        mixed_id = _free_id(dataset_id)
        echo(f"[10/11] medimgen export-dataset --mix-real: the real cases plus 4 LDM image+label pairs as nnU-Net "
             f"dataset {mixed_id:03d} (synthetic cases only ever in training folds)")
        from medimgen.generation.export import export_dataset

        mixed = export_dataset(dataset_id, 4, mixed_id, ModelRef("ldm", dataset_id, "3d"),
                               SampleOptions(progress=progress), mix_real=True)
    cn_run = RunDir.standard(DatasetPlans.planned(dataset_id).name, "controlnet", "3d", "train-val-test")
    if cn_run.best.is_file():
        echo(f"[11/11] ControlNet already trained: {cn_run.root}")
    else:
        echo("[11/11] training a ControlNet on the LDM (demo length), then one image for each of 2 training label "
             "maps (medimgen sample --labels train)")
        train("controlnet", dataset_id, "train-val-test", "3d", overrides=DEMO_OVERRIDES, progress=progress, echo=echo)
    runs["controlnet"] = cn_run.root
    from medimgen.core.requests import LabelRequest
    from medimgen.generation.sampler import sample_for_labels

    conditioned = sample_for_labels(samples / "controlnet", LabelRequest("train", limit=2),
                                    ModelRef("controlnet", dataset_id, "3d"), SampleOptions(progress=progress))
    echo("")
    echo("Done. Outputs:")
    for model, root in runs.items():
        echo(f"  {model:<11} {root}")
    echo(f"  samples     {samples} ({len(files)} NIfTI files with JSON sidecars; controlnet/: {len(conditioned)} "
         f"images with the label maps they were made for)")
    echo(f"  registry    models:/Dataset{dataset_id:03d}_{DEMO_NAME}_ldm_3d and ..._ddpm_3d (latest versions)")
    echo(f"  evaluation  {report['json']}")
    echo(f"  tuning      study {tuned.study_name} ({tuned.storage}); `--apply-best` writes its best trial to the config")
    echo(f"  nnU-Net     {mixed} (real + synthetic; splits_final.json in nnUNet_preprocessed): "
         f"nnUNetv2_plan_and_preprocess -d {mixed_id} --verify_dataset_integrity, then nnUNetv2_train {mixed_id} 3d_fullres 0")
    echo(f"  Dice gain   medimgen benchmark-segmentation -d {dataset_id} -t <new id> --synthetic N (two nnU-Net "
         f"trainings with a generator trained on `5-fold`; README 'Does synthetic data help nnU-Net')")
    echo(f"  MLflow UI   mlflow ui --backend-store-uri {resolve_uri(None)}, then open:")
    echo(_runs_view(runs))
    return {"config": result.path, "env": env, "runs": runs, "samples": files, "evaluation": report, "tuning": tuned,
            "mixed_dataset": mixed, "conditioned": conditioned}


def _runs_view(runs: dict) -> str:
    """The link that opens the demo's experiment on its runs table (MLflow's model-training view)."""
    from mlflow import MlflowClient

    from medimgen.runs.folders import RunDir
    from medimgen.runs.tracking import runs_view_url, ui_base

    try:
        run_id = RunDir(Path(runs["ldm"])).checkpoint_meta()["mlflow_run_id"]
        return runs_view_url(MlflowClient().get_run(run_id).info.experiment_id)
    except Exception:  # no MLflow run: the list of experiments, in the same view
        return f"{ui_base()}/#/experiments?workflowType=machine_learning"


def _free_id(dataset_id: int) -> int:
    """The first nnU-Net dataset id after ``dataset_id`` that neither nnUNet_raw nor nnUNet_preprocessed uses."""
    for candidate in [*range(dataset_id + 1, 1000), *range(1, dataset_id)]:
        if not any(any(root.glob(f"Dataset{candidate:03d}_*")) for root in (paths.nnunet_raw(), paths.nnunet_preprocessed())):
            return candidate
    raise RuntimeError("every nnU-Net dataset id is taken")


def _demo_space(workspace: Path) -> Path:
    """tuning/default.yaml with the demo's short budget (and the tiny dataset's few real images)."""
    import yaml

    from medimgen.tuning.space import default_space_path

    data = yaml.safe_load(default_space_path().read_text())
    data.update(DEMO_TUNING)
    path = workspace / "tuning_demo.yaml"
    path.write_text("# tuning/default.yaml with the demo's budget\n" + yaml.safe_dump(data, sort_keys=False))
    return path
