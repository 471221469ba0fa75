"""Search-space YAML files (top-level tuning/): parsing, validation, sampling, and trial -> config overrides."""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medimgen.config import apply_overrides
from medimgen.config.io import parse_override
from medimgen.config.kinds import kind, names
from medimgen.config.schema import GenerationConfig
from medimgen.core.errors import MedimgenError

SETTINGS_SECTIONS = ("budget", "objective", "pruner")  # and one section per model kind (kinds.names())
SPEC_KEYS = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "step", "log"},
             "categorical": {"type", "choices"}}
BUDGET_DEFAULTS = {"epochs": 30, "iterations_per_epoch": None, "num_samples": None, "real": "val",
                   "sampling_steps": None}  # None: sized by planning.quality_budget on the trial's run
OBJECTIVE_DEFAULTS = {"ms_ssim_gap_weight": 100.0, "nsga2_population_size": 10}
PRUNER_DEFAULTS = {"n_startup_trials": 5, "n_warmup_steps": 5}
BUDGET_KEYS = ("epochs", "iterations_per_epoch")  # train_<model>.<key>: a trial's run length
DERIVED = ("autoencoder.channel_multiplier", "autoencoder.depth", "ddpm_unet.channel_multiplier",
           "ldm_unet.channel_multiplier")


def default_space_path() -> Path:
    """tuning/default.yaml of the source tree, else the copy installed under <prefix>/share/medimgen."""
    for candidate in (Path(__file__).resolve().parents[2] / "tuning" / "default.yaml",
                      Path(sys.prefix) / "share" / "medimgen" / "tuning" / "default.yaml"):
        if candidate.is_file():
            return candidate
    raise MedimgenError("tuning/default.yaml is not installed: pass a search space with --space FILE")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    model: str
    params: tuple[Param, ...]
    budget: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=dict)

    def signature(self) -> list:
        """The parameters and their ranges, JSON-able: a study's parameters cannot change between runs."""
        return [[p.name, p.type, p.low, p.high, p.log, p.step, list(p.choices)] for p in self.params]

    def sample(self, trial) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def overrides(self, cfg: GenerationConfig, values: dict[str, Any]) -> list[str]:
        """``--set``-style overrides that put ``values`` (a trial's params) into ``cfg``."""
        sets: list[str] = []
        derived = {k: v for k, v in values.items() if k in DERIVED}
        if "autoencoder.depth" in derived:
            sets += _depth(cfg, int(derived["autoencoder.depth"]))
            cfg = apply_overrides(cfg, sets)
        for key in ("autoencoder", "ddpm_unet", "ldm_unet"):
            mult = derived.get(f"{key}.channel_multiplier")
            if mult is not None:
                section = getattr(cfg, key)
                sets.append(f"{key}.channels={_list(_scale(section.channels, float(mult), section.norm_num_groups))}")
        sets += [f"{k}={_yaml(v)}" for k, v in values.items() if k not in DERIVED]
        return sets

    def split_budget(self, overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """(config overrides, {budget key: override}) of the user's ``--set`` values: ``train_<model>.epochs`` and
        ``train_<model>.iterations_per_epoch`` are the trials' budget (they win over the space's budget section)
        and never part of the tuned config (``--apply-best`` keeps the planned run length)."""
        config, budget = [], {}
        for text in overrides:
            key = override_key(text)
            head, _, tail = key.partition(".")
            if head == f"{kind(self.model).train_section}" and tail in BUDGET_KEYS:
                budget[tail] = text
            else:
                config.append(text)
        return config, budget

    def budget_overrides(self, user: dict[str, str] | None = None) -> list[str]:
        """The per-trial run length: the space's budget, where the user's ``--set`` (``user``) does not set it."""
        user = user or {}
        sets = [] if "epochs" in user else [f"{kind(self.model).train_section}.epochs={int(self.budget['epochs'])}"]
        if self.budget.get("iterations_per_epoch") and "iterations_per_epoch" not in user:
            sets.append(f"{kind(self.model).train_section}.iterations_per_epoch={int(self.budget['iterations_per_epoch'])}")
        return sets + list(user.values())

    def describe_budget(self, user: dict[str, str] | None = None) -> str:
        """One line: each trial's run length and where it comes from (the user's --set or the space file)."""
        user = user or {}
        parts = []
        for key in BUDGET_KEYS:
            space_value = self.budget.get(key)
            if key in user:
                instead = f", instead of budget.{key}={space_value} in {self.path.name}" if space_value else ""
                parts.append(f"{key}={parse_override(user[key])[1]} (from --set{instead})")
            elif space_value:
                parts.append(f"{key}={space_value} (from budget.{key} in {self.path.name})")
            else:
                parts.append(f"{key} as planned")
        scored = ("the real images reconstructed" if kind(self.model).encoder else
                  f"{self.budget['num_samples'] or 'planned'} samples ({self.budget['sampling_steps'] or 'planned'} "
                  f"DDIM steps)")
        return f"{kind(self.model).train_section}." + ", ".join(parts) + f"; scored on {scored}"

    def restrict(self, cfg: GenerationConfig, fixed: Sequence[str] = ()) -> tuple["SearchSpace", list[str]]:
        """(the space without the parameters that cannot matter, one note per dropped parameter): those the user
        fixed with ``--set`` (keys in ``fixed``: the explicit value wins), and the weights and settings of losses
        that ``cfg`` switches off (perceptual_network none or perceptual_weight 0; adversarial_weight 0; the label
        losses of an image-only model)."""
        names = {p.name for p in self.params}
        why = {n: "fixed by --set" for n in names if n in set(fixed)}
        searched = names - set(why)
        losses = cfg.losses
        off = []
        if "losses.perceptual_network" not in searched and losses.perceptual_network == "none":
            off.append(("losses.perceptual_network is none", ("losses.perceptual_",)))
        elif "losses.perceptual_weight" not in searched and losses.perceptual_weight == 0:
            off.append(("losses.perceptual_weight is 0", ("losses.perceptual_",)))
        if "losses.adversarial_weight" not in searched and losses.adversarial_weight == 0:
            off.append(("losses.adversarial_weight is 0",
                        ("losses.adversarial_", "discriminator.", "train_autoencoder.disc_learning_rate")))
        if not cfg.data.generate_labels:
            off.append(("data.generate_labels is false", ("losses.label_",)))
        for reason, prefixes in off:
            for n in sorted(searched):
                if n.startswith(prefixes):
                    why[n] = f"{reason} (that loss is switched off)"
        notes = [f"{n} is not searched: {why[n]}" for n in sorted(why)]
        kept = tuple(p for p in self.params if p.name not in why)
        if not kept:
            raise MedimgenError(f"{self.path} [{self.model}]: nothing left to search ("
                                + "; ".join(f"{n}: {why[n]}" for n in sorted(why)) + ")")
        return dataclasses.replace(self, params=kept), notes

    def validate(self, cfg: GenerationConfig) -> None:
        """Every key must reach a config field, every value must be valid for it (typos named, with a suggestion)."""
        representative = {p.name: (p.choices[0] if p.type == "categorical" else p.low) for p in self.params}
        try:
            apply_overrides(cfg, self.overrides(cfg, representative) + self.budget_overrides())
        except MedimgenError as e:
            raise MedimgenError(f"{self.path} [{self.model}]: {e}") from None


def override_key(text: str) -> str:
    """'section.key' of a ``--set`` override (a leading 2d./3d. dropped)."""
    parts = parse_override(text)[0]
    return ".".join(parts[1:] if parts[0] in ("2d", "3d") and len(parts) > 1 else parts)


def _list(values) -> str:
    return str(list(values)).replace(" ", "")


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _scale(channels, mult: float, groups: int) -> list[int]:
    return [max(groups, int(round(c * mult / groups)) * groups) for c in channels]


def _depth(cfg: GenerationConfig, depth: int) -> list[str]:
    ae = cfg.autoencoder
    d = max(1, min(depth, len(ae.strides)))
    sets = [f"autoencoder.strides={_list([list(s) for s in ae.strides[:d]])}",
            f"autoencoder.channels={_list(ae.channels[:d + 1])}"]
    if ae.attention_levels:
        sets.append(f"autoencoder.attention_levels={_list(ae.attention_levels[:d + 1]).lower()}")
    cn = cfg.controlnet
    if cn.conditioning_strides:  # the ControlNet's embedding follows the autoencoder down to the same latent size
        sets += [f"controlnet.conditioning_strides={_list([list(s) for s in cn.conditioning_strides[:d]])}",
                 f"controlnet.conditioning_channels={_list(cn.conditioning_channels[:d + 1])}"]
    return sets


def _parse_param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or "type" not in spec:
        raise MedimgenError(f"{where}: {name} needs a mapping with 'type' (float, int or categorical)")
    kind = spec["type"]
    if kind not in SPEC_KEYS:
        raise MedimgenError(f"{where}: {name}: type must be float, int or categorical, got {kind!r}")
    unknown = set(spec) - SPEC_KEYS[kind]
    if unknown:
        bad = sorted(unknown)[0]
        close = difflib.get_close_matches(bad, sorted(SPEC_KEYS[kind]), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MedimgenError(f"{where}: {name}: unknown key '{bad}' for a {kind} parameter{hint}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise MedimgenError(f"{where}: {name}: categorical needs a non-empty 'choices' list")
        if any(not isinstance(c, (int, float, str, bool)) or c is None for c in choices):
            raise MedimgenError(f"{where}: {name}: choices must be numbers, strings or booleans "
                                f"(lists such as channel tuples: use a channel_multiplier)")
        return Param(name, kind, choices=tuple(choices))
    for key in ("low", "high"):
        if not isinstance(spec.get(key), (int, float)) or isinstance(spec.get(key), bool):
            raise MedimgenError(f"{where}: {name}: '{key}' must be a number (write floats as 1.0e-5: YAML reads 1e-5 as text)")
    if spec["low"] > spec["high"]:
        raise MedimgenError(f"{where}: {name}: low {spec['low']} is above high {spec['high']}")
    if spec.get("log") and spec["low"] <= 0:
        raise MedimgenError(f"{where}: {name}: a log-scale range needs low > 0")
    return Param(name, kind, spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step"))


def _section(data: dict, name: str, defaults: dict, where: str) -> dict:
    given = data.get(name) or {}
    if not isinstance(given, dict):
        raise MedimgenError(f"{where}: '{name}' must be a mapping")
    for key in given:
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MedimgenError(f"{where}: unknown key '{name}.{key}'{hint}")
    return {**defaults, **given}


def load_space(path: Path | str | None, model: str) -> SearchSpace:
    from medimgen.config.io import load_yaml

    if model not in names():
        raise MedimgenError(f"--model must be one of {', '.join(names())}, got {model!r}")
    sections = (*SETTINGS_SECTIONS, *names())
    path = Path(path) if path else default_space_path()
    data = load_yaml(path) or {}
    where = str(path)
    if not isinstance(data, dict):
        raise MedimgenError(f"{where}: expected a mapping with sections {', '.join(sections)}")
    for key in data:
        if key not in sections:
            close = difflib.get_close_matches(key, sections, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MedimgenError(f"{where}: unknown section '{key}'{hint}")
    params_data = data.get(model) or {}
    if not isinstance(params_data, dict) or not params_data:
        raise MedimgenError(f"{where}: no search space for '{model}' (add a '{model}:' section)")
    params = tuple(_parse_param(name, spec, f"{where} [{model}]") for name, spec in params_data.items())
    budget = _section(data, "budget", BUDGET_DEFAULTS, where)
    if budget["real"] not in ("val", "train", "all"):
        raise MedimgenError(f"{where}: budget.real must be val, train or all (tuning on the test cases would leak), "
                            f"got {budget['real']!r}")
    return SearchSpace(path, model, params, budget, _section(data, "objective", OBJECTIVE_DEFAULTS, where),
                       _section(data, "pruner", PRUNER_DEFAULTS, where))
