"""MLflow as users see it: `mlflow run` names and continues runs, experiments open in MLflow 3's
model-training view, the pyfunc model is typed (no "Add type hints" warning), `plan --explain`
reads an existing config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
from click.testing import CliRunner
from mlflow import MlflowClient

from medimgen.cli import main
from medimgen.runs.tracking import CONTINUES_TAG, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker
from tests.conftest import ANISO_3D, plan_once
from tests.training_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent


def _mlflow_run(env: dict, cwd: Path, entry: str, params: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(EXE / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local", *extra]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_mlflow_run_names_its_run_and_continues_it(workspace, tmp_path):
    """No --experiment-name: MLflow's Default experiment (said once), medimgen's run name; then
    `-P continue=true` continues that training run, and the new `mlflow run` run points to it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                                                             "MLFLOW_EXPERIMENT_NAME")}
    env.update(medimgen_results=str(tmp_path / "results"), MLFLOW_TRACKING_URI=uri,
               PATH=f"{EXE}{os.pathsep}{env.get('PATH', '')}")
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1) + ["tracking.log_models=false"]
    params = {"dataset": ANISO_3D, "model_type": "2d", "overrides": " ".join(sets)}
    first = _mlflow_run(env, tmp_path, "train_ddpm", params)
    client = MlflowClient(tracking_uri=uri)
    default = client.get_experiment_by_name("Default")
    (run,) = client.search_runs([default.experiment_id])
    assert run.info.run_name == "ddpm_2d_train-val-test" and run.info.status == "FINISHED"
    assert first.stderr.count("Default experiment") == 1
    assert "--experiment-name Dataset201_Aniso" in first.stderr
    assert default.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # an experiment medimgen used, without a kind

    params["overrides"] = params["overrides"].replace("train_ddpm.epochs=1", "train_ddpm.epochs=2")
    second = _mlflow_run(env, tmp_path, "train_ddpm", {**params, "continue": "true"},
                         "--experiment-name", "Dataset201_Aniso")
    assert "Default experiment" not in second.stderr
    continued = client.get_run(run.info.run_id)
    assert continued.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    exp = client.get_experiment_by_name("Dataset201_Aniso")  # created by `mlflow run`, given the kind by medimgen
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    (pointer,) = client.search_runs([exp.experiment_id])
    assert pointer.data.tags[CONTINUES_TAG] == run.info.run_id
    assert pointer.info.run_name == "continue_ddpm_2d_train-val-test"
    history = json.loads((tmp_path / "results" / "Dataset201_Aniso" / "ddpm" / "2d" / "train-val-test" /
                          "loss_dict.json").read_text())
    assert len(history["val_loss"]) == 2


def test_experiments_open_in_the_model_training_view(tmp_path, monkeypatch):
    """Experiments medimgen creates get mlflow.experimentKind=custom_model_development; existing ones
    get it when they have no kind, a kind set by the user stays."""
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    try:
        tracker = Tracker()
        assert tracker.start("Dataset777_New", "ddpm_3d_train-val-test")
        tracker.end()
        client = MlflowClient()
        client.create_experiment("Dataset778_Old")
        client.create_experiment("Dataset779_Genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
        for name in ("Dataset778_Old", "Dataset779_Genai"):
            tracker = Tracker()
            assert tracker.start(name, "ddpm_3d_train-val-test")
            tracker.end()
        kind = lambda name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)  # noqa: E731
        assert kind("Dataset777_New") == kind("Dataset778_Old") == EXPERIMENT_KIND
        assert kind("Dataset779_Genai") == "genai_development"
    finally:
        mlflow.set_tracking_uri(before)


def test_project_run_keeps_a_user_name_and_notes_default_once(tmp_path, capsys, monkeypatch):
    """What train/tune/evaluate do with the run `mlflow run` made: medimgen's name only over MLflow's made-up one."""
    import medimgen.runs.tracking as tracking

    monkeypatch.setattr(tracking, "_noted_default", False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    made_up = client.create_run("0").info  # Default experiment, MLflow's random name
    named = client.create_run("0", run_name="my-baseline").info
    assert tracking.attach_project_run(made_up.run_id, "tune_ldm_3d", "Dataset201_Aniso", client) == "tune_ldm_3d"
    assert tracking.attach_project_run(named.run_id, "tune_ldm_3d", "Dataset201_Aniso", client) is None
    assert capsys.readouterr().err.count("Default experiment") == 1
    assert client.get_experiment("0").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_logged_model_has_type_hints_and_predicts(workspace, tmp_path, monkeypatch):
    """Training logs the sampler without MLflow's "Add type hints" warning, in an experiment it creates
    with the model-training kind; the model predicts from a dict and from a list of requests."""
    from medimgen.training.api import train

    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    warnings.onceregistry.clear()  # MLflow shows its type-hint warnings once per process
    try:
        sets = tiny_overrides(workspace["config"].get("2d"), epochs=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train("ddpm", ANISO_3D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None)
        hints = [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
        assert not hints, hints
        client = MlflowClient()
        assert client.get_experiment_by_name("Dataset201_Aniso").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
        model = mlflow.pyfunc.load_model("models:/Dataset201_Aniso_ddpm_2d/1")
        assert model.metadata.run_id == result.mlflow_run_id
        one = model.predict({"num_images": 2, "seed": 3, "steps": 2})
        both = model.predict([{"num_images": 2, "seed": 3, "steps": 2}, {"num_images": 1, "seed": 4, "steps": 2}])
        assert isinstance(one, np.ndarray) and one.shape[:2] == (2, 2) and both.shape[0] == 3
        np.testing.assert_allclose(both[:2], one, rtol=1e-5, atol=1e-5)
    finally:
        mlflow.set_tracking_uri(before)


def test_plan_explain_reads_the_existing_config(nnunet_env, monkeypatch):
    from medimgen.planning import api

    path = nnunet_env["nnUNet_preprocessed"] / "Dataset201_Aniso" / "medimgen_config.yaml"
    plan_once(ANISO_3D)  # the session's plan (made once)
    mtime, text = path.stat().st_mtime_ns, path.read_text()

    def no_planning(*args, **kwargs):
        raise AssertionError("plan --explain re-planned an existing config")

    monkeypatch.setattr(api, "build_config", no_planning)
    start = time.perf_counter()
    r = CliRunner().invoke(main, ["plan", "-d", str(ANISO_3D), "--explain"])
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - start < 30  # (0.2 s here after planning in this process; re-planning: 67 s)
    assert f"{path} exists" in r.output and "peak GB" in r.output and "3d: image" in r.output
    assert path.stat().st_mtime_ns == mtime and path.read_text() == text
    # anything else asked re-plans
    r = CliRunner().invoke(main, ["plan", "-d", str(ANISO_3D), "--explain", "--gpu-memory", "8"])
    assert r.exit_code != 0 and "re-planned an existing config" in repr(r.exception)
