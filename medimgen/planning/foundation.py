"""Whether the LDM starts from a foundation autoencoder (``autoencoder.source``), and the intensity map it needs.

The rule (one line of reason each, recorded in ``derived.autoencoder_choice`` and printed by ``plan --explain``):
the foundation autoencoder (MAISI's VAE, medimgen.models.foundation) when it applies, i.e. a 3D config, one image
channel whose modality (nnU-Net channel name; CTNormalization is CT) is one its published weights were trained on
(CT, MR), an image-only model (``data.generate_labels`` false: the published VAE encodes images, not label maps), and
its weights file is present in the torch hub cache; else a trained one. ``--set autoencoder.source=...`` forces either
(``3d.autoencoder.source=...`` one dimensionality); a forced foundation source that cannot apply is one line.
Whether it suits the data is decided once more on the data itself: `medimgen train autoencoder` adopts it only after a
reconstruction check and otherwise trains the planned fallback (training.foundation).

Intensities as the published weights saw them, into ``data.intensity_range`` [0, 1]: CT, the HU window [-1000, 1000]
applied to HU = normalised * std + mean (nnU-Net's CTNormalization z-scored with the fingerprint's foreground mean/std,
exact); nnU-Net clipped the HU to the foreground's 0.5/99.5th percentiles before, a loss no mapping of its
preprocessed data undoes: the VAE sees the window of the clipped HU (``plan --explain`` prints the sub-range), and
samples mapped back to nnU-Net's space are clamped to that clip (``data.intensity_clip_low/high``); MR (any per-image normalisation), the
0th-99.5th percentiles (MAISI scales each image by its own; medimgen's bounds are dataset-wide, from the same
sample of preprocessed voxels as the usual 0.5/99.5 bounds, so one mapping holds for every image and for samples).
"""

from __future__ import annotations

from typing import Sequence

from medimgen.config.io import parse_override
from medimgen.config.schema import AUTOENCODER_SOURCES, TRAINED, is_foundation
from medimgen.core.errors import MedimgenError
from medimgen.models.foundation import FOUNDATIONS, foundation, modality, weights_path, weights_present
from medimgen.nnunet.plans import DatasetPlans

CT_WINDOW_HU = (-1000.0, 1000.0)  # MAISI's CT window (ScaleIntensityRange a_min/a_max), to [0, 1]
MR_PERCENTILES = (0.0, 99.5)  # MAISI's MR scaling (ScaleIntensityRangePercentiles lower/upper), to [0, 1]
FOUNDATION_RANGE = (0.0, 1.0)
DEFAULT_FOUNDATION = "maisi"


SOURCE_KEY = "autoencoder.source"


def is_source_override(text: str) -> bool:
    """Whether an override sets ``autoencoder.source`` (of every dimensionality or of one)."""
    parts, _ = parse_override(text)
    key = ".".join(parts[1:] if parts[0] in ("2d", "3d") else parts)
    return key == SOURCE_KEY


def forced_sources(overrides: Sequence[str]) -> dict[str, str]:
    """{dim or '*': source} from ``autoencoder.source`` overrides (the last one wins)."""
    out: dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        dim = parts[0] if parts[0] in ("2d", "3d") else "*"
        if is_source_override(text):
            if value not in AUTOENCODER_SOURCES:
                raise MedimgenError(f"override {text!r}: autoencoder.source must be one of "
                                    f"{', '.join(AUTOENCODER_SOURCES)}")
            out[dim] = value
    return out


def overridden(overrides: Sequence[str], key: str, dim: str):
    """The value an override gives ``key`` (section.key) in ``dim``, None when none does."""
    found = None
    for text in overrides:
        parts, value = parse_override(text)
        if parts in (key.split("."), [dim, *key.split(".")]):
            found = value
    return found


def _why_not(plans: DatasetPlans, dim: str, generate_labels: bool, source: str) -> str | None:
    """Why ``source`` cannot serve this dimensionality (None: it can)."""
    f = foundation(source)
    if dim != "3d":
        return f"{dim}: the published {f.title} is a 3D network"
    if plans.num_channels != 1:
        return f"{plans.num_channels} image channels: the published {f.title} encodes one"
    if generate_labels:
        return (f"a joint image+label model (data.generate_labels): the published {f.title} encodes images only "
                f"(--set data.generate_labels=false autoencoder.source={source} plans the LDM image-only, labels "
                f"then come from a ControlNet, as MAISI does)")
    return None


def choose(plans: DatasetPlans, dim: str, generate_labels: bool, forced: str | None = None) -> tuple[str, str]:
    """(autoencoder.source, one line saying why) for ``dim`` of ``plans``."""
    source = forced if forced in FOUNDATIONS else DEFAULT_FOUNDATION
    f = foundation(source)
    name = plans.channel_names[0] if plans.channel_names else "?"
    schemes = plans.configuration(dim).normalization_schemes
    mod = modality(name, schemes[0] if schemes else "")
    if forced is not None and not is_foundation(forced):
        return TRAINED, "trained (forced by autoencoder.source=trained)"
    blocked = _why_not(plans, dim, generate_labels, source)
    if forced:
        if blocked:
            raise MedimgenError(f"autoencoder.source={forced} cannot be used for {dim}: {blocked}")
        notes = [] if mod in f.modalities else [f"channel {name!r} is no modality its weights were trained on "
                                                 f"({', '.join(m.upper() for m in f.modalities)})"]
        if not weights_present(source):
            notes.append(f"its weights are not in {weights_path(source)} yet: `medimgen weights download "
                         f"{f.weights}` before `medimgen train autoencoder`")
        return source, f"{source} (forced by autoencoder.source={source}" + "".join(f"; {n}" for n in notes) + \
            "); adopted after a reconstruction check, else trained"
    if blocked:
        return TRAINED, f"trained ({blocked})"
    if mod not in f.modalities:
        return TRAINED, (f"trained (channel {name!r} is not a modality the {f.title} weights were trained on: "
                           f"{', '.join(m.upper() for m in f.modalities)})")
    if not weights_present(source):
        return TRAINED, (f"trained (the {f.title} would suit this {mod.upper()} data, but its weights are not in "
                           f"{weights_path(source)}: `medimgen weights download {f.weights}`, then re-plan)")
    return source, (f"{source} ({f.title}: 3D {mod.upper()} images, one channel, weights present; `train autoencoder` "
                    f"adopts it after a reconstruction check on the validation cases, else trains one"
                    f"{ct_clip_note(plans, dim)})")


def foundation_bounds(plans: DatasetPlans, dim: str) -> tuple[list[float], list[float]]:
    """The nnU-Net-normalised (low, high) per channel that the model range [0, 1] maps to, as the foundation
    weights were trained: CT channels (CTNormalization) the HU window, others the MR percentiles."""
    from medimgen.planning.intensity_stats import hu_normalized, intensity_bounds

    low, high = intensity_bounds(plans, dim, percentiles=MR_PERCENTILES)
    fg = plans.foreground_intensity_properties
    for c, scheme in enumerate(plans.configuration(dim).normalization_schemes):
        if scheme == "CTNormalization":  # HU = norm * std + mean (nnU-Net z-scored clipped HU with these)
            low[c], high[c] = (hu_normalized(fg[c], v) for v in CT_WINDOW_HU)
    return low, high


def nnunet_clip(plans: DatasetPlans, dim: str, low, high) -> tuple[list[float], list[float]]:
    """Per channel, the normalised range nnU-Net's preprocessing gives (``data.intensity_clip_low/high``): CT its
    percentile clip; other channels the planned bounds (the model's range never maps beyond them)."""
    from medimgen.planning.intensity_stats import ct_clip

    lo, hi = [float(v) for v in low], [float(v) for v in high]
    fg = plans.foreground_intensity_properties
    for c, scheme in enumerate(plans.configuration(dim).normalization_schemes):
        if scheme == "CTNormalization":
            lo[c], hi[c] = ct_clip(fg[c])
    return lo, hi


def ct_clip_note(plans: DatasetPlans, dim: str) -> str:
    """One clause on what nnU-Net's CT clip leaves of MAISI's HU window (empty: no CT channel)."""
    fg = plans.foreground_intensity_properties
    w0, w1 = CT_WINDOW_HU
    for c, scheme in enumerate(plans.configuration(dim).normalization_schemes):
        if scheme == "CTNormalization":
            a, b = fg[c]["percentile_00_5"], fg[c]["percentile_99_5"]
            m0, m1 = ((min(max(v, w0), w1) - w0) / (w1 - w0) for v in (a, b))
            return (f"; nnU-Net clipped this CT to its foreground's 0.5-99.5th percentiles [{a:.0f}, {b:.0f}] HU, "
                    f"so the VAE sees MAISI's window of those HU: [{m0:.3f}, {m1:.3f}] of [0, 1]")
    return ""
