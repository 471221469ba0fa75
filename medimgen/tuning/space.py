"""Search-space YAML files (top-level tuning/): parsing, validation, sampling, and trial -> config overrides."""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medimgen.config import apply_overrides
from medimgen.config.schema import GenerationConfig
from medimgen.errors import MedimgenError

MODELS = ("autoencoder", "ldm", "ddpm")
SECTIONS = ("budget", "objective", "pruner", *MODELS)
SPEC_KEYS = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "step", "log"},
             "categorical": {"type", "choices"}}
BUDGET_DEFAULTS = {"epochs": 30, "iterations_per_epoch": None, "num_samples": 16, "real": "val", "sampling_steps": 50}
OBJECTIVE_DEFAULTS = {"ms_ssim_gap_weight": 100.0, "nsga2_population_size": 10}
PRUNER_DEFAULTS = {"n_startup_trials": 5, "n_warmup_steps": 5}
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

    def budget_overrides(self) -> list[str]:
        sets = [f"train_{self.model}.epochs={int(self.budget['epochs'])}"]
        if self.budget.get("iterations_per_epoch"):
            sets.append(f"train_{self.model}.iterations_per_epoch={int(self.budget['iterations_per_epoch'])}")
        return sets

    def validate(self, cfg: GenerationConfig) -> None:
        """Every key must reach a config field, every value must be valid for it (typos named, with a suggestion)."""
        representative = {p.name: (p.choices[0] if p.type == "categorical" else p.low) for p in self.params}
        try:
            apply_overrides(cfg, self.overrides(cfg, representative) + self.budget_overrides())
        except MedimgenError as e:
            raise MedimgenError(f"{self.path} [{self.model}]: {e}") from None


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

    if model not in MODELS:
        raise MedimgenError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    path = Path(path) if path else default_space_path()
    data = load_yaml(path) or {}
    where = str(path)
    if not isinstance(data, dict):
        raise MedimgenError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, SECTIONS, n=1)
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
