"""`medimgen train {ddpm,autoencoder,ldm}`: one library call from config to a finished, tracked run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from medimgen import __version__
from medimgen.config import (apply_overrides, flatten, load_config, load_generation_config, render_generation_config,
                             save_generation_config)
from medimgen.config.schema import GenerationConfig
from medimgen.data.cases import open_cases
from medimgen.data.loader import TrainBatches, validation_batches
from medimgen.data.splits import get_split
from medimgen.errors import MedimgenError
from medimgen.geometry import case_geometry, save_geometry
from medimgen.paths import medimgen_results
from medimgen.planning.api import CONFIG_NAME
from medimgen.plans import DatasetPlans
from medimgen.sampling import resolve_device
from medimgen.tracking import Tracker, git_commit, sigterm_interrupts
from medimgen.training import MODELS
from medimgen.training.lock import RunLock
from medimgen.training.loop import LoopOptions, Trainer, amp_dtype, seed_everything
from medimgen.training.memory_guard import MemoryGuard
from medimgen.training.outputs import RunDir

DIMS = ("2d", "3d")


@dataclass
class TrainResult:
    run_dir: Path
    completed: bool
    epoch: int
    mlflow_run_id: str | None
    config: GenerationConfig


@dataclass
class RunSetup:
    """How a run is placed when it is not the dataset's standard run (tuning trials use this)."""

    config: GenerationConfig | None = None  # the resolved config (instead of medimgen_config.yaml + overrides)
    run_root: Path | None = None  # run folder (instead of medimgen_results/Dataset/model/dim/split)
    autoencoder_run: Path | None = None  # LDM: the autoencoder run to build on (instead of the dataset's)
    tracker: Tracker | None = None  # lets the caller see the MLflow run id even when training fails
    run_name: str | None = None
    parent_run_id: str | None = None  # nest the MLflow run under this one
    tags: dict = field(default_factory=dict)
    on_epoch: Callable[[int, dict], None] | None = None  # after every epoch (may raise to stop, e.g. pruning)


def run_dir_for(plans: DatasetPlans, model: str, dim: str, split_name: str) -> RunDir:
    return RunDir.for_run(medimgen_results(), plans.name, model, dim, split_name)


def _echo_for(cfg: GenerationConfig, run: RunDir, echo: Callable[[str], None]) -> Callable[[str], None]:
    if cfg.tracking.output_mode != "log":
        return echo

    def to_log(msg: str) -> None:
        with open(run.log, "a") as f:
            f.write(msg + "\n")

    return to_log


def resolve_config(plans: DatasetPlans, run: RunDir, dim: str, resume: bool, overrides: Sequence[str],
                   config_path: Path | str | None) -> GenerationConfig:
    """Resume: the run's own saved config (+ overrides). New run: the dataset's medimgen_config.yaml section."""
    if resume:
        return apply_overrides(load_generation_config(run.config), list(overrides))
    path = Path(config_path) if config_path else plans.folder / CONFIG_NAME
    if not path.is_file():
        raise MedimgenError(f"{path} does not exist: run `medimgen plan -d {plans.dataset_id}` first")
    return apply_overrides(load_config(path).get(dim), list(overrides))


def build_task(model: str, cfg: GenerationConfig, device: torch.device, plans: DatasetPlans, split_name: str,
               autoencoder_run: Path | None = None):
    if model == "ddpm":
        from medimgen.training.ddpm import DiffusionTask

        return DiffusionTask(cfg, device)
    if model == "autoencoder":
        from medimgen.training.autoencoder import AutoencoderTask

        return AutoencoderTask(cfg, device)
    from medimgen.training.ldm import LatentDiffusionTask

    dim = "2d" if cfg.data.spatial_dims == 2 else "3d"
    ae_run = RunDir(Path(autoencoder_run)) if autoencoder_run else run_dir_for(plans, "autoencoder", dim, split_name)
    return LatentDiffusionTask(cfg, device, ae_run)


def _log_model(run: RunDir, cfg: GenerationConfig, tracker: Tracker, echo) -> None:
    """Log the trained sampler as a pyfunc model in this run (and register it); never fails training."""
    import warnings

    from medimgen.registry import log_sampler
    from medimgen.sampling import from_run

    try:
        reg = log_sampler(from_run(run.root), run_id=tracker.run_id, register=cfg.tracking.register_models,
                          tracking_uri=cfg.tracking.tracking_uri)
        echo(f"logged model {reg.model_uri}" + (f", registered as {reg.name} version {reg.version}" if reg.name else ""))
    except Exception as e:
        warnings.warn(f"could not log the model to MLflow ({type(e).__name__}: {e}); "
                      f"`medimgen register {run.root}` can do it later", stacklevel=2)


@sigterm_interrupts()  # SIGTERM ends the MLflow run as KILLED, like Ctrl-C
def train(
    model: str,
    dataset_id: int | str,
    splitting: str = "train-val-test",
    model_type: str = "3d",
    fold: int = 0,
    progress: bool = False,
    resume: bool = False,
    overrides: Sequence[str] = (),
    config_path: Path | str | None = None,
    device: str | None = None,
    stop_after_epoch: int | None = None,
    echo: Callable[[str], None] = print,
    setup: RunSetup | None = None,
) -> TrainResult:
    """Train ``model`` ('ddpm' | 'autoencoder' | 'ldm') on a planned dataset; see README 'Training'."""
    if model not in MODELS:
        raise MedimgenError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if model_type not in DIMS:
        raise MedimgenError(f"MODEL_TYPE must be 2d or 3d, got {model_type!r}")
    plans = DatasetPlans.from_id(dataset_id)
    identifiers = open_cases(plans.preprocessed_folder(model_type)).identifiers
    split = get_split(plans.folder, identifiers, splitting, fold)
    setup = setup or RunSetup()
    run = RunDir(Path(setup.run_root)) if setup.run_root else run_dir_for(plans, model, model_type, split.name)
    with RunLock(run.root) as lock:  # an existing run is locked first: a running one is named before anything else
        return _train_locked(lock, model, plans, split, run, model_type, resume, overrides, config_path, setup,
                             progress, device, stop_after_epoch, echo)


def _check_run(run: RunDir, model: str, resume: bool) -> None:
    if resume and not run.last.is_file():
        raise MedimgenError(f"nothing to continue: no checkpoint at {run.last} (drop -c to start a new run)")
    if not resume and run.last.exists():
        raise MedimgenError(f"a {model} run already exists at {run.root}: pass -c to continue it, "
                            f"or move/delete that folder to start over")


def _train_locked(lock: RunLock, model: str, plans: DatasetPlans, split, run: RunDir, model_type: str, resume: bool,
                  overrides: Sequence[str], config_path, setup: RunSetup, progress: bool, device: str | None,
                  stop_after_epoch: int | None, echo: Callable[[str], None]) -> TrainResult:
    _check_run(run, model, resume)
    if setup.config is not None and not resume:
        cfg = apply_overrides(setup.config, list(overrides))
    else:
        cfg = resolve_config(plans, run, model_type, resume, overrides, config_path)
    tcfg = getattr(cfg, f"train_{model}")
    dev = resolve_device(device)

    seed_everything(tcfg.seed)
    task = build_task(model, cfg, dev, plans, split.name, setup.autoencoder_run)  # writes nothing (LDM: needs its AE)
    lock.acquire()  # creates the folder of a new run; the check again: another process may have started it
    _check_run(run, model, resume)
    batches = TrainBatches(cfg, plans, split.train, tcfg.batch_size, seed=tcfg.seed)
    tracker = setup.tracker or Tracker()
    completed = False
    try:
        if model == "ldm" and not resume:
            scale = task.compute_scale_factor(batches)
            cfg = dataclasses.replace(cfg, train_ldm=dataclasses.replace(cfg.train_ldm, latent_scale_factor=scale))
        if model == "ldm":
            cfg = dataclasses.replace(cfg, autoencoder=task.cfg.autoencoder)
        run.make()
        val_ids = split.val or split.train[:1]
        run_echo = _echo_for(cfg, run, echo)

        def on_refit(refit) -> TrainBatches:
            """A memory re-fit in the first steps: new batches, the change recorded in config.yaml and MLflow."""
            nonlocal cfg, batches
            cfg = refit.config
            batches.close()
            batches = TrainBatches(cfg, plans, split.train, getattr(cfg, f"train_{model}").batch_size, seed=tcfg.seed)
            save_generation_config(cfg, run.config)
            trainer.config_yaml = render_generation_config(cfg)
            tracker.set_tags({"memory.refit": f"{refit.reason}: {'; '.join(refit.changes)}"})
            tracker.log_artifacts([run.config], "run")
            return batches

        guard = MemoryGuard(cfg, model, dev, run_echo, lambda m: tracker.log_metrics(m, step=0))
        trainer = Trainer(
            task, tcfg, run, tracker, dev, batches,
            val_batches=lambda: validation_batches(cfg, plans, val_ids, getattr(cfg, f"train_{model}").batch_size),
            plot_batch=lambda: next(validation_batches(cfg, plans, val_ids[:1], 1)),
            options=LoopOptions(progress=progress, echo=run_echo, stop_after_epoch=stop_after_epoch,
                                on_epoch=setup.on_epoch, memory_guard=guard, on_refit=on_refit),
            config_yaml=render_generation_config(cfg),
        )
        previous_run_id = trainer.load(run.last)["mlflow_run_id"] if resume else None  # before any file is written
        save_generation_config(cfg, run.config)
        run.copy_nnunet_files(plans.folder, plans.plans_identifier)
        save_geometry(case_geometry(plans, model_type, sorted(split.train)[0], cfg.data.spacing), run.root)
        dim_split = f"{model_type}_{split.name}"
        tracker.start(
            experiment=cfg.tracking.experiment_name or plans.name,
            run_name=setup.run_name or f"{model}_{dim_split}",
            tracking_uri=cfg.tracking.tracking_uri,
            run_id=previous_run_id,
            tags={
                "medimgen.model": model, "medimgen.dim": model_type, "medimgen.split": split.name,
                "medimgen.dataset": plans.name, "medimgen.version": __version__, "git_commit": git_commit(),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "amp_dtype": str(amp_dtype(tcfg.amp, dev)).replace("torch.", "") if amp_dtype(tcfg.amp, dev) else "off",
                "perceptual_network": cfg.losses.perceptual_network if model == "autoencoder" else None,
                "medimgen.run_dir": str(run.root),
                "mlflow.parentRunId": setup.parent_run_id,
                **setup.tags,
            },
        )
        tracker.log_params({"dataset": plans.name, "model": model, "dim": model_type, "split": split.name,
                            **flatten(cfg)})
        result = trainer.fit()
        completed = result["completed"]
        tracker.log_artifacts([run.config, run.loss_dict, run.geometry, run.root / "dataset.json",
                               run.root / f"{plans.plans_identifier}.json"], "run")
        if completed:
            if cfg.tracking.log_checkpoints:  # off by default: the run folder has them, MLflow gets the model
                tracker.log_artifacts([run.best, run.last], "checkpoints")
            if model in ("ddpm", "ldm") and cfg.tracking.log_models and tracker.enabled:
                _log_model(run, cfg, tracker, _echo_for(cfg, run, echo))
        return TrainResult(run.root, completed, result["epoch"], tracker.run_id, cfg)
    except BaseException:
        tracker.end("KILLED")
        raise
    finally:
        batches.close()
        if tracker.run_id:
            tracker.end("FINISHED")
