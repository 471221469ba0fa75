"""Whether the latent-space kinds train on the latent cache (``train_*.cache_latents``; medimgen.training.latents).

The cache holds, per training sample (a 3D case, or a slice of a case for 2D), the posterior's mean and std
(float32, latent_channels x latent size each; a ControlNet's cache also a label map at image size, 1 byte a voxel).
It is planned on when it pays and fits:

- training draws more samples (epochs x iterations x micro-batch x accumulation) than the cache encodes: each
  sample's encoder pass is then made once instead of once per draw;
- the cache takes at most ``DISK_SHARE`` of the free disk where nnU-Net's preprocessed data live, and at most
  ``RAM_SHARE`` of the available host memory (training holds it in memory; several ranks each hold a copy).

Sizes use the planned image size (cases larger than it are cached up to training.latents.MAX_EXTENT times larger,
smaller ones padded), and dataset.json's training cases (the cache encodes those of the training split); a 2D cache
one latent per slice of each (the slices nnU-Net's 2d configuration cuts, from its fingerprint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from medimgen.config.kinds import kind, names
from medimgen.config.schema import GenerationConfig, MedimgenConfig

DISK_SHARE = 0.25
RAM_SHARE = 0.25
LABEL_BYTES = 1  # a ControlNet's cached label map: int8 per voxel
MB = 1e6


@dataclass(frozen=True)
class CacheDecision:
    model: str
    on: bool
    bytes: int  # the cache's size on disk and in memory
    samples: int  # cached samples (cases; 2D: slices)
    draws: int  # samples training draws
    reason: str


def latent_models(cfg: GenerationConfig) -> list[str]:
    """The kinds of this config that work in latent space (the LDM; a ControlNet on an LDM)."""
    return [m for m in names() if cfg.space_of(m) == "latent"]


def training_slices(config: MedimgenConfig, folder: Path) -> int | None:
    """Slices of all training cases as nnU-Net's 2D configuration cuts them (None: no readable fingerprint).

    nnU-Net's 2d preprocessing resamples in-plane only: a case has as many slices as its cropped shape has along
    the axis transpose_forward puts first (dataset_fingerprint.json ``shapes_after_crop``, one per training case),
    whether or not the 3D configuration was planned (2D data: 1 each)."""
    try:
        shapes = json.loads((Path(folder) / "dataset_fingerprint.json").read_text())["shapes_after_crop"]
        axis = int(config.dataset.transpose_forward[0]) if config.dataset.transpose_forward else 0
        return sum(max(1, int(shape[axis])) for shape in shapes)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def cache_bytes(cfg: GenerationConfig, model: str, samples: int) -> int:
    """Bytes of the cache of ``samples`` training samples for ``model``."""
    from medimgen.models.networks import latent_size

    per = 2 * 4 * cfg.autoencoder.latent_channels * math.prod(latent_size(cfg))
    if kind(model).steers:
        per += LABEL_BYTES * math.prod(cfg.data.image_size)
    return per * samples


def draws(cfg: GenerationConfig, model: str) -> int:
    t = cfg.train_for(model)
    return t.epochs * t.iterations_per_epoch * t.batch_size


def decide(cfg: GenerationConfig, model: str, samples: int, free_disk: float | None,
           free_ram: float | None) -> CacheDecision:
    """The rule of this module for one latent kind, with the free disk and available RAM given (None: unknown,
    then off)."""
    size, n = cache_bytes(cfg, model, samples), draws(cfg, model)
    what = f"{samples} samples x {size / max(1, samples) / 1e3:.1f} kB = {size / MB:.1f} MB"
    if n <= samples:
        return CacheDecision(model, False, size, samples, n, f"off: training draws {n} samples, no more than the "
                             f"{samples} the cache would encode ({what})")
    for where, free, share in (("free disk", free_disk, DISK_SHARE), ("available RAM", free_ram, RAM_SHARE)):
        if free is None:
            return CacheDecision(model, False, size, samples, n, f"off: {where} unknown ({what})")
        if size > share * free:
            return CacheDecision(model, False, size, samples, n, f"off: {what} is more than {share:.0%} of the "
                                 f"{free / 1e9:.1f} GB {where}")
    return CacheDecision(model, True, size, samples, n, f"on: {what} fits {DISK_SHARE:.0%} of the "
                         f"{free_disk / 1e9:.1f} GB free disk and {RAM_SHARE:.0%} of the {free_ram / 1e9:.1f} GB "
                         f"available RAM; training draws {n} samples, each encoded once instead of per draw")


def free_space(folder: Path) -> tuple[float | None, float | None]:
    """(free disk at ``folder`` or its nearest existing parent, available host memory), bytes (None: unknown)."""
    from medimgen.core.devices import available_memory_bytes

    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        disk = float(shutil.disk_usage(probe).free)
    except OSError:
        disk = None
    ram = available_memory_bytes()
    return disk, float(ram) if ram is not None else None


def cached_samples(config: MedimgenConfig, dim: str, folder: Path) -> int:
    """Training samples a latent cache of ``dim`` holds: the cases; 2D, one per slice of every case
    (:func:`training_slices`; without a fingerprint, the 3D median depth per case where 3D is planned, else 1)."""
    if dim != "2d":
        return config.dataset.num_training
    slices = training_slices(config, folder)
    if slices is not None:
        return slices
    depth = config.configs["3d"].data.median_image_size[0] if "3d" in config.configs else 1
    return config.dataset.num_training * max(1, int(depth))


def decisions(config: MedimgenConfig, dim: str, folder: Path) -> list[CacheDecision]:
    cfg = config.configs[dim]
    samples = cached_samples(config, dim, folder)
    disk, ram = free_space(folder)
    return [decide(cfg, m, samples, disk, ram) for m in latent_models(cfg)]


def plan_cache(config: MedimgenConfig, folder: Path) -> MedimgenConfig:
    """``config`` with cache_latents of every latent kind set by the rule (``folder``: the dataset's preprocessed
    folder, where the cache goes)."""
    configs = {}
    for dim, cfg in config.configs.items():
        for d in decisions(config, dim, folder):
            cfg = cfg.with_train(d.model, cache_latents=d.on)
        configs[dim] = cfg
    return dataclasses.replace(config, configs=configs)


def explain_cache(config: MedimgenConfig, dim: str, folder: Path) -> str:
    """The latent-cache lines of `plan --explain`: what the config says and what the rule says now."""
    cfg = config.configs[dim]
    lines = [f"{dim}: latent cache (train_*.cache_latents; beside the preprocessed data in {folder.name}/"
             f"medimgen_latents/)"]
    for d in decisions(config, dim, folder):
        value = cfg.train_for(d.model).cache_latents
        note = "" if value == d.on else f" [the config says {str(value).lower()}: set by hand or --set]"
        lines.append(f"  {d.model:<12}{d.reason}{note}")
    return "\n".join(lines)
