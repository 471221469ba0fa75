"""The LDM's way back from latents to images: the autoencoder's decoder on the whole latent, or tiled.

Tiled decoding runs the decoder on overlapping latent windows with MONAI's ``sliding_window_inference``
(Gaussian blending; each window's output is its latent window times the decoder's upsampling, which MONAI
scales for) so that a volume whose decoding would not fit the GPU in one piece is still decodable (MAISI
decodes its large volumes the same way). The windows overlap by at least twice the decoder's receptive
halo (latent voxels an output voxel sees beyond its own, from the 3x3 convolutions of every level), so every
voxel is far from some window's border; what tiling cannot reproduce exactly is the decoder's group
normalisation, whose statistics are those of a window rather than of the whole image (a small difference,
tests/test_decoding.py). Which window fits a GPU is decided by medimgen.planning.sampling_memory.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from medimgen.config.schema import AutoencoderConfig

MAX_OVERLAP = 0.5  # beyond this the number of windows grows faster than the accuracy


def halo(cfg: AutoencoderConfig, spatial_dims: int) -> tuple[int, ...]:
    """Latent voxels, per axis, that a decoded voxel depends on beyond its own latent voxel: the receptive radius
    of MONAI's AutoencoderKL decoder as medimgen builds it (conv_in, ``num_res_blocks`` residual blocks of two 3x3
    convolutions per level, the convolution after each upsampling, conv_out; no middle attention block), counted at
    each level's resolution and expressed in latent voxels. Attention levels (off as planned) see everything."""
    strides = [tuple(int(v) for v in s) for s in reversed(cfg.strides)]  # decoder order: latent level first
    out = []
    for axis in range(spatial_dims):
        radius, scale = 1.0, 1.0  # conv_in
        for level in range(len(cfg.channels)):
            radius += 2 * cfg.num_res_blocks / scale
            if level < len(strides):
                scale *= strides[level][axis]
                radius += 1 / scale  # the convolution after the upsampling, at the finer resolution
        radius += 1 / scale  # conv_out
        out.append(math.ceil(radius))
    return tuple(out)


def overlap_for(tile: Sequence[int], latent: Sequence[int], halo_voxels: Sequence[int]) -> tuple[float, ...]:
    """Per-axis overlap fraction of the windows: twice the halo of a window (at most MAX_OVERLAP); 0 along an axis
    the window covers whole."""
    return tuple(0.0 if t >= n else min(MAX_OVERLAP, max(0.25, 2 * h / t))
                 for t, n, h in zip(tile, latent, halo_voxels))


def window_weights(tile: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The Gaussian blending weights of one latent window (MONAI's compute_importance_map)."""
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(int(t) for t in tile), mode="gaussian", device=device)


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: Sequence[int],
                 halo_voxels: Sequence[int], weights: torch.Tensor | None = None, progress: bool = False
                 ) -> torch.Tensor:
    """``decode`` (latent window -> image window) over ``z`` in overlapping windows of ``tile`` latent voxels,
    blended with Gaussian weights (MONAI's sliding_window_inference), output stitched on ``z``'s device.
    ``weights``: :func:`window_weights` of the clipped tile, when already made."""
    from monai.inferers import sliding_window_inference

    tile = tuple(min(int(t), int(n)) for t, n in zip(tile, z.shape[2:]))
    if weights is None or tuple(weights.shape) != tile:
        weights = window_weights(tile, z.device)
    return sliding_window_inference(z, roi_size=tile, sw_batch_size=1, predictor=decode,
                                    overlap=overlap_for(tile, z.shape[2:], halo_voxels), mode="gaussian",
                                    roi_weight_map=weights, progress=progress)


def decoder(autoencoder: torch.nn.Module, scale_factor: float, tile: Sequence[int] | None = None,
            cfg: AutoencoderConfig | None = None, progress: bool = False, weights: torch.Tensor | None = None
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LDM's decoder (medimgen.models.diffusion.latent_decoder) on whole latents (``tile`` None) or in latent windows
    of ``tile`` voxels (``cfg``: the autoencoder's section, for its receptive halo; ``weights``: the windows'
    blending weights, made on first use when not given)."""
    from medimgen.models.diffusion import latent_decoder

    if tile is None:
        return latent_decoder(autoencoder, scale_factor)
    if cfg is None:
        raise ValueError("tiled decoding needs the autoencoder's config (its receptive halo)")
    halo_voxels = halo(cfg, len(tile))
    return lambda z: tiled_decode(autoencoder.decode_stage_2_outputs, z / scale_factor, tile, halo_voxels, weights,
                                  progress)
