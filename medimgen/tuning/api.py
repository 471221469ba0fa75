"""`medimgen tune`: search the planner's heuristic values with Optuna, judged by generation quality.

- One study per dataset / model / dimensionality / objective, named
  ``DatasetXXX_Name/<model>/<dim>/<objective>``, stored in
  ``medimgen_results/DatasetXXX_Name/tuning/optuna.db`` (sqlite) unless ``--storage`` names a
  journal file (several workers on one machine) or an RDB URL such as PostgreSQL (several
  machines; Optuna's heartbeat fails a dead worker's trial, which then runs again, and all workers
  share one MLflow parent run). An existing study is continued (``load_if_exists``): ``--trials N``
  adds N trials.
- Objectives (medimgen.tuning.objectives, ``--metrics``): DDPM/LDM: FID on a named feature extractor
  and the MS-SSIM gap to the real images. Autoencoders: rFID of reconstructions and 1 - their
  MS-SSIM when a feature extractor has weights, else 1 - MS-SSIM and L1 (no weights needed);
  PSNR too on request. A study keeps the objectives it was made with. ``pareto``: a
  multi-objective study (NSGA-II, Pareto front; no pruning). ``scalar``: TPE on
  ``fid + ms_ssim_gap_weight * gap`` (the sum of the objectives, the MS-SSIM one weighted) with
  median pruning on each epoch's validation loss.
- Each trial is a short training run (budget in the search-space file; ``--set
  train_<model>.epochs=N`` / ``iterations_per_epoch`` win over it) in its own folder
  ``tuning/<model>_<dim>_<objective>/trial_NNNN`` and its own MLflow run, nested under one
  parent run per study that also carries the running best values.
- Parameters that cannot matter leave the space with a note: those fixed by ``--set``, and the
  weights/settings of losses the config switches off (perceptual_network none, adversarial_weight 0).
- A trial that fails (non-finite loss, out of memory, an invalid combination of values) is
  marked FAIL with its reason (Optuna user attribute, MLflow tag) and the study goes on.
- ``--apply-best`` writes the best trial's values (the best first objective on the Pareto front,
  e.g. the lowest FID) into the dataset's medimgen_config.yaml, after a backup; the file is then
  marked as edited, so ``medimgen plan`` will not overwrite it without --force.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from medimgen.core.atomic import write_text_atomic
from medimgen.config.kinds import kind, the
from medimgen.config import apply_overrides, load_config
from medimgen.config.io import back_up_config, render_yaml
from medimgen.config.schema import MedimgenConfig
from medimgen.core.errors import MedimgenError
from medimgen.core.interrupts import sigterm_interrupts
from medimgen.tuning.objective import TrialFailed, TrialObjective
from medimgen.tuning.study_runs import StudyRuns
from medimgen.tuning.space import load_space, override_key
from medimgen.tuning.study import OBJECTIVES, PARENT_ATTR, best_trials, load_study, open_storage, recorded_objectives


@dataclass
class TuneResult:
    study_name: str
    storage: str
    trials: int  # all trials in the study
    completed: int
    parent_run_id: str | None
    best: list[dict]  # Pareto front (pareto) or the best trial (scalar): number, values, objectives, params
    objectives: tuple[str, ...] = ()  # the objective names, in the order of the values
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
        backup = back_up_config(config_path)
    write_text_atomic(config_path, "".join(lines))
    load_config(config_path)  # what was written must read back
    return config_path, backup


def _check_perceptual_weights(base, space) -> None:
    """Stop before the first trial (not N failed trials) when a perceptual network the trials would use has no
    weights on disk: tuning never downloads."""
    from medimgen.models.perceptual import check_weights_available

    searched = {p.name: p for p in space.params}
    net = searched.get("losses.perceptual_network")
    networks = list(net.choices) if net else [base.losses.perceptual_network]
    if "losses.perceptual_weight" not in searched and base.losses.perceptual_weight == 0:
        return
    for network in networks:
        try:
            check_weights_available(network)
        except MedimgenError as e:
            raise MedimgenError(f"autoencoder trials would use the perceptual loss: {e} (on tune: --set "
                                f"losses.perceptual_network=none; losses.perceptual_weight then leaves the search "
                                f"space)") from None


def _named_values(trial, names: Sequence[str], objective: str) -> dict[str, float]:
    """A trial's objective values by name (scalar studies: each objective, then the scalar it minimised)."""
    from medimgen.tuning import objectives

    if objective == "pareto":
        return dict(zip(names, trial.values))
    scores = {k: v for k, v in trial.user_attrs.get("scores", {}).items() if v is not None}
    return {**objectives.values(scores, names), "scalar": trial.value}


@dataclass
class _Setup:
    """What every trial of this invocation shares (made once, before the study opens)."""

    plans: object  # DatasetPlans
    config_path: Path
    space: object  # tuning.space.SearchSpace, restricted to what can matter
    base: object  # the dataset's GenerationConfig with the user's --set
    config_sets: list[str]
    budget_sets: dict
    dropped: list[str]
    autoencoder_run: Path | None


def _setup(dataset_id, model: str, dim: str, trials: int, space_path, objective: str, overrides: Sequence[str],
           autoencoder_run, splitting: str, fold: int) -> _Setup:
    """Check the request and load what the trials share; one line for whatever is wrong."""
    from medimgen.data.splits import split_name
    from medimgen.core.paths import CONFIG_NAME
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.runs.folders import RunDir

    if objective not in OBJECTIVES:
        raise MedimgenError(f"--objective must be pareto or scalar, got {objective!r}")
    if trials < 0:
        raise MedimgenError("--trials must be 0 or more")
    space = load_space(space_path, model)
    plans = DatasetPlans.planned(dataset_id)
    config_path = plans.folder / CONFIG_NAME
    if not config_path.is_file():
        raise MedimgenError(f"{config_path} does not exist: run `medimgen plan -d {plans.dataset_id}` first")
    config_sets, budget_sets = space.split_budget(list(overrides))
    base = apply_overrides(load_config(config_path).get(dim), config_sets)
    space.validate(base)
    space, dropped = space.restrict(base, [override_key(o) for o in config_sets])
    if kind(model).encoder and trials > 0:
        _check_perceptual_weights(base, space)
    ae_run = None
    if kind(model).upstream == "encoder":
        ae_run = Path(autoencoder_run) if autoencoder_run else RunDir.standard(
            plans.name, the("encoder").name, dim, split_name(splitting, fold)).root
        if not RunDir(ae_run).is_trained():
            raise MedimgenError(f"tuning the LDM needs a trained autoencoder: none at {ae_run} "
                                f"(train one, or pass --autoencoder RUN_FOLDER)")
    return _Setup(plans, config_path, space, base, config_sets, budget_sets, dropped, ae_run)


def _study_disk(base, space, budget_sets: dict, model: str, trials: int) -> int:
    """Bytes ``trials`` more trials leave (best.pt, plots, log of each: a finished trial keeps no last.pt) plus the
    last.pt of the one running (planning.disk's estimates for the trial's run length)."""
    from medimgen.planning.disk import estimate_disk

    e = estimate_disk(apply_overrides(base, space.budget_overrides(budget_sets)), model)
    return trials * (e.best + e.plots) + e.last


def _require_features(names: Sequence[str], feats, model: str, dataset_id) -> None:
    from medimgen.tuning import objectives

    needs = [n for n in names if objectives.METRICS[n].features]
    if needs and feats is None:
        raise MedimgenError(
            f"tuning scores these trials by {', '.join(needs)}, which needs a feature extractor, and none has "
            f"weights here: run `medimgen train-feature-nnunet -d {dataset_id}` (a short nnU-Net training "
            f"whose encoder gives dataset-specific features), or `medimgen weights download radimagenet|"
            f"medicalnet|inception`, or pass --extractor NAME --weights FILE"
            + ("; or score the autoencoder without features: --metrics ms_ssim_loss,l1" if kind(model).encoder
               else ""))


def _optimize(study, objective_fn: TrialObjective, runs: StudyRuns, parent: str | None, trials: int,
              timeout: float | None, progress: bool) -> None:
    """Run the trials; the study's parent run ends FINISHED, FAILED or KILLED with them."""
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
        if parent and runs.enabled and parent != env_run and not _others_running(study):
            runs.log(parent, {}, status=status)  # the last worker of a shared study ends the parent run


def _others_running(study) -> bool:
    """Whether other workers still run trials of the study (this worker's own have ended)."""
    import optuna

    try:
        return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    except Exception:  # the storage is gone: nothing to wait for
        return False


@sigterm_interrupts()  # SIGTERM ends the trial's and the study's MLflow runs as KILLED, like Ctrl-C
def tune(
    dataset_id: int | str | None,
    model: str = "ldm",
    dim: str = "3d",
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
    metrics: str | Sequence[str] | None = None,
    eval_samples: int | None = None,
    eval_steps: int | None = None,
) -> TuneResult:
    """Run ``trials`` more trials of the study (creating it if needed); see the module doc. ``metrics``: the
    objective names (comma-separated or a list; default: see medimgen.tuning.objectives.choose_metrics).
    ``dataset_id`` None: the one planned dataset (said so), else one line listing the planned ones."""
    import optuna

    from medimgen import __version__
    from medimgen.data.intensity import IntensityMap
    from medimgen.evaluation.features import build_extractor
    from medimgen.core.paths import medimgen_results
    from medimgen.runs.tracking import git_commit
    from medimgen.tuning import objectives

    if dataset_id is None:
        from medimgen.core.paths import the_planned_dataset

        dataset_id = the_planned_dataset()
        echo(f"tuning the {model} ({dim}) of {dataset_id}, the one planned dataset")
    st = _setup(dataset_id, model, dim, trials, space_path, objective, overrides, autoencoder_run, splitting, fold)
    plans, space, base = st.plans, st.space, st.base
    for key, value in (("num_samples", eval_samples), ("sampling_steps", eval_steps)):  # --eval-samples/--eval-steps
        if value is not None:
            if value < 1:
                raise MedimgenError(f"--eval-{'samples' if key == 'num_samples' else 'steps'} must be at least 1")
            space = dataclasses.replace(space, budget={**space.budget, key: value})
    if progress:  # trial lines above the progress bar, not glued to it
        from tqdm import tqdm

        echo = tqdm.write
    name = study_name or f"{plans.name}/{model}/{dim}/{objective}"
    tuning_root = medimgen_results() / plans.name / "tuning"
    storage_obj, storage_desc = open_storage(storage, tuning_root / "optuna.db")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    feats_cache: list = []

    def features():
        if not feats_cache:
            feats_cache.append(build_extractor(extractor, weights, plans.name, base.data.spatial_dims,
                                               IntensityMap.from_config(base.data), base.data.plans_identifier))
        return feats_cache[0]

    names, metrics_note = objectives.choose_metrics(metrics, model, objective,
                                                    recorded_objectives(storage_obj, name, model),
                                                    lambda: features() is not None)
    study = load_study(storage_obj, storage_desc, name, objective, space, names)
    echo(f"study {name} in {storage_desc}: {len(study.trials)} trial(s) so far, running {trials} more"
         + (f"; disk: about {_study_disk(base, space, st.budget_sets, model, trials) / 2**30:.2f} GB" if trials else ""))

    parent = None
    if trials > 0:
        for note in [*st.dropped, *([metrics_note] if metrics_note else [])]:
            echo(f"note: {note}")
        feats = features() if any(objectives.METRICS[n].features for n in names) else None
        _require_features(names, feats, model, plans.dataset_id)
        echo(f"objectives: {objectives.describe(names, feats.name if feats is not None else None)}")
        echo(f"trial budget: {space.describe_budget(st.budget_sets)}")
        runs = StudyRuns(track, base.tracking.experiment_name or plans.name)
        objective_fn = TrialObjective(name, plans.name, model, dim, objective, space, base, st.config_sets,
                                      tuning_root / f"{model}_{dim}_{objective}", feats, runs, None,
                                      splitting=splitting, fold=fold, autoencoder_run=st.autoencoder_run,
                                      device=device, echo=echo, metrics=names, budget=st.budget_sets,
                                      progress=progress)
        objective_fn.check()
        parent = runs.parent(
            study, storage_obj,
            tags={"run_name": f"tune_{model}_{dim}", "medimgen.tuning_parent": "true", "optuna.study": name,
                  "medimgen.model": model, "medimgen.dim": dim, "medimgen.dataset": plans.name,
                  "medimgen.version": __version__, "git_commit": git_commit() or "unknown"},
            params={"study": name, "storage": storage_desc, "objective": objective, "space": str(space.path),
                    "objectives": ",".join(names), "feature_extractor": feats.name if feats is not None else "none",
                    "real": "+".join(objective_fn.subsets),
                    **{f"budget.{k}": v for k, v in space.budget.items()},
                    **{f"budget.{k}.set": o for k, o in st.budget_sets.items()}},
            artifacts=[space.path])
        objective_fn.parent = parent
        _optimize(study, objective_fn, runs, parent, trials, timeout, progress)

    front = best_trials(study, objective)
    result = TuneResult(
        study_name=name, storage=storage_desc, trials=len(study.trials),
        completed=sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        parent_run_id=study.user_attrs.get(PARENT_ATTR) if trials == 0 else parent,
        best=[{"number": t.number, "values": list(t.values), "params": dict(t.params),
               "objectives": _named_values(t, names, objective)} for t in front],
        objectives=names)
    if apply_best:
        if not front:
            raise MedimgenError(f"study {name} has no completed trial yet: nothing to apply")
        result.applied, result.backup = apply_trial(st.config_path, dim, front[0], name)
    return result


__all__ = ["TrialFailed", "TuneResult", "apply_trial", "best_trials", "open_storage", "tune"]
