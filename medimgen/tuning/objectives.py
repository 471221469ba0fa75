"""What trials are scored by: the objective metrics, their directions, and the default per model.

An autoencoder can be tuned without any downloaded weights: reconstruction 1 - MS-SSIM, L1 and PSNR of
the real images need no feature extractor; rFID (reconstructions vs originals) needs one (the dataset's
nnU-Net encoder, or pretrained networks in the torch hub cache). DDPM/LDM trials need FID features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from medimgen.config.kinds import kind
from medimgen.core.errors import MedimgenError


@dataclass(frozen=True)
class Metric:
    name: str
    score: str  # key of the evaluation scores; a trailing '.' is a prefix (fid.<extractor>)
    direction: str  # minimize | maximize
    kinds: tuple[str, ...]  # what it scores: the roles of `role` ("generates", "reconstructs")
    features: bool = False  # needs a feature extractor (weights)
    pairs: bool = False  # needs at least 2 real images
    ms_ssim: bool = False  # weighted by ms_ssim_gap_weight in the scalar objective
    doc: str = ""

    def value(self, scores: dict[str, float]) -> float:
        if self.score.endswith("."):
            return next((v for k, v in scores.items() if k.startswith(self.score)), math.nan)
        return scores.get(self.score, math.nan)


# what a metric scores: a generator's samples, or an encoder's reconstructions (ModelKind.encoder)
_GEN, _REC = ("generates",), ("reconstructs",)
METRICS = {m.name: m for m in (
    Metric("fid", "fid.", "minimize", _GEN, features=True, pairs=True, doc="FID of samples vs the real images"),
    Metric("ms_ssim_gap", "ms_ssim_gap", "minimize", _GEN, pairs=True, ms_ssim=True,
           doc="|MS-SSIM among samples - among real images| (diversity gap)"),
    Metric("rfid", "rfid.", "minimize", _REC, features=True, pairs=True,
           doc="FID of reconstructions vs originals"),
    Metric("ms_ssim_loss", "ms_ssim_loss", "minimize", _REC, ms_ssim=True,
           doc="1 - MS-SSIM of reconstructions"),
    Metric("l1", "l1", "minimize", _REC, doc="mean absolute reconstruction error, model range"),
    Metric("psnr", "psnr", "maximize", _REC, doc="PSNR of reconstructions"),
)}
FEATURE_DEFAULT = {"reconstructs": ("rfid", "ms_ssim_loss"), "generates": ("fid", "ms_ssim_gap")}
WEIGHT_FREE_DEFAULT = ("ms_ssim_loss", "l1")  # autoencoder: needs no downloaded weights, no trained nnU-Net


def role(model: str) -> str:
    """What a model of kind ``model`` is scored on: 'reconstructs' (an encoder) or 'generates'."""
    return _REC[0] if kind(model).encoder else _GEN[0]


def default_metrics(model: str) -> tuple[str, ...]:
    """The objectives a study of ``model`` is scored by when a feature extractor has weights."""
    return FEATURE_DEFAULT[role(model)]


def parse_metrics(text: str | Sequence[str], model: str, objective: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip())
    allowed = [m.name for m in METRICS.values() if role(model) in m.kinds]
    for n in names:
        if n not in allowed:
            raise MedimgenError(f"--metrics: {n!r} is not an objective of the {model} "
                                f"(choose from {', '.join(allowed)})")
    if len(set(names)) != len(names) or not names:
        raise MedimgenError(f"--metrics must name distinct objectives, got {text!r}")
    if objective == "pareto" and len(names) < 2:
        raise MedimgenError("--objective pareto needs at least 2 --metrics (or use --objective scalar)")
    return names


def choose_metrics(requested: str | Sequence[str] | None, model: str, objective: str, recorded: Sequence[str] | None,
                   has_features: Callable[[], bool]) -> tuple[tuple[str, ...], str | None]:
    """(objective names, a note or None). A study keeps the objectives it was made with; a new autoencoder
    study is scored by rFID and 1 - MS-SSIM when a feature extractor has weights, else by 1 - MS-SSIM and L1."""
    if requested:
        names = parse_metrics(requested, model, objective)
        if recorded is not None and tuple(recorded) != names:
            raise MedimgenError(f"this study scores trials by {', '.join(recorded)}; a study keeps its objectives: "
                                f"use a new --study-name for --metrics {','.join(names)}")
        return names, None
    if recorded is not None:
        return tuple(recorded), None
    if not kind(model).encoder or has_features():
        return default_metrics(model), None
    return WEIGHT_FREE_DEFAULT, ("no feature extractor has weights here, so the autoencoder trials are scored by "
                                 "reconstruction 1 - MS-SSIM and L1 of the real images (no weights needed); for rFID "
                                 "too, run `medimgen train-feature-nnunet` and start a study with "
                                 "--metrics rfid,ms_ssim_loss --study-name NAME")


def directions(names: Sequence[str]) -> list[str]:
    return [METRICS[n].direction for n in names]


def values(scores: dict[str, float], names: Sequence[str]) -> dict[str, float]:
    return {n: METRICS[n].value(scores) for n in names}


def scalar(obj: dict[str, float], ms_ssim_weight: float) -> float:
    """--objective scalar: the sum of the objectives (minimised), an MS-SSIM one times ``ms_ssim_weight``, a
    maximised one (psnr) negated. For the defaults: fid + w * ms_ssim_gap, rfid + w * ms_ssim_loss."""
    total = 0.0
    for n, v in obj.items():
        m = METRICS[n]
        total += (ms_ssim_weight if m.ms_ssim else 1.0) * (v if m.direction == "minimize" else -v)
    return total


def describe(names: Sequence[str], extractor: str | None) -> str:
    parts = []
    for n in names:
        m = METRICS[n]
        parts.append(f"{n} ({m.doc}{'; features ' + extractor if m.features and extractor else ''}; "
                     f"{'lower' if m.direction == 'minimize' else 'higher'} is better)")
    return ", ".join(parts)
