"""Intensity constants that map nnU-Net-normalised values into the model's range.

CT (nnU-Net's CTNormalization clips to the foreground 0.5/99.5 percentiles, then
z-scores with the foreground mean/std): the clip bounds, normalised, are exact, so the
mapping is exactly reversible to Hounsfield units. Other schemes (per-image z-score)
have no dataset-wide bounds in the fingerprint: the 0.5/99.5 percentiles of the
preprocessed voxels of (up to) 16 cases are used.

And the statistics that map samples back into the dataset's units (``intensity_statistics``):
per-case normalisation (z-score, rescale) is undone with a representative case's statistics,
collected from the raw images as nnU-Net computes them; see the comment block below.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medimgen.data.cases import load_case, open_cases
from medimgen.core.errors import MedimgenError
from medimgen.core.paths import nnunet_raw
from medimgen.nnunet.plans import DatasetPlans

SAMPLE_CASES = 16
SAMPLE_VOXELS = 200_000


def hu_normalized(fg: dict, hu: float) -> float:
    """A HU value in nnU-Net's CTNormalization units (z-scored with one channel's fingerprint mean/std)."""
    return (hu - fg["mean"]) / max(fg["std"], 1e-8)


def ct_clip(fg: dict) -> tuple[float, float]:
    """nnU-Net's CTNormalization clip (the foreground's 0.5th/99.5th HU percentiles) in its normalised units, from
    one channel's fingerprint properties (mean, std, percentile_00_5, percentile_99_5)."""
    return hu_normalized(fg, fg["percentile_00_5"]), hu_normalized(fg, fg["percentile_99_5"])


def intensity_bounds(plans: DatasetPlans, dim: str, seed: int = 0,
                     percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[list[float], list[float]]:
    """Per channel (low, high) in nnU-Net-normalised units: CT's clip bounds, else ``percentiles`` of the
    preprocessed voxels (a foundation autoencoder's own mapping asks for others: medimgen.planning.foundation)."""
    cm = plans.configuration(dim)
    fg = plans.foreground_intensity_properties
    low: list[float | None] = [None] * plans.num_channels
    high: list[float | None] = [None] * plans.num_channels
    for c, scheme in enumerate(cm.normalization_schemes):
        if scheme == "CTNormalization":
            low[c], high[c] = ct_clip(fg[c])
    missing = [c for c in range(plans.num_channels) if low[c] is None]
    if missing:
        rng = np.random.default_rng(seed)
        ds = open_cases(plans.preprocessed_folder(dim))
        ids = sorted(ds.identifiers)
        ids = [ids[i] for i in sorted(rng.choice(len(ids), min(SAMPLE_CASES, len(ids)), replace=False))]
        samples: list[list[np.ndarray]] = [[] for _ in range(plans.num_channels)]
        for identifier in ids:
            data, _, _ = load_case(ds, identifier)
            flat = data.reshape(data.shape[0], -1)
            pick = rng.choice(flat.shape[1], min(SAMPLE_VOXELS, flat.shape[1]), replace=False)
            for c in missing:
                samples[c].append(flat[c, pick])
        for c in missing:
            values = np.concatenate(samples[c])
            low[c], high[c] = (float(v) for v in np.percentile(values, list(percentiles)))
    return [float(v) for v in low], [float(v) for v in high]


# ---------------------------------------------------------------------------------------------
# Statistics to map samples back into the dataset's units
#
# nnU-Net normalises each case before resampling, on the case cropped to its nonzero region:
#   ZScoreNormalization        (x - mean_case) / std_case, over all cropped voxels, or (use_mask_for_norm)
#                              only over the nonzero mask; voxels outside the mask stay at their raw 0
#   CTNormalization            (clip(x, p0.5, p99.5) - mean_fg) / std_fg   (fingerprint; the same for every case)
#   RescaleTo01Normalization   (x - min_case) / (max_case - min_case)
#   NoNormalization / RGBTo01  x / 1, x / 255
# so raw = normalised * scale + offset, with a per-case (offset, scale) for the per-case schemes. A
# generated image has no case of its own: it is mapped back with a representative case's (offset,
# scale), the median over the cases of each, collected here from the raw images exactly the way
# nnU-Net computes them (nnU-Net's own reader and crop_to_nonzero).

RAW_SAMPLE_CASES = 32  # raw cases read for the per-case statistics (evenly spread over the sorted identifiers)
PER_CASE_SCHEMES = ("ZScoreNormalization", "RescaleTo01Normalization")
FIXED_SCALE = {"NoNormalization": (0.0, 1.0), "RGBTo01Normalization": (0.0, 255.0)}


@dataclass(frozen=True)
class CaseStatistics:
    """One raw case: per channel, the (offset, scale) nnU-Net's normalisation removed, in raw units."""

    identifier: str
    offset: tuple[float, ...]  # z-score: the mean; rescale: the minimum
    scale: tuple[float, ...]  # z-score: the std; rescale: max - min (both at least nnU-Net's eps)
    outside_mask: int  # voxels of the cropped case outside nnU-Net's nonzero mask (raw 0 in every channel)


@dataclass(frozen=True)
class IntensityStatistics:
    """What the planner stores so that samples come back in the dataset's units (see DataConfig)."""

    case_mean: tuple[float, ...]
    case_std: tuple[float, ...]
    background: tuple[float, ...]
    cases: tuple[CaseStatistics, ...] = ()


def _offset_scale(image: np.ndarray, scheme: str, mask: np.ndarray | None) -> tuple[float, float]:
    eps = 1e-8
    if scheme == "ZScoreNormalization":
        values = image[mask] if mask is not None else image
        return float(values.mean(dtype=np.float64)), max(float(values.std(dtype=np.float64)), eps)
    lo = float(image.min())
    return lo, max(float(image.max()) - lo, eps)


def raw_case_files(plans: DatasetPlans) -> dict[str, dict] | None:
    """nnU-Net's {identifier: {'images': [...], 'label': ...}} of the raw training cases, or None without them."""
    try:
        folder = nnunet_raw() / plans.name
    except MedimgenError:
        return None
    if not (folder / "dataset.json").is_file():
        return None
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
        files = _train_files(folder, dataset_json)
    except Exception:  # an unreadable raw folder: plan without it (fall back to the fingerprint)
        return None
    files = {k: v for k, v in files.items() if all(Path(p).is_file() for p in v["images"])}
    return files or None


def _train_files(folder: Path, dataset_json: dict) -> dict[str, dict]:
    """nnU-Net's get_filenames_of_train_images_and_targets, without the pool of 12 processes it starts to match
    file names (forking a process that holds torch costs seconds; the matching itself microseconds)."""
    from batchgenerators.utilities.file_and_folder_operations import subfiles
    from nnunetv2.utilities.utils import (create_paths_fn, get_filenames_of_train_images_and_targets,
                                          get_identifiers_from_splitted_dataset_folder)

    if "dataset" in dataset_json:  # explicit file lists: no pool there
        return get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    images, ending = str(folder / "imagesTr"), dataset_json["file_ending"]
    identifiers = get_identifiers_from_splitted_dataset_folder(images, ending)
    names = subfiles(images, suffix=ending, join=False, sort=True)
    return {i: {"images": create_paths_fn(images, names, ending, i), "label": str(folder / "labelsTr" / f"{i}{ending}")}
            for i in identifiers}


def case_statistics(plans: DatasetPlans, dim: str, identifiers: Sequence[str] | None = None,
                    max_cases: int = RAW_SAMPLE_CASES) -> list[CaseStatistics] | None:
    """Per-case (offset, scale) of every channel over the voxels nnU-Net normalised with, from the raw images.

    Follows nnU-Net's DefaultPreprocessor: read with the plans' reader, crop to the nonzero region
    (``crop_to_nonzero``, with the case's label so the mask is nnU-Net's ``seg >= 0``), then the statistics of
    each channel's scheme. CT, NoNormalization and RGB channels use fixed constants (reported as such).
    ``None`` when the raw images are not there."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    files = raw_case_files(plans)
    if files is None:
        return None
    cm = plans.configuration(dim)
    schemes = list(cm.normalization_schemes)
    use_mask = list(cm.use_mask_for_norm)
    ids = sorted(files) if identifiers is None else [i for i in identifiers if i in files]
    if not ids:
        return None
    if len(ids) > max_cases:
        ids = [ids[int(round(i))] for i in np.linspace(0, len(ids) - 1, max_cases)]
    rw = plans.manager.image_reader_writer_class()
    out = []
    for identifier in ids:
        try:
            data, _ = rw.read_images(files[identifier]["images"])
            label = files[identifier].get("label")
            seg = rw.read_seg(label)[0] if label and Path(label).is_file() else None
        except Exception as e:  # a truncated or corrupt raw file: named, not silently left out
            raise MedimgenError(f"raw case {identifier} of {plans.name} cannot be read ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:160]}): fix or remove it, then plan again") from None
        data = data.astype(np.float32)
        if not np.isfinite(data).all():
            raise MedimgenError(f"raw case {identifier} of {plans.name} has NaN or infinite voxels: its intensity "
                                f"statistics would be wrong; fix or remove it, then plan again")
        data, seg, _ = crop_to_nonzero(data, seg)  # transpose_forward does not change the statistics
        inside = seg[0] >= 0
        offset, scale = [], []
        for c, scheme in enumerate(schemes):
            if scheme in PER_CASE_SCHEMES:
                o, s = _offset_scale(data[c], scheme, inside if use_mask[c] else None)
            else:
                o, s = _fixed_offset_scale(plans, c, scheme)
            offset.append(o)
            scale.append(s)
        out.append(CaseStatistics(identifier, tuple(offset), tuple(scale), int((~inside).sum())))
    return out


def _fixed_offset_scale(plans: DatasetPlans, c: int, scheme: str) -> tuple[float, float]:
    if scheme in FIXED_SCALE:
        return FIXED_SCALE[scheme]
    # CTNormalization (exact), and schemes medimgen does not know: the fingerprint's foreground mean/std
    fg = plans.foreground_intensity_properties[c]
    return float(fg["mean"]), max(float(fg["std"]), 1e-8)


def intensity_statistics(plans: DatasetPlans, dim: str, low: Sequence[float],
                         cases: list[CaseStatistics] | None = None) -> IntensityStatistics | None:
    """Representative (median) per-case statistics and the raw background value of every channel.

    ``background[c]``: the raw value a sample at the model range's lower bound gets back. medimgen's loader
    gives voxels outside nnU-Net's nonzero mask (raw 0 in every channel) the lower bound, so when the cases
    have such voxels it is 0 (for a CT channel, to stay exact, the lower bound mapped back, i.e. the clip
    value p0.5); when they have none, ``background`` is empty (the lower bound maps back like any value).
    ``None`` (the config keeps the fingerprint's values) when the raw images are not available."""
    cm = plans.configuration(dim)
    if cases is None:
        if all(s == "CTNormalization" for s in cm.normalization_schemes):
            cases = []  # nothing per case: no raw images needed
        else:
            cases = case_statistics(plans, dim)
    if cases is None:
        warnings.warn(f"{plans.name}: raw images not found under nnUNet_raw; samples of per-image normalised "
                      f"channels are mapped back with the fingerprint's foreground mean/std (approximate units)")
        return None
    mean, std, background = [], [], []
    has_outside = any(case.outside_mask > 0 for case in cases)
    for c, scheme in enumerate(cm.normalization_schemes):
        if scheme in PER_CASE_SCHEMES and cases:
            m = float(np.median([case.offset[c] for case in cases]))
            s = float(np.median([case.scale[c] for case in cases]))
        else:
            m, s = _fixed_offset_scale(plans, c, scheme)
        mean.append(m)
        std.append(s)
        background.append(float(low[c]) * s + m if scheme == "CTNormalization" else 0.0)
    return IntensityStatistics(tuple(mean), tuple(std), tuple(background) if has_outside else (), tuple(cases))
