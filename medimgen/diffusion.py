"""Noise schedulers and inferers from the config (MONAI core); networks are passed in, never owned."""

from __future__ import annotations

from medimgen.config.schema import SchedulerConfig


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
