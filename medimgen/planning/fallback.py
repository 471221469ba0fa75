"""A foundation plan re-planned for its trained fallback autoencoder (a failed reconstruction check,
medimgen.training.foundation).

A plan for a foundation autoencoder sized the LDM and ControlNet for its latent (MAISI: 4 channels, 4x per axis)
and mapped intensities the way its weights were trained. When the check fails and medimgen trains the planned
fallback instead, those values are wrong for the new latent: the planner itself (planning.api.build_config, the
source forced to 'trained' for that dimensionality) plans them again, and these fields of its result replace the
old ones: the autoencoder, every latent-space kind's network and training sections (attention levels for the new
latent size, the memory fit, the latent cache), the intensity mapping and the planner's results in ``derived``.
Every other value (hand edits, the noise process, the image-space kinds) stays as it was, unless the two memory
fits chose different image geometries: then the trained plan is taken whole.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medimgen.config.io import back_up_config, config_lock, is_user_edited, load_config, save_config
from medimgen.config.kinds import kind, names
from medimgen.config.schema import TRAINED, GenerationConfig
from medimgen.nnunet.plans import DatasetPlans

# the data fields a plan sets from its autoencoder source (planning.api.build_config) and the memory fit
SOURCE_DATA_FIELDS = ("intensity_range", "intensity_low", "intensity_high", "intensity_background",
                      "intensity_clip_low", "intensity_clip_high")
# what the memory fit changes when it generates at a coarser spacing (planning.memory._downscale)
GEOMETRY_FIELDS = ("image_size", "crop_size", "spacing", "native_spacing", "data_size")


def trained_plan(plans: DatasetPlans, cfg: GenerationConfig) -> GenerationConfig:
    """The planner's config of ``cfg``'s dimensionality with a trained autoencoder (its labels choice and memory
    target kept)."""
    from medimgen.planning.api import build_config

    dim = cfg.dim
    overrides = [f"{dim}.autoencoder.source={TRAINED}",
                 f"{dim}.data.generate_labels={str(cfg.data.generate_labels).lower()}"]
    return build_config(plans, cfg.memory.target_gb, overrides, only=[dim]).get(dim)


def with_trained_plan(cfg: GenerationConfig, fresh: GenerationConfig, why: str) -> GenerationConfig:
    """``cfg`` with the fields that follow the autoencoder taken from ``fresh`` (:func:`trained_plan`);
    ``why``: the new derived.autoencoder_choice. When the two plans' memory fits chose different image geometries
    (the frozen foundation network counted in the LDM's fit can make one of them generate coarser), every section
    was sized for the other geometry: ``fresh`` is taken whole."""
    if any(getattr(cfg.data, f) != getattr(fresh.data, f) for f in GEOMETRY_FIELDS):
        return dataclasses.replace(fresh, derived=dataclasses.replace(fresh.derived, autoencoder_choice=why,
                                                                      fallback_autoencoder={}))
    sections = {"autoencoder": fresh.autoencoder}
    for m in names():
        if cfg.space_of(m) == "latent":
            k = kind(m)
            sections[k.network_section] = getattr(fresh, k.network_section)
            sections[k.train_section] = getattr(fresh, k.train_section)
    data = dataclasses.replace(cfg.data, **{f: getattr(fresh.data, f) for f in SOURCE_DATA_FIELDS})
    derived = dataclasses.replace(cfg.derived, memory_fitted=fresh.derived.memory_fitted,
                                  predicted_peak_gb=dict(fresh.derived.predicted_peak_gb),
                                  autoencoder_choice=why, fallback_autoencoder={})
    return dataclasses.replace(cfg, data=data, derived=derived, **sections)


def save_trained_plan(path: Path, plans: DatasetPlans, dim: str, fresh: GenerationConfig,
                      why: str) -> Path | None:
    """Rewrite ``dim`` of the config file ``path`` (atomically, under the config's lock) with
    :func:`with_trained_plan`; a file edited by hand is first copied to a timestamped backup beside it (returned;
    None: no backup)."""
    from medimgen.planning.api import HEADER
    from medimgen import __version__

    with config_lock(path):  # a concurrent `medimgen plan` writes before or after, never in between
        whole = load_config(path)
        configs = dict(whole.configs)
        configs[dim] = with_trained_plan(configs[dim], fresh, why)
        backup = back_up_config(path) if is_user_edited(path) else None
        save_config(dataclasses.replace(whole, configs=configs), path,
                    HEADER.format(name=plans.name, plans=plans.plans_identifier, version=__version__))
    return backup
