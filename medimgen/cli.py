"""Command line: parse arguments, call one library function, print one line on bad input."""

from __future__ import annotations

import atexit
import functools
import gc
import json
import sys

import click

from medimgen import __version__
from medimgen.config.kinds import names
from medimgen.core.errors import MedimgenError

# Registered first, so it runs last at exit, after every other exit handler (logging, MLflow, temporary folders):
# the half a million objects torch and MONAI import are left to the process's end instead of being swept by the
# interpreter's final garbage collections, which took 2 of a `medimgen plan`'s 10 CPU seconds.
atexit.register(gc.freeze)


def friendly_errors(fn):
    """Turn MedimgenError into `Error: <one line>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedimgenError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # the environment (a full disk, a folder that cannot be made): one line, no traceback
            from medimgen.core.atomic import disk_error

            where = e.filename or "an output"
            click.echo(f"Error: {disk_error(e, where) if e.errno is not None else e}", err=True)
            sys.exit(2)

    return wrapper


class OneLineCommand(click.Command):
    """Usage errors (a bad option value, a missing argument) as one line, like every other error."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            path = e.ctx.command_path if e.ctx else info_name
            one = click.ClickException(f"{e.format_message()} (see '{path} --help')")
            one.exit_code = 2
            raise one from None


class _Group(click.Group):
    command_class = OneLineCommand
    group_class = type  # subgroups (train) are _Group too


def _device(ctx, param, value):
    """--device must exist on this machine (cpu, cuda, cuda:N, mps)."""
    if value is None:
        return None
    from medimgen.core.devices import check_device

    try:
        return check_device(value)
    except MedimgenError as e:
        raise click.BadParameter(str(e)) from None


_device_option = click.option("--device", default=None, callback=_device,
                              help="cuda, cuda:1 or cpu (default: cuda when available).")
_positive = click.IntRange(min=1)
_fold = click.IntRange(0, 4)
_seed_range = click.IntRange(0, 2**32 - 1)  # what numpy and torch take as a seed


def _finite_gb(ctx, param, value):
    """--gpu-memory: a finite number of GB > 0 (nan and inf are no memory size)."""
    import math

    if value is not None and not (math.isfinite(value) and 0 < value <= 1e6):
        raise click.BadParameter(f"{value} is not a memory size in GB (a finite number > 0, at most 1e6)")
    return value


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="medimgen")
def main() -> None:
    """medimgen: hyperparameter-free 2D/3D medical image generation planned by nnU-Net."""


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override a config value (YAML syntax), e.g. --set 3d.train_ddpm.epochs=5; repeatable.")


@main.command("plan")
@click.option("-d", "--dataset", "dataset_id", required=True, help="nnU-Net dataset id (e.g. 1 or 001) or name.")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True), default=None, callback=_finite_gb,
              help="GPU memory target in GB (default: detected GPU, else 8).")
@click.option("--force", is_flag=True, help="Re-plan over a hand-edited config (it is backed up first).")
@click.option("--explain", is_flag=True, help="Print the predicted memory per model (params, activations, total vs target) "
              "and the disk a run will use (best.pt, last.pt, registered model, plots, samples).")
@click.option("--plans", "plans_identifier", default="nnUNetPlans", show_default=True,
              help="nnU-Net plans identifier (e.g. nnUNetResEncUNetMPlans); recorded in the config, every later "
                   "command uses these plans.")
@click.option("--offline", is_flag=True,
              help="Plan no perceptual loss (losses.perceptual_network=none) when its pretrained weights are absent.")
@click.option("--noise", type=click.Choice(["ddpm", "rflow"]), default=None,
              help="Noise process of the DDPM and the LDM: ddpm (default) or rflow (rectified flow).")
@click.option("--scheduler", "old_noise", type=click.Choice(["ddpm", "rflow"]), default=None, hidden=True,
              help="Deprecated name of --noise.")
@_set_option
@click.option("--overrides", "override_text", default="", metavar="'K=V K=V'",
              help="Space-separated overrides in one string (for MLproject).")
@friendly_errors
def plan_cmd(dataset_id, gpu_memory, force, explain, plans_identifier, offline, noise, old_noise, overrides,
             override_text):
    """Turn nnU-Net's plans (nnUNetPlans.json, or --plans) into medimgen_config.yaml (2d and 3d sections)."""
    from medimgen.planning import plan_dataset
    from medimgen.planning.api import explain_existing

    old = _deprecated(old_noise, "plan --scheduler", "--noise")
    noise = noise or old

    sets = [*overrides, *override_text.split()]
    if explain and not (force or sets or gpu_memory or offline or noise):
        text = explain_existing(dataset_id, plans_identifier)
        if text is not None:
            click.echo(text)
            return
    result = plan_dataset(dataset_id, gpu_memory_gb=gpu_memory or None, overrides=sets, force=force,
                          plans_identifier=plans_identifier, offline=offline, noise=noise)
    if result.backup:
        click.echo(f"backed up the edited config to {result.backup}")
    verb = "re-planned" if result.replaced else "wrote"
    click.echo(f"{verb} {result.path} ({', '.join(result.config.configs)})")
    for dim, cfg in result.config.configs.items():
        peaks = ", ".join(f"{m} {gb:.2f}" for m, gb in cfg.derived.predicted_peak_gb.items())
        state = "fits" if cfg.derived.memory_fitted else "DOES NOT FIT"
        click.echo(f"  {dim}: predicted peak GB {peaks} -> {state} {cfg.memory.target_gb:g} GB")
    for note in result.notes:
        click.echo(note)
    if explain:
        click.echo(result.explain())


@main.group("weights")
def weights_group() -> None:
    """Pretrained weights (perceptual loss, FID features) in the torch hub cache ($TORCH_HOME/hub)."""


@weights_group.command("download")
@click.argument("names", nargs=-1, required=True, metavar="NAME...",
                type=click.Choice(["alex", "vgg", "squeeze", "radimagenet", "medicalnet", "inception", "maisi-vae",
                                 "all"]))
@click.option("--mirror", default=None, metavar="URL",
              help="Replace scheme and host of every download URL (default: $MEDIMGEN_WEIGHTS_MIRROR).")
@click.option("--checksums", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="sha256sum-style file ('<sha256>  <file name>') with the expected checksums of files it names.")
@friendly_errors
def weights_download_cmd(names, mirror, checksums):
    """Fetch the pretrained weights of NAME (alex, vgg, squeeze, radimagenet, medicalnet, inception, maisi-vae: the
    foundation autoencoder, all) into
    the torch hub cache, where training and evaluation look: checksummed, resumable (.part), renamed when complete."""
    from medimgen.models.weights import download_weights

    download_weights(names, mirror, checksums, echo=click.echo)


@weights_group.command("list")
@friendly_errors
def weights_list_cmd():
    """What is present, where each file is expected, and the command that downloads it."""
    from medimgen.models.weights import weights_report

    click.echo(weights_report())


@main.command("memory")
@click.argument("dataset_id", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config YAML (default: the dataset's medimgen_config.yaml).")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True), default=None, callback=_finite_gb,
              help="GPU memory to check against in GB (default: the config's memory.target_gb).")
@click.option("--plans", "plans_identifier", default=None,
              help="nnU-Net plans identifier (default: the one the dataset's config was planned from).")
@friendly_errors
def memory_cmd(dataset_id, config_path, gpu_memory, plans_identifier):
    """Predicted peak GPU memory of every model of a config as it stands (no fitting); exit 1 if one does not fit."""
    from medimgen.planning.api import check_memory

    report = check_memory(dataset_id, config_path, gpu_memory, plans_identifier)
    click.echo(report.table)
    for line in report.misfits:
        click.echo(f"does not fit: {line}", err=True)
    if report.misfits:
        sys.exit(1)


def _train_command(model: str | None):
    """Build `medimgen train MODEL ...` (model None) or `medimgen_train_<model> ...`."""

    @click.argument("dataset_id")
    @click.argument("splitting", type=click.Choice(["train-val-test", "5-fold"]), metavar="SPLITTING")
    @click.argument("model_type", type=click.Choice(["2d", "3d"]), metavar="MODEL_TYPE")
    @click.option("-p", "--progress", is_flag=True, help="Show progress bars.")
    @click.option("-c", "--continue", "resume", is_flag=True, help="Continue the run from its last checkpoint.")
    @click.option("--resume", "resume_value", type=click.BOOL, default=False, metavar="BOOL",
                  help="-c with a value, true or false (for MLproject's -P continue=true).")
    @click.option("-f", "--fold", type=_fold, default=0, show_default=True, help="Fold for 5-fold splitting.")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="Config YAML (default: the dataset's medimgen_config.yaml).")
    @_device_option
    @_set_option
    @click.option("--overrides", "override_text", default="", metavar="'K=V K=V'",
                  help="Space-separated overrides in one string (for MLproject).")
    @click.option("--gpus", type=_positive, default=1, show_default=True,
                  help="Train on N GPUs of this machine (torchrun, one process per GPU; the effective batch is kept).")
    @friendly_errors
    def command(dataset_id, splitting, model_type, progress, resume, resume_value, fold, config_path, device,
                overrides, override_text, gpus, model=model):
        from medimgen.training.api import train

        sets = [*overrides, *override_text.split()]
        resume = resume or resume_value
        if gpus > 1:
            from medimgen.core.distributed import launch_training

            return launch_training(gpus, model, dataset_id, splitting, model_type, fold, progress, resume, sets,
                                   config_path, device)
        try:
            result = train(model, dataset_id, splitting=splitting, dim=model_type, fold=fold, progress=progress,
                           resume=resume, overrides=sets, config_path=config_path, device=device)
        except KeyboardInterrupt:
            click.echo("interrupted: the last finished epoch is saved; continue with -c", err=True)
            sys.exit(130)
        state = "finished" if result.completed else f"stopped after epoch {result.epoch}"
        if result.rank == 0:  # torchrun: every rank returns, rank 0 speaks
            click.echo(f"{model} {state}: {result.run_dir}" + (f" (MLflow run {result.mlflow_run_id})" if result.mlflow_run_id else ""))
            if result.mlflow_url:
                click.echo(f"MLflow: {result.mlflow_url}  (`mlflow ui` on the store for a local one)")

    return command


@main.group("train")
def train_group() -> None:
    """Train a model: ddpm, autoencoder (for LDM), ldm, or controlnet (label-map conditioning of a trained ldm/ddpm)."""


for _model in names():
    train_group.command(_model, help=f"Train the {_model} of DATASET_ID (SPLITTING: train-val-test or 5-fold; MODEL_TYPE: 2d or 3d).")(
        _train_command(_model))


def train_ddpm_entry() -> None:
    """`medimgen_train_ddpm DATASET_ID SPLITTING MODEL_TYPE -p`, as the seed README spells it."""
    click.command(cls=OneLineCommand, help="Train a DDPM.")(_train_command("ddpm"))(prog_name="medimgen_train_ddpm")


def train_autoencoder_entry() -> None:
    click.command(cls=OneLineCommand, help="Train the KL-autoencoder for latent diffusion.")(_train_command("autoencoder"))(
        prog_name="medimgen_train_autoencoder")


def train_ldm_entry() -> None:
    click.command(cls=OneLineCommand, help="Train a latent diffusion model on a trained autoencoder.")(_train_command("ldm"))(
        prog_name="medimgen_train_ldm")


_model_options = [
    click.option("--splitting", default="train-val-test", type=click.Choice(["train-val-test", "5-fold"]), show_default=True),
    click.option("-f", "--fold", type=_fold, default=0, show_default=True),
    click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True),
]
_sampling_options = [
    click.option("--sampler", type=click.Choice(["ddim", "ddpm", "rflow"]), default=None,
                 help="ddim (fast, default from the config) or ddpm (all training timesteps); rflow for a model "
                      "trained with rectified flow (its only sampler)."),
    click.option("--scheduler", "old_sampler", type=click.Choice(["ddim", "ddpm", "rflow"]), default=None, hidden=True,
                 help="Deprecated name of --sampler."),
    click.option("--steps", type=_positive, default=None,
                 help="DDIM / rectified-flow steps (default: the config's num_inference_steps)."),
    click.option("--seed", type=_seed_range, default=0, show_default=True),
    click.option("--batch-size", type=_positive, default=None, help="Images per forward pass (default: all)."),
    _device_option,
    click.option("--amp/--no-amp", default=True, show_default=True,
                 help="Mixed precision on a GPU (bf16 where supported, else fp16); no effect on the CPU."),
    click.option("--tiled-decoding/--whole-decoding", "tiled_decoding", default=None,
                 help="LDM: decode in overlapping latent tiles / in one piece (default: tiles on a GPU only when "
                      "decoding in one piece is predicted not to fit)."),
]
_output_options = [
    click.option("--resample", is_flag=True, help="Resample to the dataset's original median spacing (nnU-Net's resampling)."),
    click.option("--no-crop", is_flag=True,
                 help="Keep the model's padded image size (default: crop each sample back to the data size "
                      "the plan recorded, data.data_size)."),
]
_progress_option = click.option("-p", "--progress", is_flag=True, help="Show progress bars.")
_model_choice = click.option(
    "--model", default="auto", show_default=True,
    help="ldm, ddpm, controlnet, auto (LDM if trained, else DDPM; with --labels the ControlNet), a run folder, or an "
         "MLflow URI "
         "(models:/NAME@alias, models:/NAME/3, runs:/ID/model).")


def _deprecated(value, old: str, new: str):
    """``value`` of a deprecated option, with a one-line note on stderr when it was given."""
    if value is not None:
        click.echo(f"note: {old} is deprecated, use {new}", err=True)
    return value


def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


def _requests(kw: dict, dataset_id, model_type, dim_given: bool = True):
    """(ModelRef, SampleOptions) from the parsed options (removed from ``kw``): built once, passed by keyword."""
    from medimgen.core.requests import ModelRef, SampleOptions

    ref = ModelRef(kw.pop("model"), dataset_id, model_type, kw.pop("splitting"), kw.pop("fold"), kw.pop("checkpoint"),
                   dim_given=dim_given)
    fields = ("seed", "sampler", "steps", "batch_size", "device", "amp", "tiled_decoding", "resample", "progress")
    options = {k: kw.pop(k) for k in fields if k in kw}
    old = _deprecated(kw.pop("old_sampler", None), "--scheduler", "--sampler")
    options["sampler"] = options.get("sampler") or old
    if "no_crop" in kw:
        options["crop"] = not kw.pop("no_crop")
    return ref, SampleOptions(**options)


_label_options = [
    click.option("--labels", default=None, metavar="DIR_OR_SPLIT",
                 help="Generate an image for each label map: a folder of NIfTI label maps, or train/val/test (the "
                      "split's preprocessed labels); needs a ControlNet (--model controlnet, the default here). "
                      "NUM_IMAGES: how many maps to use (the first, by name)."),
    click.option("--augment-labels", type=click.IntRange(0), default=0, show_default=True, metavar="N",
                 help="With --labels: N images per map, each for the map after nnU-Net's spatial augmentation."),
]


def _label_request(kw: dict, num_images: int):
    """A LabelRequest from --labels / --augment-labels (removed from ``kw``), or None."""
    from medimgen.core.requests import LabelRequest

    source, augment = kw.pop("labels"), kw.pop("augment_labels")
    if source is None:
        if augment:
            raise click.UsageError("--augment-labels needs --labels")
        return None
    return LabelRequest(source, augment, limit=num_images)


def _sample_command():
    @click.argument("dataset_id")
    @click.argument("model_type", type=click.Choice(["2d", "3d"]), metavar="MODEL_TYPE")
    @click.argument("num_images", type=_positive)
    @click.argument("save_path", type=click.Path(file_okay=False))
    @_model_choice
    @_with(_model_options + _sampling_options + _output_options + _label_options + [_progress_option])
    @friendly_errors
    def command(dataset_id, model_type, num_images, save_path, **kw):
        from medimgen.generation.sampler import sample_for_labels, sample_to_folder

        labels = _label_request(kw, num_images)
        ref, options = _requests(kw, dataset_id, model_type)
        if labels is not None:
            files = sample_for_labels(save_path, labels, ref=ref, options=options)
        else:
            files = sample_to_folder(save_path, num_images, ref=ref, options=options, echo=click.echo)
        click.echo(f"wrote {len(files)} NIfTI file(s) to {save_path}")

    return command


main.command("sample", help="Sample NUM_IMAGES images of DATASET_ID into SAVE_PATH as NIfTI (+ JSON sidecars).")(_sample_command())


def sample_entry() -> None:
    """`medimgen_sample DATASET_ID MODEL_TYPE NUM_IMAGES SAVE_PATH -p`, as the seed README spells it."""
    click.command(cls=OneLineCommand, help="Sample images as NIfTI.")(_sample_command())(prog_name="medimgen_sample")


@main.command("export-dataset")
@click.argument("dataset_id")
@click.argument("model_type", type=click.Choice(["2d", "3d"]), metavar="MODEL_TYPE")
@click.argument("num_images", type=_positive)
@click.option("-t", "--target-id", type=click.IntRange(1, 999), required=True, help="Id of the new nnU-Net dataset.")
@click.option("--name", default=None, help="Name of the new dataset (default: <source name>Synth, or Mixed).")
@click.option("--mix-real", is_flag=True,
              help="Also copy the source dataset's real training cases, and write a splits_final.json whose "
                   "validation folds hold real cases only (needs a model that generates labels).")
@_model_choice
@_with(_model_options + _sampling_options + _output_options + _label_options + [_progress_option])
@friendly_errors
def export_cmd(dataset_id, model_type, num_images, target_id, name, mix_real, **kw):
    """Sample NUM_IMAGES images (with their generated labels; foreground masks for an image-only model) into a new
    nnU-Net raw dataset (imagesTr, labelsTr, dataset.json)."""
    from medimgen.generation.export import export_dataset

    labels = _label_request(kw, num_images)
    ref, options = _requests(kw, dataset_id, model_type)
    out = export_dataset(dataset_id, num_images, target_id, ref=ref, options=options, name=name, mix_real=mix_real,
                         labels=labels)
    from medimgen.models.labels import GENERATED_MASK_KEY

    if json.loads((out / "dataset.json").read_text()).get(GENERATED_MASK_KEY):
        click.echo("note: this model is image-only, so every label is a foreground mask, not the dataset's labels")
    click.echo(f"wrote {out}; next: nnUNetv2_plan_and_preprocess -d {target_id} --verify_dataset_integrity")


@main.command("benchmark-segmentation")
@click.option("-d", "--dataset", "dataset_id", required=True, help="nnU-Net dataset id (e.g. 1 or 001) or name.")
@click.option("-t", "--target-id", type=click.IntRange(1, 999), required=True,
              help="Id of the real + synthetic dataset: exported now (with --synthetic), or reused if it exists.")
@click.option("--synthetic", type=_positive, default=None, help="Generated cases to add (export-dataset --mix-real).")
@click.option("-c", "--configuration", default=None, help="nnU-Net configuration (default: 3d_fullres; 2d for 2D data).")
@click.option("-f", "--fold", type=_fold, default=0, show_default=True,
              help="nnU-Net fold of both arms (and of the default generation model, trained with 5-fold).")
@click.option("--trainer", default="nnUNetTrainer", show_default=True,
              help="nnU-Net trainer class of both arms, e.g. nnUNetTrainer_100epochs; nnUNetTrainerMedimgenTiny "
                   "(2 x 10 iterations) only checks the pipeline.")
@_model_choice
@click.option("--model-type", type=click.Choice(["2d", "3d"]), default=None,
              help="Generation model type (default: 3d for 3D data).")
@click.option("--splitting", type=click.Choice(["train-val-test", "5-fold"]), default="5-fold", show_default=True,
              help="Split the generation model was trained with (it must not have trained on a validation case).")
@_with(_sampling_options + [_progress_option])
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Folder for segbench.json/.md (default: medimgen_results/DatasetXXX/segbench/...).")
@click.option("--no-mlflow", is_flag=True, help="Do not log the benchmark to MLflow.")
@friendly_errors
def benchmark_segmentation_cmd(dataset_id, target_id, synthetic, configuration, fold, trainer, model, model_type,
                               splitting, output, no_mlflow, **kw):
    """Measure the Dice that synthetic data adds to nnU-Net: train it on the real cases and on real + synthetic
    (same fold, configuration, trainer), validate both on the same real cases, report per-label differences."""
    from medimgen.core.requests import SampleOptions
    from medimgen.benchmark.segmentation import BenchmarkSetup, Generator, benchmark_segmentation

    old = _deprecated(kw.pop("old_sampler"), "--scheduler", "--sampler")
    kw["sampler"] = kw["sampler"] or old

    result = benchmark_segmentation(dataset_id, target_id, synthetic, BenchmarkSetup(configuration, fold, trainer,
                                    kw["device"]), Generator(model, model_type, splitting), SampleOptions(**kw),
                                    output=output, track=not no_mlflow, echo=click.echo)
    click.echo(open(result["markdown"]).read())
    click.echo(f"wrote {result['json']} and {result['markdown']}"
               + (f"; MLflow run {result['mlflow_run_id']}" if result["mlflow_run_id"] else ""))


_extractor_option = click.option(
    "--extractor", default="auto", show_default=True,
    help="Features for FID/MMD: nnunet (the dataset's trained nnU-Net encoder), nnunet:/path/to/model_folder, "
         "radimagenet_resnet50 (2D/2.5D), medicalnet_resnet10_23datasets / medicalnet_resnet50_23datasets (3D), "
         "inception_v3 or another torchvision classifier, none; auto: the first of these with weights on disk.")
_weights_option = click.option("--weights", default=None, type=click.Path(exists=True),
                               help="Weights file (torchvision) or torch.hub repository folder (RadImageNet/MedicalNet).")


@main.command("evaluate")
@click.argument("dataset_id", required=False)
@click.option("--model", default="auto", show_default=True,
              help="ldm, ddpm, autoencoder, auto (LDM if trained, else DDPM), a run folder, or an MLflow model URI.")
@click.option("-t", "--model-type", type=click.Choice(["2d", "3d"]), default="3d", show_default=True)
@click.option("-k", "--num-samples", type=_positive, default=16, show_default=True, help="Images to generate.")
@click.option("--real", type=click.Choice(["val", "test", "train", "all"]), default="test", show_default=True,
              help="Which real cases of the split to compare with.")
@_extractor_option
@_weights_option
@click.option("--segmenter", default=None,
              help="ControlNet: the nnU-Net that segments its images for the follow-the-mask Dice: auto (the "
                   "dataset's trained nnU-Net, if any), nnunet, nnunet:/path/to/model_folder, none (default: the "
                   "model's controlnet.segmenter).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="JSON file (default: evaluation_<kind>_<dim>_<real>.json in the run folder).")
@click.option("--no-mlflow", is_flag=True, help="Do not log an evaluation run to MLflow.")
@_with(_model_options + _sampling_options + [_progress_option])
@friendly_errors
def evaluate_cmd(dataset_id, model_type, num_samples, real, extractor, weights, segmenter, output, no_mlflow, **kw):
    """Score a trained model: FID/MMD (named extractor), MS-SSIM diversity vs real, reconstruction metrics."""
    from medimgen.evaluation.api import evaluate

    ref, options = _requests(kw, dataset_id, model_type, dim_given=False)
    report = evaluate(ref, real=real, num_samples=num_samples, extractor=extractor, weights=weights, options=options,
                      output=output, track=not no_mlflow, segmenter=segmenter)
    click.echo(f"{report['kind']} {report['dim']} of {report['dataset']} vs {report['real']['images']} real "
               f"{real} image(s); features: {report['feature_extractor'] or 'none'}")
    for k, v in report["scores"].items():
        click.echo(f"  {k} = {v:.6g}")
    for note in report["notes"]:
        click.echo(f"  note: {note}")
    click.echo(f"wrote {report['json']}" + (f"; MLflow run {report['mlflow_run_id']}" if report["mlflow_run_id"] else ""))


@main.command("tune")
@click.option("-d", "--dataset", "dataset_id", default=None,
              help="nnU-Net dataset id (e.g. 1 or 001) or name; default: the one planned dataset.")
@click.option("--model", type=click.Choice(names(steers=False)), default="ldm", show_default=True,
              help="Model to tune (as MLproject's tune entry).")
@click.option("-t", "--model-type", type=click.Choice(["2d", "3d"]), default="3d", show_default=True)
@click.option("--trials", type=int, default=20, show_default=True, help="Trials to run now (added to the study's).")
@click.option("--space", "space_path", type=click.Path(dir_okay=False), default=None,
              help="Search-space YAML (default: tuning/default.yaml).")
@click.option("--storage", default=None,
              help="Optuna storage: a journal file (*.log / journal:PATH, several workers on one machine), an sqlite "
                   "file (*.db) or an RDB URL (postgresql://..., several machines). Default: "
                   "medimgen_results/DatasetXXX/tuning/optuna.db.")
@click.option("--objective", type=click.Choice(["pareto", "scalar"]), default="pareto", show_default=True,
              help="pareto: FID and MS-SSIM gap, NSGA-II, Pareto front; scalar: fid + w * gap, TPE with pruning.")
@click.option("--study-name", default=None, help="Default: DatasetXXX_Name/<model>/<dim>/<objective>.")
@click.option("--splitting", default="train-val-test", type=click.Choice(["train-val-test", "5-fold"]), show_default=True)
@click.option("-f", "--fold", type=_fold, default=0, show_default=True)
@_extractor_option
@_weights_option
@click.option("--autoencoder", "autoencoder_run", type=click.Path(file_okay=False, exists=True), default=None,
              help="LDM: the autoencoder run folder to build on (default: the dataset's autoencoder run).")
@click.option("--apply-best", is_flag=True, help="Write the best trial's values into medimgen_config.yaml (backed up first).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting new trials after this many seconds.")
@_device_option
@click.option("--no-mlflow", is_flag=True, help="Do not track trials in MLflow.")
@_set_option
@click.option("--overrides", "override_text", default="", metavar="'K=V K=V'",
              help="Space-separated overrides in one string (for MLproject).")
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar over trials.")
@click.option("--metrics", default=None, metavar="NAME,NAME",
              help="Objectives: fid, ms_ssim_gap (ldm/ddpm); rfid, ms_ssim_loss, l1, psnr (autoencoder). Default: "
                   "fid,ms_ssim_gap; autoencoder rfid,ms_ssim_loss when a feature extractor has weights, else "
                   "ms_ssim_loss,l1 (no weights needed). A continued study keeps its own.")
@click.option("--eval-samples", type=_positive, default=None,
              help="Images each trial samples to be scored (default: budget.num_samples of the search space).")
@click.option("--eval-steps", type=_positive, default=None,
              help="Sampling steps per image when a trial is scored (default: budget.sampling_steps of the space).")
@friendly_errors
def tune_cmd(dataset_id, model, model_type, trials, space_path, storage, objective, study_name, splitting, fold,
             extractor, weights, autoencoder_run, apply_best, timeout, device, no_mlflow, overrides, override_text,
             progress, metrics, eval_samples, eval_steps):
    """Tune the planner's values with Optuna; every trial is a short training run scored by FID and MS-SSIM
    (autoencoders without feature weights: reconstruction MS-SSIM and L1)."""
    from medimgen.tuning.api import tune

    result = tune(dataset_id, model, model_type, trials=trials, space_path=space_path, storage=storage,
                  objective=objective, study_name=study_name, splitting=splitting, fold=fold, extractor=extractor,
                  weights=weights, autoencoder_run=autoencoder_run, overrides=[*overrides, *override_text.split()],
                  apply_best=apply_best, device=device, timeout=timeout, track=not no_mlflow, progress=progress,
                  echo=click.echo, metrics=metrics, eval_samples=eval_samples, eval_steps=eval_steps)
    click.echo(f"study {result.study_name}: {result.trials} trial(s), {result.completed} complete"
               + (f"; MLflow parent run {result.parent_run_id}" if result.parent_run_id else ""))
    for b in result.best:
        named = ", ".join(f"{k}={v:.4g}" for k, v in b["objectives"].items())
        click.echo(f"  best trial {b['number']}: {named}; {b['params']}")
    if result.applied:
        click.echo(f"wrote the values of trial {result.best[0]['number']} to {result.applied}"
                   + (f" (previous file kept as {result.backup})" if result.backup else ""))


@main.command("train-feature-nnunet")
@click.option("-d", "--dataset", "dataset_id", required=True, help="nnU-Net dataset id (e.g. 1 or 001) or name.")
@click.option("-t", "--model-type", type=click.Choice(["2d", "3d"]), default="3d", show_default=True,
              help="nnU-Net configuration: 2d or 3d_fullres (preprocessed by nnUNetv2_plan_and_preprocess).")
@click.option("--epochs", type=_positive, default=2, show_default=True)
@click.option("--iterations", type=_positive, default=10, show_default=True, help="Training iterations per epoch.")
@click.option("-f", "--fold", type=_fold, default=0, show_default=True)
@_device_option
@friendly_errors
def train_feature_nnunet_cmd(dataset_id, model_type, epochs, iterations, fold, device):
    """Train nnU-Net briefly (the demo's 2 x 10 iterations) so that FID/rFID have dataset-specific features offline."""
    from medimgen.nnunet.commands import train_feature_nnunet

    folder = train_feature_nnunet(dataset_id, model_type, fold=fold, epochs=epochs, iterations=iterations, device=device)
    click.echo(f"wrote {folder}: `medimgen evaluate` and `medimgen tune` (--extractor auto or nnunet) now use its "
               f"encoder's features")


@main.command("register")
@click.argument("run_folder", type=click.Path(file_okay=False, exists=True))
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--alias", default=None, help="Registry alias to point at the new version (e.g. champion).")
@friendly_errors
def register_cmd(run_folder, checkpoint, alias):
    """Log a trained DDPM/LDM run as an MLflow pyfunc model and register it as DatasetXXX_<model>_<dim>."""
    from medimgen.runs.registry import register_run

    reg = register_run(run_folder, checkpoint=checkpoint, alias=alias)
    click.echo(f"registered {reg.name} version {reg.version}" + (f" (alias {alias})" if alias else "")
               + f": models:/{reg.name}/{reg.version}")


@main.command("demo-data")
@click.option("-d", "--dataset", "dataset_id", type=click.IntRange(1, 999), required=True, help="Dataset id to create.")
@click.option("--name", default="Phantom", show_default=True)
@click.option("--cases", "num_cases", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--shape", default="48,48,32", show_default=True, help="Voxels x,y[,z]; two values make a 2D dataset.")
@click.option("--spacing", default=None, help="mm per voxel x,y[,z] (default 1 each).")
@click.option("--channels", type=_positive, default=1, show_default=True)
@click.option("--modality", type=click.Choice(["MRI", "CT"]), default="MRI", show_default=True)
@click.option("--seed", type=_seed_range, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing dataset of this id and name (the old one is kept "
              "beside it as a hidden .DatasetXXX_NAME.backup-<time> folder).")
@friendly_errors
def demo_data_cmd(dataset_id, name, num_cases, shape, spacing, channels, modality, seed, force):
    """Write a synthetic phantom dataset in nnU-Net raw format into $nnUNet_raw."""
    from medimgen.core.paths import nnunet_raw
    from medimgen.nnunet.synthetic import make_synthetic_dataset

    dims = _ints(shape, "--shape")
    space = _floats(spacing, "--spacing") if spacing else (1.0,) * len(dims)
    folder = make_synthetic_dataset(nnunet_raw(), dataset_id, name=name, num_cases=num_cases, shape=dims, spacing=space,
                                    channels=channels, modality=modality, seed=seed, overwrite=force)
    click.echo(f"wrote {folder}" + (" (a previous dataset there is kept as a hidden backup beside it)" if force else ""))


@main.command("import")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("-d", "--dataset", "dataset_id", type=int, required=True, help="nnU-Net dataset id to create.")
@click.option("--name", required=True, help="Dataset name (folder becomes DatasetXXX_NAME).")
@click.option("--labels", type=click.Path(file_okay=False), default=None,
              help="Folder of label files named like the cases (default: SOURCE/labelsTr if present, else masks are generated).")
@click.option("--modality", default="MRI", show_default=True, help="Channel name(s) for dataset.json; CT selects nnU-Net's CT normalisation.")
@click.option("--channel-names", default=None, help="Comma-separated names, one per channel (overrides --modality).")
@click.option("--force", "--overwrite", "overwrite", is_flag=True,
              help="Replace an existing raw dataset with this id and name (the old one is kept as a hidden backup).")
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar.")
@friendly_errors
def import_cmd(source, dataset_id, name, labels, modality, channel_names, overwrite, progress):
    """Turn a folder of NIfTI images (or an MSD task) into an nnU-Net raw dataset, making foreground masks where no labels exist."""
    from medimgen.nnunet.importer import import_dataset
    from medimgen.core.paths import nnunet_raw

    names = channel_names.split(",") if channel_names else None
    done = import_dataset(source, nnunet_raw(), dataset_id, name, labels=labels, modality=modality, channel_names=names,
                          overwrite=overwrite, progress=progress)
    if done.backup:
        click.echo(f"kept the previous dataset as {done.backup}")
    click.echo(f"{done.grouping}; wrote {done.folder}")
    click.echo(f"next: nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity")


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
