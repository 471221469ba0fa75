"""Value checks of the typed configs: every impossible value stops with one line naming the key and what is allowed.

Per-field ranges are declared in the schema (``doc(..., ge=1)``) and checked for every value read
from YAML or a ``--set`` override (``io.from_dict`` calls :func:`check_field`); the relations between
fields of one dimensionality (strides vs levels and image size) are checked by :func:`check_generation`
whenever a GenerationConfig is built from data. The network builders use :func:`check_network` too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from medimgen.config.schema import AutoencoderConfig, GenerationConfig, UNetConfig
from medimgen.core.errors import MedimgenError
from medimgen.core.names import short_repr

_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)) and len(value) <= 16:
        return short_repr(list(value), 120).replace(" ", "")
    return short_repr(value, 120)


def _bad(key: str, allowed: str, value: Any) -> MedimgenError:
    return MedimgenError(f"config key '{key}': must be {allowed}, got {_show(value)}")


def allowed_range(bounds: dict) -> str:
    """'>= 1', '> 0', 'in [0, 1)' ... for the bounds declared on a schema field."""
    low = next(((op, b) for op, b in bounds.items() if op in ("ge", "gt")), None)
    high = next(((op, b) for op, b in bounds.items() if op in ("le", "lt")), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    op, b = low or high
    return f"{_OPS[op][0]} {b:g}"


def check_field(field: dataclasses.Field, value: Any, key: str) -> None:
    """The range declared on ``field`` (for a list: on every element), or its pattern; None (null) is never checked."""
    pattern = field.metadata.get("pattern")
    if pattern and value is not None and not re.fullmatch(pattern[0], str(value)):
        raise _bad(key, pattern[1], value)
    bounds = field.metadata.get("bounds")
    if not bounds or value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not all(_OPS[op][1](v, b) for op, b in bounds.items()):
            kind = "a list of values" if isinstance(value, tuple) else "an integer" if isinstance(v, int) else "a number"
            raise _bad(key, f"{kind} {allowed_range(bounds)}", value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_network(section: AutoencoderConfig | UNetConfig, key: str, spatial_dims: int | None = None) -> None:
    """Levels, strides (1 or 2 on each axis) and group norm of an autoencoder or UNet section."""
    levels = len(section.channels)
    if len(section.strides) != levels - 1:
        raise MedimgenError(f"config key '{key}.strides': {levels} channel levels need {levels - 1} strides, "
                            f"got {len(section.strides)}")
    for i, stride in enumerate(section.strides):
        if any(s not in (1, 2) for s in stride) or (spatial_dims is not None and len(stride) != spatial_dims):
            axes = f" on each of {spatial_dims} axes" if spatial_dims else ""
            raise _bad(f"{key}.strides[{i}]", f"1 or 2{axes}", stride)
    attention = section.attention_levels
    if (attention or isinstance(section, UNetConfig)) and len(attention) != levels:
        raise MedimgenError(f"config key '{key}.attention_levels': {levels} channel levels need {levels} values, "
                            f"got {len(attention)}")
    if any(c % section.norm_num_groups for c in section.channels):
        raise MedimgenError(f"config key '{key}.norm_num_groups': norm_num_groups={section.norm_num_groups} does not "
                            f"divide channels {_show(section.channels)} (allowed: a divisor of every channel count)")
    if isinstance(section, UNetConfig):
        # MONAI splits into heads only where there is attention: the levels with attention and the middle block
        # (the deepest level's channels); elsewhere num_head_channels is ignored
        attended = [c for i, c in enumerate(section.channels)
                    if i == len(section.channels) - 1 or (i < len(attention) and attention[i])]
        if any(c % section.num_head_channels for c in attended):
            raise MedimgenError(f"config key '{key}.num_head_channels': {section.num_head_channels} does not divide "
                                f"the channels {_show(attended)} of the levels with attention (and the middle block) "
                                f"of {_show(section.channels)}")


def check_foundation(cfg: GenerationConfig, where: str = "") -> None:
    """``autoencoder.source`` other than 'trained': the published network as it is (its architecture fields fixed),
    3D, one image channel, no joint label channels (the published weights encode images only)."""
    from medimgen.config.schema import FOUNDATION_ARCHITECTURES

    ae = cfg.autoencoder
    if not ae.is_foundation:
        return
    key = _join(where, "autoencoder.source")
    if cfg.data.spatial_dims != 3:
        raise MedimgenError(f"config key '{key}': '{ae.source}' is a 3D network, this is the "
                            f"{cfg.data.spatial_dims}d config (allowed here: trained)")
    if cfg.data.in_channels != 1:
        raise MedimgenError(f"config key '{key}': '{ae.source}' encodes one image channel, this dataset has "
                            f"{cfg.data.in_channels} (allowed here: trained)")
    if cfg.data.generate_labels:
        raise MedimgenError(f"config key '{key}': '{ae.source}' encodes images only, but data.generate_labels is "
                            f"true: set data.generate_labels=false (labels then come from a ControlNet) or "
                            f"autoencoder.source=trained")
    published = FOUNDATION_ARCHITECTURES[ae.source]
    for name in ("channels", "strides", "latent_channels", "num_res_blocks", "attention_levels", "norm_num_groups"):
        got, want = getattr(ae, name), getattr(published, name)
        if got != want:
            raise MedimgenError(f"config key '{_join(where, 'autoencoder.' + name)}': must be {_show(want)} with "
                                f"autoencoder.source={ae.source} (the published network), got {_show(got)}")


def _product(strides, nd: int) -> tuple[int, ...]:
    return tuple(math.prod(s[i] for s in strides) for i in range(nd))


def _divides(key: str, strides, nd: int, size: tuple[int, ...], size_name: str) -> None:
    total = _product(strides, nd)
    if any(n % t for n, t in zip(size, total)):
        raise MedimgenError(f"config key '{key}.strides': their per-axis product {_show(total)} must divide "
                            f"{size_name} {_show(size)}")


def check_generation(cfg: GenerationConfig, where: str = "") -> None:
    """Relations between the fields of one dimensionality's config (``where``: its key prefix, e.g. '3d')."""
    data, nd = cfg.data, cfg.data.spatial_dims
    if nd not in (2, 3):
        raise _bad(_join(where, "data.spatial_dims"), "2 or 3", nd)
    for name in ("image_size", "size_divisor", "spacing", "crop_size", "native_spacing", "data_size"):
        value = getattr(data, name)
        if len(value) != nd and (value or name in ("image_size", "size_divisor", "spacing")):
            raise _bad(_join(where, f"data.{name}"), f"a list of {nd} values (data.spatial_dims)", value)
    if any(s % d for s, d in zip(data.image_size, data.size_divisor)):
        raise MedimgenError(f"config key '{_join(where, 'data.image_size')}': must be divisible per axis by "
                            f"data.size_divisor {_show(data.size_divisor)}, got {_show(data.image_size)}")
    if data.generate_labels and not data.label_values:
        raise MedimgenError(f"config key '{_join(where, 'data.generate_labels')}': true needs data.label_values "
                            f"(the foreground label values of dataset.json), got none")
    if data.label_names and len(data.label_names) != len(data.label_values):
        raise _bad(_join(where, "data.label_names"), f"one name per data.label_values ({len(data.label_values)})",
                   data.label_names)
    if len(set(data.label_values)) != len(data.label_values):
        raise _bad(_join(where, "data.label_values"), "distinct values", data.label_values)
    for name in ("autoencoder", "ddpm_unet", "ldm_unet"):
        check_network(getattr(cfg, name), _join(where, name), nd)
    check_foundation(cfg, where)
    _divides(_join(where, "autoencoder"), cfg.autoencoder.strides, nd, data.image_size, "data.image_size")
    _divides(_join(where, "ddpm_unet"), cfg.ddpm_unet.strides, nd, data.image_size, "data.image_size")
    latent = tuple(s // a for s, a in zip(data.image_size, _product(cfg.autoencoder.strides, nd)))
    _divides(_join(where, "ldm_unet"), cfg.ldm_unet.strides, nd, latent, "the latent size (image size / autoencoder strides)")
    cn = cfg.controlnet
    if cn.conditioning_strides:
        if any(len(s) != nd or any(v not in (1, 2) for v in s) for s in cn.conditioning_strides):
            raise _bad(_join(where, "controlnet.conditioning_strides"), f"lists of {nd} strides of 1 or 2",
                       cn.conditioning_strides)
        if len(cn.conditioning_channels) != len(cn.conditioning_strides) + 1:
            raise _bad(_join(where, "controlnet.conditioning_channels"),
                       f"one more level than controlnet.conditioning_strides ({len(cn.conditioning_strides) + 1})",
                       cn.conditioning_channels)
    _check_intensity(data, where)
    max_layers = max(1, int(math.floor(math.log2(max(2, min(data.image_size))))) - 2)
    if cfg.discriminator.num_layers > max_layers:
        raise _bad(_join(where, "discriminator.num_layers"), f"<= {max_layers} (each layer halves the smallest "
                   f"image axis, {min(data.image_size)} voxels)", cfg.discriminator.num_layers)
    from medimgen.config.kinds import kinds

    for name in dict.fromkeys(k.scheduler_section for k in kinds() if k.scheduler_section):
        sched = getattr(cfg, name)
        if sched.beta_start >= sched.beta_end:
            raise MedimgenError(f"config key '{_join(where, name + '.beta_start')}': must be < {name}.beta_end "
                                f"({sched.beta_end:g}), got {sched.beta_start:g}")
        if sched.num_inference_steps > sched.num_train_timesteps:
            raise _bad(_join(where, f"{name}.num_inference_steps"),
                       f"<= {name}.num_train_timesteps ({sched.num_train_timesteps})", sched.num_inference_steps)


def _check_intensity(data, where: str) -> None:
    """The intensity map: a range with low < high, per-channel values one per channel with low < high."""
    lo, hi = data.intensity_range
    if not lo < hi:
        raise _bad(_join(where, "data.intensity_range"), "[low, high] with low < high", data.intensity_range)
    per_channel = ("intensity_low", "intensity_high", "intensity_mean", "intensity_std", "intensity_case_mean",
                   "intensity_case_std", "intensity_background", "intensity_clip_low", "intensity_clip_high")
    for name in per_channel:
        value = getattr(data, name)
        if value and len(value) != data.in_channels:
            raise _bad(_join(where, f"data.{name}"), f"one value per channel ({data.in_channels}, data.in_channels)",
                       value)
    for c, (low, high) in enumerate(zip(data.intensity_low, data.intensity_high)):
        if not low < high:
            raise MedimgenError(f"config key '{_join(where, 'data.intensity_low')}': must be below data.intensity_high "
                                f"on every channel, got {low:g} >= {high:g} on channel {c}")
    if len(data.intensity_clip_low) != len(data.intensity_clip_high) or any(
            not low < high for low, high in zip(data.intensity_clip_low, data.intensity_clip_high)):
        raise MedimgenError(f"config key '{_join(where, 'data.intensity_clip_low')}': one value per channel below "
                            f"data.intensity_clip_high (or both empty)")
    if data.intensity_std and any(v <= 0 for v in data.intensity_std):
        raise _bad(_join(where, "data.intensity_std"), "numbers > 0", data.intensity_std)


def check_dataset(info, configs: dict) -> None:
    """Relations between dataset facts and the sections: transpositions that are inverse permutations, label
    values that dataset.json has."""
    fwd, bwd = tuple(info.transpose_forward), tuple(info.transpose_backward)
    for name, perm in (("transpose_forward", fwd), ("transpose_backward", bwd)):
        if sorted(perm) != list(range(len(perm))) or len(perm) not in (2, 3):
            raise _bad(f"dataset.{name}", f"a permutation of 0..{max(len(perm), 2) - 1}", perm)
    if len(fwd) != len(bwd) or any(fwd[bwd[i]] != i for i in range(len(bwd))):
        raise _bad("dataset.transpose_backward", f"the inverse of dataset.transpose_forward {_show(fwd)}", bwd)
    if len(info.original_median_spacing) not in (0, len(fwd)) or any(s <= 0 for s in info.original_median_spacing):
        raise _bad("dataset.original_median_spacing", f"{len(fwd)} numbers > 0", info.original_median_spacing)
    values = list(info.labels.values()) if isinstance(info.labels, dict) else []
    plain = values and all(isinstance(v, int) and not isinstance(v, bool) for v in values)  # not region-based
    known = set(values) if plain else set()
    for dim, c in configs.items():
        unknown = [v for v in c.data.label_values if known and v not in known]
        if unknown:
            raise MedimgenError(f"config key '{dim}.data.label_values': {_show(unknown)} not among the label values of "
                                f"dataset.json {_show(sorted(known))}")
