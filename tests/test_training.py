"""The seed's whole training flow on CPU (2D and 3D): autoencoder -> LDM, and DDPM; outputs and MLflow checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.config import load_generation_config
from medimgen.core.errors import MedimgenError
from medimgen.training.api import train
from tests.conftest import ANISO_3D, plan_once
from tests.training_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _check_outputs(result, dim: str, epochs: int = 2):
    root = result.run_dir
    assert result.completed
    for ckpt in ("checkpoints/last.pt", "checkpoints/best.pt"):
        state = torch.load(root / ckpt, map_location="cpu", weights_only=True)
        assert state["epoch"] >= 1 and state["modules"]
    assert (root / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if dim == "3d":
        from PIL import Image

        gif = Image.open(root / "plots" / f"epoch_{epochs:04d}.gif")
        assert gif.n_frames == result.config.data.image_size[0] > 1
    else:
        assert (root / "plots" / f"epoch_{epochs:04d}.png").read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    from medimgen.training.outputs import PLOT_EXAMPLES

    # several examples (autoencoder: input | output per row), each at least 256 px on its short side, a title above
    width, height = Image.open(next((root / "plots").glob(f"epoch_{epochs:04d}.*"))).size
    columns = 2 if root.parts[-3] == "autoencoder" else PLOT_EXAMPLES  # validation images there: 1 (3d) or 3 (2d)
    assert height >= 20 + 256 and width >= columns * 256
    history = json.loads((root / "loss_dict.json").read_text())
    assert not list(root.rglob("*.pkl")) and not list(root.rglob("*.tmp"))  # nothing to unpickle, no temporary left
    geometry = json.loads((root / "geometry.json").read_text())
    assert geometry["spacing"] == list(result.config.data.spacing) and len(geometry["direction"]) == 9
    assert history["epoch"] == list(range(1, epochs + 1))
    assert len(history["train_loss"]) == len(history["val_loss"]) == epochs
    assert all(v is not None and v == v for v in history["val_loss"])
    if result.config.train_for(root.parts[-3]).ema_decay and root.parts[-3] != "autoencoder":  # raw and EMA weights
        assert len(history["val_loss_ema"]) == epochs and all(v is not None for v in history["val_loss_ema"])
    assert load_generation_config(root / "config.yaml") == result.config
    assert (root / "nnUNetPlans.json").is_file() and (root / "dataset.json").is_file()


def _check_mlflow(result, model: str):
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params[f"train_{model}.epochs"] == "2"
    assert run.data.params["model"] == model
    assert run.data.tags["device"] == "cpu" and run.data.tags["amp_dtype"] == "off"
    assert run.data.tags["medimgen.model"] == model
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "run"} <= artifacts
    assert "checkpoints" not in artifacts  # tracking.log_checkpoints is false by default (tests/test_disk.py)
    assert "run/config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "Dataset201_Aniso"


@pytest.mark.parametrize("dim", ["3d", "2d"])
def test_seed_flow_outputs_and_mlflow(dim, request):
    runs = request.getfixturevalue(f"flow_{dim}")
    for model, result in runs.items():
        _check_outputs(result, dim)
        _check_mlflow(result, model)
        assert result.run_dir.parts[-4:] == (model, dim, "train-val-test") or result.run_dir.parts[-3:] == (model, dim, "train-val-test")
    # the LDM computed its latent scale once and stored it in its config (the one place), which the model loads
    from medimgen.runs.folders import TrainedModel

    ldm = runs["ldm"]
    scale = ldm.config.derived.latent_scale_factor
    assert scale is not None and scale > 0
    ckpt = torch.load(ldm.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert TrainedModel.from_run(ldm.run_dir, "last").scale_factor == pytest.approx(scale)
    reference = Path(ckpt["extra"]["upstream_run"])  # relative to the LDM run: a moved results folder still works
    assert not reference.is_absolute() and (ldm.run_dir / reference).resolve() == runs["autoencoder"].run_dir.resolve()
    # the autoencoder learned something in 2 epochs; the adversarial phase ran after warm-up
    ae_hist = json.loads((runs["autoencoder"].run_dir / "loss_dict.json").read_text())
    assert ae_hist["train_discriminator"][0] is None and ae_hist["train_discriminator"][1] is not None


def test_existing_run_not_overwritten_and_continue_needs_run(flow_2d, workspace):
    sets = tiny_overrides(workspace["config"].get("2d"))
    last = (flow_2d["ddpm"].run_dir / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(MedimgenError, match="already exists .* pass -c to continue"):
        train("ddpm", ANISO_3D, "train-val-test", "2d", overrides=sets)
    assert (flow_2d["ddpm"].run_dir / "checkpoints" / "last.pt").read_bytes() == last
    r = CliRunner().invoke(main, ["train", "ddpm", str(ANISO_3D), "5-fold", "2d", "-c", "--fold", "4"])
    assert r.exit_code == 2 and "nothing to continue" in r.output


def test_ldm_without_autoencoder_is_clear(workspace):
    sets = tiny_overrides(workspace["config"].get("2d"))
    r = CliRunner().invoke(main, ["train", "ldm", str(ANISO_3D), "5-fold", "2d", "--fold", "3", *sum([["--set", s] for s in sets], [])])
    assert r.exit_code == 2 and "no trained autoencoder" in r.output


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("model", ["ddpm", "autoencoder"])
def test_resume_equals_uninterrupted(model, workspace, tmp_path, monkeypatch):
    """Stop after epoch 1, continue with -c: identical to an uninterrupted 2-epoch run (same seed), with the run's
    quality check after every epoch (it builds networks and samples, and must leave the random state as saved)."""
    sets = tiny_overrides(workspace["config"].get("2d")) + [f"train_{model}.val_plot_interval=5",
                                                            f"train_{model}.eval_interval=1"]
    monkeypatch.setenv("medimgen_results", str(tmp_path / "a"))
    full = train(model, ANISO_3D, "5-fold", "2d", fold=1, overrides=sets, echo=lambda *_: None)
    monkeypatch.setenv("medimgen_results", str(tmp_path / "b"))
    first = train(model, ANISO_3D, "5-fold", "2d", fold=1, overrides=sets, stop_after_epoch=1, echo=lambda *_: None)
    assert not first.completed and _state(first.run_dir)["epoch"] == 1
    resumed = train(model, ANISO_3D, "5-fold", "2d", fold=1, resume=True, echo=lambda *_: None)
    assert resumed.completed and resumed.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    a, b = _state(full.run_dir), _state(resumed.run_dir)
    for name in a["modules"]:
        for k, v in a["modules"][name].items():
            torch.testing.assert_close(b["modules"][name][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
    assert a["history"]["train_loss"] == pytest.approx(b["history"]["train_loss"], rel=1e-5)
    assert a["history"]["val_loss"] == pytest.approx(b["history"]["val_loss"], rel=1e-5)
    if a["ema"] is not None:
        assert int(b["ema"]["step"]) == int(a["ema"]["step"]) == 4  # the EMA's warm-up continues where it stopped
        assert a["history"]["val_loss_ema"] == pytest.approx(b["history"]["val_loss_ema"], rel=1e-5)
        for k, v in a["ema"].items():
            if torch.is_tensor(v) and v.is_floating_point():
                torch.testing.assert_close(b["ema"][k], v, rtol=1e-5, atol=1e-6)
    from mlflow import MlflowClient

    steps = [m.step for m in MlflowClient().get_metric_history(resumed.mlflow_run_id, "train_loss")]
    assert steps == [1, 2]


def test_training_survives_tracking_failure(workspace, tmp_path, monkeypatch):
    import mlflow

    sets = tiny_overrides(workspace["config"].get("2d"))
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    calls = {"n": 0}
    real = mlflow.log_metrics

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("tracking server unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train("ddpm", ANISO_3D, "5-fold", "2d", fold=2, overrides=sets, echo=lambda *_: None)
    assert result.completed
    assert any("MLflow log_metrics failed" in str(w.message) for w in caught)
    assert (result.run_dir / "checkpoints" / "best.pt").is_file() and (result.run_dir / "loss_dict.json").is_file()


def test_unreachable_tracking_server_at_start(workspace, tmp_path, monkeypatch):
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1)
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.warns(UserWarning, match="MLflow start_run failed"):
        result = train("ddpm", ANISO_3D, "5-fold", "2d", fold=3, overrides=sets, echo=lambda *_: None)
    assert result.completed and result.mlflow_run_id is None
    assert (result.run_dir / "checkpoints" / "last.pt").is_file()


def test_log_mode_writes_log_txt(workspace, tmp_path, monkeypatch):
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1) + ["tracking.output_mode=log"]
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    printed = []
    result = train("ddpm", ANISO_3D, "5-fold", "2d", fold=4, overrides=sets, echo=printed.append)
    assert not printed
    assert "ddpm epoch 1/1" in (result.run_dir / "log.txt").read_text()


@pytest.mark.slow  # `mlflow run` attaching to its run is also shown by tests/test_mlflow_project.py
def test_mlflow_run_attaches_to_its_run(workspace, tmp_path):
    """`mlflow run . -e train_ldm -P dataset=N --env-manager local` uses the run MLflow created."""
    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["medimgen_results"] = str(tmp_path / "results")
    sets = " ".join(tiny_overrides(workspace["config"].get("2d"), epochs=1))
    exe = Path(sys.executable).parent
    env["PATH"] = f"{exe}{os.pathsep}{env.get('PATH', '')}"
    ae = subprocess.run([str(exe / "medimgen"), "train", "autoencoder", str(ANISO_3D), "train-val-test", "2d",
                         "--overrides", sets], env=env, capture_output=True, text=True, cwd=workspace["base"])
    assert ae.returncode == 0, ae.stderr[-2000:]
    out = subprocess.run([str(exe / "mlflow"), "run", str(REPO), "-e", "train_ldm", "-P", f"dataset={ANISO_3D}",
                          "-P", "model_type=2d", "-P", f"overrides={sets}", "--env-manager", "local",
                          "--experiment-name", "mlproject-test"],
                         env=env, capture_output=True, text=True, cwd=workspace["base"])
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("mlproject-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # attached, not a second run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "ldm" and run.data.tags["medimgen.model"] == "ldm"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 1
    assert (tmp_path / "results" / "Dataset201_Aniso" / "ldm" / "2d" / "train-val-test" / "checkpoints" / "best.pt").is_file()


def test_autoencoder_with_perceptual_loss_from_cached_weights(workspace, tmp_path, monkeypatch):
    """AE training uses the perceptual network whose weights are in the torch hub cache.

    The AlexNet weights file is created by this test (random initialisation) in a temporary TORCH_HOME,
    only to exercise the offline loading path end to end; nothing here is a real LPIPS score.
    """
    import torchvision

    from medimgen.models.perceptual import torchvision_weights_file
    from tests.conftest import FLAT_2D

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    path, _ = torchvision_weights_file("alex")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    cfg = plan_once(FLAT_2D).config.get("2d")
    assert cfg.losses.perceptual_network == "alex"  # 64x64 slices are large enough for AlexNet
    sets = [s for s in tiny_overrides(cfg, epochs=1) if not s.startswith("losses.perceptual_network")]
    result = train("autoencoder", FLAT_2D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None)
    history = json.loads((result.run_dir / "loss_dict.json").read_text())
    assert history["train_perceptual"][0] > 0
    from mlflow import MlflowClient

    assert MlflowClient().get_run(result.mlflow_run_id).data.tags["perceptual_network"] == "alex"
