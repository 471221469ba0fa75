"""Reversible map between nnU-Net-normalised intensities, the model's range, and original units.

model = r0 + (norm - low) / (high - low) * (r1 - r0)   (per channel, clipped to [r0, r1] for training)
original = norm * std + mean                             (fingerprint foreground mean/std)

For CT this is exact: nnU-Net's CTNormalization is (clip(HU, p0.5, p99.5) - mean) / std with
the same fingerprint values. For per-image z-scored MRI the original units are arbitrary;
mapping with the dataset-wide foreground mean/std gives values on the scale of the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from medimgen.config.schema import DataConfig


@dataclass(frozen=True)
class IntensityMap:
    low: tuple[float, ...]
    high: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    out_range: tuple[float, float] = (-1.0, 1.0)

    @classmethod
    def from_config(cls, data: DataConfig) -> "IntensityMap":
        n = data.in_channels
        return cls(
            low=tuple(data.intensity_low) or (-3.0,) * n,
            high=tuple(data.intensity_high) or (3.0,) * n,
            mean=tuple(data.intensity_mean) or (0.0,) * n,
            std=tuple(data.intensity_std) or (1.0,) * n,
            out_range=tuple(data.intensity_range),
        )

    def _shape(self, values: Sequence[float], x, channel_axis: int):
        shape = [1] * x.ndim
        shape[channel_axis] = len(values)
        if isinstance(x, torch.Tensor):
            return torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(shape)
        return np.asarray(values, dtype=np.float64).reshape(shape)

    def to_model(self, norm, channel_axis: int = 0, clip: bool = True):
        lo, hi = self._shape(self.low, norm, channel_axis), self._shape(self.high, norm, channel_axis)
        r0, r1 = self.out_range
        out = r0 + (norm - lo) / (hi - lo) * (r1 - r0)
        if clip:
            out = out.clamp(r0, r1) if isinstance(out, torch.Tensor) else np.clip(out, r0, r1)
        return out

    def to_normalized(self, model, channel_axis: int = 0):
        lo, hi = self._shape(self.low, model, channel_axis), self._shape(self.high, model, channel_axis)
        r0, r1 = self.out_range
        return lo + (model - r0) / (r1 - r0) * (hi - lo)

    def normalized_to_original(self, norm, channel_axis: int = 0):
        return norm * self._shape(self.std, norm, channel_axis) + self._shape(self.mean, norm, channel_axis)

    def to_original(self, model, channel_axis: int = 0):
        """Model output -> original intensity units (HU for CT)."""
        return self.normalized_to_original(self.to_normalized(model, channel_axis), channel_axis)

    def background(self) -> tuple[float, ...]:
        """Model-range value used for padded voxels (the lower end: air / background)."""
        return (self.out_range[0],) * len(self.low)
