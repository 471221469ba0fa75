"""MLflow outages never freeze training (issue 12): a port that refuses, a real server killed mid-run,
and SIGTERM ending the MLflow run as KILLED. Loopback only; processes are ended by their own PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

from medimgen.runs.tracking import HTTP_LIMITS, Tracker
from medimgen.training.api import RunSetup, train
from medimgen.runs.folders import RunDir
from medimgen.training.lock import RunLock
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides

BOUND_S = 15  # what an unreachable server may add to a whole training run
EPOCHS = 2


@pytest.fixture(autouse=True)
def _restore_mlflow_uri():
    """A run that started on the test's server makes it MLflow's process-wide URI: later tests must not see it."""
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri
    yield
    utils._tracking_uri = previous


@pytest.fixture
def medimgen_limits(monkeypatch):
    """MLflow's HTTP settings unset, so the limits medimgen applies are the ones tested."""
    for key in HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)


def _timed(tracker: Tracker) -> list[float]:
    """Seconds spent in the tracker's calls (the real ones, timed): what tracking costs the run."""
    spent = [0.0]

    def timing(real):
        def call(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return real(*args, **kwargs)
            finally:
                spent[0] += time.monotonic() - t0
        return call

    for name in ("start", "log_params", "log_metrics", "log_artifact", "set_tags", "end"):
        setattr(tracker, name, timing(getattr(tracker, name)))
    return spent


def _train(workspace, root: Path, tracker: Tracker, on_epoch=None):
    """A tiny DDPM run; returns the result and the seconds spent in tracking."""
    import mlflow  # noqa: F401  (imported before timing: the import is not an outage cost)

    spent = _timed(tracker)
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=EPOCHS)
    result = train("ddpm", ANISO_3D, "5-fold", "2d", fold=0, overrides=sets, echo=lambda *_: None,
                   setup=RunSetup(run_root=root, tracker=tracker, on_epoch=on_epoch))
    return result, spent[0]


def _mlflow_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "MLflow" in str(w.message)]


def _check_local_outputs(result) -> None:
    assert result.completed and result.epoch == EPOCHS
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS
    assert (result.run_dir / "checkpoints" / "best.pt").is_file() and RunDir(result.run_dir).loss_dict.is_file()


def test_refused_port_costs_seconds_and_warns_once(workspace, tmp_path, monkeypatch, medimgen_limits):
    import mlflow

    with socket.socket() as blocker:  # bound, never listening: every connection is refused
        blocker.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{blocker.getsockname()[1]}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result, seconds = _train(workspace, tmp_path / "run", Tracker())
    _check_local_outputs(result)
    assert result.mlflow_run_id is None and mlflow.active_run() is None
    messages = _mlflow_warnings(caught)
    assert len(messages) == 1 and "unreachable" in messages[0] and "\n" not in messages[0], messages
    assert seconds < BOUND_S, seconds


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server on loopback, in its own process group (killed by its PID at the end)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield {"uri": uri, "proc": proc}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group is the server and its own workers
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("outage", ["kill", pytest.param("hang", marks=pytest.mark.slow)])
def test_server_lost_mid_run(outage, workspace, mlflow_server, tmp_path, monkeypatch, medimgen_limits):
    """The server is killed (connections refused) or stopped (connections accepted, never answered) after epoch 1."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    tracker = Tracker()
    logged_before_kill = {}

    def lose_server_after_first_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            client = MlflowClient(tracking_uri=mlflow_server["uri"])
            logged_before_kill["train_loss"] = client.get_metric_history(tracker.run_id, "train_loss")
            os.killpg(mlflow_server["proc"].pid, signal.SIGKILL if outage == "kill" else signal.SIGSTOP)
            if outage == "kill":
                mlflow_server["proc"].wait(timeout=30)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, seconds = _train(workspace, tmp_path / "run", tracker, on_epoch=lose_server_after_first_epoch)
    assert [m.step for m in logged_before_kill["train_loss"]] == [1]  # it was really logging to the server
    _check_local_outputs(result)
    messages = _mlflow_warnings(caught)
    assert len(messages) == 1 and "tracking is off" in messages[0], messages
    assert not tracker.enabled
    assert seconds < BOUND_S, seconds


def test_sigterm_ends_the_run_as_killed(workspace, nnunet_env, tmp_path):
    """`medimgen train` gets SIGTERM mid-run: exit with one line, MLflow run KILLED, last checkpoint on disk, lock
    released."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "medimgen_results": str(tmp_path / "results"), "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1000)
    exe = Path(sys.executable).parent / "medimgen"
    proc = subprocess.Popen([str(exe), "train", "ddpm", str(ANISO_3D), "5-fold", "2d", "-f", "1",
                             "--overrides", " ".join(sets)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (found := list((tmp_path / "results").glob("*/ddpm/2d/*/checkpoints/last.pt"))):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        last = found[0]
        time.sleep(1.0)  # let it start the next epochs
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=BOUND_S + 30)
        except subprocess.TimeoutExpired:  # what it said shows why (e.g. "Exception ignored in ...: Terminated")
            proc.kill()
            pytest.fail(f"still running {BOUND_S + 30} s after SIGTERM; stderr: {proc.communicate()[1][-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted" in stderr
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert 1 <= state["epoch"] < 1000 and RunDir(last.parents[1]).loss_dict.is_file()
    run_info = MlflowClient(tracking_uri=uri).get_run(state["mlflow_run_id"]).info
    assert run_info.status == "KILLED"
    lock = RunLock(last.parents[1])
    assert lock.path.read_text() == ""  # released by the run itself (a killed holder would leave its PID)
    lock.acquire()
    lock.release()
