"""Command line: parse arguments, call one library function, print one line on bad input."""

from __future__ import annotations

import functools
import sys

import click

from medimgen import __version__
from medimgen.errors import MedimgenError


def friendly_errors(fn):
    """Turn MedimgenError into `Error: <one line>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedimgenError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="medimgen")
def main() -> None:
    """medimgen: hyperparameter-free 2D/3D medical image generation planned by nnU-Net."""


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override a config value (YAML syntax), e.g. --set 3d.train_ddpm.epochs=5; repeatable.")


@main.command("plan")
@click.option("-d", "--dataset", "dataset_id", required=True, help="nnU-Net dataset id (e.g. 1 or 001) or name.")
@click.option("--gpu-memory", type=float, default=None, help="GPU memory target in GB (default: detected GPU, else 8).")
@click.option("--force", is_flag=True, help="Re-plan over a hand-edited config (it is backed up first).")
@click.option("--plans", "plans_identifier", default="nnUNetPlans", show_default=True, help="nnU-Net plans identifier.")
@_set_option
@click.option("--overrides", "override_text", default="", metavar="'K=V K=V'",
              help="Space-separated overrides in one string (for MLproject).")
@friendly_errors
def plan_cmd(dataset_id, gpu_memory, force, plans_identifier, overrides, override_text):
    """Turn nnU-Net's nnUNetPlans.json into medimgen_config.yaml (2d and 3d sections)."""
    from medimgen.planning import plan_dataset

    sets = [*overrides, *override_text.split()]
    result = plan_dataset(dataset_id, gpu_memory_gb=gpu_memory or None, overrides=sets, force=force,
                          plans_identifier=plans_identifier)
    if result.backup:
        click.echo(f"backed up the edited config to {result.backup}")
    verb = "re-planned" if result.replaced else "wrote"
    click.echo(f"{verb} {result.path} ({', '.join(result.config.configs)})")


def _train_command(model: str | None):
    """Build `medimgen train MODEL ...` (model None) or `medimgen_train_<model> ...`."""

    @click.argument("dataset_id")
    @click.argument("splitting", type=click.Choice(["train-val-test", "5-fold"]))
    @click.argument("model_type", type=click.Choice(["2d", "3d"]))
    @click.option("-p", "--progress", is_flag=True, help="Show progress bars.")
    @click.option("-c", "--continue", "resume", is_flag=True, help="Continue the run from its last checkpoint.")
    @click.option("-f", "--fold", type=int, default=0, show_default=True, help="Fold for 5-fold splitting.")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="Config YAML (default: the dataset's medimgen_config.yaml).")
    @click.option("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available).")
    @_set_option
    @click.option("--overrides", "override_text", default="", metavar="'K=V K=V'",
                  help="Space-separated overrides in one string (for MLproject).")
    @friendly_errors
    def command(dataset_id, splitting, model_type, progress, resume, fold, config_path, device, overrides,
                override_text, model=model):
        from medimgen.training.api import train

        sets = [*overrides, *override_text.split()]
        try:
            result = train(model, dataset_id, splitting, model_type, fold, progress, resume, sets, config_path, device)
        except KeyboardInterrupt:
            click.echo("interrupted: the last finished epoch is saved; continue with -c", err=True)
            sys.exit(130)
        state = "finished" if result.completed else f"stopped after epoch {result.epoch}"
        click.echo(f"{model} {state}: {result.run_dir}" + (f" (MLflow run {result.mlflow_run_id})" if result.mlflow_run_id else ""))

    return command


@main.group("train")
def train_group() -> None:
    """Train a model: ddpm, autoencoder (for LDM) or ldm."""


for _model in ("ddpm", "autoencoder", "ldm"):
    train_group.command(_model, help=f"Train the {_model} of DATASET_ID (SPLITTING: train-val-test or 5-fold; MODEL_TYPE: 2d or 3d).")(
        _train_command(_model))


def train_ddpm_entry() -> None:
    """`medimgen_train_ddpm DATASET_ID SPLITTING MODEL_TYPE -p`, as the seed README spells it."""
    click.command(help="Train a DDPM.")(_train_command("ddpm"))(prog_name="medimgen_train_ddpm")


def train_autoencoder_entry() -> None:
    click.command(help="Train the KL-autoencoder for latent diffusion.")(_train_command("autoencoder"))(
        prog_name="medimgen_train_autoencoder")


def train_ldm_entry() -> None:
    click.command(help="Train a latent diffusion model on a trained autoencoder.")(_train_command("ldm"))(
        prog_name="medimgen_train_ldm")


@main.command("demo-data")
@click.option("-d", "--dataset", "dataset_id", type=int, required=True, help="Dataset id to create.")
@click.option("--name", default="Phantom", show_default=True)
@click.option("--cases", "num_cases", type=int, default=10, show_default=True)
@click.option("--shape", default="48,48,32", show_default=True, help="Voxels x,y[,z]; two values make a 2D dataset.")
@click.option("--spacing", default=None, help="mm per voxel x,y[,z] (default 1 each).")
@click.option("--channels", type=int, default=1, show_default=True)
@click.option("--modality", type=click.Choice(["MRI", "CT"]), default="MRI", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def demo_data_cmd(dataset_id, name, num_cases, shape, spacing, channels, modality, seed):
    """Write a synthetic phantom dataset in nnU-Net raw format into $nnUNet_raw."""
    from medimgen.paths import nnunet_raw
    from medimgen.synthetic import make_synthetic_dataset

    dims = _ints(shape, "--shape")
    space = _floats(spacing, "--spacing") if spacing else (1.0,) * len(dims)
    folder = make_synthetic_dataset(nnunet_raw(), dataset_id, name, num_cases, dims, space, channels, modality, seed)
    click.echo(f"wrote {folder}")


@main.command("import")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("-d", "--dataset", "dataset_id", type=int, required=True, help="nnU-Net dataset id to create.")
@click.option("--name", required=True, help="Dataset name (folder becomes DatasetXXX_NAME).")
@click.option("--labels", type=click.Path(file_okay=False), default=None,
              help="Folder of label files named like the cases (default: SOURCE/labelsTr if present, else masks are generated).")
@click.option("--modality", default="MRI", show_default=True, help="Channel name(s) for dataset.json; CT selects nnU-Net's CT normalisation.")
@click.option("--channel-names", default=None, help="Comma-separated names, one per channel (overrides --modality).")
@click.option("--overwrite", is_flag=True, help="Replace an existing raw dataset with this id and name.")
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar.")
@friendly_errors
def import_cmd(source, dataset_id, name, labels, modality, channel_names, overwrite, progress):
    """Turn a folder of NIfTI images (or an MSD task) into an nnU-Net raw dataset, making foreground masks where no labels exist."""
    from medimgen.importer import import_dataset
    from medimgen.paths import nnunet_raw

    names = channel_names.split(",") if channel_names else None
    folder = import_dataset(source, nnunet_raw(), dataset_id, name, labels, modality, names, overwrite, progress)
    click.echo(f"wrote {folder}; next: nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity")


@main.command("demo")
@click.option("--workspace", default="demo_workspace", show_default=True,
              help="Folder for nnUNet_raw/preprocessed/results and medimgen_results when those variables are unset.")
@friendly_errors
def demo_cmd(workspace):
    """Run the whole pipeline on a synthetic dataset (the README's demo)."""
    from medimgen.demo import run_demo

    run_demo(workspace)


def _ints(text: str, opt: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise MedimgenError(f"{opt} must be comma-separated integers, got {text!r}") from None


def _floats(text: str, opt: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise MedimgenError(f"{opt} must be comma-separated numbers, got {text!r}") from None


def plan_entry() -> None:
    """`medimgen_plan -d ID`, as the seed README spells it."""
    plan_cmd(prog_name="medimgen_plan")
