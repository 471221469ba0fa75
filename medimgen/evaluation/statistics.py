"""Image statistics and their MMD: a score of generated against real images that needs no network weights.

Each image (C, *spatial), model range [lo, hi], becomes a short vector: per channel the histogram of its
intensities (``bins`` bins over the range, as fractions of the voxels), the fraction of "foreground" voxels
(above the lowest tenth of the range) and the mean absolute difference between neighbouring voxels along each
axis (in units of the range: smooth anatomy is low, noise is high). Two sets of such vectors are compared with
the kernel MMD of ``metrics.mmd`` (RBF, averaged over bandwidths of 1/4, 1 and 4 times the median squared
distance between the *real* vectors, so that scores of different generators against one real set are
comparable). About 0 for images like the real ones; Gaussian noise and untrained networks score far higher.

It sees intensities, body size and smoothness, not anatomy: a proof that a model learns, not a quality score
(``medimgen evaluate`` reports FID/MMD on learned features for that).
"""

from __future__ import annotations

import torch

from medimgen.evaluation.metrics import _rbf_bandwidth, mmd

FOREGROUND = 0.1  # foreground: above lo + FOREGROUND * (hi - lo)
BANDWIDTH_SCALES = (0.25, 1.0, 4.0)


def image_statistics(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
                     bins: int = 16) -> torch.Tensor:
    """(N, F) statistics of images (N, C, *spatial): per channel intensity histogram, foreground fraction and
    mean absolute neighbour difference per axis."""
    lo, hi = (float(v) for v in value_range)
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)  # [0, 1]
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    index = (flat * bins).long().clamp(max=bins - 1)
    hist = torch.zeros(n, c, bins).scatter_add_(2, index, torch.ones_like(flat)) / flat.shape[-1]
    foreground = (flat > FOREGROUND).float().mean(-1, keepdim=True)
    smooth = torch.stack([x.diff(dim=d).abs().flatten(2).mean(-1) for d in range(2, x.ndim)], dim=-1)
    return torch.cat([hist, foreground, smooth], dim=-1).reshape(n, -1)


def statistics_mmd(generated: torch.Tensor, real: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
                   bins: int = 16) -> float:
    """Squared MMD between the image statistics of generated and real images (both (N, C, *spatial), N >= 2)."""
    if tuple(generated.shape[1:]) != tuple(real.shape[1:]):
        raise ValueError(f"generated images {tuple(generated.shape[1:])} and real images "
                         f"{tuple(real.shape[1:])} differ in shape")
    g, r = image_statistics(generated, value_range, bins), image_statistics(real, value_range, bins)
    h = _rbf_bandwidth(r.double())
    return sum(mmd(g, r, bandwidth=h * s) for s in BANDWIDTH_SCALES) / len(BANDWIDTH_SCALES)
