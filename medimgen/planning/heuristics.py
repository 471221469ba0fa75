"""nnU-Net plans -> generation config: the rules for what nnU-Net does not decide.

Every rule lives in one small function so it can be read, tested and tuned on its own;
docs/heuristics.md lists them in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medimgen.config.schema import (
    AutoencoderConfig,
    ControlNetConfig,
    DataConfig,
    DerivedConfig,
    DiscriminatorConfig,
    GenerationConfig,
    LossConfig,
    MemoryConfig,
    SchedulerConfig,
    TrackingConfig,
    TrainConfig,
    UNetConfig,
    TRAINED,
    is_foundation,
)
from medimgen.config.io import to_dict
from medimgen.models.networks import total_stride
from medimgen.models.labels import real_labels
from medimgen.nnunet.plans import NNUNET_CONFIGURATION, DatasetPlans

# --- constants of the rules (documented in docs/heuristics.md)
AE_DOWNSAMPLINGS = {2: 3, 3: 2}  # seed: 2-3 downsamplings at most, else details are lost
AE_BASE_CHANNELS = 32  # seed: few filters (e.g. 32) reconstruct well enough
LATENT_CHANNELS = {2: 4, 3: 3}
MAX_DDPM_LEVELS = 4
# the DDPM UNet's widths: nnU-Net's encoder features (a segmenter's) times DDPM_WIDTH, at most DDPM_MAX_CHANNELS.
# 2D: 4x, capped at 256, is MONAI's 2D DDPM tutorial's 128-256-256 on the real-anatomy benchmark, where the plan's
# own 32-64-128 learned ~4x slower per step and ~2x slower per CPU second (benchmarks/README.md, "Ablation").
# 3D: not measured; kept at nnU-Net's widths (the 3D DDPM is the memory-bound model, a wider one is generated smaller).
DDPM_WIDTH = {2: 4, 3: 1}
DDPM_MAX_CHANNELS = 256
MAX_LDM_LEVELS = 3
ATTENTION_MAX_POSITIONS = {2: 32 * 32, 3: 16 * 16 * 16}
TARGET_STEPS = {"autoencoder": 50_000, "ddpm": 100_000, "ldm": 100_000, "controlnet": 50_000}
# Adam(W) learning rates. The LDM's was 2.5e-5 (published brain-MRI LDM settings); on the real-anatomy benchmark the
# MONAI 3D LDM tutorial's 1e-4 made the planned LDM learn several times faster per step on one latent space (held-out
# loss, samples and label fractions; two seeds), enough to lead the tutorial's config at equal compute too
# (benchmarks/README.md, "LDMs on one latent space"). ControlNet: MONAI's ControlNet tutorial rate, unchanged.
LEARNING_RATES = {"autoencoder": 1e-4, "ddpm": 1e-4, "ldm": 1e-4, "controlnet": 2.5e-5}
DISC_LEARNING_RATE = 5e-4
EPOCH_RANGE = (50, 2000)
PLOTS_PER_RUN = 20
VALIDATION_FRACTION = 0.2  # train-val-test keeps 70/10/20; 5-fold 80/20: plan for ~80 % of the cases


def autoencoder_strides(nnunet_strides: Sequence[Sequence[int]], dims: int) -> tuple[tuple[int, ...], ...]:
    """The first 2 (3D) or 3 (2D) of nnU-Net's pooling strides (nnU-Net's stage 0 does not pool)."""
    pooling = [tuple(int(v) for v in s) for s in nnunet_strides[1:]]
    return tuple(pooling[: AE_DOWNSAMPLINGS[dims]])


def autoencoder_channels(n_down: int) -> tuple[int, ...]:
    return (AE_BASE_CHANNELS,) + (2 * AE_BASE_CHANNELS,) * n_down


def unet_levels(features: Sequence[int], nnunet_strides: Sequence[Sequence[int]], start: int, max_levels: int):
    """Channels and strides of a diffusion UNet that reuses nnU-Net's encoder from stage ``start`` on."""
    channels = [int(f) for f in features[start:start + max_levels]]
    strides = [tuple(int(v) for v in s) for s in nnunet_strides[start + 1:start + len(channels)]]
    if not channels:  # latent already smaller than nnU-Net's bottleneck: one level at the deepest width
        channels = [int(features[-1])]
    return tuple(channels), tuple(strides)


def ddpm_widths(channels: Sequence[int], dims: int) -> tuple[int, ...]:
    """The DDPM UNet's channels per level from nnU-Net's features of those levels (see DDPM_WIDTH)."""
    if DDPM_WIDTH[dims] == 1:
        return tuple(int(c) for c in channels)
    return tuple(min(DDPM_MAX_CHANNELS, DDPM_WIDTH[dims] * int(c)) for c in channels)


def attention_levels(size: Sequence[int], strides: Sequence[Sequence[int]], dims: int) -> tuple[bool, ...]:
    """Attention where a level has few enough positions (cost ~ positions^2), never at the first level."""
    out = []
    current = list(size)
    for level in range(len(strides) + 1):
        if level > 0:
            current = [math.ceil(c / s) for c, s in zip(current, strides[level - 1])]
        out.append(level > 0 and int(np.prod(current)) <= ATTENTION_MAX_POSITIONS[dims])
    return tuple(out)


def round_up(size: Sequence[float], divisor: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(math.ceil(round(float(s)) / d) * d) for s, d in zip(size, divisor))


def norm_groups(channels: Sequence[int]) -> int:
    g = 32
    while any(c % g for c in channels):
        g //= 2
    return max(g, 1)


PERCEPTUAL_MIN_SIZE = 32  # AlexNet (LPIPS) features need slices of at least 31 voxels per side


def perceptual_network(image_size: Sequence[int]) -> str:
    """'alex' (LPIPS) where every slice is large enough for AlexNet's features, else 'none'."""
    return "alex" if min(image_size) >= PERCEPTUAL_MIN_SIZE else "none"


def discriminator_layers(image_size: Sequence[int], max_layers: int = 3) -> int:
    """Patch-discriminator depth that the smallest image axis can take (each layer halves it)."""
    return int(max(1, min(max_layers, math.floor(math.log2(max(2, min(image_size)))) - 2)))


def generation_batch_size(nnunet_batch: int, nnunet_patch: Sequence[int], image_size: Sequence[int]) -> int:
    """nnU-Net's batch size, scaled by how many more voxels a generated image has than its patch."""
    ratio = float(np.prod(nnunet_patch)) / float(np.prod(image_size))
    return max(1, int(nnunet_batch * min(ratio, 1.0)))


def epochs_for(model: str, samples_per_epoch: int, batch_size: int) -> tuple[int, int]:
    """(epochs, iterations per epoch): about TARGET_STEPS optimiser steps, epochs kept in EPOCH_RANGE."""
    iterations = max(1, math.ceil(samples_per_epoch / batch_size))
    epochs = int(np.clip(round(TARGET_STEPS[model] / iterations), *EPOCH_RANGE))
    return epochs, iterations


@dataclass(frozen=True)
class _Levels:
    """The networks' levels from nnU-Net's architecture, and the generated image size they allow."""

    dims: int
    ae_strides: tuple
    ddpm_channels: tuple
    ddpm_strides: tuple
    ldm_channels: tuple
    ldm_strides: tuple
    divisor: tuple[int, ...]
    image_size: tuple[int, ...]
    latent_size: tuple[int, ...]
    trained_ae_strides: tuple  # the strides a trained autoencoder gets (the same as ae_strides unless a foundation)


def _levels(cm, autoencoder_source: str = TRAINED) -> _Levels:
    """A foundation autoencoder (``autoencoder_source``) brings its own strides; the image size is then divisible by
    a trained autoencoder's levels too, so falling back to training one (training.foundation) keeps the size."""
    arch = cm.network_arch_init_kwargs
    dims = len(cm.patch_size)
    nn_strides = [list(s) for s in arch["strides"]]
    features = list(arch["features_per_stage"])
    trained = autoencoder_strides(nn_strides, dims)
    ae_strides = trained
    if is_foundation(autoencoder_source):
        from medimgen.models.foundation import architecture

        ae_strides = tuple(tuple(s) for s in architecture(autoencoder_source).strides)
    ae_factor = total_stride(ae_strides, dims)
    ddpm_channels, ddpm_strides = unet_levels(features, nn_strides, 0, MAX_DDPM_LEVELS)
    ddpm_channels = ddpm_widths(ddpm_channels, dims)
    ldm_channels, ldm_strides = unet_levels(features, nn_strides, len(trained), MAX_LDM_LEVELS)
    divisor = total_stride(ddpm_strides, dims)
    for ae in (ae_strides, trained):
        ldm_factor = tuple(a * b for a, b in zip(total_stride(ae, dims), total_stride(ldm_strides, dims)))
        divisor = tuple(int(np.lcm(a, b)) for a, b in zip(divisor, ldm_factor))
    image_size = round_up([float(v) for v in cm.median_image_size_in_voxels], divisor)
    return _Levels(dims, ae_strides, ddpm_channels, ddpm_strides, ldm_channels, ldm_strides, divisor, image_size,
                   tuple(s // f for s, f in zip(image_size, ae_factor)), trained)


def _samples_per_epoch(plans: DatasetPlans, dims: int) -> int:
    """Training cases; 2D trains on slices: an epoch draws one slice per case and per ~8 slices of depth."""
    n_train_cases = max(1, round(plans.num_training * (1 - VALIDATION_FRACTION)))
    if dims == 3:
        return n_train_cases
    depth = plans.manager.get_configuration(NNUNET_CONFIGURATION["3d"]).median_image_size_in_voxels[0] \
        if "3d" in plans.available_dims else 1
    return n_train_cases * max(1, int(round(float(depth) / 8)))


def joint_by_default(plans: DatasetPlans) -> bool:
    """Whether the plan generates labels with images (data.generate_labels): a dataset with real labels."""
    return bool(real_labels(plans.dataset_json))


def _data_config(plans: DatasetPlans, dim: str, cm, lv: _Levels, intensity_low, intensity_high,
                 intensity_stats, intensity_range=(-1.0, 1.0)) -> DataConfig:
    median = [float(v) for v in cm.median_image_size_in_voxels]
    fg = plans.foreground_intensity_properties
    labels = real_labels(plans.dataset_json)
    return DataConfig(
        nnunet_configuration=NNUNET_CONFIGURATION[dim],
        spatial_dims=lv.dims,
        in_channels=plans.num_channels,
        channel_names=plans.channel_names,
        image_size=lv.image_size,
        size_divisor=lv.divisor,
        spacing=tuple(float(s) for s in cm.spacing),
        median_image_size=tuple(int(round(m)) for m in median),
        nnunet_patch_size=tuple(int(p) for p in cm.patch_size),
        nnunet_batch_size=int(cm.batch_size),
        normalization_schemes=tuple(cm.normalization_schemes),
        plans_identifier=plans.plans_identifier,
        intensity_range=tuple(float(v) for v in intensity_range),
        intensity_low=tuple(float(v) for v in intensity_low),
        intensity_high=tuple(float(v) for v in intensity_high),
        intensity_mean=tuple(float(p["mean"]) for p in fg),
        intensity_std=tuple(float(p["std"]) for p in fg),
        intensity_case_mean=tuple(intensity_stats.case_mean) if intensity_stats else (),
        intensity_case_std=tuple(intensity_stats.case_std) if intensity_stats else (),
        intensity_background=tuple(intensity_stats.background) if intensity_stats else (),
        data_size=tuple(min(int(round(m)), s) for m, s in zip(median, lv.image_size)),
        generate_labels=joint_by_default(plans),
        label_values=tuple(labels.values()),
        label_names=tuple(labels),
    )


def trained_autoencoder(lv: _Levels) -> AutoencoderConfig:
    """The autoencoder medimgen trains: few channels, nnU-Net's first pooling strides."""
    ae_channels = autoencoder_channels(len(lv.trained_ae_strides))
    return AutoencoderConfig(channels=ae_channels, strides=lv.trained_ae_strides, latent_channels=LATENT_CHANNELS[lv.dims],
                             attention_levels=(False,) * len(ae_channels), norm_num_groups=norm_groups(ae_channels))


def _networks(lv: _Levels, autoencoder_source: str = TRAINED) -> dict:
    if not is_foundation(autoencoder_source):
        autoencoder = trained_autoencoder(lv)
    else:
        from medimgen.models.foundation import architecture

        autoencoder = architecture(autoencoder_source)
    return dict(
        autoencoder=autoencoder,
        discriminator=DiscriminatorConfig(num_layers=discriminator_layers(lv.image_size)),
        ddpm_unet=UNetConfig(channels=lv.ddpm_channels, strides=lv.ddpm_strides, norm_num_groups=norm_groups(lv.ddpm_channels),
                             attention_levels=attention_levels(lv.image_size, lv.ddpm_strides, lv.dims)),
        # a foundation autoencoder may give way to its trained fallback: empty strides follow whichever one the LDM has
        controlnet=ControlNetConfig(conditioning_channels=tuple(16 * 2 ** min(i, 2) for i in range(len(lv.ae_strides) + 1)),
                                    conditioning_strides=lv.ae_strides if not is_foundation(autoencoder_source) else ()),
        ldm_unet=UNetConfig(channels=lv.ldm_channels, strides=lv.ldm_strides, norm_num_groups=norm_groups(lv.ldm_channels),
                            attention_levels=attention_levels(lv.latent_size, lv.ldm_strides, lv.dims)),
    )


def _training(samples: int, batch: int) -> dict:
    def train(model: str, disc_lr: float | None = None, ema: float | None = None) -> TrainConfig:
        epochs, iterations = epochs_for(model, samples, batch)
        from dataclasses import replace

        from medimgen.planning import quality_budget

        run = TrainConfig(epochs=epochs, batch_size=batch, iterations_per_epoch=iterations,
                          learning_rate=LEARNING_RATES[model],
                          disc_learning_rate=disc_lr, ema_decay=ema, val_plot_interval=max(1, epochs // PLOTS_PER_RUN))
        return replace(run, **quality_budget.plan(run, quality_budget.MAX_STEPS))  # scoring: a bounded share

    return dict(train_autoencoder=train("autoencoder", disc_lr=DISC_LEARNING_RATE), train_ddpm=train("ddpm", ema=0.999),
                train_ldm=train("ldm", ema=0.999),
                # ControlNet on a frozen generator: half the steps (it starts from the base UNet)
                train_controlnet=train("controlnet", ema=0.999))


def plan_generation(
    plans: DatasetPlans,
    dim: str,
    intensity_low: Sequence[float],
    intensity_high: Sequence[float],
    target_gb: float = 8.0,
    intensity_stats=None,
    autoencoder_source: str = TRAINED,
    intensity_range: Sequence[float] = (-1.0, 1.0),
) -> GenerationConfig:
    """The complete generation config for ``dim`` ('2d' or '3d') of a preprocessed dataset.

    ``intensity_stats``: medimgen.planning.intensity_stats.IntensityStatistics (how samples go back to the
    dataset's units); None leaves those fields empty (the fingerprint's mean/std are used). ``autoencoder_source``:
    the LDM's autoencoder (medimgen.planning.foundation decides; a foundation one brings its architecture and, with
    ``intensity_range`` and the bounds, the intensity mapping it was trained with)."""
    cm = plans.configuration(dim)
    lv = _levels(cm, autoencoder_source)
    batch = generation_batch_size(cm.batch_size, cm.patch_size, lv.image_size)
    training = _training(_samples_per_epoch(plans, lv.dims), batch)
    return GenerationConfig(
        data=_data_config(plans, dim, cm, lv, intensity_low, intensity_high, intensity_stats, intensity_range),
        **_networks(lv, autoencoder_source),
        # DDPM in image space: Ho et al.'s linear schedule; LDM on latents: Rombach/Pinaya's scaled linear
        ddpm_scheduler=SchedulerConfig(schedule="linear_beta", beta_start=1e-4, beta_end=2e-2),
        ldm_scheduler=SchedulerConfig(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195),
        losses=LossConfig(
            perceptual_network=perceptual_network(lv.image_size),
            perceptual_fake_3d=lv.dims == 3,
            adversarial_warmup_epochs=max(1, training["train_autoencoder"].epochs // 10),
        ),
        **training,
        tracking=TrackingConfig(),
        memory=MemoryConfig(target_gb=float(target_gb)),
        derived=DerivedConfig(fallback_autoencoder={} if not is_foundation(autoencoder_source) else
                              to_dict(trained_autoencoder(lv))),
    )
