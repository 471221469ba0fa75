"""KL-autoencoder task: L1 + KL + perceptual + adversarial (LSGAN patch discriminator after a warm-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medimgen.config.schema import GenerationConfig
from medimgen.losses import kl_loss
from medimgen.networks import build_autoencoder, build_discriminator
from medimgen.perceptual import build_perceptual_loss
from medimgen.training.outputs import PLOT_EXAMPLES, plot_images


class AutoencoderTask:
    name = "autoencoder"
    ema_module = None
    sampling_modules = ("autoencoder",)  # best.pt: no discriminator

    def __init__(self, cfg: GenerationConfig, device: torch.device):
        from monai.losses import PatchAdversarialLoss

        self.cfg = cfg
        self.device = device
        nd, c = cfg.data.spatial_dims, cfg.data.in_channels
        self.autoencoder = build_autoencoder(cfg.autoencoder, nd, c).to(device)
        self.modules: dict[str, nn.Module] = {"autoencoder": self.autoencoder}
        self.phase_modules = {"generator": ["autoencoder"]}
        self.losses = cfg.losses
        self.adversarial = cfg.losses.adversarial_weight > 0
        if self.adversarial:
            self.discriminator = build_discriminator(cfg.discriminator, nd, c).to(device)
            self.modules["discriminator"] = self.discriminator
            self.phase_modules["discriminator"] = ["discriminator"]
            self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual = None
        if cfg.losses.perceptual_weight > 0:
            self.perceptual = build_perceptual_loss(cfg.losses.perceptual_network, nd, cfg.losses.perceptual_fake_3d,
                                                    cfg.losses.perceptual_fake_3d_ratio, tuple(cfg.data.image_size))
            if self.perceptual is not None:
                self.perceptual.to(device)

    def active_phases(self, epoch: int) -> list[str]:
        if self.adversarial and epoch >= self.losses.adversarial_warmup_epochs:
            return ["generator", "discriminator"]
        return ["generator"]

    def _recon(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.losses.reconstruction == "l2":
            return F.mse_loss(recon.float(), x.float())
        return F.l1_loss(recon.float(), x.float())

    def loss(self, phase: str, batch: dict, state: dict):
        x = batch["image"]
        if phase == "generator":
            recon, z_mu, z_sigma = self.autoencoder(x)
            state["recon"] = recon
            rec = self._recon(recon, x)
            kl = kl_loss(z_mu.float(), z_sigma.float())
            total = rec + self.losses.kl_weight * kl
            logs = {"loss": rec.item(), "kl": kl.item()}
            if self.perceptual is not None:
                p = self.perceptual(recon.float(), x.float())
                total = total + self.losses.perceptual_weight * p
                logs["perceptual"] = p.item()
            if "discriminator" in state["phases"]:
                logits = self.discriminator(recon.contiguous().float())[-1]
                g = self.adv_loss(logits, target_is_real=True, for_discriminator=False)
                total = total + self.losses.adversarial_weight * g
                logs["generator_adv"] = g.item()
            return total, logs
        recon = state["recon"].detach()
        fake = self.discriminator(recon.contiguous().float())[-1]
        real = self.discriminator(x.contiguous().float())[-1]
        d = 0.5 * (self.adv_loss(fake, target_is_real=False, for_discriminator=True)
                   + self.adv_loss(real, target_is_real=True, for_discriminator=True))
        return self.losses.adversarial_weight * d, {"discriminator": d.item()}

    def validate(self, batches: Iterator[dict], model: Callable[[str], nn.Module]) -> dict[str, float]:
        ae = model("autoencoder")
        total, count = 0.0, 0
        for batch in batches:
            x = batch["image"].to(self.device)
            z_mu, _ = ae.encode(x)  # the posterior mean: deterministic
            total += self._recon(ae.decode(z_mu), x).item() * x.shape[0]
            count += x.shape[0]
        return {"loss": total / max(1, count)}

    def plot(self, stem: Path, batch: dict, model: Callable[[str], nn.Module]) -> Path | None:
        ae = model("autoencoder")
        rows = []
        for image in batch["image"][:PLOT_EXAMPLES]:  # one at a time: no bigger batch than training's
            x = image[None].to(self.device)
            z_mu, _ = ae.encode(x)
            rows.append([x[0], ae.decode(z_mu).float().clamp(*self.cfg.data.intensity_range)[0]])
        return plot_images(rows, stem, self.cfg, f"AUTOENCODER reconstructions of {len(rows)} validation "
                                                 f"image(s): input | output")

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
