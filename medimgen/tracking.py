"""MLflow behind one small interface that never stops training.

- Tracking URI: the config's ``tracking.tracking_uri``, else $MLFLOW_TRACKING_URI, else the
  embedded ``sqlite:///mlflow.db`` (artifacts in ./mlruns).
- Under ``mlflow run`` ($MLFLOW_RUN_ID set) the run MLflow created is attached to.
- A resumed training run continues its MLflow run (its id is stored in the checkpoint).
- If the tracking server fails mid-run, a warning is printed once, tracking is switched
  off for the rest of the run, and training continues with all local outputs.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterable

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def start_existing_run(run_id: str):
    """Re-open a run; the process's active experiment is switched to the run's (MLflow requires it)."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    return mlflow.start_run(run_id=run_id)


class Tracker:
    """One MLflow run. Every method is safe to call when tracking is off or broken."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._warned = False

    def _fail(self, what: str, error: Exception) -> None:
        if not self._warned:
            warnings.warn(f"MLflow {what} failed ({type(error).__name__}: {error}); "
                          f"training continues, outputs stay in the run folder", stacklevel=3)
            self._warned = True
        self.enabled = False

    def start(self, experiment: str, run_name: str, tracking_uri: str | None = None,
              run_id: str | None = None, tags: dict | None = None) -> str | None:
        if not self.enabled:
            return None
        try:
            import mlflow

            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            mlflow.set_tracking_uri(resolve_uri(tracking_uri))
            if run_id:  # resume our own run (in its own experiment)
                run = start_existing_run(run_id)
            elif os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` created the run: attach, don't set an experiment
                run = mlflow.start_run()
            else:
                mlflow.set_experiment(experiment)
                run = mlflow.start_run(run_name=run_name)
            self.run_id = run.info.run_id
            self.experiment_id = run.info.experiment_id
            if tags:
                mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})
            return self.run_id
        except Exception as e:  # unreachable server, bad URI, ...
            self._fail("start_run", e)
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            import mlflow

            items = [(k, str(v)[:6000]) for k, v in params.items()]
            existing = mlflow.get_run(self.run_id).data.params if self.run_id else {}
            items = [(k, v) for k, v in items if k not in existing]  # a resumed run keeps its params
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
        except Exception as e:
            self._fail("log_params", e)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        try:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        except Exception as e:
            self._fail("log_metrics", e)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if not self.enabled or not Path(path).exists():
            return
        try:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        except Exception as e:
            self._fail("log_artifact", e)

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.log_artifact(p, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})
        except Exception as e:
            self._fail("set_tags", e)

    def end(self, status: str = "FINISHED") -> None:
        if not self.run_id:
            return
        try:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status=status)
        except Exception as e:
            self._fail("end_run", e)
