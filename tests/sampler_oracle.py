"""The exact denoiser of a dataset of K fixed samples, as a network: what a perfectly trained DDPM / rectified-flow
UNet would predict. With it medimgen's sampling code must give back the data (each sample one of the K), whatever
the schedule, sampler, number of steps or channels; a wrong schedule, timestep or prediction type does not.

For x_t = a x0 + s noise (DDPM: a = sqrt(alphas_cumprod[t]), s = sqrt(1 - alphas_cumprod[t]); rectified flow:
a = 1 - t/T, s = t/T) the posterior over the K samples is softmax(-|x_t - a x_k|^2 / 2 s^2), E[x0 | x_t] its
weighted mean, and the network's target follows from it (epsilon, v, sample; rectified flow: x0 - noise).
Used by tests/test_sampler_oracle.py and benchmarks/sampler_check.py.
"""

from __future__ import annotations

import torch
from torch import nn

from medimgen.config.schema import SchedulerConfig
from medimgen.models.diffusion import is_rflow, training_scheduler


class FiniteDataDenoiser(nn.Module):
    """``data`` (K, C, *spatial): the training set; ``cfg``: the schedule the network was trained with."""

    def __init__(self, data: torch.Tensor, cfg: SchedulerConfig, spatial_dims: int):
        super().__init__()
        self.data = data.double()
        self.cfg = cfg
        self.scheduler = training_scheduler(cfg, spatial_dims)
        self.rflow = is_rflow(self.scheduler)
        self.calls = 0

    def _coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rflow:
            s = t.double() / self.cfg.num_train_timesteps
            return 1 - s, s
        abar = self.scheduler.alphas_cumprod.double()[t.round().long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, **_) -> torch.Tensor:
        self.calls += 1
        xd = x.double()
        view = (-1,) + (1,) * (x.ndim - 1)
        a, s = (c.expand(x.shape[0]) for c in self._coefficients(timesteps.to("cpu").reshape(-1)))
        data = self.data.to(x.device)
        a, s = a.to(x.device), s.to(x.device)
        d2 = ((xd[:, None] - a.view(-1, 1, *view[1:]) * data[None]) ** 2).flatten(2).sum(-1)  # (B, K)
        w = torch.softmax(-d2 / (2 * s.view(-1, 1) ** 2), dim=1)
        x0 = torch.einsum("bk,k...->b...", w, data)
        return self._target(xd, x0, a.view(view), s.view(view)).to(x.dtype)

    def _target(self, x: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict, given E[x0 | x_t] = ``x0``."""
        eps = (x - a * x0) / s
        if self.rflow:
            return x0 - eps
        if self.cfg.prediction_type == "epsilon":
            return eps
        if self.cfg.prediction_type == "v_prediction":
            return a * eps - s * x0
        return x0


def smooth_images(k: int, channels: int, size: tuple[int, ...], low: float = -1.0, high: float = 1.0,
                  seed: int = 0) -> torch.Tensor:
    """K smooth, distinct images (K, C, *size) spanning [low, high]: discs of different radii and centres."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in size], indexing="ij")
    out = []
    for _ in range(k):
        centre = torch.rand(len(size), generator=g) * 0.6 - 0.3
        chans = []
        for _ in range(channels):
            r = 0.3 + 0.5 * float(torch.rand((), generator=g))
            dist = sum((ax - c) ** 2 for ax, c in zip(axes, centre)).sqrt()
            chans.append(torch.sigmoid(6 * (r - dist) / 0.5))
        out.append(torch.stack(chans))
    return low + (high - low) * torch.stack(out)


def nearest_rms(samples: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms distance of each sample to its nearest data item, that item's index)."""
    d = ((samples.double()[:, None] - data.double()[None].to(samples.device)) ** 2).flatten(2).mean(-1).sqrt()
    best = d.min(dim=1)
    return best.values, best.indices


class GaussianDenoiser(FiniteDataDenoiser):
    """The exact denoiser of Gaussian data, every voxel independent: x0 ~ N(``mean``, ``std``^2) (mean (C, *spatial)).
    E[x0 | x_t] = mean + a std^2 (x_t - a mean) / (a^2 std^2 + s^2): a linear map, so an exact sampler's samples have
    the data's mean and spread, and a sampler that walks a different schedule than the network learnt does not
    (finite data forgives that: every trajectory still ends on a training image)."""

    def __init__(self, mean: torch.Tensor, std: float, cfg: SchedulerConfig, spatial_dims: int):
        super().__init__(mean[None], cfg, spatial_dims)
        self.mean, self.std = mean.double(), float(std)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, **_) -> torch.Tensor:
        self.calls += 1
        xd = x.double()
        view = (-1,) + (1,) * (x.ndim - 1)
        a, s = (c.expand(x.shape[0]).to(x.device).view(view)
                for c in self._coefficients(timesteps.to("cpu").reshape(-1)))
        mean, v = self.mean.to(x.device), self.std ** 2
        x0 = mean + a * v * (xd - a * mean) / (a * a * v + s * s)
        return self._target(xd, x0, a, s).to(x.dtype)
