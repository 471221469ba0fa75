"""`medimgen train KIND` (the kinds of medimgen.config.kinds): one library call from config to a finished, tracked
run."""

from __future__ import annotations

import contextlib
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from medimgen import __version__
from medimgen.core import distributed
from medimgen.config import (apply_overrides, flatten, load_config, load_generation_config, render_generation_config,
                             save_generation_config)
from medimgen.config.io import from_dict, to_dict
from medimgen.config.kinds import config_sections, kind, names
from medimgen.config.schema import DIMS, GenerationConfig
from medimgen.data.cases import open_cases
from medimgen.data.loader import TrainBatches, validation_batches
from medimgen.data.splits import get_split
from medimgen.core.devices import amp_dtype, resolve_device
from medimgen.core.errors import MedimgenError
from medimgen.data.geometry import case_geometry, save_geometry
from medimgen.core.paths import CONFIG_NAME
from medimgen.nnunet.plans import DatasetPlans
from medimgen.runs.folders import RunDir, log_run_model, read_checkpoint, scale_factor_of, upstream_for
from medimgen.core.interrupts import sigterm_interrupts
from medimgen.runs.tracking import Tracker, git_commit
from medimgen.training.lock import RunLock
from medimgen.training.loop import LoopOptions, Trainer, seed_everything
from medimgen.training.memory_guard import MemoryGuard
from medimgen.training.outputs import PLOT_EXAMPLES
from medimgen.training.tasks import build_task


@dataclass
class TrainResult:
    run_dir: Path
    completed: bool
    epoch: int
    mlflow_run_id: str | None
    config: GenerationConfig
    rank: int = 0  # several ranks (torchrun): which one returned this
    mlflow_url: str | None = None  # the run's experiment in the MLflow UI (runs view)


@dataclass
class RunSetup:
    """How a run is placed when it is not the dataset's standard run (tuning trials use this)."""

    config: GenerationConfig | None = None  # the resolved config (instead of medimgen_config.yaml + overrides)
    run_root: Path | None = None  # run folder (instead of medimgen_results/Dataset/model/dim/split)
    upstream_run: Path | None = None  # a kind building on another run (LDM: its autoencoder; ControlNet: its base)
    tracker: Tracker | None = None  # lets the caller see the MLflow run id even when training fails
    run_name: str | None = None
    parent_run_id: str | None = None  # nest the MLflow run under this one
    tags: dict = field(default_factory=dict)
    on_epoch: Callable[[int, dict], None] | None = None  # after every epoch (may raise to stop, e.g. pruning)
    score: bool = True  # quality checks during and after training (tuning trials score once, with their own budget)


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


def _log_model(run: RunDir, cfg: GenerationConfig, tracker: Tracker, echo) -> None:
    """Log the trained sampler as a pyfunc model in this run (and register it); never fails training."""
    import warnings

    try:
        reg = log_run_model(run.root, tracker.run_id, cfg.tracking.register_models, tracking_uri=cfg.tracking.tracking_uri)
        echo(f"logged model {reg.model_uri}" + (f", registered as {reg.name} version {reg.version}" if reg.name else ""))
    except Exception as e:
        warnings.warn(f"could not log the model to MLflow ({type(e).__name__}: {e}); "
                      f"`medimgen register {run.root}` can do it later", stacklevel=2)


@sigterm_interrupts()  # SIGTERM ends the MLflow run as KILLED, like Ctrl-C
def train(
    model: str,
    dataset_id: int | str,
    splitting: str = "train-val-test",
    dim: str = "3d",
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
    """Train ``model`` (a registered kind: ddpm, autoencoder, ldm, controlnet) on a planned dataset; see README
    'Training'."""
    if model not in names():
        raise MedimgenError(f"model must be one of {', '.join(names())}, got {model!r}")
    if dim not in DIMS:
        raise MedimgenError(f"MODEL_TYPE must be 2d or 3d, got {dim!r}")
    setup = setup or RunSetup()
    plans = DatasetPlans.planned(dataset_id, setup.config if setup.config is not None else config_path)
    identifiers = open_cases(plans.preprocessed_folder(dim)).identifiers
    split = get_split(plans.folder, identifiers, splitting, fold)
    run = RunDir(Path(setup.run_root)) if setup.run_root else RunDir.standard(plans.name, model, dim, split.name)
    with distributed.joined(resolve_device(device)) as dev:  # torchrun's ranks: one process group, a GPU each
        # an existing run is locked first (by rank 0 of several): a running one is named before anything else
        with RunLock(run.root) if distributed.is_main() else contextlib.nullcontext() as lock:
            return _train_locked(lock, model, plans, split, run, dim, resume, overrides, config_path, setup,
                                 progress, dev, stop_after_epoch, echo)


def _check_run(run: RunDir, model: str, resume: bool) -> None:
    if resume and not run.last.is_file():
        raise MedimgenError(f"nothing to continue: no checkpoint at {run.last} (drop -c to start a new run)")
    if not resume and run.last.exists():
        raise MedimgenError(f"a {model} run already exists at {run.root}: pass -c to continue it, "
                            f"or move/delete that folder to start over")


def _run_config(plans: DatasetPlans, run: RunDir, dim: str, resume: bool, overrides: Sequence[str], config_path,
                setup: RunSetup) -> GenerationConfig:
    if setup.config is not None and not resume:
        cfg = apply_overrides(setup.config, list(overrides))
    else:
        cfg = resolve_config(plans, run, dim, resume, overrides, config_path)
    if cfg.data.plans_identifier != plans.plans_identifier:
        raise MedimgenError(f"the {'run' if resume else 'training'} config has data.plans_identifier="
                            f"{cfg.data.plans_identifier}, but {plans.name} is planned from {plans.plans_identifier} "
                            f"(its {CONFIG_NAME}): re-plan with `medimgen plan -d {plans.dataset_id} --plans "
                            f"{cfg.data.plans_identifier}`, or start a new run")
    check_against_dataset(cfg, plans)
    return cfg


def check_against_dataset(cfg: GenerationConfig, plans: DatasetPlans) -> None:
    """The config agrees with the dataset it trains on (checked before the run folder is made): its channels and
    its label values are the dataset's."""
    if cfg.data.in_channels != plans.num_channels:
        raise MedimgenError(f"config key 'data.in_channels': must be {plans.num_channels} (the channels of "
                            f"{plans.name}'s dataset.json), got {cfg.data.in_channels}")
    labels = plans.dataset_json.get("labels") or {}
    values = {v for v in labels.values() if isinstance(v, int) and not isinstance(v, bool)}
    unknown = [v for v in cfg.data.label_values if v not in values]
    if values and len(values) == len(labels) and unknown:
        raise MedimgenError(f"config key 'data.label_values': {unknown} not among the label values of {plans.name}'s "
                            f"dataset.json {sorted(values)}")


def check_host_memory_for(cfg: GenerationConfig, model: str, device: torch.device) -> None:
    """On a CPU, training allocates in host memory: refuse an image size whose full-resolution activations alone
    (a lower bound: a few maps of the first level's channels per image of the micro-batch) exceed what is free."""
    if device.type != "cpu":
        return  # a GPU: the planner's memory fit and the memory guard
    from medimgen.core.devices import check_host_memory

    full_resolution_autoencoder = kind(model).encoder or cfg.space_of(model) == "latent"
    net = cfg.autoencoder if full_resolution_autoencoder else cfg.unet_for(model)
    voxels = math.prod(cfg.data.image_size)
    need = cfg.train_for(model).batch_size * net.channels[0] * voxels * 4 * 4
    check_host_memory(need, f"training the {model} at data.image_size {list(cfg.data.image_size)} on the CPU")


def _train_locked(lock: RunLock | None, model: str, plans: DatasetPlans, split, run: RunDir, dim: str, resume: bool,
                  overrides: Sequence[str], config_path, setup: RunSetup, progress: bool, device: torch.device,
                  stop_after_epoch: int | None, echo: Callable[[str], None]) -> TrainResult:
    _check_run(run, model, resume)
    cfg = _run_config(plans, run, dim, resume, overrides, config_path, setup)
    check_host_memory_for(cfg, model, device)
    seed_everything(distributed.rank_seed(cfg.train_for(model).seed))  # several ranks: DDP gives all rank 0's weights
    upstream = upstream_for(model, run, cfg, plans.name, split.name, setup.upstream_run)  # resume: the run's own link
    task = build_task(model, cfg, device, upstream, run.root)  # writes nothing (LDM: loads its AE)
    cfg = task.cfg  # LDM: its autoencoder's architecture; ControlNet: the base run's networks + its own sections
    if lock is not None:
        lock.acquire()  # creates the folder of a new run; the check again: another process may have started it
        _check_run(run, model, resume)
    # the config file the run was resolved from (a failed foundation check re-plans it); None: given in memory
    config_file = None if setup.config is not None or resume else \
        Path(config_path) if config_path else plans.folder / CONFIG_NAME
    return _Job(model, plans, split, run, cfg, task, device, setup, echo, config_file).execute(
        resume, progress, stop_after_epoch)


class _Job:
    """One locked training run: batches, trainer and MLflow run. Its config may change on the way (the LDM's
    latent scale, a memory re-fit); config.yaml and MLflow follow."""

    def __init__(self, model: str, plans: DatasetPlans, split, run: RunDir, cfg: GenerationConfig, task,
                 device: torch.device, setup: RunSetup, echo: Callable[[str], None], config_file: Path | None = None):
        self.model, self.plans, self.split, self.run, self.cfg, self.task = model, plans, split, run, cfg, task
        self.device, self.setup, self.echo = device, setup, echo
        self.config_file = config_file  # where the run's config came from (None: given in memory)
        self.main = distributed.is_main()  # several ranks: rank 0 writes the run files and tracks
        self.cfg = self._record_world(cfg)  # sets self.tcfg: what each rank runs
        self.cached: list[dict] | None = None  # the latent cache's cases (training.latents), when the run uses it
        self.batches = None
        self.tracker = setup.tracker or Tracker(enabled=self.main)
        self.trainer: Trainer | None = None
        self.foundation_metrics: dict = {}  # a foundation autoencoder's reconstruction check (training.foundation)
        self.foundation_tags: dict = {}

    def run_echo(self) -> Callable[[str], None]:
        return _echo_for(self.cfg, self.run, self.echo) if self.main else (lambda msg: None)

    def execute(self, resume: bool, progress: bool, stop_after_epoch: int | None) -> TrainResult:
        try:
            if not resume and kind(self.model).encoder and self.cfg.autoencoder.is_foundation:
                from medimgen.training.foundation import adopt

                # rank 0 checks and writes (several ranks: the others follow its decision)
                if distributed.broadcast(adopt(self, progress) if self.main else None):
                    return self._adopted()  # the published autoencoder, checked: a complete run
                fallback = distributed.broadcast(to_dict(self.cfg) if self.main else None)  # rank 0 re-planned it
                self.cfg = self._record_world(from_dict(GenerationConfig, fallback))
                self.task = build_task(self.model, self.cfg, self.device)  # the check failed: train the fallback
            # after the choice of autoencoder: a fallback's re-plan changes the intensity mapping the batches use
            self.batches = self._train_batches(self.cfg, self.tcfg.batch_size, distributed.rank_seed(self.tcfg.seed),
                                               progress)
            self._derive(resume)  # the folder: RunLock made it, the Trainer makes its checkpoints/ and plots/
            self.trainer = self.make_trainer(progress, stop_after_epoch)
            previous_run_id = self.trainer.load(self.run.last)["mlflow_run_id"] if resume else None  # before any write
            distributed.barrier()  # every rank has read last.pt before rank 0 writes
            if self.main:
                self.write_run_files()
                self._start_tracking(previous_run_id)
                self._log_foundation_check()
            result = self.trainer.fit()
            self._finish(result["completed"])
            return TrainResult(self.run.root, result["completed"], result["epoch"], self.tracker.run_id, self.cfg,
                               distributed.rank(), self._runs_view_url())
        except BaseException:
            self.tracker.end("KILLED")
            raise
        finally:
            if self.batches is not None:
                self.batches.close()
            if self.tracker.run_id:
                self.tracker.end("FINISHED")

    def _adopted(self) -> TrainResult:
        """The end of an adopted foundation autoencoder's run (training.foundation.adopt wrote its files)."""
        epoch = self.cfg.train_for(self.model).epochs
        if self.main:
            self._start_tracking(None)
            self._log_foundation_check()
            self.tracker.log_metrics({k: v[-1] for k, v in self.trainer.history.items() if k != "epoch" and v},
                                     step=epoch)  # val_loss, as an autoencoder run's validation logs it
            self.tracker.log_metrics({k.replace("foundation/", "", 1): v for k, v in self.foundation_metrics.items()},
                                     step=0)
            for path in sorted(self.run.plots.glob("*.png")) + sorted(self.run.plots.glob("*.gif")):
                self.tracker.log_artifact(path, "plots")
        self._finish(True)
        return TrainResult(self.run.root, True, epoch, self.tracker.run_id, self.cfg, distributed.rank(),
                           self._runs_view_url())

    def _runs_view_url(self) -> str | None:
        """The MLflow runs view of this run's experiment (None: not tracked)."""
        from medimgen.runs.tracking import runs_view_url

        return runs_view_url(self.tracker.experiment_id, self.cfg.tracking.tracking_uri) \
            if self.tracker.run_id and self.tracker.experiment_id else None

    def _log_foundation_check(self) -> None:
        if self.foundation_tags:
            self.tracker.set_tags(self.foundation_tags)
            self.tracker.log_metrics(self.foundation_metrics, step=0)

    def _train_batches(self, cfg: GenerationConfig, batch_size: int, seed: int, progress: bool = False):
        """nnU-Net's augmented image batches, or (cache_latents) batches of the latent cache, built once per dataset
        state and autoencoder (training.latents; rank 0 builds it, every rank reads it)."""
        from medimgen.training import latents

        if not latents.uses_cache(cfg, self.model):
            return TrainBatches(cfg, self.plans, self.split.train, batch_size, seed=seed)
        if self.cached is None:
            self.cached = latents.prepare(cfg, self.plans, self.split.train, self.task.frozen_autoencoder,
                                          self.device, with_labels=kind(self.model).steers,
                                          progress=progress and self.main,
                                          echo=self.run_echo(), batch_size=batch_size)
        return latents.CachedBatches(self.cached, cfg, batch_size)

    def _record_world(self, cfg: GenerationConfig) -> GenerationConfig:
        """The planned effective batch on this many ranks (distributed.split_batch): each rank's micro-batch,
        accumulation and iterations (self.tcfg), recorded in ``derived``."""
        planned = cfg.train_for(self.model)
        world = distributed.world_size()
        share = distributed.split_batch(planned.batch_size, planned.grad_accumulation_steps,
                                        planned.iterations_per_epoch, world)
        self.tcfg = dataclasses.replace(planned, batch_size=share.micro_batch_size,
                                        grad_accumulation_steps=share.grad_accumulation_steps,
                                        iterations_per_epoch=share.iterations_per_epoch)
        if self.main and share.effective_batch_size != planned.batch_size * planned.grad_accumulation_steps:
            self.echo(f"{world} ranks x micro-batch {share.micro_batch_size} x accumulation "
                      f"{share.grad_accumulation_steps}: effective batch {share.effective_batch_size} (planned "
                      f"{planned.batch_size * planned.grad_accumulation_steps})")
        return dataclasses.replace(cfg, derived=dataclasses.replace(
            cfg.derived, world_size=world, micro_batch_size=share.micro_batch_size,
            grad_accumulation_steps=share.grad_accumulation_steps, effective_batch_size=share.effective_batch_size))

    def _derive(self, resume: bool) -> None:
        """A latent model's scale (once, at the start of a new run; rank 0's, on every rank), kept in one place:
        the run config's ``derived.latent_scale_factor``."""
        if kind(self.model).upstream != "encoder":
            return
        if resume:  # the run's config, or (a run of an older version) its checkpoint
            scale = scale_factor_of(self.cfg, read_checkpoint(self.run.last, mmap=True)["extra"])
        else:
            scale = distributed.broadcast(self.task.compute_scale_factor(self.batches) if self.main else None)
        self.task.scale_factor = scale
        self.cfg = dataclasses.replace(self.cfg, derived=dataclasses.replace(self.cfg.derived, latent_scale_factor=scale))

    def make_trainer(self, progress: bool, stop_after_epoch: int | None) -> Trainer:
        val_ids = self.split.val or self.split.train[:1]
        run_echo = self.run_echo()
        guard = MemoryGuard(self.cfg, self.model, self.device, run_echo, lambda m: self.tracker.log_metrics(m, step=0)) \
            if distributed.world_size() == 1 else None  # a re-fit would have to reach every rank: not with several
        return Trainer(
            self.task, self.tcfg, self.run, self.tracker, self.device, self.batches,
            val_batches=lambda: validation_batches(self.cfg, self.plans, val_ids, self.cfg.train_for(self.model).batch_size),
            plot_batch=lambda: next(validation_batches(self.cfg, self.plans, val_ids[:PLOT_EXAMPLES], PLOT_EXAMPLES)),
            options=LoopOptions(progress=progress and self.main, echo=run_echo, stop_after_epoch=stop_after_epoch,
                                on_epoch=self.setup.on_epoch, memory_guard=guard, on_refit=self._on_refit,
                                quality=self._quality_check(progress)),
            config_yaml=render_generation_config(self.cfg),
        )

    def splitting_and_fold(self) -> tuple[str, int]:
        """The (splitting, fold) this run's split was made from ('train-val-test', 0 or '5-fold', k)."""
        if self.split.name == "train-val-test":
            return "train-val-test", 0
        return "5-fold", int(self.split.name.rsplit("_", 1)[1])

    def _quality_check(self, progress: bool):
        """The run's own quality checks (training.quality), on rank 0, unless the setup says no."""
        from medimgen.training.quality import QualityCheck

        if not (self.setup.score and self.main):
            return None
        return QualityCheck(self.model, self.cfg, self.plans.name, *self.splitting_and_fold(), self.run.root,
                            self.device, self.run_echo(), progress)

    def _on_refit(self, refit) -> TrainBatches:
        """A memory re-fit in the first steps: new batches, the change recorded in config.yaml and MLflow."""
        self.cfg = self._record_world(refit.config)
        self.batches.close()
        self.batches = self._train_batches(self.cfg, self.cfg.train_for(self.model).batch_size, self.tcfg.seed)
        save_generation_config(self.cfg, self.run.config)
        self.trainer.config_yaml = render_generation_config(self.cfg)
        self.tracker.set_tags({"memory.refit": f"{refit.reason}: {'; '.join(refit.changes)}"})
        self.tracker.log_artifacts([self.run.config], "run")
        return self.batches

    def write_run_files(self) -> None:
        save_generation_config(self.cfg, self.run.config)
        self.run.copy_nnunet_files(self.plans.folder, self.plans.plans_identifier)
        save_geometry(case_geometry(self.plans, self.cfg.dim, sorted(self.split.train)[0], self.cfg.data.spacing),
                      self.run.root)

    def _start_tracking(self, previous_run_id: str | None) -> None:
        model, dim, split, dev, setup = self.model, self.cfg.dim, self.split.name, self.device, self.setup
        amp = amp_dtype(self.tcfg.amp, dev)
        self.tracker.start(
            experiment=self.cfg.tracking.experiment_name or self.plans.name,
            run_name=setup.run_name or f"{model}_{dim}_{split}",
            tracking_uri=self.cfg.tracking.tracking_uri,
            run_id=previous_run_id,
            tags={
                "medimgen.model": model, "medimgen.dim": dim, "medimgen.split": split,
                "medimgen.dataset": self.plans.name, "medimgen.version": __version__, "git_commit": git_commit(),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "amp_dtype": str(amp).replace("torch.", "") if amp else "off",
                "perceptual_network": self.cfg.losses.perceptual_network if kind(model).encoder else None,
                "medimgen.run_dir": str(self.run.root),
                "medimgen.world_size": distributed.world_size(),  # this session's ranks (a resumed run may change)
                "mlflow.parentRunId": setup.parent_run_id,
                **setup.tags,
            },
        )
        sections = config_sections(model, self.cfg)  # the whole resolved config is the run/config.yaml artifact
        self.tracker.log_params({"dataset": self.plans.name, "model": model, "dim": dim, "split": split,
                                 "world_size": distributed.world_size(),
                                 **{k: v for k, v in flatten(self.cfg).items() if k.split(".", 1)[0] in sections}})

    def _finish(self, completed: bool) -> None:
        run, cfg = self.run, self.cfg
        self.tracker.log_artifacts([run.config, run.loss_dict, run.geometry, run.root / "dataset.json",
                                    run.root / f"{self.plans.plans_identifier}.json"], "run")
        if not completed:
            return
        if cfg.tracking.log_checkpoints:  # off by default: the run folder has them, MLflow gets the model
            self.tracker.log_artifacts([run.best, run.last], "checkpoints")
        if kind(self.model).samples and cfg.tracking.log_models and self.tracker.enabled:
            _log_model(run, cfg, self.tracker, _echo_for(cfg, run, self.echo))
