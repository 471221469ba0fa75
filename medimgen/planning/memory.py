"""Predict the peak GPU memory of a training step and fit every planned config into the GPU.

The peak of each model (DDPM UNet; autoencoder + discriminator + perceptual network; LDM UNet
on latents with the frozen autoencoder; with ``cache_latents`` the step reads cached latents: no encoder pass,
the autoencoder's weights stay for plots and validation) is what ``torch.cuda.max_memory_allocated`` reports
during training. It is simulated op by op on the CPU (planning/cuda_sim.py: a training step
on meta tensors with CUDA's autocast policy, activation checkpointing, AdamW, EMA). The micro-batch a model is
planned with is simulated as it is (when it fits, nothing else is). Steps at two micro-batches >= 2 make the same
allocations in the same order, each of a fixed size or one proportional to the micro-batch, so the live bytes after
every allocation, and their peak, follow for any micro-batch >= 2 from those two runs: the fitter's second
candidate is simulated too and its further ones cost nothing (micro-batch 1 is always simulated as it is: with a
batch dimension of size 1 some backward ops allocate differently). Each result is kept in this process
and on disk (planning/sim_cache.py), keyed by everything that decides it, so `medimgen memory` and `plan --explain`
of an unchanged config simulate nothing.
``CUDA_OVERHEAD`` covers what the simulation cannot see (cuDNN workspaces), calibrated on an H100 (tests/test_memory.py checks six measured runs).

The fitter keeps the planned effective batch and applies, in order of cost: AMP, activation
checkpointing, smaller micro-batches with gradient accumulation, no EMA copy (DDPM/LDM), and
only last a smaller generated image (coarser spacing: the loader crops the planned size and
resamples it down), recording what it chose and the predicted peaks. A plan fits when its
peak stays under ``USABLE`` x target - ``CONTEXT_BYTES``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from medimgen.config.kinds import kind, names
from medimgen.config.schema import GenerationConfig, TrainConfig

DEFAULT_TARGET_GB = 8.0  # nnU-Net plans for an 8 GB reference GPU too
GIB = 2**30
# measured / simulated peak on an NVIDIA H100 for the six models of ../shared/reference/GPU.md: 1.004-1.044,
# mean 1.026 (cuDNN workspaces and allocator rounding the simulation does not see); tests/test_memory.py
CUDA_OVERHEAD = 1.03
# a plan fits when its peak stays under USABLE x target - CONTEXT_BYTES: the CUDA context and the
# cuBLAS/cuDNN handles live outside PyTorch's allocator (~0.5 GiB), and the caching allocator reserves
# more than it hands out (fragmentation)
USABLE = 0.95
CONTEXT_BYTES = 0.5 * GIB
DOWNSCALE_STEP = 1.25  # generated-size reduction per fitting round (last resort)




def detect_gpu_memory_gb() -> float:
    """Total memory of CUDA device 0, else nnU-Net's 8 GB reference."""
    try:
        if torch.cuda.is_available():
            return round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    except Exception:  # pragma: no cover - broken CUDA installs
        pass
    return DEFAULT_TARGET_GB


@dataclass(frozen=True)
class Estimate:
    model: str
    params: int
    static_bytes: float
    activation_bytes: float
    peak_bytes: float
    amp: bool
    checkpointing: bool
    micro_batch: int
    accumulation: int

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GIB


def _amp_on(train: TrainConfig) -> bool:
    return train.amp != "off"  # 'auto' is AMP on any GPU this plan targets




def estimate(cfg: GenerationConfig, model: str) -> Estimate:
    """Predicted peak CUDA memory (torch.cuda.max_memory_allocated) of training ``model`` for ``cfg``."""
    train = cfg.train_for(model)
    batch = train.batch_size
    profile = _profile(cfg, model, batch)
    peak = profile.peak_bytes(batch) * CUDA_OVERHEAD
    ckpt = cfg.network_for(model).activation_checkpointing
    return Estimate(model, profile.params, profile.static_bytes, peak - profile.static_bytes, peak, _amp_on(train),
                    ckpt, batch, train.grad_accumulation_steps)


def fits(e: Estimate, target_bytes: float, ratio: float = 1.0) -> bool:
    """Whether the predicted peak (times a measured/predicted ``ratio``) leaves room for what the
    allocator does not count (see USABLE, CONTEXT_BYTES)."""
    return e.peak_bytes * ratio <= usable_bytes(target_bytes)


def usable_bytes(target_bytes: float) -> float:
    return target_bytes * USABLE - CONTEXT_BYTES


@dataclass(frozen=True)
class _Profile:
    """A model's simulated step reduced to what decides its peak: the live bytes after allocation i at micro-batch
    ``batch`` are (a_i + (batch - origin) * d_i) / scale (see the module doc), and ``lines`` keeps the (a_i, d_i) on
    the upper envelope of those lines for batch >= origin, so their maximum is the full trace's, exactly. A step
    simulated at one micro-batch alone is one line of slope 0 (valid at that micro-batch only)."""
    lines: tuple[tuple[int, int], ...]
    origin: int
    static_bytes: int
    params: int
    scale: int = 1
    ema_bytes: int = 0  # the EMA copy of the trained weights, not in lines/static_bytes (see with_ema)

    def peak_bytes(self, batch: int) -> float:
        a, d = (np.asarray(v, dtype=np.float64) for v in zip(*self.lines))
        return float((a + (batch - self.origin) * d).max()) / self.scale

    def with_ema(self) -> "_Profile":
        """The same step next to an EMA copy of the weights: it exists before the step starts, so every live count
        and the bytes between steps are higher by it (one simulation serves both; cuda_sim.Simulated.ema_bytes)."""
        return dataclasses.replace(self, lines=tuple((a + self.ema_bytes * self.scale, d) for a, d in self.lines),
                                   static_bytes=self.static_bytes + self.ema_bytes)


def envelope(one: Sequence[int], two: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The lines (a, d) of ``a = one[i], d = two[i] - one[i]`` that reach the maximum of a + x * d for some x >= 0."""
    best: dict[int, int] = {}
    for a, b in zip(one, two):
        d = b - a
        if a > best.get(d, -1):
            best[d] = a
    hull: list[tuple[int, int]] = []  # increasing slopes; integer arithmetic, so nothing is lost to rounding
    for d3, a3 in sorted(best.items()):
        while len(hull) >= 2:
            (a1, d1), (a2, d2) = hull[-2], hull[-1]
            if (a1 - a3) * (d2 - d1) <= (a1 - a2) * (d3 - d1):  # line 2 is never above both neighbours
                hull.pop()
            else:
                break
        hull.append((a3, d3))
    while len(hull) >= 2 and hull[1][0] >= hull[0][0]:  # the first line leads only at x < 0
        hull.pop(0)
    return tuple(hull)


def _sim_key(cfg: GenerationConfig, model: str):
    """Everything that decides a simulated step (not epochs, rates, ...), and the config it is simulated with: without
    EMA, which _profile adds (_Profile.with_ema).
    An adopted foundation autoencoder trains nothing: the autoencoder's step is its planned fallback's training (what
    a failed reconstruction check runs); the LDM's and ControlNet's count the frozen foundation network."""
    if kind(model).encoder:
        cfg = cfg.trained_fallback()
    train = cfg.train_for(model)
    key_train = TrainConfig(
        epochs=1, batch_size=1, grad_accumulation_steps=min(2, max(1, train.grad_accumulation_steps)),
        amp="off" if train.amp == "off" else "auto", ema_decay=None, grad_clip=1.0 if train.grad_clip else None,
        weight_decay=0.01 if train.weight_decay else 0.0,
        cache_latents=train.cache_latents and cfg.space_of(model) == "latent")
    nets = (cfg.autoencoder, cfg.discriminator, cfg.losses) if kind(model).encoder else (
        cfg.unet_for(model), cfg.scheduler_for(model), cfg.autoencoder if cfg.space_of(model) == "latent" else None,
        (cfg.network_for(model), len(cfg.data.label_values)) if kind(model).steers else None)
    from medimgen.models import networks
    from medimgen.models.labels import autoencoder_out_channels, network_channels

    key = (model, cfg.data.spatial_dims, cfg.data.in_channels, network_channels(cfg), autoencoder_out_channels(cfg),
           tuple(cfg.data.image_size), nets, key_train, networks.FLASH_ATTENTION)
    return key, dataclasses.replace(cfg, **{kind(model).train_section: key_train})


def _profile(cfg: GenerationConfig, model: str, batch: int) -> _Profile:
    """What decides ``model``'s peak at micro-batch ``batch``: from this process, else from the disk cache, else
    simulated. The first micro-batch asked for is simulated as it is (the planned one: if it fits, the fitter needs
    no other); a second one >= 2 is simulated too and the two traces give every micro-batch >= 2 (each allocation
    is of a fixed size or one proportional to the micro-batch, in the same order), so the fitter's further
    candidates cost nothing. Micro-batch 1 is always simulated as it is (a size-1 batch dimension makes some
    backward ops allocate differently)."""
    profile = _profile_without_ema(cfg, model, batch)
    return profile.with_ema() if cfg.train_for(model).ema_decay else profile


def _profile_without_ema(cfg: GenerationConfig, model: str, batch: int) -> _Profile:
    base, sim_cfg = _sim_key(cfg, model)
    found = _cached((base, "at", batch))
    if found is None and batch >= 2:
        found = _cached((base, "lines"))
    if found is not None:
        return found
    from medimgen.planning.cuda_sim import simulate

    sim = simulate(_at(sim_cfg, model, batch), model)
    profile = _Profile(((sim.peak_bytes, 0),), batch, sim.static_bytes, sim.params, 1, sim.ema_bytes)
    _keep((base, "at", batch), profile)
    if batch >= 2:  # the first trace of this key waits for a second one (then both are dropped)
        other = next((k[2] for k in _profiles if k[:2] == (base, "trace")), None)
        if other is None:
            _profiles[(base, "trace", batch)] = sim
        else:
            lines = _lines(_profiles.pop((base, "trace", other)), other, sim, batch)
            if lines is not None:
                _keep((base, "lines"), lines)
    return profile


def _at(cfg: GenerationConfig, model: str, batch: int) -> GenerationConfig:
    return dataclasses.replace(cfg, **{kind(model).train_section: dataclasses.replace(cfg.train_for(model),
                                                                               batch_size=batch)})


def _lines(one, b1: int, two, b2: int) -> _Profile | None:
    """Every micro-batch >= 2 from steps simulated at ``b1`` and ``b2``: allocation i holds
    one_i + (batch - b1) * (two_i - one_i) / (b2 - b1) bytes, kept as integer lines from micro-batch 2 scaled by
    b2 - b1. None when the two steps allocate differently (then every micro-batch is simulated as it is)."""
    if len(one.trace) != len(two.trace):  # pragma: no cover - no network here allocates differently
        return None
    if b1 > b2:
        one, b1, two, b2 = two, b2, one, b1
    k = b2 - b1
    start = [k * x + (2 - b1) * (y - x) for x, y in zip(one.trace, two.trace)]  # k x the bytes at micro-batch 2
    return _Profile(envelope(start, [a + y - x for a, x, y in zip(start, one.trace, two.trace)]), 2, one.static_bytes,
                    one.params, k, one.ema_bytes)


def _cached(key) -> _Profile | None:
    """The profile kept for ``key`` in this process, else on disk (planning/sim_cache.py), else None."""
    if key in _profiles:
        return _profiles[key]
    from medimgen.planning import sim_cache

    stored = sim_cache.load(key)
    profile = _profile_from(stored) if stored is not None else None
    if profile is not None:
        _profiles[key] = profile
    return profile


def _keep(key, profile: _Profile) -> None:
    """Keep ``profile`` in this process and on disk."""
    from medimgen.planning import sim_cache

    _profiles[key] = profile
    sim_cache.store(key, dataclasses.asdict(profile))


def _profile_from(stored: dict) -> _Profile | None:
    """A stored profile, or None when it is not one (a damaged or foreign file)."""
    try:
        lines = tuple((int(a), int(d)) for a, d in stored["lines"])
        scale = int(stored.get("scale", 1))
        if not lines or scale < 1:
            return None
        return _Profile(lines, int(stored["origin"]), int(stored["static_bytes"]), int(stored["params"]), scale,
                        int(stored.get("ema_bytes", 0)))
    except (KeyError, TypeError, ValueError):
        return None


# profiles (a few hundred bytes each; planning and tuning ask for the same configs many times) and the traces of
# this process's simulations (to pair a second micro-batch with)
_profiles: dict = {}


# ------------------------------------------------------------------------------------ fitting
def _set_ckpt(cfg: GenerationConfig, model: str) -> GenerationConfig:
    return dataclasses.replace(cfg, **{kind(model).network_section: dataclasses.replace(cfg.network_for(model),
                                                                                   activation_checkpointing=True)})


def fit_model(cfg: GenerationConfig, model: str, target: float, ratio: float = 1.0) -> tuple[GenerationConfig, bool]:
    """Cheapest settings of one model that fit ``target`` bytes: AMP, checkpointing, micro-batch, no EMA.
    ``ratio`` scales the estimate (the trainer's measured/predicted peak when it re-fits a running model)."""
    if fits(estimate(cfg, model), target, ratio):
        return cfg, True
    train = cfg.train_for(model)
    effective = train.batch_size * train.grad_accumulation_steps
    if train.amp == "off":
        cfg = cfg.with_train(model, amp="auto")
        if fits(estimate(cfg, model), target, ratio):
            return cfg, True
    cfg = _set_ckpt(cfg, model)
    if fits(estimate(cfg, model), target, ratio):
        return cfg, True
    micro = cfg.train_for(model).batch_size
    while micro > 1:
        micro = max(1, micro // 2)
        accum = math.ceil(effective / micro)
        iters = math.ceil(train.iterations_per_epoch * train.batch_size / micro)
        cfg = cfg.with_train(model, batch_size=micro, grad_accumulation_steps=accum, iterations_per_epoch=iters)
        if fits(estimate(cfg, model), target, ratio):
            return cfg, True
    if cfg.train_for(model).ema_decay:  # the EMA copy costs 4 bytes per parameter
        cfg = cfg.with_train(model, ema_decay=None)
        if fits(estimate(cfg, model), target, ratio):
            return cfg, True
    return cfg, False


def _parameter_bound(cfg: GenerationConfig, target: float, models) -> bool:
    """True when one of ``models`` cannot fit whatever the image size: its weights, moments, EMA and frozen
    networks plus the gradients and AdamW's temporary (4 + 4 bytes per trained parameter) alone exceed the target."""
    return any(((e := estimate(cfg, m)).static_bytes + 8 * e.params) * CUDA_OVERHEAD > usable_bytes(target)
               for m in models)


def _downscale(cfg: GenerationConfig, factor: float) -> GenerationConfig:
    """Generate at a coarser spacing: the loader crops ``crop_size`` voxels and resamples to ``image_size``."""
    from medimgen.planning.heuristics import discriminator_layers, perceptual_network, round_up

    data = cfg.data
    crop = data.crop_size or data.image_size
    size = round_up([max(d, s / factor) for s, d in zip(crop, data.size_divisor)], data.size_divisor)
    spacing = tuple(sp * c / s for sp, c, s in zip(data.native_spacing or data.spacing, crop, size))
    losses = cfg.losses
    if losses.perceptual_network != "none" and perceptual_network(size) == "none":
        losses = dataclasses.replace(losses, perceptual_network="none")  # slices now too small for it
    disc = cfg.discriminator  # each strided layer halves the image: fewer layers fit a smaller one
    disc = dataclasses.replace(disc, num_layers=min(disc.num_layers, discriminator_layers(size)))
    # the data inside the crop shrinks with the image: samples are still cropped back to it
    data_size = tuple(min(s, max(1, round(d * s / c))) for d, s, c in zip(data.data_size, size, crop))
    return dataclasses.replace(cfg, losses=losses, discriminator=disc, data=dataclasses.replace(
        data, image_size=size, crop_size=tuple(crop), spacing=spacing,
        native_spacing=tuple(data.native_spacing or data.spacing), data_size=data_size))


def fit_to_memory(cfg: GenerationConfig, target_gb: float) -> GenerationConfig:
    """``cfg`` adjusted so every model's predicted training peak fits ``target_gb`` (see module doc).

    At each image size the models are fitted in order; the first one that does not fit ends that size (the models
    after it are refitted at the next, smaller size anyway, so simulating them here would be wasted), unless this
    is the last size tried: the smallest one, or a model that cannot fit whatever the size (its parameters alone,
    see ``_parameter_bound``; only the models fitted so far are checked). Then every model gets its best settings."""
    target = float(target_gb) * GIB
    fitted = cfg
    factor = 1.0
    while True:
        last = all(s <= d for s, d in zip(fitted.data.image_size, fitted.data.size_divisor))
        ok, tried = True, []
        for model in names():
            fitted, ok_model = fit_model(fitted, model, target)
            tried.append(model)
            ok = ok and ok_model
            if not ok and not last:
                last = _parameter_bound(fitted, target, tried)  # a smaller image would not help
                if not last:
                    break
        if ok or last:
            break
        factor *= DOWNSCALE_STEP
        fitted = _downscale(cfg, factor)  # refit from the plan's own settings at the smaller size
    peaks = {m: round(estimate(fitted, m).peak_gb, 3) for m in names()}
    return dataclasses.replace(fitted, memory=dataclasses.replace(fitted.memory, target_gb=float(target_gb)),
                               derived=dataclasses.replace(fitted.derived, memory_fitted=ok, predicted_peak_gb=peaks))


def remedies(cfg: GenerationConfig, model: str) -> list[str]:
    """Config keys that lower ``model``'s memory, cheapest first (what the fitter would change)."""
    train = cfg.train_for(model)
    net, section = kind(model).network_section, kind(model).train_section
    keys = []
    if train.amp == "off":
        keys.append(f"{section}.amp=auto")
    if not cfg.network_for(model).activation_checkpointing:
        keys.append(f"{net}.activation_checkpointing=true")
    if train.batch_size > 1:
        keys.append(f"{section}.batch_size={max(1, train.batch_size // 2)} with "
                    f"{section}.grad_accumulation_steps={2 * train.grad_accumulation_steps}")
    if train.ema_decay and not kind(model).encoder:
        keys.append(f"{section}.ema_decay=null")
    keys.append("data.image_size (or re-plan: medimgen plan --gpu-memory GB)")
    return keys


def explain(cfg: GenerationConfig, dim: str, target_gb: float | None = None) -> str:
    """The memory table of ``medimgen plan --explain`` and ``medimgen memory``."""
    target_gb = target_gb or cfg.memory.target_gb
    usable = usable_bytes(target_gb * GIB) / GIB
    lines = [f"{dim}: image {list(cfg.data.image_size)}, target {target_gb:g} GB (peak must stay under "
             f"{usable:.2f} GB: CUDA context and fragmentation take the rest)",
             f"  {'model':<12}{'params':>12}{'static GB':>11}{'activ. GB':>11}{'peak GB':>9}  amp  ckpt  batch x accum  fits"]
    for m in names():
        e = estimate(cfg, m)
        lines.append(f"  {m:<12}{e.params:>12,}{e.static_bytes / GIB:>11.2f}{e.activation_bytes / GIB:>11.2f}"
                     f"{e.peak_gb:>9.2f}  {'on ' if e.amp else 'off'}  {'on ' if e.checkpointing else 'off'}"
                     f"   {f'{e.micro_batch} x {e.accumulation}':<13} {'yes' if fits(e, target_gb * GIB) else 'NO'}")
    if cfg.autoencoder.is_foundation:
        lines.append(f"  autoencoder.source={cfg.autoencoder.source}: the foundation autoencoder is adopted, not "
                     f"trained; its row is the fallback's training, the latent models' rows hold the frozen "
                     f"foundation network")
    if cfg.data.crop_size and tuple(cfg.data.crop_size) != tuple(cfg.data.image_size):
        lines.append(f"  generated at a coarser spacing {[round(s, 3) for s in cfg.data.spacing]} "
                     f"(crops {list(cfg.data.crop_size)} native voxels) to fit")
    return "\n".join(lines)


def misfits(cfg: GenerationConfig, dim: str, target_gb: float | None = None) -> list[str]:
    """One line per model of ``cfg`` whose predicted peak does not fit, naming the keys to change."""
    target_gb = target_gb or cfg.memory.target_gb
    out = []
    for m in names():
        e = estimate(cfg, m)
        if not fits(e, target_gb * GIB):
            out.append(f"{dim} {m}: predicted peak {e.peak_gb:.2f} GB does not fit {target_gb:g} GB "
                       f"(usable {usable_bytes(target_gb * GIB) / GIB:.2f}); change {'; '.join(remedies(cfg, m))}")
    return out
