"""Reversible map between nnU-Net-normalised intensities, the model's range, and original units.

model = r0 + (norm - low) / (high - low) * (r1 - r0)   (per channel, clipped to [r0, r1] for training)
original = norm * std + mean                             (per channel; model values <= r0: ``raw_background``)

``mean``/``std`` are the offset and scale nnU-Net's normalisation removed (config
``intensity_case_mean/std``, planned by medimgen.planning.intensity_stats). CT is exact: nnU-Net's
CTNormalization is (clip(HU, p0.5, p99.5) - mean) / std with the fingerprint's values, so the
inverse gives HU back (up to that clip). Per-case z-scored MRI has no dataset-wide units: a case
is mapped back exactly with its own mean/std, and a generated image with a representative case's
(the median over the raw cases of the per-case mean and of the per-case std, over the voxels nnU-Net
used). Voxels outside nnU-Net's nonzero mask get the model's lower bound r0 in training; a sample at
r0 gets the raw value of those voxels back (``raw_background``, 0) where the dataset has them; that value is
the data's floor, so nothing maps below it (the map is continuous: no jump just above r0).
Configs from before these fields map back with the fingerprint's foreground mean/std.
The model's own range is the only other bound (outputs are clamped to it before mapping back).
Where the model's range reaches beyond what nnU-Net's preprocessing gives (a foundation autoencoder's HU window
[-1000, 1000] around nnU-Net's CT clip to the foreground's 0.5/99.5 percentiles), ``to_normalized`` clamps to
nnU-Net's range (``clip_low``/``clip_high``), so what reads nnU-Net-space images (evaluation features) sees values
nnU-Net could have given; ``to_original`` keeps the window's HU.
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
    raw_background: tuple[float, ...] = ()  # original value of model values <= r0 (empty: linear)
    clip_low: tuple[float, ...] = ()  # nnU-Net's own normalised range (CT: its percentile clip; empty: no clamp)
    clip_high: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, data: DataConfig) -> "IntensityMap":
        n = data.in_channels
        return cls(
            low=tuple(data.intensity_low) or (-3.0,) * n,
            high=tuple(data.intensity_high) or (3.0,) * n,
            mean=tuple(data.intensity_case_mean) or tuple(data.intensity_mean) or (0.0,) * n,
            std=tuple(data.intensity_case_std) or tuple(data.intensity_std) or (1.0,) * n,
            out_range=tuple(data.intensity_range),
            raw_background=tuple(data.intensity_background),
            clip_low=tuple(data.intensity_clip_low),
            clip_high=tuple(data.intensity_clip_high),
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

    def _linear_normalized(self, model, channel_axis: int = 0):
        lo, hi = self._shape(self.low, model, channel_axis), self._shape(self.high, model, channel_axis)
        r0, r1 = self.out_range
        return lo + (model - r0) / (r1 - r0) * (hi - lo)

    def to_normalized(self, model, channel_axis: int = 0):
        """Model values -> nnU-Net's normalised space, as nnU-Net's preprocessing gives it: within ``clip_low``/
        ``clip_high`` where set (a foundation autoencoder's HU window reaches beyond nnU-Net's CT clip)."""
        norm = self._linear_normalized(model, channel_axis)
        if not self.clip_low:
            return norm
        lo, hi = self._shape(self.clip_low, norm, channel_axis), self._shape(self.clip_high, norm, channel_axis)
        if isinstance(norm, torch.Tensor):
            return torch.minimum(torch.maximum(norm, lo.to(norm.dtype)), hi.to(norm.dtype))
        return np.clip(norm, lo, hi)

    def normalized_to_original(self, norm, channel_axis: int = 0):
        return norm * self._shape(self.std, norm, channel_axis) + self._shape(self.mean, norm, channel_axis)

    def to_original(self, model, channel_axis: int = 0):
        """Model output -> original intensity units (HU for CT), continuous and within what the data holds.

        The model value is first clamped to the model's range (training never showed it values outside). With
        ``raw_background`` set (the value of voxels outside nnU-Net's nonzero mask, MRI's 0 background; CT: the
        lower clip), that value is the data's floor: the lower bound maps to it and nothing maps below it, so the
        map has no jump at the lower bound (a value just above it cannot come back far below the background)."""
        r0, r1 = self.out_range
        model = model.clamp(r0, r1) if isinstance(model, torch.Tensor) else np.clip(model, r0, r1)
        out = self.normalized_to_original(self._linear_normalized(model, channel_axis), channel_axis)
        if not self.raw_background:
            return out
        bg = self._shape(self.raw_background, model, channel_axis)
        at_floor = model <= r0
        if isinstance(out, torch.Tensor):
            bg = bg.to(out.dtype)
            return torch.where(at_floor, bg, torch.maximum(out, bg))
        return np.where(at_floor, bg, np.maximum(out, bg))

    def background(self) -> tuple[float, ...]:
        """Model-range value used for padded voxels (the lower end: air / background)."""
        return (self.out_range[0],) * len(self.low)
