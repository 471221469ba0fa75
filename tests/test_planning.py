"""`medimgen plan` on datasets really planned/preprocessed by nnU-Net: YAML values checked against the plans."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.config import load_config
from tests.conftest import ANISO_3D, FLAT_2D


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "medimgen"
    return subprocess.run([str(exe), "plan", *args], capture_output=True, text=True, env=dict(os.environ))


def _plans(nnunet_env, name: str) -> dict:
    return json.loads((nnunet_env["nnUNet_preprocessed"] / name / "nnUNetPlans.json").read_text())


def _yaml(nnunet_env, name: str) -> dict:
    return yaml.safe_load((nnunet_env["nnUNet_preprocessed"] / name / "medimgen_config.yaml").read_text())


def test_plan_3d_anisotropic_multichannel(nnunet_env):
    out = _plan_cli("-d", str(ANISO_3D), "--force")
    assert out.returncode == 0, out.stderr
    name = "Dataset201_Aniso"
    assert "medimgen_config.yaml" in out.stdout
    plans, cfg = _plans(nnunet_env, name), _yaml(nnunet_env, name)
    assert set(cfg) == {"medimgen_version", "dataset", "2d", "3d"}
    nn3 = plans["configurations"]["3d_fullres"]
    strides = nn3["architecture"]["arch_kwargs"]["strides"]
    features = nn3["architecture"]["arch_kwargs"]["features_per_stage"]
    c3 = cfg["3d"]

    # channels and geometry from the plans / dataset.json
    assert c3["data"]["in_channels"] == 2 == len(json.loads(
        (nnunet_env["nnUNet_preprocessed"] / name / "dataset.json").read_text())["channel_names"])
    assert c3["data"]["spacing"] == pytest.approx(nn3["spacing"])
    assert c3["data"]["nnunet_patch_size"] == nn3["patch_size"]
    # the anisotropic axis (z, first in nnU-Net's transposed order, 3.0 mm vs 0.8 mm) is not pooled first
    assert nn3["spacing"][0] > 2 * nn3["spacing"][1]
    assert strides[1][0] == 1 and strides[1][1] == 2
    # AE uses nnU-Net's first two pooling strides, so it too keeps z at the first downsampling
    assert c3["autoencoder"]["strides"] == strides[1:3]
    assert c3["autoencoder"]["strides"][0][0] == 1
    assert len(c3["autoencoder"]["channels"]) == len(c3["autoencoder"]["strides"]) + 1 <= 4
    assert max(c3["autoencoder"]["channels"]) <= 64
    # the diffusion UNet follows nnU-Net's encoder
    assert c3["ddpm_unet"]["channels"] == features[: len(c3["ddpm_unet"]["channels"])]
    assert c3["ddpm_unet"]["strides"] == strides[1: len(c3["ddpm_unet"]["channels"])]
    # generated size: the whole median image, divisible by every network's total downsampling
    size, median = c3["data"]["image_size"], nn3["median_image_size_in_voxels"]
    ae_total = np.prod(c3["autoencoder"]["strides"], axis=0)
    ldm_total = ae_total * (np.prod(c3["ldm_unet"]["strides"], axis=0) if c3["ldm_unet"]["strides"] else 1)
    ddpm_total = np.prod(c3["ddpm_unet"]["strides"], axis=0)
    for s, m, a, b in zip(size, median, ldm_total, ddpm_total):
        assert s >= m and s % a == 0 and s % b == 0
        assert s - m < max(a, b)  # the smallest such size
    assert c3["data"]["size_divisor"][0] < c3["data"]["size_divisor"][1]  # z downsampled less
    # seed's loss weights and the 2d section from nnU-Net's 2d configuration
    assert (c3["losses"]["kl_weight"], c3["losses"]["perceptual_weight"], c3["losses"]["adversarial_weight"]) == (1e-6, 1.0, 0.25)
    nn2 = plans["configurations"]["2d"]
    assert cfg["2d"]["data"]["nnunet_configuration"] == "2d"
    assert cfg["2d"]["data"]["spacing"] == pytest.approx(nn2["spacing"])
    assert cfg["2d"]["autoencoder"]["strides"] == nn2["architecture"]["arch_kwargs"]["strides"][1:4]
    # the 2D DDPM is 4x nnU-Net's 2d encoder, at most 256 wide (MONAI's 2D DDPM tutorial; benchmarks/README.md)
    features2 = nn2["architecture"]["arch_kwargs"]["features_per_stage"]
    channels2 = cfg["2d"]["ddpm_unet"]["channels"]
    assert channels2 == [min(256, 4 * f) for f in features2[: len(channels2)]]
    assert all(ch % cfg["2d"]["ddpm_unet"]["norm_num_groups"] == 0 for ch in channels2)
    # the YAML documents the heuristics in comments and loads into the typed config
    text = (nnunet_env["nnUNet_preprocessed"] / name / "medimgen_config.yaml").read_text()
    assert "# per-axis downsampling of each level transition" in text
    load_config(nnunet_env["nnUNet_preprocessed"] / name / "medimgen_config.yaml")


def test_plan_2d_only_ct(nnunet_env):
    out = _plan_cli("-d", str(FLAT_2D), "--force")
    assert out.returncode == 0, out.stderr
    name = "Dataset202_Flat"
    plans, cfg = _plans(nnunet_env, name), _yaml(nnunet_env, name)
    assert "3d_fullres" not in plans["configurations"]
    assert "3d" not in cfg and "2d" in cfg
    c2 = cfg["2d"]
    assert c2["data"]["spatial_dims"] == 2 and len(c2["data"]["image_size"]) == 2
    assert all(s % d == 0 for s, d in zip(c2["data"]["image_size"], c2["data"]["size_divisor"]))
    assert c2["data"]["normalization_schemes"] == ["CTNormalization"]
    # CT: nnU-Net clips to the foreground percentiles, so the bounds are exact and invertible to HU
    fg = plans["foreground_intensity_properties_per_channel"]["0"]
    assert c2["data"]["intensity_low"][0] == pytest.approx((fg["percentile_00_5"] - fg["mean"]) / fg["std"])
    assert c2["data"]["intensity_high"][0] == pytest.approx((fg["percentile_99_5"] - fg["mean"]) / fg["std"])
    assert c2["autoencoder"]["latent_channels"] == 4 and len(c2["autoencoder"]["strides"]) <= 3


def test_zscore_bounds_cover_preprocessed_data(nnunet_env):
    from medimgen.data.cases import load_case, open_cases

    cfg = load_config(nnunet_env["nnUNet_preprocessed"] / "Dataset201_Aniso" / "medimgen_config.yaml").get("3d")
    ds = open_cases(nnunet_env["nnUNet_preprocessed"] / "Dataset201_Aniso" / "nnUNetPlans_3d_fullres")
    data = np.concatenate([load_case(ds, i)[0].reshape(2, -1) for i in ds.identifiers], axis=1)
    for c in range(2):
        inside = np.mean((data[c] >= cfg.data.intensity_low[c]) & (data[c] <= cfg.data.intensity_high[c]))
        assert 0.97 < inside < 1.0


def test_seed_spelling_medimgen_plan(nnunet_env):
    """`medimgen_plan` is `medimgen plan` (which the planning tests run in full): same options, same errors."""
    exe = Path(sys.executable).parent / "medimgen_plan"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and "--gpu-memory" in out.stdout, out.stderr
    out = subprocess.run([str(exe), "-d", "999"], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 2 and "999" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_replan_refuses_edited_config_and_force_backs_up(nnunet_env):
    runner = CliRunner()
    assert runner.invoke(main, ["plan", "-d", str(FLAT_2D), "--force"]).exit_code == 0
    path = nnunet_env["nnUNet_preprocessed"] / "Dataset202_Flat" / "medimgen_config.yaml"
    # an unedited file is simply re-planned
    again = runner.invoke(main, ["plan", "-d", str(FLAT_2D)])
    assert again.exit_code == 0 and "re-planned" in again.output
    edited = path.read_text().replace("val_interval: 1", "val_interval: 7")
    path.write_text(edited)
    refused = runner.invoke(main, ["plan", "-d", str(FLAT_2D)])
    assert refused.exit_code == 2
    assert "edited by hand; not overwriting" in refused.output
    assert path.read_text() == edited  # nothing lost
    forced = runner.invoke(main, ["plan", "-d", str(FLAT_2D), "--force"])
    assert forced.exit_code == 0 and "backed up" in forced.output
    backups = list(path.parent.glob("medimgen_config.yaml.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == edited
    assert "val_interval: 7" not in path.read_text()


def test_set_overrides_land_in_yaml(nnunet_env):
    r = CliRunner().invoke(main, ["plan", "-d", str(FLAT_2D), "--force", "--set", "train_ddpm.epochs=3",
                                  "--set", "2d.losses.perceptual_network=none"])
    assert r.exit_code == 0, r.output
    cfg = load_config(nnunet_env["nnUNet_preprocessed"] / "Dataset202_Flat" / "medimgen_config.yaml").get("2d")
    assert cfg.train_ddpm.epochs == 3 and cfg.losses.perceptual_network == "none"


def test_gpu_memory_target_recorded(nnunet_env):
    r = CliRunner().invoke(main, ["plan", "-d", str(FLAT_2D), "--force", "--gpu-memory", "24"])
    assert r.exit_code == 0, r.output
    cfg = load_config(nnunet_env["nnUNet_preprocessed"] / "Dataset202_Flat" / "medimgen_config.yaml").get("2d")
    assert cfg.memory.target_gb == 24.0


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("unset", ["plan", "-d", "1"], "environment variable nnUNet_preprocessed is not set"),
        ("empty", ["plan", "-d", "77"], "dataset 077 not found"),
        ("raw_only", ["plan", "-d", "78"], "is not preprocessed yet"),
        ("empty", ["plan", "-d", "1", "--set", "train_ddpm.epoch=2"], "dataset 001 not found"),
    ],
)
def test_cli_bad_input_one_line(setup, args, message, empty_env, monkeypatch):
    if setup == "unset":
        monkeypatch.delenv("nnUNet_preprocessed")
    if setup == "raw_only":
        (empty_env["nnUNet_raw"] / "Dataset078_Raw").mkdir()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_cli_mistyped_override_key(nnunet_env):
    r = CliRunner().invoke(main, ["plan", "-d", str(FLAT_2D), "--force", "--set", "train_ddpm.epoch=2"])
    assert r.exit_code == 2
    assert r.output.strip() == "Error: unknown config key 'train_ddpm.epoch=2' (did you mean 'epochs'?)"


def test_heuristic_rules():
    from medimgen.planning import heuristics as h

    assert h.autoencoder_strides([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], 3) == ((1, 2, 2), (2, 2, 2))
    assert h.round_up([19.5, 45, 48], [4, 8, 8]) == (20, 48, 48)
    assert h.attention_levels([64, 64], [[2, 2], [2, 2]], 2) == (False, True, True)
    assert h.generation_batch_size(2, [64, 64, 64], [128, 128, 128]) == 1
    epochs, iters = h.epochs_for("ddpm", 100, 2)
    assert iters == 50 and epochs == math.ceil(h.TARGET_STEPS["ddpm"] / 50)
    assert h.norm_groups([32, 48]) == 16
    assert h.ddpm_widths([32, 64, 128, 256], 2) == (128, 256, 256, 256)
    assert h.ddpm_widths([32, 64, 128, 256], 3) == (32, 64, 128, 256)
    # the LDM at the MONAI 3D LDM tutorial's rate (2.5e-5 learned slower on the real-anatomy benchmark)
    training = h._training(samples=100, batch=2)
    assert {m: training[f"train_{m}"].learning_rate for m in h.LEARNING_RATES} == {
        "autoencoder": 1e-4, "ddpm": 1e-4, "ldm": 1e-4, "controlnet": 2.5e-5}
    assert training["train_autoencoder"].disc_learning_rate == 5e-4
