"""Tuning studies shared by several machines: a real PostgreSQL server on loopback (tests/postgres_helpers.py)
holds the Optuna study. Two `medimgen tune` workers share one study and one MLflow parent run; a trial left
RUNNING by a killed worker is failed by Optuna's heartbeat and retried; the study lock excludes; a URL's
password never shows. Skipped, with the reason, where no server can be started (no binaries, no psycopg2)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from medimgen.core.errors import MedimgenError
from medimgen.tuning.study import open_storage, study_lock
from tests import postgres_helpers
from tests.training_helpers import tiny_overrides

SHARED_2D = 212  # ids in use by other test modules: 201-204, 207, 211, 231

WHY_NOT = postgres_helpers.missing()
needs_postgres = pytest.mark.skipif(WHY_NOT is not None, reason=f"no PostgreSQL server here: {WHY_NOT}")

SPACE = """
budget: {epochs: 1, num_samples: 2, real: val, sampling_steps: 1}
autoencoder:
  losses.kl_weight: {type: float, low: 1.0e-8, high: 1.0e-4, log: true}
  autoencoder.latent_channels: {type: categorical, choices: [3, 4]}
"""


@pytest.fixture(scope="module")
def postgres():
    with postgres_helpers.postgres_server(("optuna", "mlflow", "other", "empty")) as urls:
        yield urls


def test_storage_url_password_never_shows(tmp_path):
    """A server that cannot be reached (or a missing driver) is one line, without the URL's password."""
    with pytest.raises(MedimgenError) as e:
        open_storage("postgresql://someone:s3cret@127.0.0.1:1/optuna", tmp_path / "x.db")
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)
    assert "someone:***@127.0.0.1:1/optuna" in str(e.value)


@needs_postgres
def test_rdb_storage_has_heartbeat_and_retry(postgres, tmp_path):
    storage, description = open_storage(postgres["other"], tmp_path / "x.db", heartbeat_interval=7)
    assert isinstance(storage, optuna.storages.RDBStorage) and description == postgres["other"]
    assert storage.get_heartbeat_interval() == 7 and storage.grace_period == 21
    assert storage.get_heartbeat_stale_trial_callback() is not None


OPEN = """
import sys, time
import optuna
from medimgen.tuning.study import open_storage

time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all together
storage, _ = open_storage(sys.argv[1], None)
optuna.create_study(storage=storage, study_name="together", load_if_exists=True)
"""


@needs_postgres
def test_workers_starting_together_on_an_empty_database(postgres):
    """Four workers open an empty database at the same moment: they race to create Optuna's tables (one wins,
    the others try again) and all open the one study."""
    start = time.time() + 5
    workers = [subprocess.Popen([sys.executable, "-c", OPEN, postgres["empty"], str(start)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, outputs
    assert [s.study_name for s in optuna.get_all_study_summaries(postgres["empty"])] == ["together"]


WORKER = """
import sys, time
import optuna
from medimgen.tuning.study import open_storage

storage, _ = open_storage(sys.argv[1], None, heartbeat_interval=1, grace_period=2)
study = optuna.create_study(storage=storage, study_name="heartbeat", load_if_exists=True)

def objective(trial):
    trial.suggest_float("x", -10, 10)
    open(sys.argv[2], "w").write(str(trial.number))
    time.sleep(600)  # killed here

study.optimize(objective, n_trials=1)
"""


@needs_postgres
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried(postgres, tmp_path):
    """A worker dies (SIGKILL) inside a trial: its trial stays RUNNING until its heartbeat is older than the grace
    period; then the next worker's optimize() fails it and runs it again (same values, a new trial number)."""
    started = tmp_path / "started"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, postgres["optuna"], str(started)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert worker.poll() is None, worker.communicate()[0]
            assert time.time() < deadline, "the worker never started its trial"
            time.sleep(0.2)
        time.sleep(1.5)  # at least one heartbeat is recorded
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    storage, _ = open_storage(postgres["optuna"], tmp_path / "x.db", heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="heartbeat", storage=storage)
    (dead,) = study.trials
    assert dead.state == optuna.trial.TrialState.RUNNING  # nobody has noticed yet
    optuna.storages.fail_stale_trials(study)  # within the grace period: not stale yet
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(3)  # the grace period passes

    seen = []
    study.optimize(lambda t: seen.append(t.suggest_float("x", -10, 10)) or seen[-1] ** 2, n_trials=1)
    dead, retried = study.trials
    assert dead.state == optuna.trial.TrialState.FAIL
    assert retried.state == optuna.trial.TrialState.COMPLETE and retried.number == 1
    assert seen == [dead.params["x"]] and retried.params == dead.params  # the same values ran again
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retried) == 0


@needs_postgres
def test_study_lock_excludes_and_an_abandoned_lock_is_broken(postgres, tmp_path):
    storage, _ = open_storage(postgres["other"], tmp_path / "x.db")
    inside, overlaps = [], []

    def worker():
        with study_lock(storage, "locked"):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not overlaps and not inside
    assert "locked.lock" not in {s.study_name for s in optuna.get_all_study_summaries(storage)}  # released

    abandoned = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "dead.lock")
    storage.set_study_user_attr(abandoned, "since", time.time() - 1000)  # its worker died holding it
    t0 = time.time()
    with study_lock(storage, "dead", timeout=60):
        assert time.time() - t0 < 30


@pytest.fixture(scope="module")
def shared_env(nnunet_roots, tmp_path_factory, postgres):
    """A tiny 2D dataset of its own, planned and preprocessed by nnU-Net; MLflow tracking in PostgreSQL too (the
    shared tracking store of machines that share a study)."""
    from mlflow import MlflowClient

    from medimgen.nnunet.commands import plan_and_preprocess
    from medimgen.planning import plan_dataset
    from medimgen.nnunet.synthetic import make_synthetic_dataset

    base = tmp_path_factory.mktemp("shared")
    make_synthetic_dataset(nnunet_roots["nnUNet_raw"], SHARED_2D, "Shared", num_cases=12, shape=(48, 48),
                           spacing=(0.7, 0.7), channels=1, modality="CT", seed=5)
    mp = pytest.MonkeyPatch()
    for k, v in nnunet_roots.items():
        mp.setenv(k, str(v))
    mp.setenv("medimgen_results", str(base / "results"))
    mp.setenv("MLFLOW_TRACKING_URI", postgres["mlflow"])
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    plan_and_preprocess(SHARED_2D, configurations=("2d",), quiet=True)
    cfg = plan_dataset(SHARED_2D, force=True).config.get("2d")
    MlflowClient().search_experiments()  # the tracking tables exist before the workers start (a server would)
    space = base / "space.yaml"
    space.write_text(SPACE)
    tiny = [o for o in tiny_overrides(cfg) if not o.startswith("train_autoencoder.epochs=")]
    yield {"base": base, "args": ["-d", str(SHARED_2D), "--model", "autoencoder", "-t", "2d", "--space", str(space),
                                  "--metrics", "ms_ssim_loss,l1", "--overrides", " ".join(tiny)]}
    mp.undo()


@needs_postgres
@pytest.mark.slow
def test_two_workers_share_one_postgres_study_and_one_parent_run(shared_env, postgres):
    """Two `medimgen tune --storage postgresql://...` processes started together (as on two machines): they create
    the study's tables and the study at once, take unique trial numbers, and nest all their trials under one MLflow
    parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [str(Path(sys.executable).parent / "medimgen"), "tune", *shared_env["args"], "--trials", "2",
           "--storage", postgres["optuna"], "--study-name", "shared"]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=shared_env["base"]) for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    study = optuna.load_study(study_name="shared", storage=postgres["optuna"])
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # no duplicates, none lost
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {s.study_name for s in optuna.get_all_study_summaries(postgres["optuna"])} == {"shared"}  # no lock left
    for out in outputs:
        assert len(re.findall(r"^trial \d+: ", out, re.M)) == 2, out  # each worker ran two of them
    parent_ids = {re.search(r"MLflow parent run (\w+)", out).group(1) for out in outputs}
    assert parent_ids == {study.user_attrs["mlflow_parent_run_id"]}  # one parent, found by both

    client = MlflowClient()
    exp = client.get_experiment_by_name("Dataset212_Shared")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    parents = [r for r in runs if r.data.tags.get("medimgen.tuning_parent") == "true"]
    assert [p.info.run_id for p in parents] == list(parent_ids)
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["storage"] == postgres["optuna"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3]
    assert all(r.data.tags["optuna.state"] == "COMPLETE" for r in children)
    assert len(runs) == 5  # nothing else: no second parent, not even a deleted one
