"""One Optuna trial: sample the space, train a short run, score it, record it (Optuna + MLflow)."""

from __future__ import annotations

import functools
import json
import re
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from medimgen.config import apply_overrides
from medimgen.core.names import EXPERIMENT_NAME_RULE
from medimgen.config.kinds import kind
from medimgen.config.schema import GenerationConfig
from medimgen.core.errors import MedimgenError
from medimgen.evaluation.scorer import quality_metrics
from medimgen.training.quality import optimizer_steps
from medimgen.tuning import objectives
from medimgen.tuning.study_runs import StudyRuns
from medimgen.tuning.space import SearchSpace
from medimgen.tuning.study import best_trials

FAILURES = (MedimgenError, ValueError, RuntimeError, torch.OutOfMemoryError)  # a trial's own failure, not a bug


class TrialFailed(MedimgenError):
    """A trial that could not produce objective values; Optuna records it as FAIL and goes on."""


def _keep_sampling_weights(run_root: Path) -> None:
    """A finished trial keeps its sampling weights (best.pt) only: its last.pt (optimiser, EMA, ...: several times
    larger) goes, as a complete trial is never continued."""
    from medimgen.runs.folders import RunDir

    run = RunDir(run_root)
    if run.best.is_file() and run.last.is_file():
        run.last.unlink()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@dataclass
class TrialObjective:
    """Callable objective (and after-trial callback) for ``study.optimize``."""

    study_name: str
    dataset: str  # DatasetXXX_Name
    model: str
    dim: str
    objective: str  # pareto | scalar
    space: SearchSpace
    base: GenerationConfig  # the dataset's config with the user's overrides
    overrides: Sequence[str]  # the user's config overrides (part of every trial's config, and of --apply-best)
    trial_root: Path
    extractor: torch.nn.Module | None  # None: the objectives need no features
    runs: StudyRuns
    parent: str | None  # the study's MLflow parent run (set by tune() once the checks passed)
    splitting: str = "train-val-test"
    fold: int = 0
    autoencoder_run: Path | None = None
    device: str | None = None
    echo: Callable[[str], None] = print
    metrics: tuple[str, ...] = ()  # objective names (medimgen.tuning.objectives); default: the model's FID-based pair
    budget: dict[str, str] = field(default_factory=dict)  # the user's --set train_<model>.epochs/iterations_per_epoch
    subsets: tuple[str, ...] = ()  # the real cases scored against; set by check() (budget.real, or val + train)
    progress: bool = False  # sampling/scoring progress bars inside a trial
    _real: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics) or objectives.default_metrics(self.model)
        self.subsets = tuple(self.subsets) or (self.space.budget["real"],)

    def real_images(self, cfg: GenerationConfig, subsets: Sequence[str] | None = None) -> torch.Tensor:
        """The real images the trials are scored against (cached per image geometry and subsets)."""
        return self._real_cases(cfg, subsets)[0]

    def real_labels(self, cfg: GenerationConfig, subsets: Sequence[str] | None = None) -> torch.Tensor:
        """The label maps of :meth:`real_images` (a joint autoencoder is scored on both)."""
        return self._real_cases(cfg, subsets)[1]

    def _real_cases(self, cfg: GenerationConfig, subsets: Sequence[str] | None = None):
        from medimgen.evaluation.api import real_cases

        subsets = tuple(subsets or self.subsets)
        key = (tuple(cfg.data.image_size), tuple(cfg.data.crop_size), tuple(cfg.data.spacing), subsets)
        if key not in self._real:
            parts = []
            for s in subsets:
                try:
                    parts.append(real_cases(cfg, self.dataset, s, self.splitting, self.fold)[:2])
                except MedimgenError as e:
                    if len(subsets) == 1 or "has no" not in str(e):
                        raise
            if not parts:
                raise MedimgenError(f"the split of {self.dataset} has no {' or '.join(subsets)} cases")
            self._real[key] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return self._real[key]

    def _count(self, subsets: Sequence[str]) -> int:
        try:
            return len(self.real_images(self.base, subsets))
        except MedimgenError as e:
            if "has no" in str(e):  # an empty subset of the split
                return 0
            raise

    @functools.cached_property
    def run_settings(self) -> list[str]:
        """Trial-run-only settings, never part of the dataset's config: no model registration, log to a file, and
        the parent's experiment (the MLflow UI nests runs within one experiment). Read once ``parent`` is set."""
        sets = ["tracking.log_models=false", "tracking.output_mode=log"]
        experiment = self.runs.experiment_of(self.parent)
        if experiment and re.fullmatch(EXPERIMENT_NAME_RULE, experiment):  # else the trials log to the dataset's
            sets.append(f"tracking.experiment_name={json.dumps(experiment)}")
        return sets

    def check(self) -> None:
        """Choose the real images: budget.real, or, when its val cases are too few for the objectives (FID and the
        MS-SSIM gap need 2 images), the val and train cases, with a note. Never the test cases."""
        need = 2 if any(objectives.METRICS[m].pairs for m in self.metrics) else 1
        real = self.space.budget["real"]
        n = self._count((real,))
        if n < need and real == "val":
            n_val, n = n, self._count(("val", "train"))
            if n >= need:
                self.subsets = ("val", "train")
                self.echo(f"note: the split has {n_val} val case(s), and {'/'.join(self.metrics)} need(s) at least "
                          f"{need} real images: trials are scored against the val and train cases ({n} images)")
                return
        if n < need:
            raise MedimgenError(f"only {n} real image(s) in the '{real}' cases of the split: {'/'.join(self.metrics)} "
                                f"need(s) at least {need}; set budget.real to train or all in {self.space.path}")

    def _pruning(self, trial) -> Callable[[int, dict], None]:
        import optuna

        def report(epoch: int, metrics: dict) -> None:
            if self.objective == "scalar" and metrics.get("val_loss") is not None:
                trial.report(float(metrics["val_loss"]), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} (val_loss {metrics['val_loss']:.4g})")

        return report

    def trial_config(self, config_sets: list[str]) -> GenerationConfig:
        """A trial's run config: the dataset's, the trial's values, the budget (the user's --set wins), fitted."""
        from medimgen.planning.memory import fit_to_memory

        cfg = apply_overrides(self.base, config_sets + self.space.budget_overrides(self.budget) + self.run_settings)
        return fit_to_memory(cfg, cfg.memory.target_gb)  # every trial fits the GPU like a planned config

    def _train_and_score(self, trial, cfg: GenerationConfig, run_root: Path, tracker, tags: dict) -> dict[str, float]:
        from medimgen.evaluation.api import score_model
        from medimgen.core.requests import SampleOptions
        from medimgen.runs.folders import TrainedModel
        from medimgen.training.api import RunSetup, train

        if run_root.exists():  # a folder left by a study of the same name that was deleted
            run_root.rename(run_root.with_name(f"{run_root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
        setup = RunSetup(config=cfg, run_root=run_root, upstream_run=self.autoencoder_run, tracker=tracker,
                         run_name=run_root.name, parent_run_id=self.parent, tags=tags,
                         on_epoch=self._watch(trial, cfg), score=False)  # scored once below, with the trial budget
        train(self.model, self.dataset, self.splitting, self.dim, self.fold, device=self.device,
              echo=lambda *_: None, setup=setup)
        model = TrainedModel.from_run(run_root)
        n, steps = self.eval_budget(cfg)
        self.echo(f"trial {trial.number}: scoring {n} samples x {steps} steps" if not kind(self.model).encoder else
                  f"trial {trial.number}: scoring reconstructions")
        options = SampleOptions(seed=trial.number, steps=steps, device=self.device, progress=self.progress)
        ref = self.reference(model.cfg)
        return score_model(model, ref, n, self.extractor, options, self.real_labels(model.cfg))

    def eval_budget(self, cfg: GenerationConfig) -> tuple[int, int]:
        """(samples, steps) that score a trial: the space's budget (or --eval-samples / --eval-steps), else sized by
        the rule of a training run's quality checks (planning.quality_budget) for the trial's run length."""
        from medimgen.planning.quality_budget import plan

        planned = plan(cfg.train_for(self.model), max_checks=1)
        n, steps = self.space.budget.get("num_samples"), self.space.budget.get("sampling_steps")
        return int(n or planned["eval_samples"]), int(steps or planned["eval_steps"])

    def reference(self, cfg: GenerationConfig):
        """The real images, with the split's training and held-out val cases for the memorisation score."""
        from medimgen.config.kinds import kind
        from medimgen.evaluation.api import reference

        key = ("reference", tuple(cfg.data.image_size), tuple(cfg.data.crop_size), tuple(cfg.data.spacing))
        if key not in self._real:
            self._real[key] = reference(cfg, self.dataset, self.real_images(cfg), self.splitting, self.fold,
                                        memorise=kind(self.model).samples, heldout="val")
        return self._real[key]

    def _watch(self, trial, cfg: GenerationConfig) -> Callable[[int, dict], None]:
        """After each epoch: a progress line (epoch, validation loss, time left of the training), then pruning."""
        prune = self._pruning(trial)
        epochs = cfg.train_for(self.model).epochs
        start = time.time()

        def on_epoch(epoch: int, metrics: dict) -> None:
            left = (time.time() - start) / epoch * (epochs - epoch)
            val = metrics.get("val_loss")
            self.echo(f"trial {trial.number}: epoch {epoch}/{epochs}" + (f" val_loss={val:.4g}" if val is not None
                                                                        else "") + f", training ETA {left:.0f}s")
            prune(epoch, metrics)

        return on_epoch

    def _fail(self, trial, reason: str, run_id: str | None, metrics: dict | None = None) -> TrialFailed:
        trial.set_user_attr("failure", reason)
        self.runs.log(run_id, metrics or {}, tags={"optuna.state": "FAIL", "medimgen.failure": reason}, status="FAILED")
        self.echo(f"trial {trial.number} failed: {reason}")
        return TrialFailed(reason)

    def __call__(self, trial) -> float | tuple[float, ...]:
        import optuna

        from medimgen.runs.tracking import Tracker

        values = self.space.sample(trial)
        config_sets = [*self.overrides, *self.space.overrides(self.base, values)]
        run_root = self.trial_root / f"trial_{trial.number:04d}"
        trial.set_user_attr("config_overrides", config_sets)
        trial.set_user_attr("run_dir", str(run_root))
        tags = {"optuna.study": self.study_name, "optuna.trial_number": trial.number, "medimgen.tuning_trial": "true"}
        param_tags = {f"param.{k}": v for k, v in values.items()}
        tracker = Tracker(enabled=self.runs.enabled)
        length = ""
        try:
            cfg = self.trial_config(config_sets)
            run = cfg.train_for(self.model)
            length = f"{run.epochs} epoch(s) x {run.iterations_per_epoch} iteration(s)"
            scores = self._train_and_score(trial, cfg, run_root, tracker, tags)
        except optuna.TrialPruned as e:
            self.runs.log(tracker.run_id, {}, tags={"optuna.state": "PRUNED"})
            self.echo(f"trial {trial.number}: {e}")
            raise
        except FAILURES as e:
            if is_oom(e) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            reason = ("out of memory: " if is_oom(e) else "") + f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            run_id = tracker.run_id or self.runs.stub_run(self.parent, run_root.name, {**tags, **param_tags})
            raise self._fail(trial, reason, run_id) from None
        obj = objectives.values(scores, self.metrics)
        trial.set_user_attr("scores", {k: (v if math.isfinite(v) else None) for k, v in scores.items()})
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
        trial.set_user_attr("budget", length)
        result = tuple(obj.values())
        if not all(math.isfinite(v) for v in result):
            raise self._fail(trial, f"non-finite objective values {obj}", tracker.run_id, scores)
        value = result if self.objective == "pareto" else objectives.scalar(
            obj, float(self.space.objective["ms_ssim_gap_weight"]))
        logged = {**scores, **{f"objective.{k}": v for k, v in obj.items()}}
        if self.objective == "scalar":
            logged["objective.scalar"] = value
        self.runs.log(tracker.run_id, logged, tags={"optuna.state": "COMPLETE", **param_tags}, params=values)
        self.runs.log(tracker.run_id, quality_metrics(scores), step=optimizer_steps(cfg.train_for(self.model),
                                                                                     cfg.train_for(self.model).epochs))
        _keep_sampling_weights(run_root)
        self.echo(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in obj.items())
                  + (f"  (scalar {value:.4g})" if self.objective == "scalar" else "")
                  + f"  [{length}; {run_root}]")
        return value

    def after_trial(self, study, frozen) -> None:
        """Optuna callback: the running best values on the parent run."""
        import optuna

        front = best_trials(study, self.objective)
        metrics = {"trials_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)}
        if front and self.objective == "scalar":
            metrics["best_objective"] = front[0].value
        elif front:
            metrics["pareto_front_size"] = len(front)
            for i, k in enumerate(self.metrics):
                best = min if objectives.METRICS[k].direction == "minimize" else max
                metrics[f"best_{k}"] = best(t.values[i] for t in front)
        self.runs.log(self.parent, metrics, step=frozen.number)
