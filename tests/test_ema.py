"""EMA with warm-up (training/ema.py) and how the loop uses it: raw and EMA validation losses, which weights
plots and best.pt hold, exact resume of the EMA step, and checkpoints written by torch's AveragedModel."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medimgen.training.api import train
from medimgen.training.ema import WeightEMA, effective_decay, warmup_steps
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides


def test_effective_decay_warms_up():
    assert effective_decay(0.999, 0) == pytest.approx(1 / 10)
    assert effective_decay(0.999, 10) == pytest.approx(11 / 20)
    assert effective_decay(0.999, 1000) == pytest.approx(min(0.999, 1001 / 1010))
    assert effective_decay(0.99, 10_000) == 0.99  # capped at the configured decay
    assert warmup_steps(0.999) == 1000 and warmup_steps(0.9) == 10 and warmup_steps(0.5) == 2


def test_update_matches_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEMA(model, decay=0.6)
    assert not any(p.requires_grad for p in ema.module.parameters())
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.6, (1 + step) / (10 + step))  # 0.1, 2/11, 3/12, 4/13
        expected = {k: d * expected[k] + (1 - d) * v for k, v in model.state_dict().items()}
        ema.update(model)
        for k, v in ema.module.state_dict().items():
            torch.testing.assert_close(v, expected[k])
    assert ema.step == 4 and ema.ready == (4 >= warmup_steps(0.6))
    # the copy lags behind the model: it is not just the model's weights
    assert not torch.allclose(ema.module.weight, model.weight)


def test_state_dict_round_trip_and_averaged_model_checkpoints():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    old = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        old.update_parameters(model)
    state = old.state_dict()
    assert int(state["n_averaged"]) == 3 and any(k.startswith("module.") for k in state)
    ema = WeightEMA(model, 0.999)
    ema.load_state_dict(state)  # a last.pt from before the warm-up: n_averaged updates -> step
    assert ema.step == 3
    torch.testing.assert_close(ema.module[0].weight, old.module[0].weight)
    again = WeightEMA(model, 0.999)
    again.load_state_dict(ema.state_dict())
    assert again.step == 3 and set(ema.state_dict()) == {f"module.{k}" for k in model.state_dict()} | {"step"}


def _last(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _best(run_dir):
    return torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("decay, ready", [(0.5, True), (0.999, False)])
def test_validation_and_best_checkpoint_with_ema(decay, ready, workspace, tmp_path, monkeypatch):
    """Both losses are in the history and MLflow; best.pt and the plot title follow the EMA's readiness
    (0.5: ready after 2 of the run's 4 optimiser steps; 0.999: still warming up, the raw weights are used)."""
    from mlflow import MlflowClient

    from medimgen.training import outputs

    titles, save = [], outputs.save_images
    monkeypatch.setattr(outputs, "save_images", lambda rows, stem, vr, title, *a: titles.append(title) or
                        save(rows, stem, vr, title, *a))
    sets = tiny_overrides(workspace["config"].get("2d")) + [f"train_ddpm.ema_decay={decay}"]
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    result = train("ddpm", ANISO_3D, "5-fold", "2d", fold=0, overrides=sets, echo=lambda *_: None)
    history = json.loads((result.run_dir / "loss_dict.json").read_text())
    assert len(history["val_loss"]) == len(history["val_loss_ema"]) == 2
    assert all(v == v and v is not None for v in history["val_loss"] + history["val_loss_ema"])
    assert history["val_loss"] != history["val_loss_ema"]  # two different sets of weights
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "val_loss_ema")] == [1, 2]
    last, best = _last(result.run_dir), _best(result.run_dir)
    assert int(last["ema"]["step"]) == 4 and last["sampling_ema"] is ready and best["ema_weights"] is ready
    source = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")} if ready \
        else last["modules"]["unet"]
    if best["epoch"] == last["epoch"]:
        for k, v in best["modules"]["unet"].items():
            torch.testing.assert_close(v, source[k])
    selected = history["val_loss_ema" if ready else "val_loss"]
    assert best["best_val"] == pytest.approx(min(selected))
    # epoch 1: 2 updates (ready at 0.5), epoch 2: 4
    assert titles[0].endswith("| EMA weights (step 2)" if ready else "| raw weights (EMA warm-up, step 2)")
    assert titles[1].endswith("| EMA weights (step 4)" if ready else "| raw weights (EMA warm-up, step 4)")


def test_resume_keeps_the_ema_step_and_reads_averaged_model_checkpoints(workspace, tmp_path, monkeypatch):
    """Stop after epoch 1, rewrite last.pt as the loop wrote it before the warm-up existed (AveragedModel state,
    no sampling_ema / best_ema), continue: the EMA step continues from n_averaged."""
    sets = tiny_overrides(workspace["config"].get("2d")) + ["train_ddpm.val_plot_interval=5"]
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    first = train("ddpm", ANISO_3D, "5-fold", "2d", fold=1, overrides=sets, stop_after_epoch=1, echo=lambda *_: None)
    path = first.run_dir / "checkpoints" / "last.pt"
    state = _last(first.run_dir)
    assert int(state["ema"]["step"]) == 2
    ema = {k: v for k, v in state["ema"].items() if k != "step"}
    ema["n_averaged"] = torch.tensor(2, dtype=torch.long)
    state["ema"] = ema
    del state["sampling_ema"], state["best_ema"]
    torch.save(state, path)
    resumed = train("ddpm", ANISO_3D, "5-fold", "2d", fold=1, resume=True, echo=lambda *_: None)
    assert resumed.completed
    last = _last(resumed.run_dir)
    assert int(last["ema"]["step"]) == 4 and "n_averaged" not in last["ema"]
    assert last["best_ema"] is False  # the first validation after resuming replaced the old (EMA) best.pt by raw weights
