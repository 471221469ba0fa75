"""Diffusion tasks: DDPM in image space, and the same objective on autoencoder latents (LDM)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medimgen.config.schema import GenerationConfig
from medimgen.models.diffusion import generate, noised, training_scheduler
from medimgen.models.labels import join, label_channels, network_channels
from medimgen.models.networks import build_unet
from medimgen.training.outputs import PLOT_EXAMPLES, plot_images, plot_progress

VAL_SEED = 1234
PLOT_SEED = 4321


class DiffusionTask:
    """Noise-prediction training of a DiffusionModelUNet on ``encode(images)``."""

    name = "ddpm"
    ema_module = "unet"
    sampling_modules = ("unet",)  # best.pt (LDM: the autoencoder stays in its own run's best.pt)

    def __init__(self, cfg: GenerationConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.unet = build_unet(cfg.unet_for(self.name), cfg.data.spatial_dims, self.in_channels).to(device)
        self.labels = label_channels(cfg) > 0  # joint model: one-hot label channels after the image channels
        self.modules: dict[str, nn.Module] = {"unet": self.unet}
        self.phase_modules = {"diffusion": ["unet"]}
        self.scheduler = training_scheduler(cfg.scheduler_for(self.name), cfg.data.spatial_dims)
        self.num_plot_samples = PLOT_EXAMPLES

    # -- what differs between DDPM and LDM
    @property
    def in_channels(self) -> int:
        return network_channels(self.cfg)

    def inputs(self, batch: dict) -> torch.Tensor:
        """What the model generates from a batch: the images, with a joint model's one-hot label channels."""
        return join(batch["image"].to(self.device), batch["label"], self.cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # -- loop hooks
    def active_phases(self, epoch: int) -> list[str]:
        return ["diffusion"]

    def _diffusion_loss(self, unet: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None):
        noisy, t, target = noised(self.scheduler, self.cfg.scheduler_for(self.name).prediction_type, x, generator)
        pred = unet(noisy, timesteps=t)
        return F.mse_loss(pred.float(), target.float())

    def targets(self, batch: dict) -> torch.Tensor:
        """What the UNet learns to generate from a training batch (LDM: latents)."""
        return self.encode(self.inputs(batch))

    def loss(self, phase: str, batch: dict, state: dict):
        with torch.no_grad():
            x = self.targets(batch)
        loss = self._diffusion_loss(self.unet, x)
        return loss, {"loss": loss.item()}

    def validate(self, batches: Iterator[dict], model: Callable[[str], nn.Module]) -> dict[str, float]:
        gen = torch.Generator().manual_seed(VAL_SEED)  # same noise and timesteps every validation
        total, count = 0.0, 0
        for batch in batches:
            x = self.encode(self.inputs(batch))
            total += self._diffusion_loss(model("unet"), x, gen).item() * x.shape[0]
            count += x.shape[0]
        return {"loss": total / max(1, count)}

    def sample(self, unet: nn.Module, n: int, seed: int) -> torch.Tensor:
        """n images in the model range, reproducible for a seed (the global RNG is left untouched)."""
        return generate(self.cfg, self.name, unet, n, seed, device=self.device, decode=self.decode)

    def plot(self, stem: Path, batch: dict, model: Callable[[str], nn.Module]) -> Path | None:
        """Samples (first row) and, for a joint model, their label maps (second row, label values spread over the
        intensity range)."""
        n, step = self.num_plot_samples, self.cfg.train_for(self.name).batch_size  # no bigger batches than training's
        pairs = [generate(self.cfg, self.name, model("unet"), min(step, n - i), PLOT_SEED + i, device=self.device,
                          decode=self.decode, labels=True, progress=plot_progress()) for i in range(0, n, step)]
        images = torch.cat([p[0] for p in pairs])
        what = f"{self.name.upper()} samples ({n}, seed {PLOT_SEED})"
        if not self.labels:
            return plot_images(list(images), stem, self.cfg, what)
        lo, hi = self.cfg.data.intensity_range
        labels = torch.cat([p[1] for p in pairs]).float().cpu() / max(self.cfg.data.label_values)
        return plot_images([list(images), list(lo + (hi - lo) * labels)], stem, self.cfg, what + " | their labels")

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

