"""KL-autoencoder task: L1 + KL + perceptual + adversarial (LSGAN patch discriminator after a warm-up).

Joint models (``data.generate_labels``) encode image + one-hot label channels and decode image channels + one
logit per class; the label logits add cross-entropy + Dice (``losses.label_ce_weight``/``label_dice_weight``),
and validation reports the label Dice of the reconstructions (medimgen.models.labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medimgen.config.schema import GenerationConfig
from medimgen.models.labels import class_index, dice_per_label, join, label_channels, logits_to_labels
from medimgen.models.losses import kl_loss, label_loss
from medimgen.models.networks import autoencoder_for, build_discriminator
from medimgen.models.perceptual import build_perceptual_loss
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
        self.autoencoder = autoencoder_for(cfg).to(device)
        self.joint = label_channels(cfg) > 0
        self.label_loss = label_loss(cfg.losses.label_ce_weight, cfg.losses.label_dice_weight) if self.joint else None
        self.modules: dict[str, nn.Module] = {"autoencoder": self.autoencoder}
        self.phase_modules = {"generator": ["autoencoder"]}
        self.losses = cfg.losses
        # a foundation autoencoder (autoencoder.source) is adopted, not trained (training.foundation): no
        # discriminator, no perceptual network (nor its weights) are needed
        self.adopted = cfg.autoencoder.is_foundation
        self.adversarial = cfg.losses.adversarial_weight > 0 and not self.adopted
        if self.adversarial:
            self.discriminator = build_discriminator(cfg.discriminator, nd, c).to(device)
            self.modules["discriminator"] = self.discriminator
            self.phase_modules["discriminator"] = ["discriminator"]
            self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual = None
        if cfg.losses.perceptual_weight > 0 and not self.adopted:
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

    def _inputs(self, batch: dict) -> torch.Tensor:
        return join(batch["image"].to(self.device), batch["label"], self.cfg)

    def _labels(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        """The label loss of decoded logits against the batch's label map."""
        c = self.cfg.data.in_channels
        target = class_index(batch["label"].to(self.device), self.cfg.data.label_values)[:, None]
        return self.label_loss(out[:, c:].float(), target)

    def loss(self, phase: str, batch: dict, state: dict):
        x = batch["image"]
        if phase == "generator":
            out, z_mu, z_sigma = self.autoencoder(self._inputs(batch))
            recon = out[:, :self.cfg.data.in_channels]
            state["recon"] = recon
            rec = self._recon(recon, x)
            kl = kl_loss(z_mu.float(), z_sigma.float())
            total = rec + self.losses.kl_weight * kl
            logs = {"loss": rec.item(), "kl": kl.item()}
            if self.joint:
                lab = self._labels(out, batch)
                total = total + lab
                logs["label_loss"] = lab.item()
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
        """Image reconstruction loss (``loss``, which picks the best checkpoint: with the label loss added for a
        joint model) and, for a joint model, the mean foreground Dice of the reconstructed label maps."""
        ae = model("autoencoder")
        c = self.cfg.data.in_channels
        total, count, dices = 0.0, 0, []
        for batch in batches:
            x = batch["image"].to(self.device)
            z_mu, _ = ae.encode(self._inputs(batch))  # the posterior mean: deterministic
            out = ae.decode(z_mu)
            loss = self._recon(out[:, :c], x)
            if self.joint:
                loss = loss + self._labels(out, batch)
                pred = logits_to_labels(out[:, c:].float(), self.cfg).cpu()
                ref = batch["label"].long().clamp(min=0)
                for p, r in zip(pred, ref):
                    d = [v for v in dice_per_label(p, r, self.cfg.data.label_values).values() if v == v]
                    if d:
                        dices.append(sum(d) / len(d))
            total += loss.item() * x.shape[0]
            count += x.shape[0]
        metrics = {"loss": total / max(1, count)}
        if self.joint and dices:
            metrics["label_dice"] = sum(dices) / len(dices)
        return metrics

    def plot(self, stem: Path, batch: dict, model: Callable[[str], nn.Module]) -> Path | None:
        ae = model("autoencoder")
        rows = []
        for image in batch["image"][:PLOT_EXAMPLES]:  # one at a time: no bigger batch than training's
            x = image[None].to(self.device)
            z_mu, _ = ae.encode(self._inputs({"image": x, "label": batch["label"][len(rows)][None]}))
            recon = ae.decode(z_mu)[:, :self.cfg.data.in_channels]
            rows.append([x[0], recon.float().clamp(*self.cfg.data.intensity_range)[0]])
        return plot_images(rows, stem, self.cfg, f"AUTOENCODER reconstructions of {len(rows)} validation "
                                                 f"image(s): input | output")

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
