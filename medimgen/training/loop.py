"""The one training loop shared by every model kind.

A task (DDPM, autoencoder, LDM, ControlNet: training.tasks) supplies modules, optimiser *phases* (e.g. generator and
discriminator) and a loss per phase; the loop owns everything else: AMP (bf16 where the
GPU supports it, else fp16 with a GradScaler per phase; off on CPU), gradient accumulation
(loss divided by the number of micro-batches), gradient clipping, EMA, learning-rate
schedule, validation, plots, loss history, atomic checkpoints and MLflow logging.

EMA (``ema_decay``, the task's ``ema_module``): a ``training.ema.WeightEMA`` copy with diffusers' warm-up. Validation
logs the raw weights' losses (``val_loss``, ...) and, with an EMA, the copy's (``val_loss_ema``, ...). Until the copy
is *ready* (``ema.warmup_steps``: 1/(1 - decay) optimiser steps) plots, best.pt and sampling from last.pt use the raw
weights and best.pt is chosen by ``val_loss``; from then on they use the EMA copy and best.pt is chosen by
``val_loss_ema`` (the first ready validation always replaces a best.pt of raw weights). Plot titles say which.

Two checkpoints per run: ``last.pt`` is the full resume state (every module, optimisers,
scalers, EMA, LR schedulers, epoch, RNG states, history), rewritten after every epoch;
``best.pt`` (written when the selected validation loss improves) holds only what sampling, evaluation and
registration read: the weights of the task's ``sampling_modules`` (the EMA copy once it is ready, else the
trained weights; ``ema_weights`` says which; no discriminator, no optimiser), the resolved config, the task's
extra state (LDM: latent scale factor, autoencoder checkpoint), model kind, epoch, best_val and
MLflow run id, marked ``"weights_only": True``. Readers that sample take best.pt, else last.pt
(a run that has not validated yet); only resuming reads last.pt.

Several ranks (torchrun, medimgen.core.distributed): the trained modules run their forward passes through
DistributedDataParallel, gradients are averaged once per optimiser step, training losses are averaged over the
ranks; rank 0 alone validates, plots, writes and logs, and hands its metrics to the others. last.pt keeps every
rank's RNG state (``rng_ranks``), so a run resumed on as many ranks draws what it would have drawn.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from medimgen.core import distributed
from medimgen.config.kinds import kind
from medimgen.config.schema import GenerationConfig, TrainConfig
from medimgen.core.devices import amp_dtype, autocast
from medimgen.core.errors import MedimgenError
from medimgen.runs.tracking import Tracker
from medimgen.training.ema import WeightEMA
from medimgen.training.memory_guard import Refit
from medimgen.core.atomic import write_json_atomic
from medimgen.runs.folders import RunDir, read_checkpoint, write_checkpoint
from medimgen.training.outputs import plot_losses, plot_note

CHECKPOINT_FORMAT = 1


class Task(Protocol):
    name: str  # its kind's name (medimgen.config.kinds); tasks are built by training.tasks
    cfg: GenerationConfig  # the config the run records (an LDM: its autoencoder's architecture; a ControlNet: its base's)
    modules: dict[str, nn.Module]  # everything saved in last.pt
    sampling_modules: tuple[str, ...]  # the modules saved in best.pt (what sampling/evaluation need)
    phase_modules: dict[str, list[str]]  # optimiser phase -> names of the modules it trains
    ema_module: str | None  # module that gets an EMA copy (used for validation/sampling)

    def active_phases(self, epoch: int) -> list[str]: ...
    def loss(self, phase: str, batch: dict, state: dict) -> tuple[torch.Tensor, dict[str, float]]: ...
    def validate(self, batches: Iterator[dict], model: Callable[[str], nn.Module]) -> dict[str, float]: ...
    def plot(self, stem: Path, batch: dict, model: Callable[[str], nn.Module]) -> Path | None: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(schedule: str, epochs: int) -> Callable[[int], float]:
    if schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / max(1, epochs)))
    if schedule == "poly":
        return lambda e: (1 - min(e, epochs) / max(1, epochs)) ** 0.9
    return lambda e: 1.0


@dataclass
class LoopOptions:
    progress: bool = False
    echo: Callable[[str], None] = print
    stop_after_epoch: int | None = None  # for tests and tuning: leave early, as if interrupted
    on_epoch: Callable[[int, dict], None] | None = None  # called after each epoch's checkpoint (tuning: pruning)
    memory_guard: object | None = None  # training.memory_guard.MemoryGuard: checks the first steps' peak
    on_refit: Callable[[object], Iterator[dict]] | None = None  # applies a memory Refit: returns the new batches
    quality: Callable[[int], dict] | None = None  # training.quality.QualityCheck: quality/* metrics after an epoch


class Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, run: RunDir, tracker: Tracker, device: torch.device,
                 train_batches: Iterator[dict], val_batches: Callable[[], Iterator[dict]],
                 plot_batch: Callable[[], dict], options: LoopOptions, config_yaml: str):
        self.task, self.cfg, self.run, self.tracker, self.device = task, cfg, run, tracker, device
        self.train_batches, self.val_batches, self.plot_batch = train_batches, val_batches, plot_batch
        self.opt = options
        self.config_yaml = config_yaml
        self.dtype = amp_dtype(cfg.amp, device)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        for phase, names in task.phase_modules.items():
            params = [p for n in names for p in task.modules[n].parameters()]
            lr = cfg.disc_learning_rate if phase == "discriminator" and cfg.disc_learning_rate else cfg.learning_rate
            self.optimizers[phase] = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
            self.schedulers[phase] = torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[phase], lr_lambda(cfg.lr_schedule, cfg.epochs))
            self.scalers[phase] = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ddp = distributed.wrap_task(task, device)  # several ranks: the trained modules in DDP (rank 0's weights)
        self.ema = WeightEMA(task.modules[task.ema_module], cfg.ema_decay) if cfg.ema_decay and task.ema_module else None
        self.history: dict[str, list] = defaultdict(list)
        self.best_val = float("inf")
        self.best_ema = False  # whether best.pt (and best_val) are of the EMA copy
        self.start_epoch = 0

    # ------------------------------------------------------------------ model access (EMA once it is ready)
    @property
    def ema_ready(self) -> bool:
        return self.ema is not None and self.ema.ready

    def raw_model(self, name: str) -> nn.Module:
        return self.task.modules[name]

    def ema_model(self, name: str) -> nn.Module:
        if self.ema is not None and name == self.task.ema_module:
            return self.ema.module
        return self.task.modules[name]

    def eval_model(self, name: str) -> nn.Module:
        """What plots and best.pt use: the EMA copy once it is ready, else the trained weights."""
        return self.ema_model(name) if self.ema_ready else self.raw_model(name)

    # ------------------------------------------------------------------ checkpoints
    def state(self, epoch: int, rng_ranks: list | None = None) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.task.name,
            "epoch": epoch,
            "modules": {k: m.state_dict() for k, m in self.task.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "lr_schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scalers": {k: s.state_dict() for k, s in self.scalers.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "sampling_ema": self.ema_ready,  # sampling from last.pt takes the EMA copy (runs.sampling_weights)
            "history": dict(self.history),
            "best_val": self.best_val,
            "best_ema": self.best_ema,
            "mlflow_run_id": self.tracker.run_id,
            "rng": rng_state(),
            "rng_ranks": rng_ranks or [],  # several ranks: each one's RNG state, by rank
            "extra": self.task.extra_state(),
            "config": self.config_yaml,
        }

    def sampling_state(self, epoch: int) -> dict:
        """best.pt: the sampling weights (EMA where there is one) and what readers of a run need, no resume state."""
        names = getattr(self.task, "sampling_modules", tuple(self.task.modules))
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.task.name,
            "weights_only": True,
            "epoch": epoch,
            "modules": {k: self.eval_model(k).state_dict() for k in names},
            "ema_weights": self.ema_ready,  # modules[ema_module] is the EMA copy
            "best_val": self.best_val,
            "mlflow_run_id": self.tracker.run_id,
            "extra": self.task.extra_state(),
            "config": self.config_yaml,
        }

    def load(self, path: Path) -> dict:
        ckpt = read_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("model") != self.task.name:
            raise MedimgenError(f"{path} is not a medimgen {self.task.name} checkpoint")
        if ckpt.get("weights_only"):
            raise MedimgenError(f"{path} holds sampling weights only; a run continues from its last.pt")
        try:
            for k, m in self.task.modules.items():
                m.load_state_dict(ckpt["modules"][k])
        except (KeyError, RuntimeError) as e:
            raise MedimgenError(f"{path} does not fit this config's {self.task.name} networks (did an override change "
                                f"the architecture?): {' '.join(str(e).split())[:240]}") from None
        for group in ("optimizers", "lr_schedulers", "scalers"):
            for k, obj in getattr(self, group if group != "lr_schedulers" else "schedulers").items():
                obj.load_state_dict(ckpt[group][k])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.history = defaultdict(list, ckpt["history"])
        self.best_val = ckpt["best_val"]
        self.best_ema = ckpt.get("best_ema", ckpt["ema"] is not None)  # before warm-up: best.pt held the EMA copy
        self.start_epoch = ckpt["epoch"]
        self.task.load_extra_state(ckpt["extra"])
        ranks = ckpt.get("rng_ranks") or []
        if distributed.rank() < len(ranks):
            set_rng_state(ranks[distributed.rank()])
        elif distributed.rank() == 0:
            set_rng_state(ckpt["rng"])
        else:  # more ranks than the run had: a fresh seed of its own
            seed_everything(distributed.rank_seed(self.cfg.seed) + ckpt["epoch"])
        return ckpt

    # ------------------------------------------------------------------ one optimiser step
    @contextmanager
    def _only_trains(self, phase: str):
        """Freeze the other phases' parameters so a phase's loss only reaches its own optimiser."""
        own = {id(p) for n in self.task.phase_modules[phase] for p in self.task.modules[n].parameters()}
        frozen = [p for other, names in self.task.phase_modules.items() if other != phase
                  for n in names for p in self.task.modules[n].parameters() if id(p) not in own and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _autocast(self):
        return autocast(self.device, self.dtype)

    @contextmanager
    def _out_of_memory(self, where: str):
        """CUDA out of memory: a memory re-fit in the first steps (see memory_guard), else one line."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            guard = self.opt.memory_guard
            if guard is None:
                raise MedimgenError(f"CUDA out of memory during {where} of {self.task.name}: lower "
                                    f"{kind(self.task.name).train_section}.batch_size or re-plan with `medimgen plan --gpu-memory GB`") from None
            guard.on_out_of_memory(where)  # raises a Refit or the one-line error
            raise

    def _apply_refit(self, refit) -> None:
        """Continue with a re-fitted config: same weights and optimiser state, new micro-batch/checkpointing/EMA."""
        from medimgen.training.memory_guard import apply_checkpointing

        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.cfg = refit.config.train_for(self.task.name)
        apply_checkpointing(self.task.modules, refit.config, self.task.name)
        if not self.cfg.ema_decay:
            self.ema = None
        self.train_batches = self.opt.on_refit(refit)
        self.opt.echo(f"memory re-fit ({refit.reason}): {'; '.join(refit.changes)}; repeating epoch from the current state")

    def _optimizer_step(self, phases: list[str]) -> None:
        for phase in phases:
            opt, scaler = self.optimizers[phase], self.scalers[phase]
            if self.cfg.grad_clip:
                scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.task.modules[self.task.ema_module])

    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        for m in self.task.modules.values():
            m.train()
        sums: dict[str, float] = defaultdict(float)
        accum = max(1, self.cfg.grad_accumulation_steps)
        n = self.cfg.iterations_per_epoch
        phases = self.task.active_phases(epoch)
        bar = tqdm(range(n), desc=f"{self.task.name} epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not self.opt.progress)
        for it in bar:
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in next(self.train_batches).items()}
            state: dict = {"phases": phases}
            step = (it + 1) % accum == 0 or it == n - 1  # gradients of several ranks are averaged on this micro-step
            group = min(accum, n - it + it % accum)  # micro-batches of this step (fewer in an epoch's short last)
            for phase in phases:
                with self._only_trains(phase), self._out_of_memory("training"), distributed.no_sync(self.ddp, not step):
                    with self._autocast():
                        loss, logs = self.task.loss(phase, batch, state)
                    if not torch.isfinite(loss):
                        raise MedimgenError(f"{self.task.name} {phase} loss is {loss.item()} at epoch {epoch + 1}: "
                                            f"lower the learning rate or disable AMP (train_*.amp=off)")
                    self.scalers[phase].scale(loss / group).backward()
                for k, v in logs.items():
                    sums[k] += v
            if step:
                self._optimizer_step(phases)
                if self.opt.memory_guard is not None:
                    self.opt.memory_guard.after_step()
            if self.opt.progress:
                bar.set_postfix({k: f"{v / (it + 1):.4f}" for k, v in list(sums.items())[:3]})
        for phase in phases:  # a phase that did not train yet (GAN warm-up) keeps its schedule
            self.schedulers[phase].step()
        return distributed.mean({f"train_{k}": v / n for k, v in sums.items()})

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        main = distributed.is_main()  # several ranks: rank 0 validates, plots, writes and logs
        if main:
            self.run.make()  # checkpoints/ and plots/ (the run folder itself: training.lock.RunLock)
        t_start = time.time()
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.time()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            while True:
                try:
                    metrics = self.train_epoch(epoch)
                    break
                except Refit as refit:
                    self._apply_refit(refit)
            if main and ((epoch + 1) % cfg.val_interval == 0 or epoch == cfg.epochs - 1):
                for m in self.task.modules.values():
                    m.eval()
                with torch.no_grad(), self._autocast(), self._out_of_memory("validation"):
                    metrics.update({f"val_{k}": v for k, v in self.task.validate(self.val_batches(), self.raw_model).items()})
                    if self.ema is not None:
                        metrics.update({f"val_{k}_ema": v
                                        for k, v in self.task.validate(self.val_batches(), self.ema_model).items()})
            metrics["epoch_seconds"] = time.time() - t0
            if self.device.type == "cuda":
                metrics["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            metrics = distributed.broadcast(metrics)  # every rank keeps rank 0's history and best
            self.history["epoch"].append(epoch + 1)
            for k in set(self.history) - {"epoch"} | set(metrics):
                if k != "epoch":
                    self.history[k] = self.history.get(k, [None] * (len(self.history["epoch"]) - 1))
                    self.history[k].append(metrics.get(k))
            val = metrics.get("val_loss_ema" if self.ema_ready else "val_loss")
            if val is not None and (val < self.best_val or self.ema_ready != self.best_ema):
                self.best_val, self.best_ema = val, self.ema_ready
                if main:
                    write_checkpoint(self.sampling_state(epoch + 1), self.run.best)
            rngs = distributed.gather(rng_state()) if distributed.active() else None
            if main:
                # the epoch is saved before its plots, samples and quality check (slow on a CPU): a kill during them
                # loses nothing; they leave the random state as saved, so a resumed run continues exactly as this one
                write_checkpoint(self.state(epoch + 1, rngs), self.run.last)
                saved = rng_state()
                self._epoch_outputs(epoch, metrics)
                self.opt.echo(f"{self.task.name} epoch {epoch + 1}/{cfg.epochs} "
                              + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None))
                self._quality(epoch + 1)
                set_rng_state(saved)
            if self.opt.on_epoch is not None:
                self.opt.on_epoch(epoch + 1, metrics)
            if self.opt.stop_after_epoch is not None and epoch + 1 >= self.opt.stop_after_epoch and epoch + 1 < cfg.epochs:
                self.opt.echo(f"stopped after epoch {epoch + 1}; continue with -c")
                return {"completed": False, "epoch": epoch + 1}
        self.tracker.log_artifact(self.run.plots / "loss.png", "plots")
        return {"completed": True, "epoch": cfg.epochs, "best_val": self.best_val, "seconds": time.time() - t_start}

    def _quality(self, epoch: int) -> None:
        """The run scores itself where planned (training.quality); quality/* metrics at the optimiser step (rank 0)."""
        from medimgen.training.quality import optimizer_steps

        check = self.opt.quality
        if check is None or not check.due(epoch):
            return
        self.opt.echo(f"{self.task.name} epoch {epoch}: scoring {check.train.eval_samples} samples (quality checks)"
                      if not kind(self.task.name).encoder else f"{self.task.name} epoch {epoch}: scoring reconstructions")
        try:
            q = check(epoch)
        except MedimgenError as e:
            self.opt.echo(f"quality check skipped: {e}")
            return
        self.tracker.log_metrics(q, step=optimizer_steps(self.cfg, epoch))
        self.opt.echo(f"{self.task.name} epoch {epoch} " + " ".join(f"{k}={v:.4g}" for k, v in q.items()))

    def _epoch_outputs(self, epoch: int, metrics: dict) -> None:
        """MLflow metrics, loss history and plots of an epoch (rank 0)."""
        self.tracker.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=epoch + 1)
        write_json_atomic(self.run.loss_dict, dict(self.history))
        plot_losses(self.history, self.run.plots / "loss.png")
        if (epoch + 1) % self.cfg.val_plot_interval == 0 or epoch == self.cfg.epochs - 1:
            for m in self.task.modules.values():
                m.eval()
            note = None if self.ema is None else (f"EMA weights (step {self.ema.step})" if self.ema_ready
                                                  else f"raw weights (EMA warm-up, step {self.ema.step})")
            with torch.no_grad(), self._autocast(), self._out_of_memory("plotting"), \
                    plot_note(note, self.opt.progress):
                path = self.task.plot(self.run.plots / f"epoch_{epoch + 1:04d}", self.plot_batch(), self.eval_model)
            if path is not None:
                self.tracker.log_artifact(path, "plots")
