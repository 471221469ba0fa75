"""Noise schedulers and the sampling inferer (MONAI core); networks are passed in, never owned.

Training (validation plots), the sampler, evaluation and tuning all sample through :func:`sample`:
MONAI's DiffusionInferer run from noise drawn with a seed, decoded by the LDM's autoencoder when
there is one. Nothing here knows about run folders or training.
"""

from __future__ import annotations

from typing import Callable

import math

import torch

from medimgen.config.schema import GenerationConfig, SchedulerConfig
from medimgen.core.errors import MedimgenError
from medimgen.models.labels import network_channels, split


def _schedule_args(cfg: SchedulerConfig) -> dict:
    if cfg.schedule == "cosine":
        return {}
    return {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}


def _rflow(cfg: SchedulerConfig, spatial_dims: int):
    """MONAI's rectified-flow scheduler as MAISI uses it: continuous timesteps drawn uniformly, shifted towards the
    noisy end for images larger than 32^dims voxels (the same shift in training and sampling)."""
    from monai.networks.schedulers import RFlowScheduler

    return RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=False,
                          sample_method="uniform", use_timestep_transform=True,
                          base_img_size_numel=32 ** spatial_dims, spatial_dim=spatial_dims)


def is_rflow(scheduler) -> bool:
    from monai.networks.schedulers import RFlowScheduler

    return isinstance(scheduler, RFlowScheduler)


def training_scheduler(cfg: SchedulerConfig, spatial_dims: int = 3):
    """The scheduler that adds noise during training: DDPM, or rectified flow (``cfg.type``)."""
    if cfg.type == "rflow":
        return _rflow(cfg, spatial_dims)
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                         prediction_type=cfg.prediction_type, **_schedule_args(cfg))


def sampler_name(cfg: SchedulerConfig, sampler: str | None = None) -> str:
    """The sampler a model of ``cfg`` samples with: rflow for a rectified-flow model, else ``sampler`` (ddim/ddpm;
    default the config's); a sampler the model was not trained for is a one-line error."""
    if cfg.type == "rflow":
        if sampler not in (None, "rflow"):
            raise MedimgenError(f"this model was trained with rectified flow (scheduler type rflow): it samples with "
                                f"rflow, not {sampler} (choose the number of steps with --steps)")
        return "rflow"
    if sampler == "rflow":
        raise MedimgenError("this model was trained with the DDPM noise schedule (scheduler type ddpm): sample it with "
                            "ddim or ddpm; rectified flow needs a model trained with scheduler type rflow")
    return sampler or cfg.sampler


# whether a sampler walks every training timestep (DDPM) or ``steps`` of them (DDIM, rectified flow)
EVERY_TIMESTEP = {"ddpm": True, "ddim": False, "rflow": False}


def sampling_plan(cfg: SchedulerConfig, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
    """(sampler, number of steps) of a sampling request after defaults: the one check of a request (the config's
    sampler, rflow for a rectified-flow model; DDPM uses every timestep; at most num_train_timesteps)."""
    name = sampler_name(cfg, sampler)
    n = cfg.num_train_timesteps if EVERY_TIMESTEP[name] else int(steps or cfg.num_inference_steps)
    if n > cfg.num_train_timesteps:
        raise MedimgenError(f"--steps {n}: at most the model's {cfg.num_train_timesteps} training timesteps")
    return name, n


def _clip_args(clip: tuple[float, float] | None) -> dict:
    """MONAI's x0 clipping: every step's predicted clean sample clamped to ``clip`` (the data's range), or none.
    MONAI's own defaults differ (DDPM and DDIM clip to [-1, 1]), so both samplers are told."""
    if clip is None:
        return {"clip_sample": False}
    return {"clip_sample": True, "clip_sample_min": float(clip[0]), "clip_sample_max": float(clip[1])}


def _ddpm_sampler(cfg: SchedulerConfig, steps: int, spatial_size, clip):
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                         prediction_type=cfg.prediction_type, **_clip_args(clip), **_schedule_args(cfg))


def _ddim_sampler(cfg: SchedulerConfig, steps: int, spatial_size, clip):
    from monai.networks.schedulers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                         prediction_type=cfg.prediction_type, **_clip_args(clip), **_schedule_args(cfg))


def _rflow_sampler(cfg: SchedulerConfig, steps: int, spatial_size, clip):  # MONAI's rflow step has no x0 clipping
    if spatial_size is None:
        raise ValueError("rectified flow needs the sampled spatial size")
    return _rflow(cfg, len(spatial_size))


_SAMPLERS = {"ddpm": _ddpm_sampler, "ddim": _ddim_sampler, "rflow": _rflow_sampler}


def sampling_scheduler(cfg: SchedulerConfig, sampler: str | None = None, steps: int | None = None,
                       spatial_size: tuple[int, ...] | None = None, clip: tuple[float, float] | None = None):
    """DDPM (all training timesteps), DDIM or rectified flow (``steps``, default cfg.num_inference_steps) for
    sampling (:func:`sampling_plan`). ``spatial_size``: the sampled (latent) size, which rectified flow's timestep
    shift depends on. ``clip``: the range the data lies in (an image-space model's intensity range): DDPM and DDIM
    clamp each step's predicted clean sample to it, as Ho et al. do; None (latents, which have no fixed range): no
    clamping. Without it an epsilon error that a partly trained network keeps at high noise (divided by
    sqrt(alphas_cumprod), about 0.006 at the last timestep of the linear schedule) leaves DDIM samples far outside
    the range (benchmarks/README.md, "Sampler check")."""
    name, steps = sampling_plan(cfg, sampler, steps)
    sched = _SAMPLERS[name](cfg, steps, spatial_size, clip)
    if spatial_size is not None and is_rflow(sched):
        sched.set_timesteps(steps, input_img_size_numel=math.prod(spatial_size))
    else:
        sched.set_timesteps(steps)
    return sched


def target_for(scheduler, prediction_type: str, images, noise, timesteps):
    """What the UNet is trained to predict (rectified flow: the velocity images - noise, whatever
    ``prediction_type``)."""
    if is_rflow(scheduler):
        return images - noise
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(images, noise, timesteps)
    return images


def noised(scheduler, prediction_type: str, x: torch.Tensor, generator: torch.Generator | None = None):
    """(noisy x, timesteps, training target) of a training step on ``x``: noise and timesteps from the global RNG,
    or from ``generator`` (drawn on the CPU, reproducible). DDPM: integer timesteps drawn uniformly; rectified
    flow: the scheduler's own ``sample_timesteps``."""
    if generator is None:
        noise = torch.randn_like(x)
    else:
        noise = torch.randn(x.shape, generator=generator).to(x.device)
    if is_rflow(scheduler):
        if generator is None:
            t = scheduler.sample_timesteps(x)
        else:  # sample_timesteps draws from the global RNG: seed a forked one from the generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                t = scheduler.sample_timesteps(torch.zeros(()).expand(x.shape[0], 1, *x.shape[2:])).to(x.device)
    elif generator is None:
        t = torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), device=x.device)
    else:
        t = torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), generator=generator).to(x.device)
    noisy = scheduler.add_noise(original_samples=x, noise=noise, timesteps=t)
    return noisy, t, target_for(scheduler, prediction_type, x, noise, t)


def sample_shape(cfg: GenerationConfig, model: str, n: int) -> tuple[int, ...]:
    """Shape of ``n`` starting noises: images (+ one-hot label channels of a joint model) for an image-space model
    (DDPM), latents of the autoencoder for a latent one (LDM)."""
    if cfg.space_of(model) == "latent":
        from medimgen.models.networks import latent_size

        return (n, cfg.autoencoder.latent_channels, *latent_size(cfg))
    return (n, network_channels(cfg), *cfg.data.image_size)


def latent_decoder(autoencoder: torch.nn.Module, scale_factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LDM's way back to images (MONAI's LatentDiffusionInferer does the same)."""
    return lambda z: autoencoder.decode_stage_2_outputs(z / scale_factor)


@torch.no_grad()
def sample(network: torch.nn.Module, scheduler, shape: tuple[int, ...], seed: int = 0,
           device: torch.device | str = "cpu", decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
           progress: bool = False, controlnet: torch.nn.Module | None = None,
           condition: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse diffusion with MONAI's DiffusionInferer from noise drawn with ``seed`` (reproducible; the
    global RNG is left untouched), then ``decode`` (an LDM's :func:`latent_decoder`). ``controlnet``: steered by
    it with MONAI's ControlNetDiffusionInferer, ``condition`` its input (one-hot label maps, one per sample)."""
    from monai.inferers import ControlNetDiffusionInferer, DiffusionInferer

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        noise = torch.randn(shape, device=device)
        if controlnet is None:
            x = DiffusionInferer(scheduler).sample(noise, network, scheduler, verbose=progress)
        else:
            x = ControlNetDiffusionInferer(scheduler).sample(noise, network, controlnet, condition.to(device),
                                                             scheduler, verbose=progress)
    return decode(x) if decode is not None else x


def generate(cfg: GenerationConfig, model: str, network: torch.nn.Module, n: int, seed: int = 0,
             sampler: str | None = None, steps: int | None = None, device: torch.device | str = "cpu",
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = False,
             labels: bool = False, controlnet: torch.nn.Module | None = None, condition: torch.Tensor | None = None):
    """``n`` images of a trained generator ``model`` (ddpm/ldm) of ``cfg``, in the model's intensity range; ``controlnet``:
    steered by that ControlNet of ``model`` towards ``condition`` (n one-hot label maps, medimgen.models.labels).

    ``labels``: return (images, label maps) instead, the label maps (n, 1, *size) long in nnU-Net's label values
    for a joint model (``data.generate_labels``: a DDPM's one-hot channels or the LDM's decoded logits, see
    medimgen.models.labels), None for an image-only model."""
    shape = sample_shape(cfg, model, n)
    clip = None if cfg.space_of(model) == "latent" else tuple(cfg.data.intensity_range)  # what training data spans
    scheduler = sampling_scheduler(cfg.scheduler_for(model), sampler, steps, shape[2:], clip)
    x = sample(network, scheduler, shape, seed, device, decode, progress, controlnet, condition)
    images, label = split(x, cfg, logits=cfg.space_of(model) == "latent")
    lo, hi = cfg.data.intensity_range
    images = images.float().clamp(lo, hi)
    return (images, label) if labels else images
