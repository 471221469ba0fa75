"""Model kinds as objects: the one place that knows what a DDPM, an autoencoder, an LDM and a ControlNet are.

Code asks a kind (`kind("ldm").space`, `.upstream`, `.train_section`) and never compares model names. Adding a kind
means registering one `ModelKind` (`register`, here or from outside), its training task
(medimgen.training.tasks.register_task) and its network builder (``ModelKind.build``); tests/test_kinds.py adds a toy
kind that way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from medimgen.core.errors import MedimgenError


@dataclass(frozen=True)
class ModelKind:
    """What medimgen knows about one kind of model.

    name: the kind's name on the CLI, in run folders and in MLflow.
    train_section: the config section of its training settings (``train_<name>``).
    network_section: the config section of its network (``ddpm_unet``, ``autoencoder``, ...).
    scheduler_section: the config section of its noise process, None for a kind without one.
    space: 'image' (works on images), 'latent' (works on an autoencoder's latents) or 'upstream' (that of the
        generator it steers: a ControlNet on an LDM works on latents).
    upstream: what it builds on: None, 'encoder' (a trained run of the encoder kind, the autoencoder), or 'generator' (the diffusion
        model it steers, `controlnet.base` of the config: 'auto' is the first trained of `auto_generators()`).
        Either way its run refers to that run by one relative path (runs.folders.link_upstream).
    generator: an unconditional generator (samples from noise alone).
    samples: `medimgen sample` can sample from it (a generator, or something steering one).
    sampling_modules: the networks a sampler needs from its checkpoint, besides those of its upstream run.
    encoder: it learns the latent space other kinds build on (trained without an EMA copy, scored on its
        reconstructions rather than on samples).
    auto: its rank when 'auto' picks a trained generator (lower first); None: never picked.
    build: its network builder (config -> the network of ``sampling_modules[0]``) for a kind added outside medimgen;
        None: medimgen.models.networks builds it from ``network_section`` (a UNet, an autoencoder, a ControlNet).
    """

    name: str
    train_section: str
    network_section: str
    scheduler_section: Optional[str]
    space: Literal["image", "latent", "upstream"]
    upstream: Optional[Literal["encoder", "generator"]] = None
    generator: bool = False
    samples: bool = False
    sampling_modules: tuple[str, ...] = ()
    extra_sections: tuple[str, ...] = ()  # further config sections only this kind trains with
    encoder: bool = False
    auto: Optional[int] = None
    build: Optional[Callable[[Any], Any]] = field(default=None, compare=False)

    @property
    def steers(self) -> bool:
        """It steers a trained generator (a ControlNet): conditioned sampling, its noise process is the base's."""
        return self.upstream == "generator"

    @property
    def module(self) -> str:
        """The key of its own trained network in a checkpoint's modules."""
        return self.sampling_modules[0]

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
                          sampling_modules=("unet",), auto=1))
AUTOENCODER = register(ModelKind("autoencoder", "train_autoencoder", "autoencoder", None, "image",
                                 sampling_modules=("autoencoder",), encoder=True,
                                 extra_sections=("discriminator", "losses")))
LDM = register(ModelKind("ldm", "train_ldm", "ldm_unet", "ldm_scheduler", "latent", upstream="encoder",
                         generator=True, samples=True, sampling_modules=("unet",), auto=0))
CONTROLNET = register(ModelKind("controlnet", "train_controlnet", "controlnet", None, "upstream", upstream="generator",
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


def names(*, generator: Optional[bool] = None, samples: Optional[bool] = None,
          steers: Optional[bool] = None) -> tuple[str, ...]:
    """Names of the registered kinds, optionally only generators / only those one can sample from / only those
    steering a generator."""
    return tuple(k.name for k in _KINDS.values()
                 if (generator is None or k.generator == generator) and (samples is None or k.samples == samples)
                 and (steers is None or k.steers == steers))


def auto_generators() -> tuple[str, ...]:
    """The generators 'auto' picks from, in the order it tries them (the first trained one wins)."""
    return tuple(k.name for k in sorted((k for k in _KINDS.values() if k.auto is not None), key=lambda k: k.auto))


def the(role: str) -> ModelKind:
    """The one registered kind that is ``role`` ('encoder': what an 'encoder' upstream is; 'steers': the kind
    that steers a generator with label maps)."""
    found = [k for k in _KINDS.values() if getattr(k, role)]
    if len(found) != 1:
        raise MedimgenError(f"{len(found)} registered model kinds are '{role}' (need exactly one)")
    return found[0]


SHARED_SECTIONS = ("data", "tracking", "memory", "derived")  # every kind's


def config_sections(name: "str | ModelKind", cfg=None) -> tuple[str, ...]:
    """The config sections a run of kind ``name`` uses: the shared ones, its own, and those of the kind it builds on
    (a ControlNet's base is ``cfg.controlnet_base()``, the first of `auto_generators()` without a config). What a run
    logs as MLflow params."""
    k = kind(name)
    own = [k.train_section, k.network_section, *([k.scheduler_section] if k.scheduler_section else []),
           *k.extra_sections]
    if k.upstream == "encoder":
        own.append(the("encoder").network_section)
    elif k.upstream == "generator":
        base = kind(cfg.controlnet_base() if cfg is not None else auto_generators()[0])
        own += [s for s in config_sections(base, cfg) if s != base.train_section]
    return tuple(dict.fromkeys([*SHARED_SECTIONS, *own]))
