"""Memory estimator (probe + scale) against autograd, and the fitter at 2 GB vs 80 GB targets."""

from __future__ import annotations

import math

import pytest
import torch

from medimgen.config import apply_overrides, load_config
from medimgen.config.schema import AutoencoderConfig, DiscriminatorConfig, UNetConfig
from medimgen.networks import build_autoencoder, build_discriminator, build_unet
from medimgen.nnunet import plan_and_preprocess
from medimgen.planning import memory as mem
from medimgen.planning import plan_dataset
from medimgen.synthetic import make_synthetic_dataset

BIG_3D = 203


def test_saved_bytes_counts_what_autograd_saves():
    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    saved, _ = mem.saved_bytes(lambda: conv(x), exclude=[conv])
    assert saved == x.numel() * 4  # conv3d saves its input (its weight is a parameter, not an activation)
    relu_saved, _ = mem.saved_bytes(lambda: torch.relu(conv(x)) * 2, exclude=[conv])
    assert relu_saved == x.numel() * 4 + 4 * 8 ** 3 * 4  # + relu's output


UNET = UNetConfig(channels=(16, 32, 32), strides=((1, 2, 2), (2, 2, 2)), attention_levels=(False, False, True),
                  num_res_blocks=1, num_head_channels=16, norm_num_groups=8)
AE = AutoencoderConfig(channels=(8, 16, 16), strides=((1, 2, 2), (2, 2, 2)), latent_channels=3, num_res_blocks=1,
                       norm_num_groups=8)


@pytest.mark.parametrize("amp", [False, True])
def test_unet_activation_estimate_within_10_percent(amp):
    params, act, _ = mem._probe_unet(UNET, 3, 1, (2, 4, 4), amp, False)
    size, batch = (16, 48, 48), 2  # larger than both probes: extrapolated, incl. attention's quadratic term
    unet = build_unet(UNET, 3, 1)
    x, t = torch.randn(batch, 1, *size), torch.tensor([3, 700])
    with mem._autocast(amp):
        measured, _ = mem.saved_bytes(lambda: unet(x, timesteps=t), exclude=[unet])
    predicted = act(math.prod(size), batch)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)
    assert params == sum(p.numel() for p in unet.parameters())


def test_autoencoder_activation_estimate_within_10_percent():
    disc_cfg = DiscriminatorConfig(channels=8, num_layers=2)
    _, _, act, _ = mem._probe_autoencoder(AE, disc_cfg, 3, 1, (2, 4, 4), False, False, True)
    ae, disc = build_autoencoder(AE, 3, 1), build_discriminator(disc_cfg, 3, 1)
    size = (24, 64, 64)
    x = torch.randn(1, 1, *size)
    measured, _ = mem.saved_bytes(lambda: disc(ae(x)[0])[-1], exclude=[ae, disc])
    predicted = act(math.prod(size))
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


@pytest.fixture(scope="module")
def planned_3d(nnunet_roots):
    from tests.conftest import ANISO_3D

    return plan_dataset(ANISO_3D, force=True).config.get("3d")


def test_prediction_grows_with_batch_and_size_and_checkpointing_lowers_it(planned_3d):
    cfg = planned_3d
    base = mem.estimate(cfg, "ddpm").peak_bytes
    bigger_batch = mem.estimate(apply_overrides(cfg, [f"train_ddpm.batch_size={cfg.train_ddpm.batch_size * 2}"]), "ddpm")
    assert bigger_batch.peak_bytes > base
    size = [2 * s for s in cfg.data.image_size]
    bigger_image = mem.estimate(apply_overrides(cfg, [f"data.image_size={size}".replace(" ", "")]), "ddpm")
    assert bigger_image.activation_bytes > 7 * mem.estimate(cfg, "ddpm").activation_bytes  # 8x voxels (+attention)
    ckpt = mem.estimate(apply_overrides(cfg, ["ddpm_unet.activation_checkpointing=true"]), "ddpm")
    assert ckpt.peak_bytes < base
    ae_ckpt = mem.estimate(apply_overrides(cfg, ["autoencoder.activation_checkpointing=true"]), "autoencoder")
    assert ae_ckpt.peak_bytes < mem.estimate(cfg, "autoencoder").peak_bytes
    no_amp = mem.estimate(apply_overrides(cfg, ["train_ddpm.amp=off"]), "ddpm")
    assert no_amp.activation_bytes > mem.estimate(cfg, "ddpm").activation_bytes


@pytest.fixture(scope="module")
def big_dataset(nnunet_roots):
    make_synthetic_dataset(nnunet_roots["nnUNet_raw"], BIG_3D, "Big", num_cases=4, shape=(96, 96, 56),
                           spacing=(1.0, 1.0, 1.5), seed=9)
    plan_and_preprocess(BIG_3D, quiet=True)
    return BIG_3D


def test_fitter_2gb_vs_80gb(big_dataset, nnunet_env):
    from click.testing import CliRunner

    from medimgen.cli import main

    small = plan_dataset(big_dataset, gpu_memory_gb=2, force=True).config.get("3d")
    r = CliRunner().invoke(main, ["plan", "-d", str(big_dataset), "--gpu-memory", "80", "--force", "--explain"])
    assert r.exit_code == 0, r.output
    assert "peak GB" in r.output and "ddpm" in r.output
    large = load_config(nnunet_env["nnUNet_preprocessed"] / "Dataset203_Big" / "medimgen_config.yaml").get("3d")
    assert small.memory.fitted and large.memory.fitted
    assert all(v < 2.0 for v in small.memory.predicted_peak_gb.values())
    assert max(large.memory.predicted_peak_gb.values()) >= 2.0  # the 80 GB plan did not need squeezing
    settings = lambda c: (c.ddpm_unet.activation_checkpointing, c.autoencoder.activation_checkpointing,
                          c.train_ddpm.batch_size, c.train_ddpm.grad_accumulation_steps, c.data.image_size)
    assert settings(small) != settings(large)
    # the effective batch is kept
    for m in ("autoencoder", "ddpm", "ldm"):
        s, l = getattr(small, f"train_{m}"), getattr(large, f"train_{m}")
        assert s.batch_size * s.grad_accumulation_steps >= l.batch_size * l.grad_accumulation_steps
    # the 2 GB plan is valid: its networks build and its estimate agrees with what it recorded
    build_unet(small.ddpm_unet, 3, small.data.in_channels)
    assert mem.estimate(small, "ddpm").peak_gb == pytest.approx(small.memory.predicted_peak_gb["ddpm"], rel=1e-3)
    assert small.memory.target_gb == 2 and large.memory.target_gb == 80


def test_downscaled_plan_loads_batches_at_generated_size(planned_3d, nnunet_env):
    """The last resort (coarser spacing) crops native voxels and resamples them to image_size."""
    from medimgen.data.cases import open_cases
    from medimgen.data.loader import TrainBatches, validation_batches
    from medimgen.plans import DatasetPlans
    from tests.conftest import ANISO_3D

    cfg = mem._downscale(planned_3d, 2.0)
    assert tuple(cfg.data.crop_size) == tuple(planned_3d.data.image_size)
    assert math.prod(cfg.data.image_size) < math.prod(cfg.data.crop_size)
    assert all(s <= c and s % d == 0 for s, c, d in zip(cfg.data.image_size, cfg.data.crop_size, cfg.data.size_divisor))
    assert cfg.data.spacing[1] > planned_3d.data.spacing[1]
    plans = DatasetPlans.from_id(ANISO_3D)
    ids = open_cases(plans.preprocessed_folder("3d")).identifiers
    b = next(TrainBatches(cfg, plans, ids, 2, num_workers=0))
    assert b["image"].shape[2:] == tuple(cfg.data.image_size)
    v = next(validation_batches(cfg, plans, ids[:1], 1))
    assert v["image"].shape[2:] == tuple(cfg.data.image_size)
