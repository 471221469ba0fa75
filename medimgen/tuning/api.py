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

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from medimgen.config import apply_overrides, load_config
from medimgen.config.io import render_yaml
from medimgen.config.schema import MedimgenConfig
from medimgen.errors import MedimgenError
from medimgen.tracking import sigterm_interrupts
from medimgen.tuning.objective import TrialFailed, TrialObjective
from medimgen.tuning.runs import StudyRuns
from medimgen.tuning.space import load_space
from medimgen.tuning.study import OBJECTIVES, PARENT_ATTR, best_trials, load_study, open_storage


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


@sigterm_interrupts()  # SIGTERM ends the trial's and the study's MLflow runs as KILLED, like Ctrl-C
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
    from medimgen.evaluation.features import build_extractor
    from medimgen.paths import medimgen_results
    from medimgen.planning.api import CONFIG_NAME
    from medimgen.plans import DatasetPlans
    from medimgen.tracking import git_commit
    from medimgen.training.api import run_dir_for

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
    study = load_study(storage_obj, storage_desc, name, objective, space)
    echo(f"study {name} in {storage_desc}: {len(study.trials)} trial(s) so far, running {trials} more")

    if trials > 0:
        feats = build_extractor(extractor, weights, plans.name, base.data.spatial_dims,
                                IntensityMap.from_config(base.data))
        if feats is None:
            raise MedimgenError("tuning scores trials by FID, and no feature extractor has weights here: train nnU-Net "
                                "on this dataset (--extractor nnunet), or put RadImageNet/MedicalNet/InceptionV3 weights "
                                "in the torch hub cache, or pass --extractor NAME --weights FILE")
        runs = StudyRuns(track, base.tracking.experiment_name or plans.name)
        objective_fn = TrialObjective(name, plans.name, model, model_type, objective, space, base, list(overrides),
                                      tuning_root / f"{model}_{model_type}_{objective}", feats, runs, None,
                                      splitting=splitting, fold=fold, autoencoder_run=ae_run, device=device, echo=echo)
        objective_fn.check()
        parent = runs.parent(
            study, storage_obj,
            tags={"run_name": f"tune_{model}_{model_type}", "medimgen.tuning_parent": "true", "optuna.study": name,
                  "medimgen.model": model, "medimgen.dim": model_type, "medimgen.dataset": plans.name,
                  "medimgen.version": __version__, "git_commit": git_commit() or "unknown"},
            params={"study": name, "storage": storage_desc, "objective": objective, "space": str(space.path),
                    "feature_extractor": feats.name, **{f"budget.{k}": v for k, v in space.budget.items()}},
            artifacts=[space.path])
        objective_fn.parent = parent
        env_run = os.environ.pop("MLFLOW_RUN_ID", None)  # trials must not attach to `mlflow run`'s run
        status = "KILLED"  # unless optimize returns or fails
        try:
            study.optimize(objective_fn, n_trials=trials, timeout=timeout, catch=(TrialFailed,), gc_after_trial=True,
                           callbacks=[objective_fn.after_trial], show_progress_bar=progress)
            status = "FINISHED"
        except Exception:
            status = "FAILED"
            raise
        finally:
            if env_run is not None:
                os.environ["MLFLOW_RUN_ID"] = env_run
            if parent and runs.enabled and parent != env_run:
                runs.log(parent, {}, status=status)

    front = best_trials(study, objective)
    result = TuneResult(
        study_name=name, storage=storage_desc, trials=len(study.trials),
        completed=sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        parent_run_id=study.user_attrs.get(PARENT_ATTR) if trials == 0 else parent,
        best=[{"number": t.number, "values": list(t.values), "params": dict(t.params)} for t in front])
    if apply_best:
        if not front:
            raise MedimgenError(f"study {name} has no completed trial yet: nothing to apply")
        result.applied, result.backup = apply_trial(config_path, model_type, front[0], name)
    return result


__all__ = ["TrialFailed", "TuneResult", "apply_trial", "best_trials", "open_storage", "tune"]
