"""Disk: one full resume checkpoint and one weights-only best.pt per run, checkpoints in MLflow only when asked,
registered versions hold only the sampling weights, and the plan-time disk estimate matches a trained run."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from medimgen.cli import main
from medimgen.planning.disk import TOLERANCE, estimate_disk
from medimgen.generation.sampler import from_run
from medimgen.training.api import train
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides

RESUME_KEYS = {"optimizers", "lr_schedulers", "scalers", "ema", "rng", "history"}
SAMPLING_MODULES = {"autoencoder": {"autoencoder"}, "ddpm": {"unet"}, "ldm": {"unet"}}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("model", ["autoencoder", "ddpm", "ldm"])
def test_run_has_one_resume_and_one_weights_only_checkpoint(model, flow_2d):
    root = flow_2d[model].run_dir
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    last, best = _load(root / "checkpoints" / "last.pt"), _load(root / "checkpoints" / "best.pt")
    assert RESUME_KEYS <= set(last) and not last.get("weights_only")
    assert all(opt["state"] for opt in last["optimizers"].values())  # AdamW moments are in last.pt
    assert best["weights_only"] is True and not RESUME_KEYS & set(best)
    assert set(best["modules"]) == SAMPLING_MODULES[model]  # no discriminator, no optimiser
    assert best["model"] == model and best["config"] and best["mlflow_run_id"] == flow_2d[model].mlflow_run_id
    assert (root / "checkpoints" / "best.pt").stat().st_size < (root / "checkpoints" / "last.pt").stat().st_size / 2
    if best["epoch"] == last["epoch"]:  # same epoch: best.pt holds exactly the weights sampling used from last.pt
        assert best.get("ema_weights", False) is bool(last.get("sampling_ema"))  # the EMA copy once past warm-up
        if best.get("ema_weights"):
            ema = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
            assert best["modules"]["unet"].keys() == ema.keys()
            for k, v in ema.items():
                torch.testing.assert_close(best["modules"]["unet"][k], v)
        else:
            name = "autoencoder" if model == "autoencoder" else "unet"
            for k, v in best["modules"][name].items():
                torch.testing.assert_close(v, last["modules"][name][k])
    if model == "ldm":
        from medimgen.runs.folders import TrainedModel

        assert TrainedModel.from_run(flow_2d[model].run_dir, "best").scale_factor == pytest.approx(
            flow_2d[model].config.derived.latent_scale_factor)


def test_sampling_reads_best_and_falls_back_to_last(flow_2d, tmp_path):
    """A run that has not validated yet (no best.pt) samples from last.pt's weights (EMA once past its warm-up, as
    best.pt): the same images."""
    root = flow_2d["ddpm"].run_dir
    assert _load(root / "checkpoints" / "best.pt")["epoch"] == _load(root / "checkpoints" / "last.pt")["epoch"]
    sampler = from_run(root)
    assert sampler.source.endswith("best.pt")
    copy = tmp_path / "Dataset201_Aniso" / "ddpm" / "2d" / "train-val-test"
    shutil.copytree(root, copy)
    (copy / "checkpoints" / "best.pt").unlink()
    fallback = from_run(copy)
    assert fallback.source.endswith("last.pt")
    np.testing.assert_array_equal(sampler.sample(1, seed=3, steps=2), fallback.sample(1, seed=3, steps=2))


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifact_files(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_checkpoints_go_to_mlflow_only_when_asked(flow_2d, workspace, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    client = MlflowClient()
    for result in flow_2d.values():  # default: tracking.log_checkpoints false
        files = _artifact_files(client, result.mlflow_run_id)
        assert "run/config.yaml" in files and not [f for f in files if f.endswith(".pt")], files
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1) + ["tracking.log_checkpoints=true",
                                                                       "tracking.log_models=false"]
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    result = train("ddpm", ANISO_3D, "5-fold", "2d", fold=0, overrides=sets, echo=lambda *_: None)
    files = _artifact_files(client, result.mlflow_run_id)
    assert {"checkpoints/best.pt", "checkpoints/last.pt"} <= set(files)


def test_bad_log_checkpoints_value_is_one_line(workspace):
    from medimgen.config import apply_overrides
    from medimgen.core.errors import MedimgenError

    with pytest.raises(MedimgenError, match="tracking.log_checkpoints"):
        apply_overrides(workspace["config"].get("2d"), ["tracking.log_checkpoints=sometimes"])


def _registered_size(client, run_id: str) -> tuple[int, set[str]]:
    import mlflow

    (version,) = client.search_model_versions(f"run_id='{run_id}'")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=tmp))
        files = [p for p in folder.rglob("*") if p.is_file()]
        weights = {k.split(".", 1)[0] for p in files if p.name == "weights.safetensors" for k in load_file(str(p))}
        return sum(p.stat().st_size for p in files), weights


@pytest.mark.parametrize("model", ["autoencoder", "ddpm", "ldm"])
def test_disk_estimate_matches_a_trained_run(model, flow_2d):
    """Predicted best.pt, last.pt and registered model within TOLERANCE of the real files; the registered
    version holds the sampling weights once (LDM: with its autoencoder, which sampling needs)."""
    from mlflow import MlflowClient

    result = flow_2d[model]
    est = estimate_disk(result.config, model)
    for name, predicted in (("best.pt", est.best), ("last.pt", est.last)):
        real = (result.run_dir / "checkpoints" / name).stat().st_size
        assert predicted == pytest.approx(real, rel=TOLERANCE), (name, predicted, real)
    if model == "autoencoder":
        assert est.registered == 0
        return
    real, weights = _registered_size(MlflowClient(), result.mlflow_run_id)
    assert weights == ({"unet", "autoencoder"} if model == "ldm" else {"unet"})
    assert est.registered == pytest.approx(real, rel=TOLERANCE), (est.registered, real)


def test_plan_explain_reports_disk(workspace, nnunet_env):
    r = CliRunner().invoke(main, ["plan", "-d", str(ANISO_3D), "--explain"])
    assert r.exit_code == 0, r.output
    assert "disk per run" in r.output and "last.pt" in r.output and "total 3d:" in r.output and "total 2d:" in r.output
    assert "quality checks per run" in r.output and "% of training" in r.output  # scoring's planned share


def test_plan_counts_the_disk_tables_networks_so_explain_needs_no_monai(workspace, tmp_path, monkeypatch):
    """`plan` counts every planned network's tensors for the disk table while MONAI is imported for the simulation
    (planning.api._warm_disk_table); a later process (`plan --explain`, `memory`) reads them from the cache and
    never imports MONAI (~4 s CPU). Without the counts in the cache it would have to."""
    import json
    import os
    import subprocess
    import sys

    from medimgen.planning.api import _warm_disk_table

    cfg = workspace["config"]
    cfg_file = tmp_path / "medimgen_config.yaml"
    from medimgen.config import save_config

    save_config(cfg, cfg_file)
    probe = ("import sys, json; from medimgen.config import load_config; from medimgen.planning.api import "
             "explain_costs; from pathlib import Path; p = Path(sys.argv[1]); "
             "lines = explain_costs(load_config(p), p.parent); "
             "print(json.dumps({'monai': 'monai' in sys.modules, 'disk': any('disk per run' in l for l in lines)}))")

    def explain_in_fresh_process(cache: Path) -> dict:
        env = {**os.environ, "MEDIMGEN_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", probe, str(cfg_file)], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = explain_in_fresh_process(tmp_path / "cold")
    assert cold == {"monai": True, "disk": True}  # nothing counted yet: the networks are built
    import medimgen.planning.disk as disk

    monkeypatch.setenv("MEDIMGEN_CACHE_DIR", str(tmp_path / "warm"))
    monkeypatch.setattr(disk, "_built", {})  # as in a fresh `plan` process: this one counted them for other tests
    _warm_disk_table(cfg)
    assert explain_in_fresh_process(tmp_path / "warm") == {"monai": False, "disk": True}
