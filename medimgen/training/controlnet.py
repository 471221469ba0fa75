"""Mask-conditioned generation: a MONAI ControlNet trained on top of a trained, frozen DDPM or LDM.

As in MONAI's ControlNet tutorial (and NVIDIA MAISI): the ControlNet starts as a copy of the base UNet's
weights (its zero-initialised output convolutions make it a no-op at first), the base UNet stays frozen, and the
ControlNet learns the usual noise-prediction loss with its residuals added to the base UNet's skip connections.
It reads the label map as one-hot channels (background first) at image size; for an LDM its conditioning
embedding downsamples them to the latent size by the autoencoder's strides (medimgen.models.networks.build_controlnet).

The base is the best checkpoint of the dataset's trained ``ldm`` run of the same split, else its ``ddpm``
(``controlnet.base`` picks one: medimgen.runs.folders.upstream_for). The run's config is the base run's own config
(its networks, scheduler, latent scale) with this run's controlnet and train_controlnet sections, ``controlnet.base``
set to the base's kind. The checkpoint refers to the base run by the upstream link, as an LDM refers to its
autoencoder (medimgen.runs.folders.link_upstream).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medimgen.config.kinds import kind
from medimgen.config.schema import GenerationConfig
from medimgen.models.diffusion import generate, latent_decoder, noised, training_scheduler
from medimgen.core.errors import MedimgenError
from medimgen.models.labels import condition_channels, join
from medimgen.models.networks import build_controlnet, enable_unet_checkpointing
from medimgen.runs.folders import RunDir, TrainedModel, link_upstream
from medimgen.training.ddpm import PLOT_SEED, VAL_SEED
from medimgen.training.latents import sample_latents
from medimgen.training.outputs import PLOT_EXAMPLES, plot_images, plot_progress


def run_config(base_cfg: GenerationConfig, cfg: GenerationConfig, base_kind: str) -> GenerationConfig:
    """The ControlNet run's config: the base's networks and data, this config's ControlNet settings."""
    return dataclasses.replace(
        base_cfg, controlnet=dataclasses.replace(cfg.controlnet, base=base_kind),
        train_controlnet=cfg.train_for("controlnet"), tracking=cfg.tracking, memory=cfg.memory)


class ControlNetTask:
    """Noise prediction of a frozen base UNet steered by a trained ControlNet (the loop's Task protocol)."""

    name = "controlnet"
    ema_module = kind(name).module
    sampling_modules = kind(name).sampling_modules  # best.pt; the base stays in its own run

    def __init__(self, cfg: GenerationConfig, device: torch.device, base_run: RunDir, run_root: Path):
        base = TrainedModel.from_run(base_run.root)
        if not kind(base.kind).generator:
            raise MedimgenError(f"{base_run.root} holds a {base.kind}; a ControlNet steers a generator")
        if tuple(base.cfg.data.image_size) != tuple(cfg.data.image_size) or \
                base.cfg.data.in_channels != cfg.data.in_channels:
            raise MedimgenError(
                f"the {base.kind} in {base_run.root} generates images {list(base.cfg.data.image_size)} "
                f"x{base.cfg.data.in_channels} channels, this config has {list(cfg.data.image_size)} "
                f"x{cfg.data.in_channels}: retrain it or match data.image_size")
        if not cfg.data.label_values:
            raise MedimgenError("a ControlNet is conditioned on label maps, but data.label_values is empty (the "
                                "dataset.json has no real labels): it needs a dataset with segmentations")
        self.cfg = run_config(base.cfg, cfg, base.kind)
        self.base_kind, self.device = base.kind, device
        self.base = base.to(device)
        for p in self.base.unet.parameters():
            p.requires_grad_(False)
        if self.cfg.controlnet.activation_checkpointing and not getattr(self.base.unet, "_checkpointed", False):
            enable_unet_checkpointing(self.base.unet)
        self.controlnet = build_controlnet(self.cfg).to(device)
        # MONAI's tutorial: the ControlNet starts from the base UNet's weights (the parts they share)
        self.controlnet.load_state_dict(self.base.unet.state_dict(), strict=False)
        self.modules: dict[str, nn.Module] = {self.ema_module: self.controlnet}
        self.phase_modules = {"diffusion": [self.ema_module]}
        self.scheduler = training_scheduler(self.cfg.scheduler_for(base.kind), self.cfg.data.spatial_dims)
        self.upstream_link = link_upstream(run_root, base_run.root)
        self.latent = self.cfg.space_of(self.name) == "latent"
        self.num_plot_samples = PLOT_EXAMPLES

    # -- data
    def latents(self, batch: dict) -> torch.Tensor:
        """What the base model generates from a batch (images, + a joint model's one-hot labels; LDM: latents)."""
        if "mu" in batch:  # a batch of the latent cache (training.latents): z drawn from the case's mu and sigma
            return sample_latents({k: batch[k].to(self.device) for k in ("mu", "sigma")}) * self.base.scale_factor
        x = join(batch["image"].to(self.device), batch["label"], self.cfg)
        if self.latent:
            x = self.base.autoencoder.encode_stage_2_inputs(x) * self.base.scale_factor
        return x

    @property
    def frozen_autoencoder(self) -> nn.Module | None:
        """What the latent cache (medimgen.training.latents) encodes with: an LDM base's autoencoder."""
        return self.base.autoencoder if self.latent else None

    def condition(self, batch: dict) -> torch.Tensor:
        return condition_channels(batch["label"].to(self.device), self.cfg.data.label_values)

    def decode(self):
        return latent_decoder(self.base.autoencoder, self.base.scale_factor) if self.latent else None

    # -- loop hooks
    def active_phases(self, epoch: int) -> list[str]:
        return ["diffusion"]

    def _loss(self, controlnet: nn.Module, x: torch.Tensor, cond: torch.Tensor, generator=None) -> torch.Tensor:
        prediction_type = self.cfg.scheduler_for(self.base_kind).prediction_type
        noisy, t, target = noised(self.scheduler, prediction_type, x, generator)
        down, mid = controlnet(x=noisy, timesteps=t, controlnet_cond=cond.to(noisy.dtype))
        pred = self.base.unet(noisy, timesteps=t, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid)
        return F.mse_loss(pred.float(), target.float())

    def loss(self, phase: str, batch: dict, state: dict):
        with torch.no_grad():
            x = self.latents(batch)
        loss = self._loss(self.controlnet, x, self.condition(batch))
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, batches: Iterator[dict], model: Callable[[str], nn.Module]) -> dict[str, float]:
        gen = torch.Generator().manual_seed(VAL_SEED)  # same noise and timesteps every validation
        total, count = 0.0, 0
        for batch in batches:
            x = self.latents(batch)
            total += self._loss(model(self.ema_module), x, self.condition(batch), gen).item() * x.shape[0]
            count += x.shape[0]
        return {"loss": total / max(1, count)}

    def plot(self, stem: Path, batch: dict, model: Callable[[str], nn.Module]) -> Path | None:
        """Samples conditioned on validation label maps (first row) and those maps (second row)."""
        label = batch["label"][:self.num_plot_samples].clamp(min=0)
        step = self.cfg.train_for(self.name).batch_size
        images = torch.cat([generate(self.cfg, self.base_kind, self.base.unet, len(chunk), PLOT_SEED + i,
                                     device=self.device, decode=self.decode(), controlnet=model(self.ema_module),
                                     condition=condition_channels(chunk.to(self.device), self.cfg.data.label_values),
                                     progress=plot_progress())
                            for i, chunk in ((i, label[i:i + step]) for i in range(0, len(label), step))])
        lo, hi = self.cfg.data.intensity_range
        maps = label.float().cpu() / max(self.cfg.data.label_values)
        return plot_images([list(images), list(lo + (hi - lo) * maps)], stem, self.cfg,
                           f"ControlNet samples ({len(label)}, seed {PLOT_SEED}) | their label maps")

    def extra_state(self) -> dict:
        return {**self.upstream_link, "base": self.base_kind}

    def load_extra_state(self, state: dict) -> None:
        pass
