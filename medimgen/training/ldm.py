"""Latent diffusion: the diffusion task on the latents of a trained autoencoder of the same dataset/split.

A run with ``train_ldm.cache_latents`` trains on latents encoded once per case (medimgen.training.latents: their
mean and std cached, z drawn every step); validation encodes its cases as before. The autoencoder is the best checkpoint (weights only; else last) of the autoencoder run with the same
dataset, dimensionality and split/fold, built from that run's own saved config. The latent
scale factor (1 / std of latents over a sample of training batches) is computed once, stored in the run's config
(``derived.latent_scale_factor``, its one place), and reused on resume and at sampling. The checkpoint refers to
the autoencoder run by the upstream link (medimgen.runs.folders.link_upstream).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from medimgen.config.schema import GenerationConfig
from medimgen.models.diffusion import latent_decoder
from medimgen.core.errors import MedimgenError
from medimgen.runs.folders import RunDir, link_upstream, load_autoencoder
from medimgen.training.ddpm import DiffusionTask
from medimgen.training.latents import sample_latents

SCALE_BATCHES = 8


class LatentDiffusionTask(DiffusionTask):
    name = "ldm"

    def __init__(self, cfg: GenerationConfig, device: torch.device, autoencoder_run: RunDir, run_root: Path):
        self.autoencoder, ae_cfg, _ = load_autoencoder(autoencoder_run, device)
        if (ae_cfg.data.generate_labels, tuple(ae_cfg.data.label_values)) != (
                cfg.data.generate_labels, tuple(cfg.data.label_values)):
            raise MedimgenError(
                f"the autoencoder in {autoencoder_run.root} was trained with data.generate_labels="
                f"{str(ae_cfg.data.generate_labels).lower()} (labels {list(ae_cfg.data.label_values)}), this config has "
                f"{str(cfg.data.generate_labels).lower()} (labels {list(cfg.data.label_values)}): retrain the "
                f"autoencoder or match data.generate_labels")
        if tuple(ae_cfg.data.image_size) != tuple(cfg.data.image_size) or ae_cfg.data.in_channels != cfg.data.in_channels:
            raise MedimgenError(
                f"the autoencoder in {autoencoder_run.root} was trained for images {list(ae_cfg.data.image_size)} "
                f"x{ae_cfg.data.in_channels} channels, this config has {list(cfg.data.image_size)} "
                f"x{cfg.data.in_channels}: retrain the autoencoder or match data.image_size")
        self.upstream_link = link_upstream(run_root, autoencoder_run.root)
        # the autoencoder architecture is the one it was trained with
        cfg = dataclasses.replace(cfg, autoencoder=ae_cfg.autoencoder)
        self.latent_channels = ae_cfg.autoencoder.latent_channels
        self.scale_factor: float | None = cfg.derived.latent_scale_factor
        super().__init__(cfg, device)

    @property
    def in_channels(self) -> int:
        return self.latent_channels

    @property
    def frozen_autoencoder(self) -> torch.nn.Module:
        """What the latent cache (medimgen.training.latents) encodes with."""
        return self.autoencoder

    def _unscaled(self, batch: dict) -> torch.Tensor:
        """Latents of a batch: drawn from a cached batch's mu/sigma (training.latents), else encoded."""
        if "mu" in batch:
            return sample_latents({k: batch[k].to(self.device) for k in ("mu", "sigma")})
        return self.autoencoder.encode_stage_2_inputs(self.inputs(batch))

    def targets(self, batch: dict) -> torch.Tensor:
        if self.scale_factor is None:
            raise RuntimeError("compute_scale_factor must run before training")
        return self._unscaled(batch) * self.scale_factor

    @torch.no_grad()
    def compute_scale_factor(self, batches) -> float:
        latents = [self._unscaled(next(batches)).float() for _ in range(SCALE_BATCHES)]
        std = torch.cat([z.flatten() for z in latents]).std().item()
        self.scale_factor = 1.0 / max(std, 1e-8)
        return self.scale_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale_factor is None:
            raise RuntimeError("compute_scale_factor must run before training")
        return self.autoencoder.encode_stage_2_inputs(images) * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return latent_decoder(self.autoencoder, self.scale_factor)(z)

    def extra_state(self) -> dict:
        return dict(self.upstream_link)

    def load_extra_state(self, state: dict) -> None:
        pass  # the scale is the run config's (training.api's _Job._derive)
