"""Predicted peak CUDA memory of sampling, and the latent tile that makes an LDM's decoding fit the GPU.

Sampling holds the UNet (and an LDM's autoencoder) and runs, under no_grad, one UNet forward per step on the
batch of noises and then the decoder on the final latents. That is simulated with the training prediction's
machinery (planning/cuda_sim.peak_of: the real forward on meta tensors under CUDA's autocast policy, live bytes
counted as CUDA's caching allocator counts them) times the same calibrated ``CUDA_OVERHEAD``, so the number is
what ``torch.cuda.max_memory_allocated`` reports. When the decoding does not fit the usable memory of the target
(planning/memory.usable_bytes), the decoder runs on latent windows (medimgen.models.decoding): the largest window, made by
halving the axis with most decoded voxels, whose predicted peak fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medimgen.config.schema import GenerationConfig
from medimgen.planning.memory import CUDA_OVERHEAD, GIB, usable_bytes

MIN_TILE = 4  # latent voxels per axis below which a window is mostly halo


@dataclass(frozen=True)
class SamplingMemory:
    """What sampling ``batch`` images is predicted to take on a GPU of ``target_bytes``."""

    model: str
    batch: int
    peak_bytes: float  # with the chosen decoding
    untiled_bytes: float  # decoding the whole latent at once (= peak_bytes for a DDPM)
    tile: tuple[int, ...] | None  # latent window of tiled decoding, None: whole
    target_bytes: float

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= usable_bytes(self.target_bytes)

    def describe(self) -> str:
        line = (f"predicted sampling peak {self.peak_bytes / GIB:.2f} GB for {self.batch} image(s) per pass "
                f"(usable {usable_bytes(self.target_bytes) / GIB:.2f} of {self.target_bytes / GIB:g} GB)")
        if self.tile is not None:
            line += f"; decoding in latent tiles {list(self.tile)} (whole: {self.untiled_bytes / GIB:.2f} GB)"
        return line + ("" if self.fits else " - DOES NOT FIT: lower --batch-size")


_cache: dict = {}
# measured / simulated peak of an LDM's decoding on a GPU (H200, 2026-11-26, 3D 8 GB plan at 144x192x160: whole
# 1.189, two latent windows 1.173 and 1.163; benchmarks/README.md): what inference-mode decoding allocates beyond
# the simulation (cuDNN workspaces of the large 3D convolutions, by the look of it: not yet traced)
DECODE_OVERHEAD = 1.175


def predict_peak(cfg: GenerationConfig, model: str, batch: int = 1, tile: tuple[int, ...] | None = None,
                 amp: bool = True, unet: bool = True) -> float:
    """Predicted peak bytes of sampling ``batch`` images of ``model`` (ddpm/ldm): one UNet step (``unet``) and an
    LDM's decoding, whole (``tile`` None) or in latent windows of ``tile``; ``unet=False``: the autoencoder and its
    decoding alone."""
    latent = cfg.space_of(model) == "latent"
    key = (model, cfg.data.spatial_dims, tuple(cfg.data.image_size), cfg.data.in_channels, cfg.data.generate_labels,
           tuple(cfg.data.label_values), cfg.unet_for(model), cfg.autoencoder if latent else None, batch,
           tile, amp, unet)
    if key not in _cache:
        _cache[key] = _simulate(cfg, model, batch, tile, amp, unet) * CUDA_OVERHEAD * \
            (DECODE_OVERHEAD if latent else 1.0)
    return _cache[key]


def _simulate(cfg: GenerationConfig, model: str, batch: int, tile, amp: bool, unet: bool) -> int:
    from medimgen.models.decoding import decoder
    from medimgen.models.diffusion import sample_shape
    from medimgen.models.networks import autoencoder_for, unet_for
    from medimgen.planning.cuda_sim import peak_of

    shape = sample_shape(cfg, model, batch)
    # made for real before the simulation (meta tensors hold no values): MONAI reads a value of the blending weights
    weights = None
    if tile is not None:
        from medimgen.models.decoding import window_weights

        weights = window_weights(tuple(min(t, n) for t, n in zip(tile, shape[2:])))

    def build():
        net = unet_for(cfg, model).eval() if unet else None
        ae = autoencoder_for(cfg).eval() if cfg.space_of(model) == "latent" else None
        for m in (net, ae):
            if m is not None:
                m.requires_grad_(False)

        @torch.no_grad()
        def step():
            x = torch.randn(shape)
            if net is not None:  # one reverse step: the UNet's prediction next to the current sample
                x = x + net(x, timesteps=torch.tensor([500.0]))
            if ae is not None:
                x = decoder(ae, 1.0, tile, cfg.autoencoder, weights=weights)(x)
            return x

        return step

    return peak_of(build, amp=amp)


def latent_tiles(cfg: GenerationConfig):
    """Latent windows from the whole latent down, each halving the axis with the most decoded voxels."""
    from medimgen.models.decoding import halo
    from medimgen.models.networks import latent_size, total_stride

    up = total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)
    low = [min(n, max(MIN_TILE, h)) for n, h in zip(latent_size(cfg), halo(cfg.autoencoder, cfg.data.spatial_dims))]
    tile = list(latent_size(cfg))
    while True:
        axes = [i for i in range(len(tile)) if tile[i] > low[i]]
        if not axes:
            return
        axis = max(axes, key=lambda i: tile[i] * up[i])
        tile[axis] = max(low[axis], math.ceil(tile[axis] / 2))
        yield tuple(tile)


def plan_sampling(cfg: GenerationConfig, model: str, batch: int, target_bytes: float, amp: bool = True,
                  tiled: bool | None = None) -> SamplingMemory:
    """The predicted peak of sampling and the decoding that fits ``target_bytes``: an LDM decodes whole when that
    fits (``tiled`` None), else in the largest latent window that fits (the smallest when none does);
    ``tiled`` True: in windows anyway (at most half the latent along its largest axis), False: whole."""
    whole = predict_peak(cfg, model, batch, None, amp)
    if cfg.space_of(model) != "latent" or tiled is False or (tiled is None and whole <= usable_bytes(target_bytes)):
        return SamplingMemory(model, batch, whole, whole, None, target_bytes)
    chosen, peak = None, whole
    for tile in latent_tiles(cfg):
        chosen, peak = tile, predict_peak(cfg, model, batch, tile, amp)
        if peak <= usable_bytes(target_bytes):
            break
    return SamplingMemory(model, batch, peak, whole, chosen, target_bytes)
