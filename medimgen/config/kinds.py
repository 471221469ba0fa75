"""Model kinds as objects: the one place that knows what a DDPM, an autoencoder, an LDM and a ControlNet are.

Code asks a kind (`kind("ldm").space`, `.upstream`, `.train_section`) and never compares model names. Adding a kind
means adding one `ModelKind` here (`register`), its training task (training/api's table) and its network builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from medimgen.core.errors import MedimgenError


@dataclass(frozen=True)
class ModelKind:
    """What medimgen knows about one kind of model.

    name: the kind's name on the CLI, in run folders and in MLflow.
    train_section: the config section of its training settings (``train_<name>``).
    network_section: the config section of its network (``ddpm_unet``, ``autoencoder``, ...).
    scheduler_section: the config section of its noise process, None for a kind without one.
    space: 'image' (works on images) or 'latent' (works on an autoencoder's latents).
    upstream: what it builds on: None, 'autoencoder' (a trained autoencoder run), or 'generator' (the diffusion
        model it steers, `controlnet.base` of the config: 'auto' is the LDM if trained, else the DDPM).
    generator: an unconditional generator (samples from noise alone).
    samples: `medimgen sample` can sample from it (a generator, or something steering one).
    sampling_modules: the networks a sampler needs from its checkpoint, besides those of its upstream run.
    """

    name: str
    train_section: str
    network_section: str
    scheduler_section: Optional[str]
    space: Literal["image", "latent"]
    upstream: Optional[Literal["autoencoder", "generator"]] = None
    generator: bool = False
    samples: bool = False
    sampling_modules: tuple[str, ...] = ()
    extra_sections: tuple[str, ...] = ()  # further config sections only this kind trains with

    def __str__(self) -> str:
        return self.name


_KINDS: dict[str, ModelKind] = {}


def register(k: ModelKind) -> ModelKind:
    """Add a kind to the registry (medimgen's own below; a test or a plug-in may add one)."""
    if k.name in _KINDS:
        raise MedimgenError(f"model kind '{k.name}' is already registered")
    _KINDS[k.name] = k
    return k


def unregister(name: str) -> None:
    """Remove a kind added by `register` (tests)."""
    _KINDS.pop(name, None)


DDPM = register(ModelKind("ddpm", "train_ddpm", "ddpm_unet", "ddpm_scheduler", "image", generator=True, samples=True,
                          sampling_modules=("unet",)))
AUTOENCODER = register(ModelKind("autoencoder", "train_autoencoder", "autoencoder", None, "image",
                                 sampling_modules=("autoencoder",), extra_sections=("discriminator", "losses")))
LDM = register(ModelKind("ldm", "train_ldm", "ldm_unet", "ldm_scheduler", "latent", upstream="autoencoder",
                         generator=True, samples=True, sampling_modules=("unet",)))
CONTROLNET = register(ModelKind("controlnet", "train_controlnet", "controlnet", None, "image", upstream="generator",
                                samples=True, sampling_modules=("controlnet",)))


def kind(name: "str | ModelKind") -> ModelKind:
    """The kind called ``name`` (a kind passes through); an unknown name is one line listing the kinds."""
    if isinstance(name, ModelKind):
        return name
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise MedimgenError(f"unknown model kind {name!r:.40}: choose one of {', '.join(_KINDS)}") from None


def kinds() -> tuple[ModelKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def names(*, generator: Optional[bool] = None, samples: Optional[bool] = None) -> tuple[str, ...]:
    """Names of the registered kinds, optionally only generators / only those one can sample from."""
    return tuple(k.name for k in _KINDS.values()
                 if (generator is None or k.generator == generator) and (samples is None or k.samples == samples))


SHARED_SECTIONS = ("data", "tracking", "memory", "derived")  # every kind's


def config_sections(name: "str | ModelKind", cfg=None) -> tuple[str, ...]:
    """The config sections a run of kind ``name`` uses: the shared ones, its own, and those of the kind it builds on
    (a ControlNet's base is ``cfg.controlnet_base()``, the LDM without a config). What a run logs as MLflow params."""
    k = kind(name)
    own = [k.train_section, k.network_section, *([k.scheduler_section] if k.scheduler_section else []),
           *k.extra_sections]
    if k.upstream == "autoencoder":
        own.append(kind("autoencoder").network_section)
    elif k.upstream == "generator":
        base = kind(cfg.controlnet_base() if cfg is not None else "ldm")
        own += [s for s in config_sections(base, cfg) if s != base.train_section]
    return tuple(dict.fromkeys([*SHARED_SECTIONS, *own]))
