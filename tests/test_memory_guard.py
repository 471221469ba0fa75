"""The trainer's memory check in the first steps and its re-fit, on CPU.

No GPU here: the CUDA reading (torch.cuda.max_memory_allocated) and CUDA's out-of-memory error
are the test doubles; the estimate, the re-fit, the live network changes, the loader, config.yaml
and MLflow records are real.
"""

from __future__ import annotations

import pytest
import torch

from medimgen.config import load_generation_config
from medimgen.core.errors import MedimgenError
from medimgen.planning.memory import GIB
from medimgen.training import memory_guard
from medimgen.training.api import train
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides


def _sets(workspace, *extra):
    return [*tiny_overrides(workspace["config"].get("2d"), epochs=2), "memory.target_gb=2",
            "train_ddpm.iterations_per_epoch=4", *extra]


def _run_folder(tmp_path, name):
    from medimgen.training.api import RunSetup

    return RunSetup(run_root=tmp_path / name)


def test_measured_peak_over_target_refits_and_training_goes_on(workspace, monkeypatch, tmp_path):
    readings = iter([2.0 * GIB])  # first check: over the 2 GB target's usable 1.4; then what a refit gives
    monkeypatch.setattr(memory_guard, "measured_peak_bytes", lambda device: next(readings, 0.3 * GIB))
    lines = []
    result = train("ddpm", ANISO_3D, "train-val-test", "2d", overrides=_sets(workspace), echo=lines.append,
                   setup=_run_folder(tmp_path, "refit"))
    assert result.completed and result.epoch == 2
    saved = load_generation_config(result.run_dir / "config.yaml")
    assert saved.ddpm_unet.activation_checkpointing  # first remedy
    assert saved.train_ddpm.batch_size * saved.train_ddpm.grad_accumulation_steps == 2  # effective batch kept
    assert saved == result.config
    assert any(line.startswith("memory re-fit") for line in lines), lines
    assert any("memory: measured peak 2.00 GB" in line for line in lines)

    from mlflow import MlflowClient

    run = MlflowClient().get_run(result.mlflow_run_id)
    assert run.data.metrics["memory.measured_peak_gb"] == pytest.approx(0.3, rel=1e-3)  # the last check
    assert run.data.metrics["memory.predicted_peak_gb"] > 0 and "memory.measured_over_predicted" in run.data.metrics
    assert "ddpm_unet.activation_checkpointing: False -> True" in run.data.tags["memory.refit"]


def test_out_of_memory_in_first_steps_refits(workspace, monkeypatch, tmp_path):
    from medimgen.training.ddpm import DiffusionTask

    real_loss = DiffusionTask.loss
    calls = {"n": 0}

    def loss(self, phase, batch, state):
        calls["n"] += 1
        if calls["n"] == 2:  # the second micro-batch of the run: one optimiser step already done
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, phase, batch, state)

    monkeypatch.setattr(DiffusionTask, "loss", loss)
    lines = []
    result = train("ddpm", ANISO_3D, "train-val-test", "2d", overrides=_sets(workspace), echo=lines.append,
                   setup=_run_folder(tmp_path, "oom"))
    assert result.completed
    saved = load_generation_config(result.run_dir / "config.yaml")
    assert saved.ddpm_unet.activation_checkpointing  # the cheapest remedy was enough for the assumed need
    assert saved.train_ddpm.batch_size * saved.train_ddpm.grad_accumulation_steps == 2
    assert any("ran out of memory in the first steps" in line for line in lines)


def test_later_out_of_memory_stops_with_one_line(workspace, monkeypatch, tmp_path):
    from medimgen.training.ddpm import DiffusionTask

    def validate(self, batches, model):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DiffusionTask, "validate", validate)
    with pytest.raises(MedimgenError) as e:
        train("ddpm", ANISO_3D, "train-val-test", "2d", overrides=_sets(workspace), echo=lambda *_: None,
              setup=_run_folder(tmp_path, "late"))
    message = str(e.value)
    assert "\n" not in message and "validation" in message and "train_ddpm.batch_size" in message
