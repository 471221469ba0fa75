"""Latent diffusion: the diffusion task on the latents of a trained autoencoder of the same dataset/split.

The autoencoder is the best checkpoint (weights only; else last) of the autoencoder run with the same
dataset, dimensionality and split/fold, built from that run's own saved config. The latent
scale factor (1 / std of latents over a sample of training batches) is computed once,
stored in the LDM checkpoint and the run's config, and reused on resume and at sampling.
"""

from __future__ import annotations

import dataclasses

import torch

from medimgen.config import load_generation_config
from medimgen.config.schema import GenerationConfig, SchedulerConfig, UNetConfig
from medimgen.errors import MedimgenError
from medimgen.networks import build_autoencoder
from medimgen.training.ddpm import DiffusionTask
from medimgen.training.outputs import RunDir

SCALE_BATCHES = 8


def load_autoencoder(run: RunDir, device: torch.device):
    """(autoencoder in eval mode with frozen weights, its run config, checkpoint path)."""
    ckpt_path = run.best if run.best.is_file() else run.last
    if not ckpt_path.is_file() or not run.config.is_file():
        raise MedimgenError(
            f"no trained autoencoder at {run.root}: train it first with "
            f"`medimgen train autoencoder` (same dataset, splitting and model type)")
    ae_cfg = load_generation_config(run.config)
    ae = build_autoencoder(ae_cfg.autoencoder, ae_cfg.data.spatial_dims, ae_cfg.data.in_channels)
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        ae.load_state_dict(state["modules"]["autoencoder"])
    except Exception as e:
        raise MedimgenError(f"cannot load the autoencoder from {ckpt_path} ({type(e).__name__}: {e})") from None
    ae.to(device).eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae, ae_cfg, ckpt_path


class LatentDiffusionTask(DiffusionTask):
    name = "ldm"

    def __init__(self, cfg: GenerationConfig, device: torch.device, autoencoder_run: RunDir):
        self.autoencoder, ae_cfg, self.autoencoder_checkpoint = load_autoencoder(autoencoder_run, device)
        if tuple(ae_cfg.data.image_size) != tuple(cfg.data.image_size) or ae_cfg.data.in_channels != cfg.data.in_channels:
            raise MedimgenError(
                f"the autoencoder in {autoencoder_run.root} was trained for images {list(ae_cfg.data.image_size)} "
                f"x{ae_cfg.data.in_channels} channels, this config has {list(cfg.data.image_size)} "
                f"x{cfg.data.in_channels}: retrain the autoencoder or match data.image_size")
        # the autoencoder architecture is the one it was trained with
        cfg = dataclasses.replace(cfg, autoencoder=ae_cfg.autoencoder)
        self.latent_channels = ae_cfg.autoencoder.latent_channels
        self.scale_factor: float | None = cfg.train_ldm.latent_scale_factor
        super().__init__(cfg, device)
        from medimgen.planning.memory import latent_size

        self.latent_size = latent_size(cfg)  # cfg carries the autoencoder it was trained with

    @property
    def unet_config(self) -> UNetConfig:
        return self.cfg.ldm_unet

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return self.cfg.ldm_scheduler

    @property
    def in_channels(self) -> int:
        return self.latent_channels

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.latent_channels, *self.latent_size)

    @torch.no_grad()
    def compute_scale_factor(self, batches) -> float:
        latents = [self.autoencoder.encode_stage_2_inputs(next(batches)["image"].to(self.device)).float()
                   for _ in range(SCALE_BATCHES)]
        std = torch.cat([z.flatten() for z in latents]).std().item()
        self.scale_factor = 1.0 / max(std, 1e-8)
        return self.scale_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale_factor is None:
            raise RuntimeError("compute_scale_factor must run before training")
        return self.autoencoder.encode_stage_2_inputs(images) * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(z / self.scale_factor)

    def extra_state(self) -> dict:
        return {"scale_factor": self.scale_factor, "autoencoder_checkpoint": str(self.autoencoder_checkpoint)}

    def load_extra_state(self, state: dict) -> None:
        self.scale_factor = state["scale_factor"]
