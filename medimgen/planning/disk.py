"""Predict the disk a planned run will use: checkpoints, registered model, plots and samples.

Sizes follow from the networks' parameter and buffer tensors (built on PyTorch's meta device:
nothing is allocated) and from what each file holds (training/loop.py):

- ``best.pt``: the sampling networks' weights (EMA copy where used; no discriminator, no
  optimiser), float32, plus config and metadata.
- ``last.pt``: every trained network, AdamW's two moments per trained parameter (+ one step
  counter per tensor), the EMA copy (DDPM/LDM with ``ema_decay``), RNG states and history.
- registered model (DDPM/LDM/ControlNet, ``tracking.log_models``): the sampling weights as
  safetensors; a model bundles what it samples through (an LDM its autoencoder, a ControlNet its
  frozen base UNet and, on an LDM base, the autoencoder): a fresh process samples from it alone.
- plots: one GIF (3D) / PNG (2D) per plotted epoch, at most one byte per shown voxel (a ControlNet
  shows each sample next to its label map).
- samples: a float32 NIfTI per channel (gzip barely compresses generated noise-like values).
- the latent cache of a kind with ``cache_latents`` (LDM, ControlNet on an LDM): mean and std per training sample,
  float32 at the latent size of the region each case is cached at (a ControlNet's: + its label map), beside the
  preprocessed data, once per autoencoder (``latent_cache_bytes``, sized per case by planning.latent_cache;
  tests/test_latent_cache.py checks it against a built cache).

``tests/test_training.py::test_disk_estimate_matches_a_trained_run`` checks best.pt, last.pt
and the registered model within ``TOLERANCE`` of a real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from medimgen.config.kinds import kind, names
from medimgen.config.schema import GenerationConfig

if TYPE_CHECKING:
    from medimgen.planning.latent_cache import CachedCases

TOLERANCE = 0.10  # relative error of best/last/registered, checked against a tiny trained run
# torch.save (zip): per tensor one archive entry (headers + 64-byte alignment) and its pickle record
TORCH_BYTES_PER_TENSOR = 320
TORCH_FIXED_BYTES = {"best": 16_000, "last": 40_000}  # config YAML, RNG states, history, zip directory
SAFETENSORS_BYTES_PER_TENSOR = 110  # JSON header entry (name, dtype, shape, offsets)
MODEL_FILES_BYTES = 20_000  # MLmodel, config.yaml, meta.json, mlflow_model.py, environment files
LOSS_PLOT_BYTES = 60_000
MB = 1e6


@dataclass(frozen=True)
class Tensors:
    """Bytes and number of the tensors of a network's state_dict; ``trainable``: of its parameters."""

    bytes: int
    count: int
    trainable_bytes: int
    trainable_count: int
    params: int

    def __add__(self, other: "Tensors") -> "Tensors":
        return Tensors(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, ...]:
        return self.bytes, self.count, self.trainable_bytes, self.trainable_count, self.params


NONE = Tensors(0, 0, 0, 0, 0)


def _tensors(key: tuple, build) -> Tensors:
    """The tensors of ``build()``, built once per ``key`` (everything the network depends on) and kept with the
    memory simulations (planning/sim_cache.py): `plan --explain` of an unchanged config builds nothing, so it
    need not import MONAI."""
    from medimgen.planning import sim_cache

    key = ("disk tensors", *key)
    if key in _built:
        return _built[key]
    stored = sim_cache.load(key)
    try:
        t = Tensors(*(int(stored[f]) for f in Tensors.__dataclass_fields__)) if stored is not None else None
    except (KeyError, TypeError, ValueError):  # a damaged entry: build again
        t = None
    if t is None:
        with torch.device("meta"):
            net = build()
        state = net.state_dict()
        params = [p for p in net.parameters() if p.requires_grad]
        t = Tensors(sum(v.numel() * v.element_size() for v in state.values()), len(state),
                    sum(p.numel() * p.element_size() for p in params), len(params), sum(p.numel() for p in params))
        sim_cache.store(key, dict(zip(Tensors.__dataclass_fields__, t.astuple())))
    _built[key] = t
    return t


_built: dict = {}


def _networks(cfg: GenerationConfig, model: str) -> tuple[Tensors, Tensors, Tensors]:
    """(sampling network of the run, other trained networks, networks bundled only in the registered model)."""
    from medimgen.models.networks import build_autoencoder, build_discriminator, build_unet

    from medimgen.models.labels import autoencoder_out_channels, network_channels

    nd, c = cfg.data.spatial_dims, cfg.data.in_channels
    ae = ("autoencoder", cfg.autoencoder, nd, c)

    def build_ae():  # a foundation autoencoder (autoencoder.source) is its published network, not a planned one
        if not cfg.autoencoder.is_foundation:
            return build_autoencoder(cfg.autoencoder, nd, c)
        from medimgen.models.foundation import build_foundation_autoencoder

        return build_foundation_autoencoder(cfg.autoencoder.source, c)

    if kind(model).steers:  # a ControlNet: the frozen base (and its autoencoder) ship with it
        from medimgen.models.networks import autoencoder_for, build_controlnet, unet_for

        base = cfg.controlnet_base()
        channels = (nd, network_channels(cfg), autoencoder_out_channels(cfg))
        bundled = _tensors(("unet_for", base, cfg.unet_for(base), cfg.autoencoder.latent_channels, *channels),
                           lambda: unet_for(cfg, base))
        if kind(base).space == "latent":
            bundled = bundled + _tensors(("autoencoder_for", cfg.autoencoder, *channels), lambda: autoencoder_for(cfg))
        net = _tensors(("controlnet", cfg.controlnet, base, cfg.unet_for(base), cfg.autoencoder,
                        tuple(cfg.data.label_values), *channels), lambda: build_controlnet(cfg))
        return net, NONE, bundled
    if kind(model).encoder:
        adopted = cfg.autoencoder.is_foundation  # adopted as published: no discriminator trained
        disc = _tensors(("discriminator", cfg.discriminator, nd, c), lambda: build_discriminator(
            cfg.discriminator, nd, c)) if cfg.losses.adversarial_weight > 0 and not adopted else NONE
        return _tensors(ae, build_ae), disc, NONE
    unet_cfg = cfg.unet_for(model)
    if cfg.space_of(model) == "image":
        return _tensors(("unet", unet_cfg, nd, c), lambda: build_unet(unet_cfg, nd, c)), NONE, NONE
    latent = cfg.autoencoder.latent_channels
    unet = _tensors(("unet", unet_cfg, nd, latent), lambda: build_unet(unet_cfg, nd, latent))
    return unet, NONE, _tensors(ae, build_ae)


def _torch_file(t: Tensors, fixed: int) -> int:
    return t.bytes + TORCH_BYTES_PER_TENSOR * t.count + fixed


@dataclass(frozen=True)
class DiskEstimate:
    model: str
    params: int  # trained parameters of the run (autoencoder: with the discriminator)
    best: int  # bytes of checkpoints/best.pt
    last: int  # bytes of checkpoints/last.pt
    registered: int  # bytes of one registered model version (0: not logged)
    plots: int  # bytes of the run's plots
    sample: int  # bytes of one generated image (all channels; 0 for the autoencoder)
    mlflow_checkpoints: int  # bytes copied into MLflow by tracking.log_checkpoints

    @property
    def run_total(self) -> int:
        """One training run: its folder, its MLflow artifacts and one registered version (no samples)."""
        return self.best + self.last + self.registered + self.plots + self.mlflow_checkpoints


def estimate_disk(cfg: GenerationConfig, model: str) -> DiskEstimate:
    """Predicted sizes of the files one training run of ``model`` (``cfg`` as planned) writes."""
    sampling, others, bundled = _networks(cfg, model)
    encoder = kind(model).encoder
    train = cfg.train_for(model)
    ema = bool(train.ema_decay) and not encoder
    trained = sampling + others
    adam = Tensors(2 * trained.trainable_bytes + 4 * trained.trainable_count, 3 * trained.trainable_count, 0, 0, 0)
    if encoder and cfg.autoencoder.is_foundation:  # adopted, never stepped: AdamW holds no moments
        adam = NONE
    ema_copy = Tensors(sampling.bytes + 8, sampling.count + 1, 0, 0, 0) if ema else NONE
    best = _torch_file(sampling, TORCH_FIXED_BYTES["best"])
    last = _torch_file(trained + adam + ema_copy, TORCH_FIXED_BYTES["last"])
    registered = 0
    if not encoder and cfg.tracking.log_models:
        weights = sampling + bundled
        registered = weights.bytes + SAFETENSORS_BYTES_PER_TENSOR * weights.count + MODEL_FILES_BYTES
    voxels = math.prod(cfg.data.image_size)
    shown = (2 if encoder else 4) if cfg.data.spatial_dims == 2 else (2 if encoder else 1)
    if kind(model).steers:
        shown *= 2  # each sample beside its label map
    plotted = len({e for e in range(train.val_plot_interval, train.epochs + 1, train.val_plot_interval)} | {train.epochs})
    plots = plotted * voxels * shown + LOSS_PLOT_BYTES
    sample = 0 if encoder else voxels * cfg.data.in_channels * 4
    mlflow_ckpt = best + last if cfg.tracking.log_checkpoints else 0
    return DiskEstimate(model, trained.params, best, last, registered, plots, sample, mlflow_ckpt)


def latent_cache_bytes(cfg: GenerationConfig, cache: CachedCases | None) -> dict[str, int]:
    """{model: bytes of its latent cache} of the kinds training on one (``train_*.cache_latents``) for the training
    samples ``cache`` (planning.latent_cache.cached_cases; None: none counted): written once beside the preprocessed
    data and shared by every run with the same autoencoder (planning.latent_cache)."""
    from medimgen.planning.latent_cache import cache_bytes, latent_models

    if cache is None:
        return {}
    return {m: cache_bytes(cfg, m, cache) for m in latent_models(cfg) if cfg.train_for(m).cache_latents}


def explain_disk(cfg: GenerationConfig, dim: str, num_samples: int = 100, cache: CachedCases | None = None) -> str:
    """The disk table of ``medimgen plan --explain`` (``cache``: the training samples a latent cache holds,
    planning.latent_cache.cached_cases)."""
    rows = [estimate_disk(cfg, m) for m in sorted(names(), key=lambda m: not kind(m).encoder)]  # encoders first
    lines = [f"{dim}: disk per run (MB; best.pt = sampling weights, last.pt = resume state, registered = one MLflow "
             f"model version{', checkpoints also copied to MLflow' if cfg.tracking.log_checkpoints else ''})",
             f"  {'model':<12}{'params':>12}{'best.pt':>10}{'last.pt':>10}{'registered':>12}{'plots':>9}"
             f"{'run total':>11}{f'{num_samples} samples':>13}"]
    for e in rows:
        lines.append(f"  {e.model:<12}{e.params:>12,}{e.best / MB:>10.1f}{e.last / MB:>10.1f}"
                     f"{e.registered / MB:>12.1f}{e.plots / MB:>9.1f}{e.run_total / MB:>11.1f}"
                     f"{num_samples * e.sample / MB:>13.1f}")
    total = sum(e.run_total for e in rows)
    samples = sum(num_samples * e.sample for e in rows)
    lines.append(f"  total {dim}: {total / MB:.1f} MB for the {len(rows)} runs (+ {samples / MB:.1f} MB for {num_samples} "
                 f"samples of each generator); each further registered version adds its 'registered' size")
    for model, size in latent_cache_bytes(cfg, cache).items():
        lines.append(f"  + {model} latent cache: {size / MB:.1f} MB beside the preprocessed data "
                     f"({cache.describe(size)}; once per autoencoder)")
    return "\n".join(lines)
