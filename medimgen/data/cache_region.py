"""What the latent cache keeps of a case: the region of its voxels that is encoded, and the label map's dtype.

One implementation for the cache's build (medimgen.training.latents) and the planner's size estimate
(medimgen.planning.latent_cache), so that the bytes planned are the bytes written.

The region of a case of a given (preprocessed) spatial shape depends on its shape and the config alone: the case's
centre, padded to at least ``data.image_size`` and, where the case is larger, up to ``MAX_EXTENT`` x image_size per
axis, rounded up to the autoencoder's total stride. When the memory fitter planned a crop resampled to the image size
(``data.crop_size``), the centred crop is resampled to image_size and cached as is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medimgen.config.schema import GenerationConfig
from medimgen.data.loader import crop_size, maybe_resize
from medimgen.models.networks import total_stride

MAX_EXTENT = 2  # a case larger than image_size is cached up to this many times image_size per axis


def region(cfg: GenerationConfig, shape: Sequence[int]) -> tuple[tuple[int, ...], list]:
    """(native voxels of a case of spatial ``shape`` that its cached latents cover, the resampling to apply).

    The region is at least image_size and, where the case is larger, up to MAX_EXTENT x image_size per axis, rounded
    up to the autoencoder's total stride; it depends on nothing else (the encoder pass is bounded by tiling,
    medimgen.training.latents.encode_region)."""
    size = tuple(cfg.data.image_size)
    if crop_size(cfg) != size:  # the memory fitter's coarser spacing: the planned crop, resampled to image_size
        return tuple(crop_size(cfg)), maybe_resize(cfg)
    stride = total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)
    return tuple(min(MAX_EXTENT * s, max(s, -(-int(n) // k) * k)) for s, n, k in zip(size, shape, stride)), []


def cached_size(cfg: GenerationConfig, shape: Sequence[int]) -> tuple[int, ...]:
    """Voxels the cache holds of a case of spatial ``shape`` once its region is resampled (image_size where the
    region is resampled, else the region): the label map's size; the latents' is this over the total stride."""
    native, resize = region(cfg, shape)
    return tuple(cfg.data.image_size) if resize else native


def label_dtype(cfg: GenerationConfig):
    """The dtype of a cached label map (a ControlNet's cache): int8 where the label values allow it."""
    return np.int8 if max(cfg.data.label_values or (0,)) < 128 else np.int16
