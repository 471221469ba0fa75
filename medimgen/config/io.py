"""YAML round-trip, validation and command-line overrides for the typed configs.

Unknown or mistyped keys are rejected with one line naming the key (and the closest
valid key), impossible values with one line naming the key and the allowed values
(medimgen.config.validate); YAML is always read with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import types

from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from medimgen.core.atomic import file_lock, write_text_atomic
from medimgen.config.schema import DIMS, DatasetInfo, GenerationConfig, MedimgenConfig
from medimgen.config.validate import check_dataset, check_field, check_generation
from medimgen.core.errors import MedimgenError
from medimgen.core.names import short_repr

# Results that configs written before the `derived` section kept among the inputs: (section, key) -> derived key.
# Every train_* section had a latent_scale_factor; only the LDM's was ever set (the others were null).
_MOVED_TO_DERIVED = {("train_ldm", "latent_scale_factor"): "latent_scale_factor",
                     ("train_ddpm", "latent_scale_factor"): None,
                     ("train_autoencoder", "latent_scale_factor"): None,
                     ("memory", "fitted"): "memory_fitted",
                     ("memory", "predicted_peak_gb"): "predicted_peak_gb"}


# ----------------------------------------------------------------------------- dict <-> dataclass
def to_dict(obj: Any) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if isinstance(obj, MedimgenConfig):
        out = {"medimgen_version": obj.medimgen_version, "dataset": to_dict(obj.dataset)}
        for dim in DIMS:
            if dim in obj.configs:
                out[dim] = to_dict(obj.configs[dim])
        return out
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} values"
    return getattr(tp, "__name__", str(tp))


class _Bad(MedimgenError):
    """'expected <type>, got <value>' for one key, its text built only when shown (values may be huge)."""

    def __init__(self, key: str, tp: Any, value: Any):
        super().__init__(key)
        self.key, self.tp, self.value = key, tp, value

    def __str__(self) -> str:
        return f"config key '{self.key}': expected {_type_name(self.tp)}, got {short_repr(self.value)}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    bad = _Bad(key, tp, value)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted off/on/no/yes as a boolean
            value = {False: "off", True: "on"}[value]
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except MedimgenError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp in (bool, int, str):  # exactly that type (a YAML true is no int)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            value = float(value)
        except OverflowError:  # an int beyond a float
            value = math.inf
        if not math.isfinite(value):
            raise MedimgenError(f"config key '{key}': must be a finite number, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    raise MedimgenError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover - schema bug


def _unknown_key(key: str, name: str, valid: list[str]) -> MedimgenError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
    return MedimgenError(f"unknown config key '{key}'{hint}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown, missing, mistyped and impossible values."""
    if not isinstance(data, dict):
        raise MedimgenError(f"config section '{where or cls.__name__}' must be a mapping, got {short_repr(data)}")
    if cls is GenerationConfig:
        data = _derived_apart(data)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            raise _unknown_key(f"{where}.{k}" if where else str(k), str(k), list(fields))
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
            check_field(f, kwargs[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MedimgenError(f"config key '{key}' is missing")
    obj = cls(**kwargs)
    if cls is GenerationConfig:
        check_generation(obj, where)
    return obj


def _derived_apart(data: dict) -> dict:
    """A config written before the `derived` section, with its results moved there (read-only migration)."""
    if not any(isinstance(data.get(sec), dict) and key in data[sec] for sec, key in _MOVED_TO_DERIVED):
        return data
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    derived = data.setdefault("derived", {})
    for (sec, key), new in _MOVED_TO_DERIVED.items():
        if isinstance(data.get(sec), dict) and key in data[sec]:
            value = data[sec].pop(key)
            if new is not None:
                derived.setdefault(new, value)
    return data


def medimgen_config_from_dict(data: Any) -> MedimgenConfig:
    if not isinstance(data, dict):
        raise MedimgenError("a medimgen config must be a mapping with 'dataset' and '2d'/'3d' sections")
    valid = ["medimgen_version", "dataset", *DIMS]
    for k in data:
        if k not in valid:
            raise _unknown_key(str(k), str(k), valid)
    if "dataset" not in data:
        raise MedimgenError("config key 'dataset' is missing")
    dataset = from_dict(DatasetInfo, data["dataset"], "dataset")
    configs = {dim: from_dict(GenerationConfig, _with_plans(data[dim], dataset.plans_identifier), dim)
               for dim in DIMS if data.get(dim) is not None}
    if not configs:
        raise MedimgenError("the config has neither a '2d' nor a '3d' section")
    check_dataset(dataset, configs)
    for dim, c in configs.items():
        if c.data.plans_identifier != dataset.plans_identifier:
            raise MedimgenError(
                f"config key '{dim}.data.plans_identifier': must equal dataset.plans_identifier "
                f"({dataset.plans_identifier!r}), got {c.data.plans_identifier!r}: re-plan with "
                f"`medimgen plan --plans {c.data.plans_identifier}` to use other nnU-Net plans")
    return MedimgenConfig(dataset=dataset, configs=configs, medimgen_version=str(data.get("medimgen_version", "unknown")))


def _with_plans(section: Any, plans_identifier: str) -> Any:
    """A section written before data.plans_identifier existed gets the dataset's (dataset.plans_identifier)."""
    if isinstance(section, dict) and isinstance(section.get("data"), dict) and "plans_identifier" not in section["data"]:
        return {**section, "data": {**section["data"], "plans_identifier": plans_identifier}}
    return section


# ----------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise MedimgenError(f"override {short_repr(text)} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise MedimgenError(f"override {short_repr(text)} must look like section.key=value")
    try:
        value = parse_yaml(raw, f"override {key!r}") if raw.strip() else ""
    except YamlRefused:
        raise
    except MedimgenError:
        value = raw  # not YAML: the text itself (a string value)
    return key.split("."), value


def _set_path(data: dict, parts: list[str], value: Any, full: str) -> None:
    node = data
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            raise MedimgenError(f"override '{full}': '{'.'.join(parts[:i])}' is not a section")
        if part not in node:
            raise _unknown_key(full, part, list(node))
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Return a new config with ``section.key=value`` overrides applied (values parsed as YAML).

    For a whole MedimgenConfig, a key may start with ``2d.``/``3d.`` to target one
    dimensionality; otherwise it applies to every dimensionality present. For one GenerationConfig
    (a training run) the prefix may be given too: it must name that config's dimensionality.
    """
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        if isinstance(cfg, GenerationConfig) and parts[0] in DIMS:
            dim = f"{cfg.data.spatial_dims}d"
            if parts[0] != dim:
                raise MedimgenError(f"override '{text}' is for the {parts[0]} config, but this is the {dim} "
                                    f"config (MODEL_TYPE {dim}): use the {dim}. prefix or none")
            parts = parts[1:]
            if not parts:
                raise MedimgenError(f"override {text!r} must look like section.key=value")
        if isinstance(cfg, MedimgenConfig) and parts[0] not in ("dataset", "medimgen_version", *DIMS):
            targets = [d for d in DIMS if d in data]
            for d in targets:
                _set_path(data, [d, *parts], value, text)
        else:
            _set_path(data, parts, value, text)
    if isinstance(cfg, MedimgenConfig):
        return medimgen_config_from_dict(data)
    return from_dict(type(cfg), data)


# ----------------------------------------------------------------------------- YAML with comments
def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("...").strip()


def _emit(obj: Any, data: dict, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    docs = {f.name: f.metadata.get("doc") for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    for key, value in data.items():
        sub = getattr(obj, key, None) if dataclasses.is_dataclass(obj) else None
        comment = docs.get(key)
        if dataclasses.is_dataclass(sub):
            lines.append(f"{pad}{key}:")
            _emit(sub, value, indent + 1, lines)
            continue
        line = f"{pad}{key}: {_flow(value)}"
        if comment:
            line += f"  # {comment}"
        lines.append(line)


def render_yaml(cfg: MedimgenConfig, header: str = "") -> str:
    data = to_dict(cfg)
    lines: list[str] = []
    lines.append(f"medimgen_version: {_flow(cfg.medimgen_version)}")
    lines.append("dataset:")
    _emit(cfg.dataset, data["dataset"], 1, lines)
    for dim in DIMS:
        if dim in cfg.configs:
            lines.append("")
            lines.append(f"{dim}:")
            _emit(cfg.configs[dim], data[dim], 1, lines)
    body = "\n".join(lines) + "\n"
    head = "".join(f"# {h}\n" if h else "#\n" for h in header.splitlines())
    return head + f"# medimgen-checksum: {body_checksum(body)}\n" + body


def body_checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def split_checksum(text: str) -> tuple[str | None, str]:
    """(recorded checksum or None, body after the checksum line)."""
    marker = "# medimgen-checksum: "
    idx = text.find(marker)
    if idx < 0:
        return None, text
    end = text.find("\n", idx)
    return text[idx + len(marker):end].strip(), text[end + 1:]


def is_user_edited(path: Path) -> bool:
    recorded, body = split_checksum(path.read_text())
    return recorded is None or recorded != body_checksum(body)


MAX_YAML_BYTES = 16 * 2**20  # a config is a few kB; a bigger file is not one
MAX_YAML_DEPTH = 32  # medimgen's configs nest 4 levels


class _LimitError(yaml.YAMLError):
    """A YAML document beyond medimgen's limits (an alias, too deep, a duplicated key)."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class YamlRefused(MedimgenError):
    """YAML that parses but breaks a limit (an alias, nesting, a duplicate key, size): never read as a string."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases (no 'billion laughs'), nesting capped, duplicate keys refused."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _LimitError("aliases (*name) are not allowed in medimgen YAML", self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _LimitError(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None:
                    if key in seen:
                        raise _LimitError(f"duplicate key {short_repr(key)} (each key may appear once per section)",
                                          key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str | bytes, where: str) -> Any:
    """The one YAML reader (safe, no aliases, depth-capped, no duplicate keys, UTF-8, at most MAX_YAML_BYTES):
    every problem is one line starting with ``where`` (a file, or an override)."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlRefused(f"{where}: {len(text)} bytes is too large for a config (at most {MAX_YAML_BYTES})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MedimgenError(f"{where}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a yaml.SafeLoader
    except _LimitError as e:
        line = f" line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        raise YamlRefused(f"{where}{line}: refused YAML ({e.problem})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise MedimgenError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise YamlRefused(f"{where}: refused YAML (nested too deeply)") from None


def load_yaml(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MedimgenError(f"config file {path} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise MedimgenError(f"{path}: {size} bytes is too large for a config (at most {MAX_YAML_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise MedimgenError(f"cannot read {path} ({e.strerror})") from None
    return parse_yaml(data, str(path))


def load_config(path: Path | str) -> MedimgenConfig:
    try:
        return medimgen_config_from_dict(load_yaml(path))
    except MedimgenError as e:
        if str(e).startswith(str(path)):
            raise
        raise MedimgenError(f"{path}: {e}") from None


def save_config(cfg: MedimgenConfig, path: Path | str, header: str = "") -> Path:
    """Write atomically (temp file + rename)."""
    path = Path(path)
    write_text_atomic(path, render_yaml(cfg, header))
    return path


def config_lock(path: Path | str):
    """The lock every writer of a dataset's config file holds from reading it to replacing it (``medimgen plan``, a
    foundation run's fallback rewriting its section): ``.<name>.lock`` beside the file, so that neither writes over
    what the other wrote meanwhile."""
    path = Path(path)
    return file_lock(path.with_name(f".{path.name}.lock"))


def back_up_config(path: Path | str) -> Path:
    """Copy a config file to ``<name>.<YYYYmmdd-HHMMSS>.bak`` beside it (``-2``, ``-3``, ... when that name is taken:
    two rewrites within a second never overwrite a backup) and return the copy's path."""
    import shutil
    import time

    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = path.with_name(f"{path.name}.{stamp}.bak"), 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.{stamp}-{n}.bak")
    shutil.copy2(path, backup)
    return backup


def render_generation_config(cfg: GenerationConfig) -> str:
    """The YAML text of one run's resolved config."""
    lines: list[str] = []
    _emit(cfg, to_dict(cfg), 0, lines)
    return "\n".join(lines) + "\n"


def save_generation_config(cfg: GenerationConfig, path: Path | str) -> Path:
    """The resolved config of one run (written beside checkpoints)."""
    path = Path(path)
    write_text_atomic(path, render_generation_config(cfg))
    return path


def load_generation_config(path: Path | str) -> GenerationConfig:
    try:
        return from_dict(GenerationConfig, load_yaml(path))
    except YamlRefused:
        raise
    except MedimgenError as e:
        if str(e).startswith(str(path)):
            raise
        raise MedimgenError(f"{path}: {e}") from None


_NOT_MODEL = ("data.num_workers", "data.augmentation", "data.oversample_foreground_percent")


def model_keys_changed(trained: GenerationConfig, now: GenerationConfig, model: str) -> list[str]:
    """The keys whose value differs between the config a run of ``model`` trained with and the run's config.yaml now,
    among what its weights depend on: ``data`` and the network and noise-process sections of the kind and of the
    kinds it builds on (a change there after training makes the weights wrong for the config)."""
    from medimgen.config.kinds import config_sections, kinds

    weights = {s for k in kinds() for s in (k.network_section, k.scheduler_section) if s}
    sections = [s for s in config_sections(model, trained) if s == "data" or s in weights]
    a, b = flatten({k: to_dict(getattr(trained, k)) for k in sections}), flatten(
        {k: to_dict(getattr(now, k)) for k in sections})
    return [k for k in sorted(set(a) | set(b)) if k not in _NOT_MODEL and a.get(k) != b.get(k)
            and not k.endswith(".activation_checkpointing")]  # a memory re-fit may switch it on: same weights


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for MLflow params."""
    data = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


__all__ = [
    "apply_overrides", "flatten", "from_dict", "is_user_edited", "load_config", "load_generation_config",
    "model_keys_changed", "parse_yaml",
    "medimgen_config_from_dict", "render_generation_config", "render_yaml", "save_config", "save_generation_config",
    "to_dict",
]

