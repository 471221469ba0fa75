"""Proof of learning: the weight-free image-statistics MMD (evaluation/statistics.py), and (slow) the planned 2D
DDPM's samples and the autoencoder's reconstructions after a short CPU training against untrained networks and
Gaussian noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medimgen.evaluation.statistics import image_statistics, statistics_mmd
from medimgen.synthetic import make_phantom


def _phantoms(n: int, seed: int) -> torch.Tensor:
    """n 2D phantom slices (1, 32, 32) scaled to [-1, 1] (background at -1)."""
    rng = np.random.default_rng(seed)
    images = [make_phantom((32, 32), (1.0, 1.0), rng=rng)[0] for _ in range(n)]
    x = torch.from_numpy(np.stack(images)).float()
    return (x / 700.0 * 2 - 1).clamp(-1, 1)


def test_image_statistics_by_hand():
    x = torch.full((2, 1, 4, 4), -1.0)
    x[1, 0, :, 2:] = 1.0  # right half bright: one vertical edge
    s = image_statistics(x, (-1.0, 1.0), bins=4)
    assert s.shape == (2, 4 + 1 + 2)
    torch.testing.assert_close(s[0], torch.tensor([1.0, 0, 0, 0, 0, 0, 0]))
    # histogram: half in the first bin, half in the last; foreground 1/2; no change along rows, one of 3 steps along
    # columns is a jump of the whole range
    torch.testing.assert_close(s[1], torch.tensor([0.5, 0, 0, 0.5, 0.5, 0, 1 / 3]))


def test_statistics_mmd_separates_phantoms_from_noise():
    real, more = _phantoms(12, 0), _phantoms(12, 1)
    noise = torch.randn(12, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    blurred_noise = torch.nn.functional.avg_pool2d(noise, 5, 1, 2).clamp(-1, 1)  # smoother, still no anatomy
    same = statistics_mmd(more, real)
    assert abs(same) < 0.1
    assert statistics_mmd(noise, real) > 10 * max(same, 0.01)
    assert statistics_mmd(blurred_noise, real) > 5 * max(same, 0.01)
    with pytest.raises(ValueError, match="differ in shape"):
        statistics_mmd(noise[:, :, :16], real)
