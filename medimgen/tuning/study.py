"""Optuna study storage: sqlite by default, a journal file for several workers on one machine, an RDB URL
across machines; one study per dataset/model/dim/objective that keeps its search space."""

from __future__ import annotations

from pathlib import Path

from medimgen.errors import MedimgenError
from medimgen.tuning.space import SearchSpace

OBJECTIVES = ("pareto", "scalar")
PARENT_ATTR = "mlflow_parent_run_id"
SPACE_ATTR = "search_space"
OBJECTIVES_ATTR = "objectives"  # the objective names, in order


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


def recorded_objectives(storage, name: str, model: str) -> tuple[str, ...] | None:
    """The objective names of an existing study (None when there is no study of that name yet); a study made
    before the names were recorded was scored by the FID-based defaults."""
    import optuna

    from medimgen.tuning.metrics import FEATURE_DEFAULT

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # no such study (KeyError), or a storage load_study() reports in one line
        return None
    recorded = study.user_attrs.get(OBJECTIVES_ATTR)
    return tuple(recorded) if recorded else FEATURE_DEFAULT[model]


def load_study(storage, description: str, name: str, objective: str, space: SearchSpace,
               metrics: tuple[str, ...] = ()):
    """Create or continue the study; ``metrics``: its objective names (directions from medimgen.tuning.metrics)."""
    import optuna

    from medimgen.tuning.metrics import directions as metric_directions

    pareto = objective == "pareto"
    sampler = (optuna.samplers.NSGAIISampler(population_size=int(space.objective["nsga2_population_size"]))
               if pareto else optuna.samplers.TPESampler())
    pruner = (optuna.pruners.NopPruner() if pareto else
              optuna.pruners.MedianPruner(n_startup_trials=int(space.pruner["n_startup_trials"]),
                                          n_warmup_steps=int(space.pruner["n_warmup_steps"])))
    directions = (metric_directions(metrics) if metrics else ["minimize", "minimize"]) if pareto else ["minimize"]
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
    except Exception as e:
        raise MedimgenError(f"cannot open the Optuna storage {description} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]})") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise MedimgenError(f"study {name} in {description} has {len(study.directions)} objective(s) "
                            f"({', '.join(d.name.lower() for d in study.directions)}), --objective {objective}"
                            + (f" --metrics {','.join(metrics)}" if metrics else "")
                            + f" needs {len(directions)} ({', '.join(directions)}): use another --study-name")
    signature = space.signature()
    recorded = study.user_attrs.get(SPACE_ATTR)
    if recorded is None:
        study.set_user_attr(SPACE_ATTR, signature)
        study.set_user_attr("search_space_file", str(space.path))
    elif recorded != signature:
        raise MedimgenError(f"study {name} was made with another search space "
                            f"({study.user_attrs.get('search_space_file', 'unknown file')}); Optuna cannot change a "
                            f"study's parameters (the space without what --set fixes or switches off): use that "
                            f"space and the same --set values again, or a new --study-name")
    if metrics and not study.user_attrs.get(OBJECTIVES_ATTR):
        study.set_user_attr(OBJECTIVES_ATTR, list(metrics))
    return study


def best_trials(study, objective: str) -> list:
    """The Pareto front, best first objective first (pareto), or the best trial (scalar)."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return []
    if objective == "pareto":
        signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]
        return sorted(study.best_trials, key=lambda t: tuple(s * v for s, v in zip(signs, t.values)))
    return [study.best_trial]
