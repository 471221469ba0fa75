"""MLflow for a study: one parent run per study, trial bookkeeping, all through MlflowClient
(no active-run juggling, so trials' own training runs are unaffected). Never stops tuning."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

from medimgen.tuning.study import PARENT_ATTR


class StudyRuns:
    """The study's parent run and the per-trial bookkeeping, through MlflowClient (no active-run juggling)."""

    def __init__(self, enabled: bool, experiment: str):
        self.enabled = enabled
        self.experiment = experiment
        self.client = None
        if enabled:
            try:
                from mlflow import MlflowClient

                from medimgen.tracking import connect

                connect()  # bounded HTTP calls; fails at once when the server is down
                self.client = MlflowClient()
            except Exception as e:
                self._warn("connect", e)

    def _warn(self, what: str, e: Exception) -> None:
        import warnings

        from medimgen.tracking import brief

        warnings.warn(f"MLflow {what} failed ({brief(e)}); tuning continues without it", stacklevel=3)
        self.enabled = False
        self.client = None

    def experiment_id(self, parent: str | None = None) -> str:
        if parent:
            return self.client.get_run(parent).info.experiment_id
        from medimgen.tracking import ensure_experiment

        return ensure_experiment(self.experiment, self.client)

    def parent(self, study, storage, tags: dict, params: dict, artifacts: Sequence[Path]) -> str | None:
        """The study's parent run: the one recorded in the study, else a new one (or `mlflow run`'s)."""
        if not self.enabled:
            return None
        try:
            attached = os.environ.get("MLFLOW_RUN_ID")
            if attached:  # under `mlflow run`: the run MLflow made is the parent of this invocation's trials
                from medimgen.tracking import attach_project_run

                name = attach_project_run(attached, tags["run_name"], self.experiment, self.client)
                if name:
                    self.client.update_run(attached, name=name)
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
            winner = _reload_attrs(study, storage).get(PARENT_ATTR, run_id)  # another worker may have been faster
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


def _reload_attrs(study, storage) -> dict:
    """The study's user attributes as stored now (another process may have written them)."""
    import optuna

    return optuna.load_study(study_name=study.study_name, storage=storage).user_attrs
