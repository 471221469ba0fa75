"""Intensity constants that map nnU-Net-normalised values into the model's range.

CT (nnU-Net's CTNormalization clips to the foreground 0.5/99.5 percentiles, then
z-scores with the foreground mean/std): the clip bounds, normalised, are exact, so the
mapping is exactly reversible to Hounsfield units. Other schemes (per-image z-score)
have no dataset-wide bounds in the fingerprint: the 0.5/99.5 percentiles of the
preprocessed voxels of (up to) 16 cases are used.
"""

from __future__ import annotations

import numpy as np

from medimgen.data.cases import load_case, open_cases
from medimgen.plans import DatasetPlans

SAMPLE_CASES = 16
SAMPLE_VOXELS = 200_000


def intensity_bounds(plans: DatasetPlans, dim: str, seed: int = 0) -> tuple[list[float], list[float]]:
    cm = plans.configuration(dim)
    fg = plans.foreground_intensity_properties
    low: list[float | None] = [None] * plans.num_channels
    high: list[float | None] = [None] * plans.num_channels
    for c, scheme in enumerate(cm.normalization_schemes):
        if scheme == "CTNormalization":
            mean, std = fg[c]["mean"], max(fg[c]["std"], 1e-8)
            low[c] = (fg[c]["percentile_00_5"] - mean) / std
            high[c] = (fg[c]["percentile_99_5"] - mean) / std
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
            low[c], high[c] = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return [float(v) for v in low], [float(v) for v in high]
