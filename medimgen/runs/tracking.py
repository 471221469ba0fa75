"""MLflow behind one small interface that never stops training.

- Tracking URI: the config's ``tracking.tracking_uri``, else $MLFLOW_TRACKING_URI, else the
  embedded ``sqlite:///mlflow.db`` (artifacts in ./mlruns).
- Under ``mlflow run`` ($MLFLOW_RUN_ID set) the run MLflow created is attached to: it gets medimgen's run
  name unless the user named it (``--run-name``); MLflow creates it before medimgen knows the dataset and
  cannot move it, so a run in MLflow's Default experiment is said so once (``--experiment-name`` fixes it).
- A resumed training run continues its MLflow run (its id is stored in the checkpoint), also under
  ``mlflow run -P continue=true``: the run MLflow created for that command then only points to it.
- Experiments medimgen creates or uses carry ``mlflow.experimentKind=custom_model_development`` (unless
  they have a kind already). MLflow 3.17's UI does not open the model-training view from that tag: it keeps the
  view in the browser (default GenAI) or takes it from the URL, so every link medimgen prints ends with
  ``workflowType=machine_learning`` (:func:`runs_view_url`).
- Experiments medimgen creates on a sqlite store keep their artifacts beside the database (:func:`artifact_location`).
- Every MLflow call is bounded: the HTTP client gets a short timeout and one retry (unless
  the user set MLflow's own variables), and an http(s) server is probed for a few seconds
  before a run starts. If the server is unreachable or fails mid-run, one warning line says
  so, MLflow is never called again for that run, and training continues with all local outputs.
- SIGTERM during training raises a KeyboardInterrupt (medimgen.core.interrupts), so the run ends
  as KILLED with its local outputs flushed, like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from medimgen.core.errors import MedimgenError

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow reads these per request. Its defaults (7 retries, exponential backoff, 120 s timeout)
# make one call to an unreachable server take about 4 minutes; these make it at most 2 x 5 s.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
PROBE_TIMEOUT_S = 3  # connect and read, for the reachability check of an http(s) server
# MLflow 3's UI opens an experiment by this tag (its values: genai_development, custom_model_development, ...);
# without it, it guesses, and an experiment of training runs opens on the GenAI traces overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
CONTINUES_TAG = "medimgen.continues"  # on the run `mlflow run -P continue=true` made: the run it continued
_noted_default = False  # the Default-experiment note is said once per process


class TrackingUnreachable(MedimgenError):
    """The MLflow tracking server did not answer the reachability check."""


def resolve_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def unreachable_reason(uri: str) -> str | None:
    """Why the http(s) server at ``uri`` gives no answer within a few seconds; None if it answers (or is not http)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return None
    import requests

    try:
        requests.get(uri, timeout=PROBE_TIMEOUT_S, allow_redirects=False, stream=True).close()  # any answer counts
    except requests.exceptions.SSLError:
        pass  # it answered; MLflow applies its own TLS settings (MLFLOW_TRACKING_INSECURE_TLS, ...)
    except (requests.ConnectionError, requests.Timeout) as e:
        return type(e).__name__
    except requests.RequestException:
        pass  # not a reachability question (a malformed URI, ...): MLflow reports it
    return None


def connect(configured: str | None = None) -> str:
    """Point MLflow at the tracking URI with bounded HTTP calls; raise TrackingUnreachable if the server is down."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = resolve_uri(configured)
    why = unreachable_reason(uri)
    if why:
        raise TrackingUnreachable(f"MLflow tracking server {uri} is unreachable: {why}")
    mlflow.set_tracking_uri(uri)
    return uri


def brief(error: BaseException) -> str:
    """An exception as one short line."""
    if isinstance(error, TrackingUnreachable):
        return str(error)
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def _client(client=None):
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def _mark(experiment, client) -> None:
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def mark_experiment(experiment_id: str, client=None) -> None:
    """Give an experiment medimgen uses the model-training kind tag, if it has no kind (a user's kind stays)."""
    client = _client(client)
    _mark(client.get_experiment(experiment_id), client)


def artifact_location(name: str, uri: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite database (``<db folder>/mlruns/<experiment>``), so the
    runs of different stores never share the working directory's ./mlruns (MLflow's default); None (MLflow's choice)
    for any other store, e.g. a server with its own artifact root."""
    import re

    uri = resolve_uri(uri)
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()
    return (db.parent / "mlruns" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)).as_uri()


UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store
RUNS_VIEW = "workflowType=machine_learning"  # MLflow 3's UI opens an experiment in the GenAI view without it


def ui_base(uri: str | None = None) -> str:
    """The MLflow UI of the tracking store: the server itself, or `mlflow ui`'s address for a local store."""
    uri = resolve_uri(uri)
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI_URL


def runs_view_url(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's runs table (model-training view) in the MLflow UI."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}"


def ensure_experiment(name: str, client=None) -> str:
    """The id of experiment ``name``: created with the model-training kind tag (and its artifacts beside a sqlite
    store, see :func:`artifact_location`), or an existing one (its location untouched) given the tag if it lacks a
    kind. Every experiment medimgen creates is made here."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            import mlflow

            return client.create_experiment(name, artifact_location=artifact_location(name, mlflow.get_tracking_uri()),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise MedimgenError(f"MLflow experiment '{name}' is deleted: restore it "
                            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use another name")
    _mark(exp, client)
    return exp.experiment_id


def _is_generated_name(name: str | None) -> bool:
    """Whether ``name`` is one MLflow made up (adjective-noun-123): the user gave the run no name."""
    import re

    m = re.fullmatch(r"([a-z]+)-([a-z]+)-(\d{1,3})", name or "")
    if not m:
        return False
    try:
        from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES
    except ImportError:  # the word lists moved: the shape alone decides
        return True
    return m.group(1) in _GENERATOR_PREDICATES and m.group(2) in _GENERATOR_NOUNS


def attach_project_run(run_id: str, run_name: str, experiment: str, client=None, continues: str | None = None) -> str | None:
    """Prepare the run that `mlflow run` created ($MLFLOW_RUN_ID) for this command.

    Tags its experiment's kind if absent; says once on stderr when it is MLflow's Default experiment
    rather than ``experiment`` (MLflow cannot move runs: `mlflow run --experiment-name` chooses).
    Returns the name to give the run: ``run_name`` while it has MLflow's made-up name (a user's
    ``--run-name`` is kept; MLflow sets it as the command starts), else None. ``continues``: the run
    this command continues, where the metrics go; this one then only points to it (tag and note)."""
    import sys

    from mlflow.entities import Experiment

    global _noted_default
    client = _client(client)
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    _mark(exp, client)
    if continues and continues != run_id:
        client.set_tag(run_id, CONTINUES_TAG, continues)
        client.set_tag(run_id, "mlflow.note.content",
                       f"Continues the training run {continues}: its metrics, params and artifacts are logged there.")
        run_name = f"continue_{run_name}"
    elif exp.name == Experiment.DEFAULT_EXPERIMENT_NAME and experiment != exp.name and not _noted_default:
        _noted_default = True
        print(f"note: this `mlflow run` run is in MLflow's Default experiment (MLflow creates the run before "
              f"medimgen knows the dataset, and runs cannot move); pass `--experiment-name {experiment}` "
              f"to `mlflow run` to put it in the dataset's experiment", file=sys.stderr)
    return run_name if _is_generated_name(run.info.run_name) else None


def start_existing_run(run_id: str):
    """Re-open a run; the process's active experiment is switched to the run's (MLflow requires it)."""
    import mlflow

    experiment_id = mlflow.get_run(run_id).info.experiment_id
    mark_experiment(experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow.start_run(run_id=run_id)


class Guarded:
    """The one failure policy of every MLflow user in medimgen: calls go through :meth:`_guard`, which never raises;
    the first failure warns once ("MLflow <what> failed (<why>); <consequence>") and switches MLflow off for this
    object, so nothing calls a dead server again."""

    consequence = "continuing without MLflow"

    def __init__(self, enabled: bool = True, consequence: str | None = None):
        self.enabled = enabled
        self._warned = False
        if consequence:
            self.consequence = consequence

    def _fail(self, what: str, error: BaseException) -> None:
        if not self._warned:
            warnings.warn(f"MLflow {what} failed ({brief(error)}); {self.consequence}", stacklevel=4)
            self._warned = True
        self.enabled = False
        self._switched_off()

    def _switched_off(self) -> None:
        """What else goes when MLflow is switched off (subclasses)."""

    def _guard(self, what: str, fn, default=None):
        if not self.enabled:
            return default
        try:
            return fn()
        except Exception as e:
            self._fail(what, e)
            return default


class Tracker(Guarded):
    """One MLflow run through MLflow's active run (the training loop's). Every method is safe to call when tracking
    is off or broken, and none calls MLflow once tracking was switched off."""

    consequence = "tracking is off for the rest of this run, training continues and outputs stay in the run folder"

    def __init__(self, enabled: bool = True):
        super().__init__(enabled)
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def _switched_off(self) -> None:
        self._forget_active_run()

    def _forget_active_run(self) -> None:
        """Drop our run from MLflow's active-run stack without a server call: MLflow's own exit hook
        would otherwise try to end it on the dead server."""
        try:
            from mlflow.tracking import fluent

            stack = fluent._active_run_stack.get()
            if stack and stack[-1].info.run_id == self.run_id:
                stack.pop()
        except Exception:
            pass

    def start(self, experiment: str, run_name: str, tracking_uri: str | None = None,
              run_id: str | None = None, tags: dict | None = None) -> str | None:
        return self._guard("start_run", lambda: self._start(experiment, run_name, tracking_uri, run_id, tags))

    def _start(self, experiment: str, run_name: str, tracking_uri: str | None, run_id: str | None,
               tags: dict | None) -> str:
        import mlflow

        connect(tracking_uri)
        project_run = os.environ.get("MLFLOW_RUN_ID")
        if run_id:  # resume our own run (in its own experiment)
            if project_run and project_run != run_id:  # `mlflow run -P continue=true`: its run points here
                name = attach_project_run(project_run, run_name, experiment, continues=run_id)
                if name:
                    mlflow.MlflowClient().update_run(project_run, name=name)
            run = start_existing_run(run_id)
        elif project_run:  # `mlflow run` created the run: attach (its experiment is MLflow's choice)
            run = mlflow.start_run(run_name=attach_project_run(project_run, run_name, experiment))
        else:
            mlflow.set_experiment(experiment_id=ensure_experiment(experiment))
            run = mlflow.start_run(run_name=run_name)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        if tags:
            mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        def go():
            import mlflow

            items = [(k, str(v)[:6000]) for k, v in params.items()]
            existing = mlflow.get_run(self.run_id).data.params if self.run_id else {}
            items = [(k, v) for k, v in items if k not in existing]  # a resumed run keeps its params
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
        self._guard("log_params", go)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        def go():
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        self._guard("log_metrics", go)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            return

        def go():
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        self._guard("log_artifact", go)

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.log_artifact(p, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        def go():
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})
        self._guard("set_tags", go)

    def end(self, status: str = "FINISHED") -> None:
        """End our run with ``status`` if it is still the active one (a second call does nothing)."""
        if not self.run_id:
            return

        def go():
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)
        self._guard("end_run", go)


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Registration:
    model_uri: str
    name: str | None
    version: str | None


DEFAULT_SPLIT = "train-val-test"


def registered_name(dataset: str, kind: str, dim: str, split: str = DEFAULT_SPLIT) -> str:
    """The registry name of a dataset's model: DatasetXXX_Name_<kind>_<dim> for runs of the default train-val-test
    split, DatasetXXX_Name_<kind>_<dim>_<split> (e.g. ``_fold_0``) for any other split, so a quick fold experiment
    never becomes the newest version of the name users sample from."""
    return f"{dataset}_{kind}_{dim}" + ("" if split == DEFAULT_SPLIT else f"_{split}")


def run_facts(run_id: str | None) -> tuple[dict, dict]:
    """(tags, quality/* metrics) of a training run (empty when unknown)."""
    if not run_id:
        return {}, {}
    run = _client().get_run(run_id)
    return dict(run.data.tags), {k: v for k, v in run.data.metrics.items() if k.startswith("quality/")}


def version_description(kind: str, dim: str, run_id: str | None, tags: dict, epochs: int | None,
                        metrics: dict[str, float]) -> str:
    """What a registered version is: its run, split, epochs and quality."""
    quality = ", ".join(f"{k.removeprefix('quality/')}={v:.4g}" for k, v in sorted(metrics.items())) or "not scored"
    return (f"{kind} {dim} of run {run_id or '(none)'} ({tags.get('medimgen.run_dir', '')}); split "
            f"{tags.get('medimgen.split', DEFAULT_SPLIT)}; {epochs if epochs is not None else '?'} epochs; "
            f"quality: {quality}")


def log_model(folder: Path, run_id: str | None = None, registered_name: str | None = None, alias: str | None = None,
              experiment: str = "Default", run_name: str = "register", tags: dict | None = None,
              tracking_uri: str | None = None, metrics: dict[str, float] | None = None,
              description: str | None = None) -> Registration:
    """Log the packaged model in ``folder`` as pyfunc model 'model' ("model from code": medimgen/generation/pyfunc.py,
    weights as safetensors) in run ``run_id`` (else the active run, else a new run in ``experiment``), register it
    as ``registered_name`` (with ``alias``) and tag the version with ``tags`` and ``metrics`` (the run's quality/*;
    logging them to the logged model would repeat them in the run's history), ``description`` on the version."""
    import mlflow
    from mlflow import MlflowClient

    connect(tracking_uri)  # bounded HTTP calls; one line if the server is down
    code = Path(__file__).resolve().parents[1] / "generation" / "pyfunc.py"
    active = mlflow.active_run()
    if run_id and (active is None or active.info.run_id != run_id):
        ctx = start_existing_run(run_id)
    elif active is None:
        mlflow.set_experiment(experiment_id=ensure_experiment(experiment))
        ctx = mlflow.start_run(run_name=run_name)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts={"sampler": str(folder)},
                                       pip_requirements=["medimgen"], registered_model_name=registered_name)
    version = str(info.registered_model_version) if registered_name and info.registered_model_version else None
    if version:
        client = MlflowClient()
        for k, v in {**(tags or {}), **(metrics or {})}.items():
            client.set_model_version_tag(registered_name, version, k, str(v))
        if description:
            client.update_model_version(registered_name, version, description=description)
        if alias:
            client.set_registered_model_alias(registered_name, alias, version)
    return Registration(info.model_uri, registered_name, version)


def download_model(uri: str, dst: Path, marker: str) -> Path:
    """Download the logged model ``uri`` into ``dst``; the folder in it that holds ``marker`` (its packaged files)."""
    import mlflow

    connect()
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:
        raise MedimgenError(f"cannot load MLflow model {uri} ({brief(e)})") from None
    found = sorted(root.rglob(marker))
    if not found:
        raise MedimgenError(f"{uri} is not a medimgen model: it has no {marker}")
    return found[0].parent


def model_run_id(uri: str) -> str | None:
    """The run that logged the model ``uri`` (None when MLflow does not say)."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0]
    try:
        import mlflow

        return mlflow.models.get_model_info(uri).run_id
    except Exception:
        return None


def log_side_run(run_name: str, experiment: str, parent_run_id: str | None, tags: dict, params: dict,
                 metrics: dict[str, float], artifact: Path, what: str) -> str | None:
    """A finished run of its own (an evaluation), nested under ``parent_run_id`` when given, else in ``experiment``;
    under ``mlflow run`` ($MLFLOW_RUN_ID) the run MLflow made is used. Never raises: one warning instead."""
    runs = ClientRuns(True, experiment, what=what, consequence=f"the results of {what} are in {artifact}")
    return runs.side_run(run_name, parent_run_id, tags, params, metrics, artifact)


class ClientRuns(Guarded):
    """Runs addressed by id through MlflowClient (no active-run juggling, so training's own runs are unaffected).
    Never raises: the first failure warns once ("``what`` continues without it") and switches MLflow off."""

    def __init__(self, enabled: bool, experiment: str, what: str = "tuning", consequence: str | None = None):
        super().__init__(enabled, consequence or f"{what} continues without it")
        self.experiment = experiment
        self.what = what
        self.client = None
        if enabled:
            self.client = self._guard("connect", self._connect)

    @staticmethod
    def _connect():
        from mlflow import MlflowClient

        connect()  # bounded HTTP calls; fails at once when the server is down
        return MlflowClient()

    def _switched_off(self) -> None:
        self.client = None

    def side_run(self, run_name: str, parent_run_id: str | None, tags: dict, params: dict,
                 metrics: dict[str, float], artifact: Path) -> str | None:
        """See :func:`log_side_run`."""
        return self._guard("logging", lambda: self._side_run(run_name, parent_run_id, tags, params, metrics, artifact))

    def _side_run(self, run_name: str, parent_run_id: str | None, tags: dict, params: dict,
                  metrics: dict[str, float], artifact: Path) -> str:
        import time

        from mlflow.entities import Metric, Param

        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = self.attach_project_run(run_name, tags)
        if run_id is None:  # (under `mlflow run`, the run MLflow made has its experiment)
            if parent_run_id:
                mark_experiment(self.client.get_run(parent_run_id).info.experiment_id, self.client)
            run_id = self._create(run_name, tags, parent_run_id)
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v],
                              params=[Param(k, str(v)) for k, v in params.items()])
        self.client.log_artifact(run_id, str(artifact))
        if run_id != os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` ends its own run
            self.client.set_terminated(run_id)
        return run_id

    def experiment_id(self, parent: str | None = None) -> str:
        if parent:
            return self.client.get_run(parent).info.experiment_id
        return ensure_experiment(self.experiment, self.client)

    def create(self, name: str, tags: dict, parent: str | None = None, what: str = "create run") -> str | None:
        """A new run named ``name`` (nested under ``parent``; in its experiment, else in ``self.experiment``)."""
        return self._guard(what, lambda: self._create(name, tags, parent))

    def _create(self, name: str, tags: dict, parent: str | None = None) -> str:
        all_tags = {k: str(v) for k, v in tags.items()}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id(parent), run_name=name, tags=all_tags).info.run_id

    def reopen(self, run_id: str) -> bool:
        """Whether run ``run_id`` still exists (then marked RUNNING again)."""
        try:
            self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
            return True
        except Exception:
            return False

    def attach_project_run(self, run_name: str, tags: dict) -> str | None:
        """Under `mlflow run` ($MLFLOW_RUN_ID): that run, named and tagged; else None."""
        attached = os.environ.get("MLFLOW_RUN_ID")
        if not attached:
            return None
        name = attach_project_run(attached, run_name, self.experiment, self.client)
        if name:
            self.client.update_run(attached, name=name)
        for k, v in tags.items():
            self.client.set_tag(attached, k, str(v))
        return attached

    def log_params(self, run_id: str, params: dict, artifacts=()) -> None:
        for k, v in params.items():
            self.client.log_param(run_id, k, str(v))
        for a in artifacts:
            self.client.log_artifact(run_id, str(a))

    def log(self, run_id: str | None, metrics: dict[str, float], step: int = 0, tags: dict | None = None,
            status: str | None = None, params: dict | None = None) -> None:
        """Metrics (at ``step``), tags and ``params`` (those the run does not have yet) of run ``run_id``."""
        if not run_id:
            return

        def go():
            import math
            import time

            from mlflow.entities import Metric, Param, RunTag

            now = int(time.time() * 1000)
            have = self.client.get_run(run_id).data.params if params else {}
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                   if v is not None and math.isfinite(float(v))],
                                  tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
                                  params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items() if k not in have])
            if status:
                self.client.set_terminated(run_id, status)
        self._guard("logging", go)

    def experiment_of(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        return self._guard("experiment lookup",
                           lambda: self.client.get_experiment(self.client.get_run(run_id).info.experiment_id).name)
