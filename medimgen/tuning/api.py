"""`medimgen tune`: search the planner's heuristic values with Optuna, judged by generation quality.

- One study per dataset / model / dimensionality / objective, named
  ``DatasetXXX_Name/<model>/<dim>/<objective>``, stored in
  ``medimgen_results/DatasetXXX_Name/tuning/optuna.db`` (sqlite) unless ``--storage`` names a
  journal file (several workers on one machine) or an RDB URL such as PostgreSQL (several
  machines). An existing study is continued (``load_if_exists``): ``--trials N`` adds N trials.
- Objectives (both minimised): FID on a named feature extractor and the MS-SSIM gap to the
  real images (autoencoders: rFID of reconstructions and 1 - their MS-SSIM). ``pareto``: a
  multi-objective study (NSGA-II, Pareto front; no pruning). ``scalar``: TPE on
  ``fid + ms_ssim_gap_weight * gap`` with median pruning on each epoch's validation loss.
- Each trial is a short training run (budget in the search-space file) in its own folder
  ``tuning/<model>_<dim>_<objective>/trial_NNNN`` and its own MLflow run, nested under one
  parent run per study that also carries the running best values.
- A trial that fails (non-finite loss, out of memory, an invalid combination of values) is
  marked FAIL with its reason (Optuna user attribute, MLflow tag) and the study goes on.
- ``--apply-best`` writes the best trial's values (lowest FID on the Pareto front) into the
  dataset's medimgen_config.yaml, after a backup; the file is then marked as edited, so
  ``medimgen plan`` will not overwrite it without --force.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from medimgen.config import apply_overrides, load_config
from medimgen.config.io import render_yaml
from medimgen.config.schema import GenerationConfig, MedimgenConfig
from medimgen.errors import MedimgenError
from medimgen.tuning.space import SearchSpace, load_space

OBJECTIVES = ("pareto", "scalar")
PARENT_ATTR = "mlflow_parent_run_id"
SPACE_ATTR = "search_space"


class TrialFailed(MedimgenError):
    """A trial that could not produce objective values; Optuna records it as FAIL and goes on."""


@dataclass
class TuneResult:
    study_name: str
    storage: str
    trials: int  # all trials in the study
    completed: int
    parent_run_id: str | None
    best: list[dict]  # Pareto front (pareto) or the best trial (scalar): number, values, params
    applied: Path | None = None
    backup: Path | None = None


def open_storage(storage: str | None, default_db: Path):
    """(Optuna storage, description): sqlite by default; a journal file; or an RDB URL."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not storage:
        default_db.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{default_db}"
        return url, url
    if storage.startswith("journal:") or storage.endswith((".log", ".journal", ".jsonl")):
        path = Path(storage.removeprefix("journal:")).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
    if "://" in storage:
        return storage, storage
    if storage.endswith((".db", ".sqlite", ".sqlite3")):
        path = Path(storage).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}", f"sqlite:///{path}"
    raise MedimgenError(f"--storage must be a journal file (*.log, *.journal or journal:PATH), an sqlite file "
                        f"(*.db) or an RDB URL (sqlite:///..., postgresql://user:pw@host/db); got {storage!r}")


def _load_study(storage, description: str, name: str, objective: str, space: SearchSpace):
    import optuna

    pareto = objective == "pareto"
    sampler = (optuna.samplers.NSGAIISampler(population_size=int(space.objective["nsga2_population_size"]))
               if pareto else optuna.samplers.TPESampler())
    pruner = (optuna.pruners.NopPruner() if pareto else
              optuna.pruners.MedianPruner(n_startup_trials=int(space.pruner["n_startup_trials"]),
                                          n_warmup_steps=int(space.pruner["n_warmup_steps"])))
    directions = ["minimize", "minimize"] if pareto else ["minimize"]
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
    except Exception as e:
        raise MedimgenError(f"cannot open the Optuna storage {description} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]})") from None
    if len(study.directions) != len(directions):
        raise MedimgenError(f"study {name} in {description} has {len(study.directions)} objective(s), "
                            f"--objective {objective} needs {len(directions)}")
    signature = space.signature()
    recorded = study.user_attrs.get(SPACE_ATTR)
    if recorded is None:
        study.set_user_attr(SPACE_ATTR, signature)
        study.set_user_attr("search_space_file", str(space.path))
    elif recorded != signature:
        raise MedimgenError(f"study {name} was made with another search space "
                            f"({study.user_attrs.get('search_space_file', 'unknown file')}); Optuna cannot change a "
                            f"study's parameters: use that space again, or a new --study-name")
    return study


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class _MLflow:
    """The study's parent run and the per-trial bookkeeping, through MlflowClient (no active-run juggling)."""

    def __init__(self, enabled: bool, experiment: str):
        self.enabled = enabled
        self.experiment = experiment
        self.client = None
        if enabled:
            try:
                import mlflow
                from mlflow import MlflowClient

                from medimgen.tracking import resolve_uri

                os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
                mlflow.set_tracking_uri(resolve_uri(None))
                self.client = MlflowClient()
            except Exception as e:
                self._warn("connect", e)

    def _warn(self, what: str, e: Exception) -> None:
        import warnings

        warnings.warn(f"MLflow {what} failed ({type(e).__name__}: {e}); tuning continues without it", stacklevel=3)
        self.enabled = False
        self.client = None

    def experiment_id(self, parent: str | None = None) -> str:
        if parent:
            return self.client.get_run(parent).info.experiment_id
        exp = self.client.get_experiment_by_name(self.experiment)
        return exp.experiment_id if exp else self.client.create_experiment(self.experiment)

    def parent(self, study, tags: dict, params: dict, artifacts: Sequence[Path]) -> str | None:
        """The study's parent run: the one recorded in the study, else a new one (or `mlflow run`'s)."""
        if not self.enabled:
            return None
        try:
            attached = os.environ.get("MLFLOW_RUN_ID")
            if attached:  # under `mlflow run`: the run MLflow made is the parent of this invocation's trials
                self.client.set_tag(attached, "medimgen.tuning_parent", "true")
                for k, v in tags.items():
                    if k != "run_name":
                        self.client.set_tag(attached, k, str(v))
                if not study.user_attrs.get(PARENT_ATTR):
                    study.set_user_attr(PARENT_ATTR, attached)
                return attached
            known = study.user_attrs.get(PARENT_ATTR)
            if known:
                try:
                    self.client.get_run(known)
                    self.client.update_run(known, status="RUNNING")
                    return known
                except Exception:
                    pass
            run_id = self.client.create_run(self.experiment_id(), run_name=tags["run_name"],
                                            tags={k: str(v) for k, v in tags.items() if k != "run_name"}).info.run_id
            study.set_user_attr(PARENT_ATTR, run_id)
            winner = _reload_attrs(study).get(PARENT_ATTR, run_id)  # another worker may have been faster
            if winner != run_id:
                self.client.delete_run(run_id)
                return winner
            for k, v in params.items():
                self.client.log_param(run_id, k, str(v))
            for a in artifacts:
                self.client.log_artifact(run_id, str(a))
            return run_id
        except Exception as e:
            self._warn("parent run", e)
            return None

    def log(self, run_id: str | None, metrics: dict[str, float], step: int = 0, tags: dict | None = None,
            status: str | None = None) -> None:
        if not self.enabled or not run_id:
            return
        try:
            from mlflow.entities import Metric, RunTag

            now = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                   if v is not None and math.isfinite(float(v))],
                                  tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
            if status:
                self.client.set_terminated(run_id, status)
        except Exception as e:
            self._warn("logging", e)

    def experiment_of(self, run_id: str | None) -> str | None:
        if not self.enabled or not run_id:
            return None
        try:
            return self.client.get_experiment(self.client.get_run(run_id).info.experiment_id).name
        except Exception as e:
            self._warn("experiment lookup", e)
            return None

    def stub_run(self, parent: str | None, name: str, tags: dict) -> str | None:
        """An MLflow run for a trial that failed before training started one."""
        if not self.enabled:
            return None
        try:
            all_tags = {k: str(v) for k, v in tags.items()}
            if parent:
                all_tags["mlflow.parentRunId"] = parent
            return self.client.create_run(self.experiment_id(parent), run_name=name, tags=all_tags).info.run_id
        except Exception as e:
            self._warn("stub run", e)
            return None


def _reload_attrs(study) -> dict:
    import optuna

    return optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs


def best_trials(study, objective: str) -> list:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return []
    if objective == "pareto":
        return sorted(study.best_trials, key=lambda t: tuple(t.values))
    return [study.best_trial]


def apply_trial(config_path: Path, dim: str, trial, study_name: str) -> tuple[Path, Path | None]:
    """Write the trial's values into medimgen_config.yaml (backup first); marked as edited, so `medimgen plan`
    keeps it unless --force."""
    from medimgen.planning.memory import fit_to_memory

    full = load_config(config_path)
    base = full.get(dim)
    sets = list(trial.user_attrs.get("config_overrides", []))
    tuned = fit_to_memory(apply_overrides(base, sets), base.memory.target_gb)
    cfg = MedimgenConfig(full.dataset, {**full.configs, dim: tuned}, full.medimgen_version)
    values = ", ".join(f"{v:.4g}" for v in trial.values)
    header = (f"medimgen generation config for {full.dataset.name}; the {dim} section holds the values of trial "
              f"{trial.number} of the Optuna study {study_name} (objectives {values}):\n"
              + "\n".join(f"  {s}" for s in sets)
              + "\nWritten by `medimgen tune --apply-best`; `medimgen plan` keeps this file unless --force.")
    text = render_yaml(cfg, header)
    lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith("# medimgen-checksum:")]
    backup = None
    if config_path.exists():
        backup = config_path.with_name(f"{config_path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        shutil.copy2(config_path, backup)
    tmp = config_path.with_name(config_path.name + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(config_path)
    load_config(config_path)  # what was written must read back
    return config_path, backup


def tune(
    dataset_id: int | str,
    model: str = "ldm",
    model_type: str = "3d",
    trials: int = 20,
    space_path: str | Path | None = None,
    storage: str | None = None,
    objective: str = "pareto",
    study_name: str | None = None,
    splitting: str = "train-val-test",
    fold: int = 0,
    extractor: str = "auto",
    weights: str | Path | None = None,
    autoencoder_run: str | Path | None = None,
    overrides: Sequence[str] = (),
    apply_best: bool = False,
    device: str | None = None,
    timeout: float | None = None,
    track: bool = True,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> TuneResult:
    """Run ``trials`` more trials of the study (creating it if needed); see the module doc."""
    import optuna

    from medimgen import __version__
    from medimgen.data.intensity import IntensityMap
    from medimgen.evaluation.api import objective_names, objective_values, real_images, score_target, target_from_run
    from medimgen.evaluation.features import build_extractor
    from medimgen.paths import medimgen_results
    from medimgen.planning.api import CONFIG_NAME
    from medimgen.planning.memory import fit_to_memory
    from medimgen.plans import DatasetPlans
    from medimgen.tracking import Tracker, git_commit
    from medimgen.training.api import RunSetup, run_dir_for, train

    if objective not in OBJECTIVES:
        raise MedimgenError(f"--objective must be pareto or scalar, got {objective!r}")
    if trials < 0:
        raise MedimgenError("--trials must be 0 or more")
    space = load_space(space_path, model)
    plans = DatasetPlans.from_id(dataset_id)
    config_path = plans.folder / CONFIG_NAME
    if not config_path.is_file():
        raise MedimgenError(f"{config_path} does not exist: run `medimgen plan -d {plans.dataset_id}` first")
    base = apply_overrides(load_config(config_path).get(model_type), list(overrides))
    space.validate(base)
    split_name = "train-val-test" if splitting == "train-val-test" else f"fold_{fold}"
    ae_run = None
    if model == "ldm":
        ae_run = Path(autoencoder_run) if autoencoder_run else run_dir_for(plans, "autoencoder", model_type, split_name).root
        if not (ae_run / "checkpoints" / "last.pt").is_file():
            raise MedimgenError(f"tuning the LDM needs a trained autoencoder: none at {ae_run} "
                                f"(train one, or pass --autoencoder RUN_FOLDER)")

    name = study_name or f"{plans.name}/{model}/{model_type}/{objective}"
    tuning_root = medimgen_results() / plans.name / "tuning"
    storage_obj, storage_desc = open_storage(storage, tuning_root / "optuna.db")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load_study(storage_obj, storage_desc, name, objective, space)
    echo(f"study {name} in {storage_desc}: {len(study.trials)} trial(s) so far, running {trials} more")

    feats = None
    if trials > 0:
        feats = build_extractor(extractor, weights, plans.name, base.data.spatial_dims,
                                IntensityMap.from_config(base.data))
        if feats is None:
            raise MedimgenError("tuning scores trials by FID, and no feature extractor has weights here: train nnU-Net "
                                "on this dataset (--extractor nnunet), or put RadImageNet/MedicalNet/InceptionV3 weights "
                                "in the torch hub cache, or pass --extractor NAME --weights FILE")
    mlf = _MLflow(track and trials > 0, base.tracking.experiment_name or plans.name)
    parent = mlf.parent(
        study,
        tags={"run_name": f"tune_{model}_{model_type}", "medimgen.tuning_parent": "true", "optuna.study": name,
              "medimgen.model": model, "medimgen.dim": model_type, "medimgen.dataset": plans.name,
              "medimgen.version": __version__, "git_commit": git_commit() or "unknown"},
        params={"study": name, "storage": storage_desc, "objective": objective, "space": str(space.path),
                "feature_extractor": feats.name if feats is not None else "none",
                **{f"budget.{k}": v for k, v in space.budget.items()}},
        artifacts=[space.path],
    ) if trials > 0 else None
    env_run = os.environ.pop("MLFLOW_RUN_ID", None)  # trials must not attach to `mlflow run`'s run
    trial_sets = ["tracking.log_models=false", "tracking.output_mode=log"]
    parent_experiment = mlf.experiment_of(parent)
    if parent_experiment:  # trials live in their parent's experiment (the UI nests runs within one experiment)
        trial_sets.append(f"tracking.experiment_name={json.dumps(parent_experiment)}")
    trial_root = tuning_root / f"{model}_{model_type}_{objective}"
    real_cache: dict[tuple, torch.Tensor] = {}
    weight = float(space.objective["ms_ssim_gap_weight"])

    def real_for(cfg: GenerationConfig) -> torch.Tensor:
        key = (tuple(cfg.data.image_size), tuple(cfg.data.crop_size), tuple(cfg.data.spacing))
        if key not in real_cache:
            real_cache[key] = real_images(cfg, plans.name, space.budget["real"], splitting, fold)[0]
        return real_cache[key]

    if trials > 0 and len(real_for(base)) < 2:
        raise MedimgenError(f"only {len(real_for(base))} real image in the '{space.budget['real']}' cases of the split: "
                            f"FID needs at least 2; set budget.real to train or all in {space.path}")

    def run_trial(trial) -> float | tuple[float, float]:
        values = space.sample(trial)
        config_sets = [*overrides, *space.overrides(base, values)]
        trial.set_user_attr("config_overrides", config_sets)
        label = f"trial_{trial.number:04d}"
        run_root = trial_root / label
        trial.set_user_attr("run_dir", str(run_root))
        tags = {"optuna.study": name, "optuna.trial_number": trial.number, "medimgen.tuning_trial": "true"}
        tracker = Tracker(enabled=mlf.enabled)

        def report(epoch: int, metrics: dict) -> None:
            if objective == "scalar" and metrics.get("val_loss") is not None:
                trial.report(float(metrics["val_loss"]), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} (val_loss {metrics['val_loss']:.4g})")

        try:
            if run_root.exists():  # a folder left by a study of the same name that was deleted
                run_root.rename(run_root.with_name(f"{label}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
            cfg = apply_overrides(base, config_sets + space.budget_overrides() + trial_sets)
            cfg = fit_to_memory(cfg, cfg.memory.target_gb)
            setup = RunSetup(config=cfg, run_root=run_root, autoencoder_run=ae_run, tracker=tracker, run_name=label,
                             parent_run_id=parent, tags=tags, on_epoch=report)
            train(model, plans.name, splitting, model_type, fold, device=device, echo=lambda *_: None, setup=setup)
            target = target_from_run(run_root)
            scores = score_target(target, real_for(target.cfg), int(space.budget["num_samples"]), feats,
                                  seed=trial.number, steps=int(space.budget["sampling_steps"]), device=device)
        except optuna.TrialPruned as e:
            mlf.log(tracker.run_id, {}, tags={"optuna.state": "PRUNED"})
            echo(f"trial {trial.number}: {e}")
            raise
        except Exception as e:
            if not isinstance(e, (MedimgenError, ValueError, RuntimeError, torch.OutOfMemoryError)):
                raise
            if _is_oom(e) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            reason = ("out of memory: " if _is_oom(e) else "") + f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            trial.set_user_attr("failure", reason)
            run_id = tracker.run_id or mlf.stub_run(parent, label, {**tags, **{f"param.{k}": v for k, v in values.items()}})
            mlf.log(run_id, {}, tags={"optuna.state": "FAIL", "medimgen.failure": reason}, status="FAILED")
            echo(f"trial {trial.number} failed: {reason}")
            raise TrialFailed(reason) from None
        obj = objective_values(scores, model)
        trial.set_user_attr("scores", {k: (v if math.isfinite(v) else None) for k, v in scores.items()})
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
        result = tuple(obj.values())
        if not all(math.isfinite(v) for v in result):
            reason = f"non-finite objective values {obj}"
            trial.set_user_attr("failure", reason)
            mlf.log(tracker.run_id, scores, tags={"optuna.state": "FAIL", "medimgen.failure": reason})
            raise TrialFailed(reason)
        value = result if objective == "pareto" else result[0] + weight * result[1]
        logged = {**scores, **{f"objective.{k}": v for k, v in obj.items()}}
        if objective == "scalar":
            logged["objective.scalar"] = value
        mlf.log(tracker.run_id, logged, tags={"optuna.state": "COMPLETE",
                                              **{f"param.{k}": v for k, v in values.items()}})
        echo(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in obj.items()) + f"  ({run_root})")
        return value

    def after_trial(study, frozen) -> None:
        front = best_trials(study, objective)
        metrics = {"trials_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)}
        if front:
            keys = objective_names(model)
            if objective == "scalar":
                metrics["best_objective"] = front[0].value
            else:
                metrics["pareto_front_size"] = len(front)
                for i, k in enumerate(keys):
                    metrics[f"best_{k}"] = min(t.values[i] for t in front)
        mlf.log(parent, metrics, step=frozen.number)

    try:
        if trials > 0:
            study.optimize(run_trial, n_trials=trials, timeout=timeout, catch=(TrialFailed,), gc_after_trial=True,
                           callbacks=[after_trial], show_progress_bar=progress)
    finally:
        if env_run is not None:
            os.environ["MLFLOW_RUN_ID"] = env_run
        if parent and mlf.enabled and parent != env_run:
            mlf.log(parent, {}, status="FINISHED")

    front = best_trials(study, objective)
    result = TuneResult(
        study_name=name, storage=storage_desc, trials=len(study.trials),
        completed=sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        parent_run_id=parent or study.user_attrs.get(PARENT_ATTR),
        best=[{"number": t.number, "values": list(t.values), "params": dict(t.params)} for t in front])
    if apply_best:
        if not front:
            raise MedimgenError(f"study {name} has no completed trial yet: nothing to apply")
        result.applied, result.backup = apply_trial(config_path, model_type, front[0], name)
    return result


__all__ = ["TuneResult", "apply_trial", "best_trials", "open_storage", "tune"]
