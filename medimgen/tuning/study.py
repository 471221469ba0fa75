"""Optuna study storage: sqlite by default, a journal file for several workers on one machine, an RDB URL
(PostgreSQL) across machines, with heartbeat and retry of a dead worker's trial; a lock every worker of a study
shares; one study per dataset/model/dim/objective that keeps its search space."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from medimgen.core.errors import MedimgenError
from medimgen.tuning.space import SearchSpace

OBJECTIVES = ("pareto", "scalar")
PARENT_ATTR = "mlflow_parent_run_id"
SPACE_ATTR = "search_space"
OBJECTIVES_ATTR = "objectives"  # the objective names, in order
HEARTBEAT_INTERVAL = 60  # seconds between a running trial's heartbeats (server databases)
MAX_RETRY = 3  # a trial failed by heartbeat runs again up to this often
LOCK_TIMEOUT = 120.0  # seconds after which a worker's study_lock counts as abandoned


def open_storage(storage: str | None, default_db: Path, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int | None = None, max_retry: int | None = MAX_RETRY):
    """(Optuna storage, description): sqlite by default; a journal file; or an RDB URL. A server database
    (postgresql://, mysql://: several machines) gets Optuna's heartbeat: a trial whose worker stopped beating for
    ``grace_period`` seconds (default: 3 heartbeats) is failed by the next worker and retried (up to ``max_retry``
    times, same values, new trial number). The description hides the URL's password."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not storage:
        default_db.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{default_db}"
        return url, url
    if storage.startswith("journal:") or storage.endswith((".log", ".journal", ".jsonl")):
        path = Path(storage.removeprefix("journal:")).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
    if "://" in storage and not storage.startswith("sqlite:"):
        description = _hide_password(storage)
        return server_storage(storage, description, heartbeat_interval, grace_period, max_retry), description
    if "://" in storage:
        return storage, storage
    if storage.endswith((".db", ".sqlite", ".sqlite3")):
        path = Path(storage).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}", f"sqlite:///{path}"
    raise MedimgenError(f"--storage must be a journal file (*.log, *.journal or journal:PATH), an sqlite file "
                        f"(*.db) or an RDB URL (sqlite:///..., postgresql://user:pw@host/db); got {storage!r}")


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can read: RDBStorage reports it
        return url.split("@")[-1] if "@" in url else url


def server_storage(url: str, description: str, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                   grace_period: int | None = None, max_retry: int | None = MAX_RETRY):
    """Optuna's RDBStorage on a database server, with heartbeat and retry of stale trials. Workers that start
    together on an empty database race to create Optuna's tables: a failed first attempt is tried again."""
    import random
    import warnings

    import optuna

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    grace = grace_period or 3 * heartbeat_interval
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeat and retry are experimental in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback = {"heartbeat_stale_trial_callback": retry(max_retry=max_retry)} if retry else {
                    "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)}
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace,
                                                  **callback)
        except ModuleNotFoundError as e:
            raise MedimgenError(f"the Optuna storage {description} needs the database driver {e.name}: "
                                f"pip install 'medimgen[postgres]' (PostgreSQL) or that driver") from None
        except Exception as e:
            if attempt == 4 or "already exists" not in str(e) and "IntegrityError" not in type(e).__name__ + str(e):
                raise MedimgenError(f"cannot open the Optuna storage {description} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:300]})") from None
            time.sleep(0.5 + random.random())  # another worker is creating the tables


@contextmanager
def study_lock(storage, name: str, timeout: float = LOCK_TIMEOUT):
    """A mutex shared by every worker of study ``name``, on any storage: a marker study ``<name>.lock`` that
    only one worker can create (Optuna refuses a second study of a name), deleted on leave. A marker older than
    ``timeout`` seconds (its worker died inside) is broken."""
    import optuna

    storage = optuna.storages.get_storage(storage)
    lock = f"{name}.lock"
    seen: dict[int, float] = {}  # when this worker first found a marker without a time (its maker died at once)
    while True:
        try:
            study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], lock)
            storage.set_study_user_attr(study_id, "since", time.time())
            break
        except optuna.exceptions.DuplicatedStudyError:
            try:
                held = storage.get_study_id_from_name(lock)
                since = storage.get_study_user_attrs(held).get("since", seen.setdefault(held, time.time()))
                if time.time() - float(since) > timeout:
                    storage.delete_study(held)
                    continue
            except KeyError:  # released meanwhile
                continue
            time.sleep(0.5)
    try:
        yield
    finally:
        try:
            storage.delete_study(study_id)
        except KeyError:  # broken by another worker after the timeout
            pass


def recorded_objectives(storage, name: str, model: str) -> tuple[str, ...] | None:
    """The objective names of an existing study (None when there is no study of that name yet); a study made
    before the names were recorded was scored by the FID-based defaults."""
    import optuna

    from medimgen.tuning.objectives import default_metrics

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # no such study (KeyError), or a storage load_study() reports in one line
        return None
    recorded = study.user_attrs.get(OBJECTIVES_ATTR)
    return tuple(recorded) if recorded else default_metrics(model)


def load_study(storage, description: str, name: str, objective: str, space: SearchSpace,
               metrics: tuple[str, ...] = ()):
    """Create or continue the study; ``metrics``: its objective names (directions from medimgen.tuning.objectives)."""
    import optuna

    from medimgen.tuning.objectives import directions as metric_directions

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
