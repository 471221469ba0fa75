"""Metrics on images or features (MONAI core implementations).

Every Fréchet distance is reported with the name of the feature extractor it was computed
on: a distance on other features is a different number, and a distance on random-weight
features is not an FID.
"""

from __future__ import annotations

import itertools
import math

import torch


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) (MONAI FIDMetric)."""
    from monai.metrics import FIDMetric

    return float(FIDMetric()(features_a.double(), features_b.double()))


def _ms_ssim_weights(min_side: int, kernel: int = 7) -> tuple[float, ...]:
    """As many of the standard 5 scales as the smallest axis allows."""
    standard = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    scales = 1
    while scales < 5 and (kernel - 1) * 2 ** scales < min_side:
        scales += 1
    w = standard[:scales]
    return tuple(v / sum(w) for v in w)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-pair MS-SSIM of batches (N, C, *spatial) (MONAI MultiScaleSSIMMetric)."""
    from monai.metrics import MultiScaleSSIMMetric

    nd = a.ndim - 2
    kernel = 7 if min(a.shape[2:]) >= 7 else 3
    metric = MultiScaleSSIMMetric(spatial_dims=nd, data_range=data_range, kernel_size=kernel,
                                  weights=_ms_ssim_weights(min(a.shape[2:]), kernel))
    return metric(a.float(), b.float()).flatten()


def mean_pairwise_ms_ssim(images: torch.Tensor, data_range: float = 2.0, max_pairs: int = 200) -> float:
    """Mean MS-SSIM over distinct pairs of a set: high means little diversity."""
    pairs = list(itertools.combinations(range(images.shape[0]), 2))[:max_pairs]
    if not pairs:
        return math.nan
    i, j = zip(*pairs)
    return float(ms_ssim(images[list(i)], images[list(j)], data_range).mean())
