"""Metrics on images or features (MONAI core implementations where MONAI has them).

Every Fréchet distance and MMD is reported with the name of the feature extractor it was
computed on: a distance on other features is a different number, and a distance on
random-weight features is not an FID.
"""

from __future__ import annotations

import itertools
import math

import torch


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) (MONAI FIDMetric)."""
    from monai.metrics import FIDMetric

    return float(FIDMetric()(features_a.double(), features_b.double()))


def _rbf_bandwidth(pooled: torch.Tensor) -> float:
    """Median heuristic: the median pairwise squared distance of the pooled sets."""
    d2 = torch.cdist(pooled, pooled).pow(2)
    off = d2[~torch.eye(len(pooled), dtype=torch.bool)]
    med = float(off.median()) if off.numel() else 1.0
    return med if med > 0 else 1.0


def mmd(features_a: torch.Tensor, features_b: torch.Tensor, kernel: str = "rbf",
        bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy between two feature sets (N, F), (M, F).

    kernel 'rbf': exp(-|x - y|^2 / bandwidth), bandwidth by the median heuristic on the pooled sets;
    kernel 'poly': (x . y / F + 1)^3 (the kernel of the Kernel Inception Distance).
    About 0 for samples of one distribution (it can be slightly negative), larger when they differ.
    """
    a, b = features_a.double(), features_b.double()
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least two samples in each set")
    if kernel == "rbf":
        h = bandwidth or _rbf_bandwidth(torch.cat([a, b]))

        def k(x, y):
            return torch.exp(-torch.cdist(x, y).pow(2) / h)
    elif kernel == "poly":
        f = a.shape[1]

        def k(x, y):
            return (x @ y.T / f + 1) ** 3
    else:
        raise ValueError(f"kernel must be 'rbf' or 'poly', got {kernel!r}")
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())


def _ms_ssim_weights(min_side: int, kernel: int = 7) -> tuple[float, ...]:
    """As many of the standard 5 scales as the smallest axis allows."""
    standard = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    scales = 1
    while scales < 5 and (kernel - 1) * 2 ** scales < min_side:
        scales += 1
    w = standard[:scales]
    return tuple(v / sum(w) for v in w)


def _kernel(shape) -> int:
    return 7 if min(shape[2:]) >= 7 else 3


def _window(shape) -> int:
    """SSIM's usual 11-voxel window, smaller for small images."""
    side = min(shape[2:])
    return 11 if side >= 11 else (7 if side >= 7 else 3)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-pair MS-SSIM of batches (N, C, *spatial) (MONAI MultiScaleSSIMMetric)."""
    from monai.metrics import MultiScaleSSIMMetric

    nd = a.ndim - 2
    kernel = _kernel(a.shape)
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


def reconstruction_metrics(recon: torch.Tensor, real: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """Mean PSNR, SSIM, MS-SSIM and L1 of reconstructions against the originals (N, C, *spatial)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    recon, real = recon.float(), real.float()
    nd = real.ndim - 2
    return {
        "psnr": float(PSNRMetric(max_val=data_range)(recon, real).mean()),
        "ssim": float(SSIMMetric(spatial_dims=nd, data_range=data_range, win_size=_window(real.shape))(recon, real).mean()),
        "ms_ssim": float(ms_ssim(recon, real, data_range).mean()),
        "l1": float((recon - real).abs().mean()),
    }
