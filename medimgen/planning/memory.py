"""Predict the peak GPU memory of a training step and fit every planned config into the GPU.

Estimate per model (DDPM UNet; autoencoder + discriminator + perceptual network; LDM UNet on
latents with the frozen autoencoder):

    static      = trainable parameters x (weights + gradients + 2 Adam moments) [+ EMA copy]
                  + frozen parameters (perceptual network, LDM's autoencoder)
    activations = bytes autograd saves for backward in the training forward, measured exactly
                  with saved-tensor hooks on two small CPU probes (batch 1) and scaled to the
                  real size as b*V + c*V^2 per sample (V = voxels; the V^2 term is attention)
                  times the micro-batch; with activation checkpointing the largest block
                  recomputed during backward is added the same way
    peak        = (static + activations) * 1.10 + 0.25 GiB  (allocator fragmentation, cuDNN workspace)

AMP (bf16/fp16 have the same size) is probed under CPU bf16 autocast, so the saved dtypes
are the ones a GPU run saves. The fitter keeps the planned effective batch and applies, in
order of cost: AMP, activation checkpointing, smaller micro-batches with gradient
accumulation, no EMA copy (DDPM/LDM), and only last a smaller generated image (coarser spacing: the loader crops the
planned size and resamples it down), recording what it chose and the predicted peaks.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import nn

from medimgen.config.schema import GenerationConfig, TrainConfig

DEFAULT_TARGET_GB = 8.0  # nnU-Net plans for an 8 GB reference GPU too
GIB = 2**30
MARGIN = 1.10
RESERVE_BYTES = 0.25 * GIB
MODELS = ("autoencoder", "ddpm", "ldm")
DOWNSCALE_STEP = 1.25  # generated-size reduction per fitting round (last resort)


def detect_gpu_memory_gb() -> float:
    """Total memory of CUDA device 0, else nnU-Net's 8 GB reference."""
    try:
        if torch.cuda.is_available():
            return round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    except Exception:  # pragma: no cover - broken CUDA installs
        pass
    return DEFAULT_TARGET_GB


# ------------------------------------------------------------------------------------ measuring
def saved_bytes(fn: Callable[[], torch.Tensor], exclude: Sequence[nn.Module] = (),
                regions: Sequence[nn.Module] = ()) -> tuple[int, int]:
    """(bytes saved for backward by ``fn()``, largest bytes saved inside one of ``regions``).

    Distinct storages are counted once; parameters of ``exclude`` modules are not activations.
    """
    params = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    total: dict[int, int] = {}
    per_region: dict[int, dict[int, int]] = {}
    current = {"r": None}
    handles = []
    for i, m in enumerate(regions):
        handles.append(m.register_forward_pre_hook(lambda mod, inp, i=i: current.__setitem__("r", i)))
        handles.append(m.register_forward_hook(lambda mod, inp, out: current.__setitem__("r", None)))

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params:
            total[key] = max(total.get(key, 0), storage.nbytes())
            if current["r"] is not None:
                per_region.setdefault(current["r"], {})[key] = storage.nbytes()
        # detached: returning the tensor itself would tie saved outputs to their own grad_fn in a
        # reference cycle that Python's GC cannot see, and every probe's graph would leak
        return t.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        del out
    finally:
        for h in handles:
            h.remove()
    region = max((sum(d.values()) for d in per_region.values()), default=0)
    return sum(total.values()), region


@dataclass(frozen=True)
class Scaling:
    """bytes = a0 + batch * (b * V + c * V^2); a0 is per step (e.g. AMP's low-precision weight copies)."""

    b: float
    c: float
    a0: float = 0.0

    def __call__(self, voxels: float, batch: int = 1) -> float:
        return self.a0 + batch * (self.b * voxels + self.c * voxels * voxels)


def fit_scaling(v1: float, a1: float, v2: float, a2: float, a1_batch2: float | None = None) -> Scaling:
    """From saved bytes at batch 1 for V1 and V2 (and at batch 2 for V1, which separates the per-step part)."""
    a0 = 0.0
    if a1_batch2 is not None:
        a0 = max(0.0, 2 * a1 - a1_batch2)
    p1, p2 = a1 - a0, a2 - a0
    c = (p2 / v2 - p1 / v1) / (v2 - v1)
    if c < 0:  # no quadratic part (measurement of a linear network): proportional
        return Scaling(p2 / v2, 0.0, a0)
    return Scaling(p1 / v1 - c * v1, c, a0)


def probe_sizes(divisor: Sequence[int], min_side: int = 16,
                target: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two small valid sizes: multiples of ``divisor`` with every axis >= min_side, and twice that per axis;
    never larger than ``target`` (the real size), so a probe costs at most one real forward."""
    p1 = [int(d * max(1, math.ceil(min_side / d))) for d in divisor]
    p2 = [2 * s for s in p1]
    if target is not None:
        c2 = [min(a, int(t)) for a, t in zip(p2, target)]
        c1 = [min(a, b) for a, b in zip(p1, c2)]
        if math.prod(c1) < math.prod(c2):  # capping keeps two distinct valid probes (else: the image is tiny anyway)
            p1, p2 = c1, c2
    return tuple(p1), tuple(p2)


def _autocast(amp: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext()


# ------------------------------------------------------------------------------------ per model
def _unet_forward(unet, channels, size, batch: int = 1):
    x = torch.randn(batch, channels, *size)
    t = torch.full((batch,), 500)
    return lambda: unet(x, timesteps=t)


def release_memory() -> None:
    """Give freed probe memory back to the OS (glibc keeps it otherwise, and many probes add up)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _fit_probes(make_fn, sizes, exclude, regions=(), amp: bool = False) -> tuple[Scaling, Scaling]:
    """Scalings of (total saved, largest region) from probes at (batch 1, V1), (batch 1, V2), (batch 2, V1)."""
    results = []
    for size, batch in ((sizes[0], 1), (sizes[1], 1), (sizes[0], 2)):
        with _autocast(amp):
            results.append(saved_bytes(make_fn(size, batch), exclude=exclude, regions=regions))
        release_memory()
    v1, v2 = math.prod(sizes[0]), math.prod(sizes[1])
    (t1, r1), (t2, r2), (t1b, r1b) = results
    total = fit_scaling(v1, t1, v2, t2, t1b)
    region = fit_scaling(v1, r1, v2, r2, r1b) if regions else Scaling(0.0, 0.0)
    return total, region


def _unet_blocks(unet):
    return [*unet.down_blocks, unet.middle_block, *unet.up_blocks]


@lru_cache(maxsize=64)
def _probe_unet(unet_cfg, spatial_dims: int, channels: int, divisor: tuple, amp: bool, ckpt: bool,
                target: tuple | None = None):
    from medimgen.networks import build_unet

    sizes = probe_sizes(divisor, target=target)
    unet = build_unet(dataclasses.replace(unet_cfg, activation_checkpointing=ckpt), spatial_dims, channels)
    total, _ = _fit_probes(lambda size, b: _unet_forward(unet, channels, size, b), sizes, [unet], amp=amp)
    region = Scaling(0.0, 0.0)
    if ckpt:  # what backward recomputes at once: the largest block, measured without checkpointing
        plain = build_unet(dataclasses.replace(unet_cfg, activation_checkpointing=False), spatial_dims, channels)
        _, region = _fit_probes(lambda size, b: _unet_forward(plain, channels, size, b), sizes, [plain],
                                _unet_blocks(plain), amp)
    return sum(p.numel() for p in unet.parameters()), total, region


@lru_cache(maxsize=64)
def _probe_autoencoder(ae_cfg, disc_cfg, spatial_dims: int, channels: int, divisor: tuple, amp: bool, ckpt: bool,
                       adversarial: bool, target: tuple | None = None):
    from medimgen.networks import build_autoencoder, build_discriminator

    ae = build_autoencoder(dataclasses.replace(ae_cfg, activation_checkpointing=ckpt), spatial_dims, channels)
    disc = build_discriminator(disc_cfg, spatial_dims, channels) if adversarial else None
    sizes = probe_sizes(divisor, 2 ** (disc_cfg.num_layers + 2) if adversarial else 16, target)

    def make(size, batch):
        x = torch.randn(batch, channels, *size)

        def fwd():
            recon = ae(x)[0]
            return disc(recon)[-1] if disc is not None else recon

        return fwd

    total, _ = _fit_probes(make, sizes, [ae] + ([disc] if disc is not None else []), amp=amp)
    region = Scaling(0.0, 0.0)
    if ckpt:
        plain = build_autoencoder(dataclasses.replace(ae_cfg, activation_checkpointing=False), spatial_dims, channels)
        _, region = _fit_probes(lambda size, b: (lambda x=torch.randn(b, channels, *size): plain(x)[0]), sizes,
                                [plain], [*plain.encoder.blocks, *plain.decoder.blocks], amp)
    params = sum(p.numel() for p in ae.parameters())
    dparams = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
    return params, dparams, total, region


@lru_cache(maxsize=16)
def _probe_perceptual(spatial_dims: int, image_size: tuple, fake_3d: bool, ratio: float, amp: bool):
    """(parameters, saved bytes per sample) of LPIPS-AlexNet on this image size (random weights: only
    sizes matter, nothing is downloaded)."""
    import warnings

    import lpips

    with warnings.catch_warnings():  # lpips uses torchvision's deprecated 'pretrained' argument
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
    if spatial_dims == 2:
        shapes = [(1, 3, *image_size)]
    else:  # MONAI's fake 3D: a fraction of the slices along each axis, as 2D images of the other two axes
        shapes = []
        for axis in range(3):
            n = max(1, int(ratio * image_size[axis]))
            other = [s for i, s in enumerate(image_size) if i != axis]
            shapes.append((n, 3, *other))
    total = 0
    for shape in shapes:
        a, b = torch.randn(shape), torch.randn(shape, requires_grad=True)
        with _autocast(amp):
            saved, _ = saved_bytes(lambda: net(a, b), exclude=[net])
        total += saved
    return sum(p.numel() for p in net.parameters()), total


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


def latent_size(cfg: GenerationConfig) -> tuple[int, ...]:
    return tuple(s // f for s, f in zip(cfg.data.image_size, _ae_divisor(cfg)))


def estimate(cfg: GenerationConfig, model: str) -> Estimate:
    """Predicted peak training memory of ``model`` for ``cfg`` (see the module doc)."""
    train: TrainConfig = getattr(cfg, f"train_{model}")
    amp = _amp_on(train)
    nd, ch = cfg.data.spatial_dims, cfg.data.in_channels
    batch = train.batch_size
    voxels = math.prod(cfg.data.image_size)
    if model in ("ddpm", "ldm"):
        unet_cfg = cfg.ddpm_unet if model == "ddpm" else cfg.ldm_unet
        if model == "ddpm":
            channels, size, divisor = ch, cfg.data.image_size, _unet_divisor(unet_cfg, nd)
        else:
            channels, size, divisor = cfg.autoencoder.latent_channels, latent_size(cfg), _unet_divisor(unet_cfg, nd)
        params, act, region = _probe_unet(unet_cfg, nd, channels, divisor, amp, unet_cfg.activation_checkpointing,
                                          tuple(size))
        v = math.prod(size)
        static = params * 4 * (4 + (1 if train.ema_decay else 0))
        if model == "ldm":
            static += _ae_params(cfg) * 4  # the frozen autoencoder
        activations = act(v, batch) + (region(v, batch) if unet_cfg.activation_checkpointing else 0)
        ckpt = unet_cfg.activation_checkpointing
    else:
        adversarial = cfg.losses.adversarial_weight > 0
        divisor = _ae_divisor(cfg)
        params, dparams, act, region = _probe_autoencoder(
            cfg.autoencoder, cfg.discriminator, nd, ch, divisor, amp, cfg.autoencoder.activation_checkpointing,
            adversarial, tuple(cfg.data.image_size))
        static = (params + dparams) * 4 * 4
        activations = act(voxels, batch) + (region(voxels, batch) if cfg.autoencoder.activation_checkpointing else 0)
        if cfg.losses.perceptual_network != "none" and cfg.losses.perceptual_weight > 0:
            pparams, pact = _probe_perceptual(nd, tuple(cfg.data.image_size), cfg.losses.perceptual_fake_3d,
                                              cfg.losses.perceptual_fake_3d_ratio, amp)
            static += pparams * 4
            activations += batch * pact
        params += dparams
        ckpt = cfg.autoencoder.activation_checkpointing
    peak = (static + activations) * MARGIN + RESERVE_BYTES
    return Estimate(model, params, static, activations, peak, amp, ckpt, batch, train.grad_accumulation_steps)


def _unet_divisor(unet_cfg, nd):
    from medimgen.planning.heuristics import total_stride

    return total_stride(unet_cfg.strides, nd)


def _ae_divisor(cfg):
    from medimgen.planning.heuristics import total_stride

    return total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)


def _ae_params(cfg: GenerationConfig) -> int:
    from medimgen.networks import build_autoencoder

    return sum(p.numel() for p in build_autoencoder(cfg.autoencoder, cfg.data.spatial_dims,
                                                    cfg.data.in_channels).parameters())


# ------------------------------------------------------------------------------------ fitting
def _set_train(cfg: GenerationConfig, model: str, **changes) -> GenerationConfig:
    return dataclasses.replace(cfg, **{f"train_{model}": dataclasses.replace(getattr(cfg, f"train_{model}"), **changes)})


def _set_ckpt(cfg: GenerationConfig, model: str) -> GenerationConfig:
    if model == "autoencoder":
        return dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder, activation_checkpointing=True))
    key = "ddpm_unet" if model == "ddpm" else "ldm_unet"
    return dataclasses.replace(cfg, **{key: dataclasses.replace(getattr(cfg, key), activation_checkpointing=True)})


def _fit_model(cfg: GenerationConfig, model: str, target: float) -> tuple[GenerationConfig, bool]:
    """Cheapest settings of one model that fit ``target`` bytes: AMP, checkpointing, micro-batch."""
    if estimate(cfg, model).peak_bytes <= target:
        return cfg, True
    train = getattr(cfg, f"train_{model}")
    effective = train.batch_size * train.grad_accumulation_steps
    if train.amp == "off":
        cfg = _set_train(cfg, model, amp="auto")
        if estimate(cfg, model).peak_bytes <= target:
            return cfg, True
    cfg = _set_ckpt(cfg, model)
    if estimate(cfg, model).peak_bytes <= target:
        return cfg, True
    micro = getattr(cfg, f"train_{model}").batch_size
    while micro > 1:
        micro = max(1, micro // 2)
        accum = math.ceil(effective / micro)
        iters = math.ceil(train.iterations_per_epoch * train.batch_size / micro)
        cfg = _set_train(cfg, model, batch_size=micro, grad_accumulation_steps=accum, iterations_per_epoch=iters)
        if estimate(cfg, model).peak_bytes <= target:
            return cfg, True
    if getattr(cfg, f"train_{model}").ema_decay:  # the EMA copy costs 4 bytes per parameter
        cfg = _set_train(cfg, model, ema_decay=None)
        if estimate(cfg, model).peak_bytes <= target:
            return cfg, True
    return cfg, False


def _parameter_bound(cfg: GenerationConfig, target: float) -> bool:
    """True when some model cannot fit whatever the image size: its parameters alone exceed the target."""
    return any(estimate(cfg, m).static_bytes * MARGIN + RESERVE_BYTES > target for m in MODELS)


def _downscale(cfg: GenerationConfig, factor: float) -> GenerationConfig:
    """Generate at a coarser spacing: the loader crops ``crop_size`` voxels and resamples to ``image_size``."""
    from medimgen.planning.heuristics import perceptual_network, round_up

    data = cfg.data
    crop = data.crop_size or data.image_size
    size = round_up([max(d, s / factor) for s, d in zip(crop, data.size_divisor)], data.size_divisor)
    spacing = tuple(sp * c / s for sp, c, s in zip(data.native_spacing or data.spacing, crop, size))
    losses = cfg.losses
    if losses.perceptual_network != "none" and perceptual_network(size) == "none":
        losses = dataclasses.replace(losses, perceptual_network="none")  # slices now too small for it
    return dataclasses.replace(cfg, losses=losses, data=dataclasses.replace(
        data, image_size=size, crop_size=tuple(crop), spacing=spacing,
        native_spacing=tuple(data.native_spacing or data.spacing)))


def fit_to_memory(cfg: GenerationConfig, target_gb: float) -> GenerationConfig:
    """``cfg`` adjusted so every model's predicted training peak fits ``target_gb`` (see module doc)."""
    target = float(target_gb) * GIB
    fitted = cfg
    factor = 1.0
    while True:
        ok = True
        for model in MODELS:
            fitted, fits = _fit_model(fitted, model, target)
            ok = ok and fits
        if ok:
            break
        smallest = all(s <= d for s, d in zip(fitted.data.image_size, fitted.data.size_divisor))
        if smallest or _parameter_bound(fitted, target):  # a smaller image would not help
            break
        factor *= DOWNSCALE_STEP
        fitted = _downscale(cfg, factor)  # refit from the plan's own settings at the smaller size
    peaks = {m: round(estimate(fitted, m).peak_gb, 3) for m in MODELS}
    memory = dataclasses.replace(fitted.memory, target_gb=float(target_gb), fitted=ok, predicted_peak_gb=peaks)
    return dataclasses.replace(fitted, memory=memory)


def explain(cfg: GenerationConfig, dim: str) -> str:
    """The memory table of ``medimgen plan --explain``."""
    lines = [f"{dim}: image {list(cfg.data.image_size)}, target {cfg.memory.target_gb:g} GB"
             + ("" if cfg.memory.fitted else " (does NOT fit even at the smallest settings)"),
             f"  {'model':<12}{'params':>12}{'static GB':>11}{'activ. GB':>11}{'peak GB':>9}  amp  ckpt  batch x accum"]
    for m in MODELS:
        e = estimate(cfg, m)
        lines.append(f"  {m:<12}{e.params:>12,}{e.static_bytes / GIB:>11.2f}{e.activation_bytes / GIB:>11.2f}"
                     f"{e.peak_gb:>9.2f}  {'on ' if e.amp else 'off'}  {'on ' if e.checkpointing else 'off'}"
                     f"   {e.micro_batch} x {e.accumulation}")
    if cfg.data.crop_size and tuple(cfg.data.crop_size) != tuple(cfg.data.image_size):
        lines.append(f"  generated at a coarser spacing {[round(s, 3) for s in cfg.data.spacing]} "
                     f"(crops {list(cfg.data.crop_size)} native voxels) to fit")
    return "\n".join(lines)
