"""Noise schedulers and the sampling inferer (MONAI core); networks are passed in, never owned.

Training (validation plots), the sampler, evaluation and tuning all sample through :func:`sample`:
MONAI's DiffusionInferer run from noise drawn with a seed, decoded by the LDM's autoencoder when
there is one. Nothing here knows about run folders or training.
"""

from __future__ import annotations

from typing import Callable

import torch

from medimgen.config.schema import GenerationConfig, SchedulerConfig
from medimgen.labels import network_channels, split


def _schedule_args(cfg: SchedulerConfig) -> dict:
    if cfg.schedule == "cosine":
        return {}
    return {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}


def training_scheduler(cfg: SchedulerConfig):
    """DDPM scheduler used to add noise during training."""
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                         prediction_type=cfg.prediction_type, **_schedule_args(cfg))


def sampling_scheduler(cfg: SchedulerConfig, sampler: str | None = None, steps: int | None = None):
    """DDPM (all training timesteps) or DDIM (``steps``, default cfg.num_inference_steps) for sampling."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    sampler = sampler or cfg.sampler
    if sampler == "ddpm":
        sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                              prediction_type=cfg.prediction_type, **_schedule_args(cfg))
        sched.set_timesteps(cfg.num_train_timesteps)
        return sched
    sched = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                          prediction_type=cfg.prediction_type, clip_sample=False, **_schedule_args(cfg))
    sched.set_timesteps(int(steps or cfg.num_inference_steps))
    return sched


def target_for(scheduler, prediction_type: str, images, noise, timesteps):
    """What the UNet is trained to predict."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(images, noise, timesteps)
    return images


def sample_shape(cfg: GenerationConfig, model: str, n: int) -> tuple[int, ...]:
    """Shape of ``n`` starting noises: images (+ one-hot label channels of a joint model) for a DDPM, latents
    of the autoencoder for an LDM."""
    if model == "ldm":
        from medimgen.networks import latent_size

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
    """``n`` images of a trained ``model`` (ddpm/ldm) of ``cfg``, in the model's intensity range; ``controlnet``:
    steered by that ControlNet of ``model`` towards ``condition`` (n one-hot label maps, medimgen.labels).

    ``labels``: return (images, label maps) instead, the label maps (n, 1, *size) long in nnU-Net's label values
    for a joint model (``data.generate_labels``: a DDPM's one-hot channels or the LDM's decoded logits, see
    medimgen.labels), None for an image-only model."""
    scheduler = sampling_scheduler(cfg.scheduler_for(model), sampler, steps)
    x = sample(network, scheduler, sample_shape(cfg, model, n), seed, device, decode, progress, controlnet, condition)
    images, label = split(x, cfg, logits=model == "ldm")
    lo, hi = cfg.data.intensity_range
    images = images.float().clamp(lo, hi)
    return (images, label) if labels else images
