"""Loss terms shared by training and the memory simulation."""

from __future__ import annotations

import torch


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of the autoencoder's posterior N(mu, sigma) from N(0, 1), summed per sample, batch mean."""
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1, dim=dims)
    return kl.mean()


class PerChannel(torch.nn.Module):
    """A 1-channel image loss (MONAI's PerceptualLoss: LPIPS wants 1 or 3 RGB channels) applied to
    each channel of a multi-channel image (e.g. T1, T2, FLAIR) and averaged."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channels = input.shape[1]
        if channels == 1:
            return self.loss(input, target)
        return sum(self.loss(input[:, c:c + 1], target[:, c:c + 1]) for c in range(channels)) / channels


def label_loss(ce_weight: float, dice_weight: float) -> torch.nn.Module:
    """Cross-entropy + soft Dice on a joint autoencoder's label logits (B, K+1, *S) against class indices
    (B, 1, *S), as nnU-Net trains segmentation: Dice over the foreground classes, batch Dice (MONAI DiceCELoss)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                      lambda_ce=ce_weight, lambda_dice=dice_weight)
