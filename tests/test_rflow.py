"""Rectified flow (scheduler type rflow) for the DDPM and the LDM: the training objective, training, sampling with
--steps, determinism, exact resume, and configs written before the scheduler type existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.config import apply_overrides, load_config
from medimgen.config.io import render_yaml
from medimgen.models.diffusion import noised, sampling_scheduler, training_scheduler
from medimgen.core.errors import MedimgenError
from medimgen.generation.sampler import from_run
from medimgen.training.api import train
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides

OLD_CONFIG = Path(__file__).parent / "data" / "Dataset501_config_8GB.yaml"
RFLOW = ["ddpm_scheduler.type=rflow", "ldm_scheduler.type=rflow", "ddpm_scheduler.num_inference_steps=3",
         "ldm_scheduler.num_inference_steps=3"]


def test_config_without_scheduler_type_loads_as_ddpm():
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    import yaml

    old = yaml.safe_load(OLD_CONFIG.read_text())
    assert all("type" not in old[dim][f"{m}_scheduler"] for dim in ("2d", "3d") for m in ("ddpm", "ldm"))
    cfg = load_config(OLD_CONFIG)
    for dim, c in cfg.configs.items():
        for model in ("ddpm", "ldm"):
            assert c.scheduler_for(model).type == "ddpm"
            assert isinstance(training_scheduler(c.scheduler_for(model), c.data.spatial_dims), DDPMScheduler)
    rflow = apply_overrides(cfg, ["ldm_scheduler.type=rflow"])
    assert rflow.get("3d").ldm_scheduler.type == "rflow" and rflow.get("3d").ddpm_scheduler.type == "ddpm"
    assert isinstance(training_scheduler(rflow.get("3d").ldm_scheduler, 3), RFlowScheduler)
    assert "type: rflow" in render_yaml(rflow)  # written with its documentation, read back the same
    with pytest.raises(MedimgenError, match="ldm_scheduler.type"):
        apply_overrides(cfg, ["ldm_scheduler.type=flow"])


@pytest.mark.parametrize("dims", [2, 3])
def test_rflow_objective_is_velocity_and_reproducible(dims):
    cfg = apply_overrides(load_config(OLD_CONFIG), ["ddpm_scheduler.type=rflow"]).get(f"{dims}d").ddpm_scheduler
    sched = training_scheduler(cfg, dims)
    x = torch.randn(3, 2, *[8] * dims)
    a = noised(sched, cfg.prediction_type, x, torch.Generator().manual_seed(5))
    b = noised(sched, cfg.prediction_type, x, torch.Generator().manual_seed(5))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    noisy, t, target = a
    assert t.dtype.is_floating_point and t.shape == (3,) and ((0 <= t) & (t <= cfg.num_train_timesteps)).all()
    noise = x - target  # the target is the velocity images - noise, the noisy input on the line between them
    s = (t / cfg.num_train_timesteps).view(-1, *[1] * (dims + 1))
    torch.testing.assert_close(noisy, (1 - s) * x + s * noise)
    torch.testing.assert_close(noise, torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))
    # sampling goes from the noisy end to the clean end in the asked number of Euler steps
    steps = sampling_scheduler(cfg, None, 7, (8,) * dims)
    assert len(steps.timesteps) == 7 and steps.timesteps[0] > steps.timesteps[-1]
    with pytest.raises(MedimgenError, match="rectified flow"):
        sampling_scheduler(cfg, "ddim", 7, (8,) * dims)
    with pytest.raises(MedimgenError, match="ddim or ddpm"):
        sampling_scheduler(load_config(OLD_CONFIG).get(f"{dims}d").ddpm_scheduler, "rflow", 7, (8,) * dims)


@pytest.fixture(scope="module")
def rflow_root(workspace, tmp_path_factory):
    """medimgen_results of its own where the flow is trained with rectified flow (2d and 3d; the autoencoder is the
    usual one)."""
    root = tmp_path_factory.mktemp("rflow_results")
    mp = pytest.MonkeyPatch()
    mp.setenv("medimgen_results", str(root))
    yield root
    mp.undo()


def _sets(workspace, dim: str, epochs: int = 2) -> list[str]:
    return tiny_overrides(workspace["config"].get(dim), epochs) + RFLOW


class _Runs(dict):
    """{dim: {model: TrainResult}}, each dimensionality trained when first asked for."""

    def __init__(self, workspace):
        super().__init__()
        self.workspace = workspace

    def __missing__(self, dim):
        sets = _sets(self.workspace, dim)
        self[dim] = {m: train(m, ANISO_3D, "train-val-test", dim, overrides=sets, echo=lambda *_: None)
                     for m in ("autoencoder", "ldm", "ddpm")}
        return self[dim]


@pytest.fixture(scope="module")
def rflow_runs(rflow_root, workspace):
    return _Runs(workspace)


@pytest.mark.slow
@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["ddpm", "ldm"])
def test_rflow_trains_and_samples(rflow_runs, dim, kind):
    run = rflow_runs[dim][kind]
    assert run.completed and run.config.scheduler_for(kind).type == "rflow"
    history = json.loads((run.run_dir / "loss_dict.json").read_text())
    assert all(np.isfinite(history["train_loss"])) and all(np.isfinite(history["val_loss"]))
    sampler = from_run(run.run_dir)
    assert sampler.schedule(None, None) == ("rflow", 3) and sampler.schedule("rflow", 5) == ("rflow", 5)
    a = sampler.sample(2, seed=4, steps=2)
    assert a.shape == (2, run.config.data.in_channels, *run.config.data.image_size) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, sampler.sample(2, seed=4, steps=2))
    assert not np.allclose(a, sampler.sample(2, seed=5, steps=2))
    assert not np.allclose(a, sampler.sample(2, seed=4, steps=3))  # the steps are used
    with pytest.raises(MedimgenError, match="rectified flow"):
        sampler.schedule("ddim", None)


@pytest.mark.slow
def test_sample_steps_cli_and_tiled_decoding(rflow_runs, tmp_path):
    run = rflow_runs["3d"]["ldm"]
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "3d", "1", str(tmp_path / "a"), "--model", str(run.run_dir),
                                  "--steps", "4", "--seed", "3", "--tiled-decoding"])
    assert r.exit_code == 0, r.output
    assert "predicted sampling peak" in r.output and "decoding in latent tiles" in r.output
    side = json.loads((tmp_path / "a" / "sample_0000.json").read_text())
    assert side["scheduler"] == "rflow" and side["steps"] == 4 and side["seed"] == 3
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "3d", "1", str(tmp_path / "b"), "--model", str(run.run_dir),
                                  "--scheduler", "ddim"])
    assert r.exit_code != 0 and "rectified flow" in r.output and "Traceback" not in r.output
    # the sampler's tiled decoding gives the same images as decoding in one piece, up to the windows' statistics
    sampler = from_run(run.run_dir)
    whole = sampler.sample_model_range(1, seed=2, steps=2, tiled_decoding=False)
    tiled = sampler.sample_model_range(1, seed=2, steps=2, tiled_decoding=True)
    assert sampler.memory(1, tiled=True).tile is not None
    assert tiled.shape == whole.shape
    assert np.corrcoef(tiled.flatten(), whole.flatten())[0, 1] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ddpm", "ldm"])
def test_rflow_resume_equals_uninterrupted(model, rflow_root, rflow_runs, workspace, tmp_path, monkeypatch):
    """Stop after epoch 1 and continue: identical to the uninterrupted rectified-flow run (same seed)."""
    sets = _sets(workspace, "2d")
    full = rflow_runs["2d"][model]
    if model == "ldm":  # the same autoencoder run, in a results folder of its own
        ae = rflow_runs["2d"]["autoencoder"].run_dir
        shutil.copytree(ae, tmp_path / "r" / ae.relative_to(rflow_root))
    monkeypatch.setenv("medimgen_results", str(tmp_path / "r"))
    first = train(model, ANISO_3D, "train-val-test", "2d", overrides=sets, stop_after_epoch=1, echo=lambda *_: None)
    assert not first.completed
    resumed = train(model, ANISO_3D, "train-val-test", "2d", resume=True, echo=lambda *_: None)
    assert resumed.completed
    a = torch.load(full.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for name in a["modules"]:
        for k, v in a["modules"][name].items():
            torch.testing.assert_close(b["modules"][name][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
    assert a["history"]["train_loss"] == pytest.approx(b["history"]["train_loss"], rel=1e-5)
    assert a["history"]["val_loss"] == pytest.approx(b["history"]["val_loss"], rel=1e-5)
