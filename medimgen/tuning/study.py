"""Optuna study storage: sqlite by default, a journal file for several workers on one machine, an RDB URL
across machines; one study per dataset/model/dim/objective that keeps its search space."""

from __future__ import annotations

from pathlib import Path

from medimgen.errors import MedimgenError
from medimgen.tuning.space import SearchSpace

OBJECTIVES = ("pareto", "scalar")
PARENT_ATTR = "mlflow_parent_run_id"
SPACE_ATTR = "search_space"


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


def load_study(storage, description: str, name: str, objective: str, space: SearchSpace):
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


def best_trials(study, objective: str) -> list:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return []
    if objective == "pareto":
        return sorted(study.best_trials, key=lambda t: tuple(t.values))
    return [study.best_trial]
