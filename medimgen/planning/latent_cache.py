"""Whether the latent-space kinds train on the latent cache (``train_*.cache_latents``; medimgen.training.latents).

The cache holds, per training sample (a 3D case, or a slice of a case for 2D), the posterior's mean and std
(float32, latent_channels x the latent size of the sample's cached region each; a ControlNet's cache also the label
map at the region's image size, int8 or int16 a voxel), one uncompressed ``.npz`` per case. It is planned on when it
pays and fits:

- training draws more samples (epochs x iterations x micro-batch x accumulation) than the cache encodes: each
  sample's encoder pass is then made once instead of once per draw;
- the cache takes at most ``DISK_SHARE`` of the free disk where nnU-Net's preprocessed data live, and at most
  ``RAM_SHARE`` of the available host memory (training holds it in memory; several ranks each hold a copy).

Its size is counted per case, as the build writes it: each case's preprocessed shape (nnU-Net's fingerprint,
``shapes_after_crop`` and ``spacings``, transposed and resampled to the configuration's spacing by nnU-Net's own
``compute_new_shape``; 2D in-plane only, one sample per slice) gives the region the build caches
(medimgen.data.cache_region: padded to image_size, cases larger than it up to MAX_EXTENT x image_size per axis).
All of dataset.json's training cases are counted (the cache encodes those of the run's training split: at most as
many). Without a readable fingerprint every sample is counted at image_size (2D: the 3D median depth of slices per
case where 3D is planned, else 1), which undercounts cases larger than image_size; `plan --explain` says so.
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
NPZ_BYTES_PER_ARRAY = 256  # np.savez's own bytes per array of a case file (npy header, zip entries): 242 measured
MB = 1e6


@dataclass(frozen=True)
class CacheDecision:
    model: str
    on: bool
    bytes: int  # the cache's size on disk and in memory
    samples: int  # cached samples (cases; 2D: slices)
    draws: int  # samples training draws
    reason: str


@dataclass(frozen=True)
class CachedCases:
    """The training samples a latent cache holds, per case: (samples, the spatial shape of each in preprocessed
    voxels): 3D (1, the case's shape), 2D (its slices, their in-plane shape). ``from_fingerprint`` False: no readable
    fingerprint, every sample taken as image_size."""
    cases: tuple[tuple[int, tuple[int, ...]], ...]
    from_fingerprint: bool = True

    @property
    def samples(self) -> int:
        return sum(n for n, _ in self.cases)

    def describe(self, size: int) -> str:
        """'6 cases (240 slices), 8.3 MB' for a cache of ``size`` bytes."""
        slices = any(len(shape) == 2 for _, shape in self.cases)
        text = f"{len(self.cases)} cases{f' ({self.samples} slices)' if slices else ''}, {size / MB:.1f} MB"
        return text if self.from_fingerprint else \
            f"{text} (no readable dataset_fingerprint.json: every sample counted at image_size)"


def latent_models(cfg: GenerationConfig) -> list[str]:
    """The kinds of this config that work in latent space (the LDM; a ControlNet on an LDM)."""
    return [m for m in names() if cfg.space_of(m) == "latent"]


def preprocessed_shapes(config: MedimgenConfig, dim: str, folder: Path) -> list[tuple[int, ...]] | None:
    """The spatial shape of every training case as nnU-Net's preprocessing of ``dim`` writes it (None: no readable
    fingerprint): dataset_fingerprint.json's ``shapes_after_crop`` and ``spacings`` (one per case, raw axis order),
    transposed by transpose_forward and resampled to the configuration's spacing by nnU-Net's ``compute_new_shape``,
    as its preprocessor does; a 2d configuration resamples in-plane only (the first axis keeps its spacing)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    data = config.configs[dim].data
    try:
        fingerprint = json.loads((Path(folder) / "dataset_fingerprint.json").read_text())
        shapes, spacings = fingerprint["shapes_after_crop"], fingerprint["spacings"]
        if len(shapes) != len(spacings):
            raise ValueError("one shape and one spacing per case")
        target = [float(s) for s in (data.native_spacing or data.spacing)]
        out = []
        for shape, spacing in zip(shapes, spacings):
            order = list(config.dataset.transpose_forward) or list(range(len(shape)))
            shape, spacing = [int(shape[i]) for i in order], [float(spacing[i]) for i in order]
            goal = target if len(target) == len(shape) else [spacing[0], *target]
            out.append(tuple(int(n) for n in compute_new_shape(shape, spacing, goal)))
        return out
    except (OSError, ValueError, KeyError, IndexError, TypeError, AssertionError):
        return None


def cached_cases(config: MedimgenConfig, dim: str, folder: Path) -> CachedCases:
    """The training samples a latent cache of ``dim`` holds (``folder``: the dataset's preprocessed folder): each
    case (3D), or every slice of each (2D) at its preprocessed shape (:func:`preprocessed_shapes`); without a
    fingerprint, the fallback: image_size samples, 2D the 3D median depth per case where 3D is planned, else 1."""
    cfg = config.configs[dim]
    two_d = cfg.data.spatial_dims == 2
    shapes = preprocessed_shapes(config, dim, folder)
    if shapes is not None:
        return CachedCases(tuple((max(1, s[0]), s[1:]) if two_d else (1, s) for s in shapes))
    depth = max(1, int(config.configs["3d"].data.median_image_size[0])) if two_d and "3d" in config.configs else 1
    size = tuple(cfg.data.image_size)
    return CachedCases(tuple((depth, size) for _ in range(config.dataset.num_training)), from_fingerprint=False)


def cache_bytes(cfg: GenerationConfig, model: str, cases: CachedCases) -> int:
    """Bytes of the cache of ``cases`` for ``model`` as the build writes them (medimgen.training.latents): per
    sample mu and sigma at the latent size of its cached region (medimgen.data.cache_region), the label map at the
    region's size where ``model`` steers (its cache keeps labels), per case file the npz's own bytes."""
    import numpy as np

    from medimgen.data.cache_region import cached_size, label_dtype
    from medimgen.models.networks import total_stride

    stride = total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)
    labels = kind(model).steers
    label_bytes = np.dtype(label_dtype(cfg)).itemsize
    total = 0
    for n, shape in cases.cases:
        size = cached_size(cfg, shape)
        per = 2 * 4 * cfg.autoencoder.latent_channels * math.prod(s // k for s, k in zip(size, stride))
        if labels:
            per += label_bytes * math.prod(size)
        total += n * per + (3 if labels else 2) * NPZ_BYTES_PER_ARRAY
    return total


def draws(cfg: GenerationConfig, model: str) -> int:
    t = cfg.train_for(model)
    return t.epochs * t.iterations_per_epoch * t.batch_size


def decide(cfg: GenerationConfig, model: str, cases: CachedCases, free_disk: float | None,
           free_ram: float | None) -> CacheDecision:
    """The rule of this module for one latent kind and the cache of ``cases``, with the free disk and available RAM
    given (None: unknown, then off)."""
    size, n, samples = cache_bytes(cfg, model, cases), draws(cfg, model), cases.samples
    what = cases.describe(size)
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


def decisions(config: MedimgenConfig, dim: str, folder: Path, cases: CachedCases | None = None) -> list[CacheDecision]:
    """The rule for every latent kind of ``dim`` (``cases``: :func:`cached_cases`, when the caller has it)."""
    cfg = config.configs[dim]
    cases = cases if cases is not None else cached_cases(config, dim, folder)
    disk, ram = free_space(folder)
    return [decide(cfg, m, cases, disk, ram) for m in latent_models(cfg)]


def plan_cache(config: MedimgenConfig, folder: Path) -> MedimgenConfig:
    """``config`` with cache_latents of every latent kind set by the rule (``folder``: the dataset's preprocessed
    folder, where the cache goes)."""
    configs = {}
    for dim, cfg in config.configs.items():
        for d in decisions(config, dim, folder):
            cfg = cfg.with_train(d.model, cache_latents=d.on)
        configs[dim] = cfg
    return dataclasses.replace(config, configs=configs)


def explain_cache(config: MedimgenConfig, dim: str, folder: Path, cases: CachedCases | None = None) -> str:
    """The latent-cache lines of `plan --explain`: what the config says and what the rule says now (``cases``: as
    :func:`decisions`)."""
    cfg = config.configs[dim]
    lines = [f"{dim}: latent cache (train_*.cache_latents; beside the preprocessed data in {folder.name}/"
             f"medimgen_latents/)"]
    for d in decisions(config, dim, folder, cases):
        value = cfg.train_for(d.model).cache_latents
        note = "" if value == d.on else f" [the config says {str(value).lower()}: set by hand or --set]"
        lines.append(f"  {d.model:<12}{d.reason}{note}")
    return "\n".join(lines)
