"""The one scorer of generated images: what `evaluate`, `tune` and a training run's own quality checks report.

Given generated images and the real ones (model range, (N, C, *spatial), the same centre crop), it returns named
scores:

- ``mmd_stats``: MMD of weight-free image statistics (evaluation.statistics), always;
- ``fid.<extractor>`` / ``mmd.<extractor>``: Fréchet distance and MMD on a named feature extractor, only when one with
  real weights is given (a random-weight network's distance is never called FID);
- ``ms_ssim_generated`` (diversity: mean MS-SSIM among samples), ``ms_ssim_real`` and their gap ``ms_ssim_gap``;
- memorisation, when training and held-out cases are given: each sample's nearest training case by normalised
  cross-correlation over the whole image (``nearest_train_ncc`` mean), against the same nearest-training similarity
  of held-out real cases: ``memorised_fraction`` is the share of samples closer to a training case than the 95th
  percentile of the held-out cases (about 0.05 or less for a generator that does not copy; near 1 for one that
  returns training cases). The closest pairs, with case ids, are in :attr:`Memorisation.pairs`.
- the follow-the-mask Dice of a ControlNet (the check MAISI reports), when its conditioning maps and a segmenter (a
  trained nnU-Net, config ``controlnet.segmenter``) are given: the segmenter labels each generated image, and
  ``follow_mask_dice.<label>`` is the mean Dice between those segmentations and the maps the images were made for
  (``follow_mask_dice``: the mean over labels). An image that ignores its map scores what the segmenter finds by
  chance; the ceiling is the segmenter's own Dice on real images.

:func:`quality_metrics` names the scores as a training run, `evaluate` and trials log them in MLflow:
``quality/mmd_stats``, ``quality/fid_<extractor>``, ``quality/ms_ssim`` (diversity), ``quality/memorised_fraction``,
``quality/follow_mask_dice`` (and ``quality/follow_mask_dice_<label>``) of a ControlNet;
autoencoders ``quality/psnr``, ``quality/ssim`` (and ``quality/label_dice`` where joint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from medimgen.core.errors import MedimgenError
from medimgen.evaluation.metrics import frechet_distance, mean_pairwise_ms_ssim, mmd
from medimgen.evaluation.statistics import statistics_mmd

HELDOUT_PERCENTILE = 95.0
TOP_PAIRS = 5
QUALITY = "quality/"
LABEL_DETAILS = "labels/"  # per-label volume fractions of joint models: details, kept out of the quality/* columns
_RENAMED = {"ms_ssim_generated": "ms_ssim"}  # quality/ms_ssim of a generator is its samples' diversity


@dataclass
class Reference:
    """The real images a generator is scored against: ``real`` (the chosen subset), and for the memorisation score
    the training cases and held-out real cases with their ids (one id per image: 2D slices carry their slice)."""

    real: torch.Tensor
    train: torch.Tensor | None = None
    train_ids: Sequence[str] = ()
    heldout: torch.Tensor | None = None
    heldout_ids: Sequence[str] = ()
    value_range: tuple[float, float] = (-1.0, 1.0)


@dataclass
class Memorisation:
    fraction: float  # share of samples nearer a training case than the held-out percentile
    threshold: float  # the HELDOUT_PERCENTILE-th percentile of the held-out cases' nearest-training NCC
    nearest: list[float]  # per sample: NCC with its nearest training case
    heldout_nearest: list[float]
    pairs: list[dict] = field(default_factory=list)  # the closest samples: {sample, train_id, ncc, memorised}

    def scores(self) -> dict[str, float]:
        return {"memorised_fraction": self.fraction, "memorised_threshold": self.threshold,
                "nearest_train_ncc": sum(self.nearest) / len(self.nearest)}


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) normalised cross-correlation of every pair of images (N, C, *spatial), over all voxels and
    channels: 1 for an image and a brighter/contrast-changed copy of it, about 0 for unrelated images."""
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise MedimgenError(f"images of shape {tuple(a.shape[1:])} and {tuple(b.shape[1:])} cannot be compared: "
                            f"they need the same crop")

    def unit(x):
        x = x.detach().reshape(len(x), -1).double().cpu()
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return unit(a) @ unit(b).T


def memorisation(generated: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, train_ids: Sequence[str],
                 generated_ids: Sequence[str] | None = None, percentile: float = HELDOUT_PERCENTILE,
                 top: int = TOP_PAIRS) -> Memorisation:
    """How many ``generated`` images are nearer a training case than held-out real cases are (see the module)."""
    if len(train) < 1 or len(heldout) < 1:
        raise MedimgenError("the memorisation score needs at least one training and one held-out real case")
    if len(train_ids) != len(train):
        raise MedimgenError(f"{len(train_ids)} training ids for {len(train)} training images")
    gen_sim = ncc(generated, train)
    nearest, which = gen_sim.max(1)
    held = ncc(heldout, train).max(1).values
    threshold = float(torch.quantile(held, percentile / 100, interpolation="higher"))  # few cases: the max
    memorised = nearest > threshold
    ids = list(generated_ids) if generated_ids is not None else [f"sample_{i}" for i in range(len(generated))]
    order = nearest.argsort(descending=True)[:top].tolist()
    pairs = [{"sample": ids[i], "train_id": train_ids[int(which[i])], "ncc": float(nearest[i]),
              "memorised": bool(memorised[i])} for i in order]
    return Memorisation(float(memorised.double().mean()), threshold, nearest.tolist(), held.tolist(), pairs)


@dataclass
class MaskFollowing:
    """What the follow-the-mask Dice needs: ``segmenter`` (``.segment(images) -> (N, 1, *spatial)`` label values,
    evaluation.features.NnUNetSegmenter), the conditioning ``maps`` (N, 1, *spatial) of the N generated images, and
    the dataset's label values and names."""

    segmenter: object
    maps: torch.Tensor
    values: Sequence[int]
    names: Sequence[str]


def follow_mask(generated: torch.Tensor, masks: MaskFollowing, batch_size: int = 8) -> dict[str, float]:
    """``follow_mask_dice.<label>``: mean Dice (over the images showing the label in the map or the segmentation)
    between the segmenter's labels of each generated image and its conditioning map; ``follow_mask_dice``: their
    mean over labels."""
    from medimgen.models.labels import dice_per_label

    if len(generated) != len(masks.maps):
        raise MedimgenError(f"{len(generated)} generated images for {len(masks.maps)} conditioning maps")
    predicted = masks.segmenter.segment(generated, batch_size)
    per_image = [dice_per_label(p, m, masks.values) for p, m in zip(predicted, masks.maps.long())]
    out = {}
    for name, v in zip(masks.names, masks.values):
        found = [d[int(v)] for d in per_image if not np.isnan(d[int(v)])]
        out[f"follow_mask_dice.{name}"] = float(np.mean(found)) if found else float("nan")
    finite = [x for x in out.values() if not np.isnan(x)]
    out["follow_mask_dice"] = float(np.mean(finite)) if finite else float("nan")
    return out


UNIT_RANGE = (-1.0, 1.0)


def to_unit_range(images: torch.Tensor, value_range: Sequence[float]) -> torch.Tensor:
    """``images`` of the model range ``value_range`` mapped linearly onto [-1, 1] (the range the statistics, MS-SSIM
    and feature extractors are calibrated for)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if (lo, hi) == UNIT_RANGE:
        return images
    return (images - lo) * (2.0 / (hi - lo)) - 1.0


def score(generated: torch.Tensor, reference: Reference, extractor=None, device: torch.device | str = "cpu",
          batch_size: int = 8, masks: MaskFollowing | None = None) -> tuple[dict[str, float], Memorisation | None]:
    """(named scores, the memorisation details or None) of ``generated`` against ``reference`` (see the module);
    ``masks``: a ControlNet's maps and a segmenter, for the follow-the-mask Dice."""
    real = reference.real
    if tuple(generated.shape[1:]) != tuple(real.shape[1:]):
        raise MedimgenError(f"generated images {tuple(generated.shape[1:])} and real images {tuple(real.shape[1:])} "
                            f"differ in shape")
    # image scores on [-1, 1], whatever range the model works in (a foundation autoencoder's is [0, 1]), so they
    # compare across configs; memorisation (NCC) and the segmenter take the images as they are
    gen_unit, real_unit = to_unit_range(generated, reference.value_range), to_unit_range(real, reference.value_range)
    g, r = mean_pairwise_ms_ssim(gen_unit), mean_pairwise_ms_ssim(real_unit)
    scores = {"ms_ssim_generated": g, "ms_ssim_real": r, "ms_ssim_gap": abs(g - r)}
    if len(generated) >= 2 and len(real) >= 2:
        scores["mmd_stats"] = statistics_mmd(gen_unit, real_unit, UNIT_RANGE)
    if extractor is not None:
        scores.update(feature_scores("", gen_unit, real_unit, extractor, device, batch_size))
    if masks is not None:
        scores.update(follow_mask(generated, masks, batch_size))
    mem = None
    if reference.train is not None and reference.heldout is not None and len(reference.heldout):
        mem = memorisation(generated, reference.train, reference.heldout, reference.train_ids)
        scores.update(mem.scores())
    return scores, mem


def feature_scores(prefix: str, generated: torch.Tensor, real: torch.Tensor, extractor, device,
                   batch_size: int = 8) -> dict[str, float]:
    """``<prefix>fid.<extractor>`` and ``<prefix>mmd.<extractor>`` of two image sets on a named extractor."""
    if len(generated) < 2 or len(real) < 2:
        raise MedimgenError(f"a Fréchet distance needs at least 2 generated and 2 real images "
                            f"(have {len(generated)} and {len(real)}): sample more, or choose --real train/all")
    fr = extractor.extract(real, batch_size, torch.device(device))
    fg = extractor.extract(generated, batch_size, torch.device(device))
    return {f"{prefix}fid.{extractor.key}": frechet_distance(fg, fr), f"{prefix}mmd.{extractor.key}": mmd(fg, fr)}


def quality_metrics(scores: dict[str, float]) -> dict[str, float]:
    """Scores under the MLflow names every run uses (``quality/<name>``, '.' as '_'; a joint model's per-label
    fractions as ``labels/<name>``); non-finite ones dropped."""
    import math

    out = {}
    for k, v in scores.items():
        if v is None or not math.isfinite(float(v)):
            continue
        prefix = LABEL_DETAILS if k.startswith(("label_fraction.", "label_inside_foreground.")) else QUALITY
        out[prefix + _RENAMED.get(k, k).replace(".", "_")] = float(v)
    return out
