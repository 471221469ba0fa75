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

_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _show(value: Any) -> str:
    return str(list(value)).replace(" ", "") if isinstance(value, (tuple, list)) else repr(value)


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
    for name in ("ddpm_scheduler", "ldm_scheduler"):
        sched = getattr(cfg, name)
        if sched.num_inference_steps > sched.num_train_timesteps:
            raise _bad(_join(where, f"{name}.num_inference_steps"),
                       f"<= {name}.num_train_timesteps ({sched.num_train_timesteps})", sched.num_inference_steps)
