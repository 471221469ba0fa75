"""Overrides that shrink the planned networks and runs to seconds on a CPU (for tests only)."""

from __future__ import annotations

from medimgen.config.schema import GenerationConfig


def _l(values) -> str:
    return str(list(values)).replace(" ", "")  # no spaces: --overrides splits on whitespace


def tiny_overrides(cfg: GenerationConfig, epochs: int = 2) -> list[str]:
    n_ae = len(cfg.autoencoder.strides)
    ddpm_levels = len(cfg.ddpm_unet.channels)
    ldm_levels = len(cfg.ldm_unet.channels)
    sets = [
        "data.num_workers=0",
        f"autoencoder.channels={_l([8] + [16] * n_ae)}",
        "autoencoder.norm_num_groups=8",
        "autoencoder.num_res_blocks=1",
        "discriminator.channels=8",
        f"ddpm_unet.channels={_l(8 * 2 ** min(i, 2) for i in range(ddpm_levels))}",
        "ddpm_unet.norm_num_groups=8",
        "ddpm_unet.num_head_channels=8",
        "ddpm_unet.num_res_blocks=1",
        f"ldm_unet.channels={_l(16 * 2 ** min(i, 1) for i in range(ldm_levels))}",
        "ldm_unet.norm_num_groups=8",
        "ldm_unet.num_head_channels=8",
        "ldm_unet.num_res_blocks=1",
        "ddpm_scheduler.num_inference_steps=2",
        "ldm_scheduler.num_inference_steps=2",
        "losses.perceptual_network=none",
        f"controlnet.conditioning_channels={_l([8] * (len(cfg.controlnet.conditioning_strides) + 1))}",
        "losses.adversarial_warmup_epochs=1",
    ]
    for model in ("autoencoder", "ddpm", "ldm", "controlnet"):
        if getattr(cfg, f"train_{model}") is None:  # a config planned before the ControlNet
            continue
        sets += [f"train_{model}.epochs={epochs}", f"train_{model}.iterations_per_epoch=2",
                 f"train_{model}.batch_size=2", f"train_{model}.val_plot_interval=1",
                 f"train_{model}.eval_samples=2", f"train_{model}.eval_steps=2", f"train_{model}.eval_interval=0"]
    return sets
