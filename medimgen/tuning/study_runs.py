"""MLflow for a study: one parent run per study, shared by all its workers (made once, under the study's lock),
and the per-trial bookkeeping (through medimgen.runs.tracking's
ClientRuns, so trials' own training runs are unaffected). Never stops tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medimgen.runs.tracking import ClientRuns
from medimgen.tuning.study import PARENT_ATTR, study_lock


class StudyRuns(ClientRuns):
    """The study's parent run and the per-trial bookkeeping."""

    def __init__(self, enabled: bool, experiment: str):
        super().__init__(enabled, experiment, what="tuning")

    def parent(self, study, storage, tags: dict, params: dict, artifacts: Sequence[Path]) -> str | None:
        """The study's parent run: the one recorded in the study, else a new one (or `mlflow run`'s)."""
        return self._guard("parent run", lambda: self._parent(study, storage, tags, params, artifacts))

    def _parent(self, study, storage, tags: dict, params: dict, artifacts: Sequence[Path]) -> str | None:
        run_tags = {k: v for k, v in tags.items() if k != "run_name"}
        attached = self.attach_project_run(tags["run_name"], {**run_tags, "medimgen.tuning_parent": "true"})
        if attached:  # under `mlflow run`: the run MLflow made is the parent of this invocation's trials
            if not study.user_attrs.get(PARENT_ATTR):
                study.set_user_attr(PARENT_ATTR, attached)
            return attached
        known = study.user_attrs.get(PARENT_ATTR)
        if known and self.reopen(known):
            return known
        with study_lock(storage, study.study_name):  # check and set: one parent for all workers of the study
            known = _reload_attrs(study, storage).get(PARENT_ATTR)  # another worker may have been faster
            if known and self.reopen(known):
                return known
            run_id = self._create(tags["run_name"], run_tags)
            study.set_user_attr(PARENT_ATTR, run_id)
        self.log_params(run_id, params, artifacts)
        return run_id

    def stub_run(self, parent: str | None, name: str, tags: dict) -> str | None:
        """An MLflow run for a trial that failed before training started one."""
        return self.create(name, tags, parent, what="stub run")


def _reload_attrs(study, storage) -> dict:
    """The study's user attributes as stored now (another process may have written them)."""
    import optuna

    return optuna.load_study(study_name=study.study_name, storage=storage).user_attrs
