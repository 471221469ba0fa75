"""Label maps next to images: what the networks see and give back when a model generates labels.

A joint model (``data.generate_labels``) generates a segmentation with every image. nnU-Net's label map
(values ``data.label_values``, background 0, -1 where the loader padded) enters the networks as one channel
per foreground label, one-hot in the model's intensity range (absent: ``intensity_range[0]``, present:
``intensity_range[1]``), after the image channels:

- DDPM: the UNet denoises image + one-hot channels; a sample's label channels become a label map by argmax
  with background (a voxel is background unless some label channel is above the middle of the range).
- Autoencoder: encodes image + one-hot channels, decodes image channels + one logit per class (background
  first), trained with cross-entropy + Dice on the logits; the LDM learns that joint latent unchanged.

Nothing here knows about training or files.
"""

from __future__ import annotations

import numpy as np
import torch

from medimgen.config.schema import GenerationConfig

# dataset.json key `medimgen import` writes when the labels are body masks it generated (not real labels)
GENERATED_MASK_KEY = "medimgen_generated_foreground_masks"


def label_channels(cfg: GenerationConfig) -> int:
    """One-hot label channels the networks see (0 for image-only models)."""
    return len(cfg.data.label_values) if cfg.data.generate_labels else 0


def network_channels(cfg: GenerationConfig) -> int:
    """Channels of what the DDPM generates and the autoencoder encodes: image channels + one-hot labels."""
    return cfg.data.in_channels + label_channels(cfg)


def autoencoder_out_channels(cfg: GenerationConfig) -> int:
    """Channels the autoencoder decodes: image channels, then one logit per class (background first)."""
    k = label_channels(cfg)
    return cfg.data.in_channels + (k + 1 if k else 0)


def real_labels(dataset_json: dict) -> dict[str, int]:
    """Foreground labels name -> value of a dataset.json whose labels are real (empty: none, only the body masks
    `medimgen import` made, or nnU-Net region labels, which medimgen does not generate)."""
    if dataset_json.get(GENERATED_MASK_KEY):
        return {}
    labels = dataset_json.get("labels", {})
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        return {}
    return {name: int(v) for name, v in sorted(labels.items(), key=lambda kv: kv[1]) if int(v) > 0}


def class_index(label: torch.Tensor, values) -> torch.Tensor:
    """(B, 1, *S) nnU-Net label values -> (B, *S) long class indices (0 background, i for values[i-1]); padding
    (-1) and values not generated become background."""
    out = torch.zeros(label.shape[:1] + label.shape[2:], dtype=torch.long, device=label.device)
    lab = label[:, 0]
    for i, v in enumerate(values, start=1):
        out[lab == int(v)] = i
    return out


def to_onehot(label: torch.Tensor, values, intensity_range) -> torch.Tensor:
    """(B, 1, *S) label map -> (B, K, *S) float one-hot channels in the model range (K foreground labels)."""
    lo, hi = float(intensity_range[0]), float(intensity_range[1])
    idx = class_index(label, values)
    onehot = torch.stack([idx == i for i in range(1, len(values) + 1)], dim=1).float()
    return lo + (hi - lo) * onehot


def join(images: torch.Tensor, label: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Image channels followed by the one-hot label channels (the images alone for an image-only model)."""
    if not label_channels(cfg):
        return images
    onehot = to_onehot(label.to(images.device), cfg.data.label_values, cfg.data.intensity_range)
    return torch.cat([images, onehot.to(images.dtype)], dim=1)


def condition_channels(label: torch.Tensor, values) -> torch.Tensor:
    """(B, 1, *S) label map -> (B, K+1, *S) float one-hot, background first, 0/1: what a ControlNet is conditioned
    on (padding -1 and values not in ``values`` count as background)."""
    lab = label[:, 0]
    idx = torch.zeros_like(lab, dtype=torch.long)
    for i, v in enumerate(values, start=1):
        idx = torch.where(lab == int(v), i, idx)  # no boolean indexing: the memory simulation runs this on meta tensors
    return torch.stack([idx == i for i in range(len(values) + 1)], dim=1).float()


def _to_values(idx: torch.Tensor, values) -> torch.Tensor:
    lut = torch.tensor([0, *[int(v) for v in values]], dtype=torch.long, device=idx.device)
    return lut[idx][:, None]


def onehot_to_labels(channels: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """(B, K, *S) generated one-hot channels (model range) -> (B, 1, *S) label values (long): argmax with a
    background score at the middle of the range."""
    lo, hi = cfg.data.intensity_range
    background = torch.full_like(channels[:, :1], (lo + hi) / 2)
    return _to_values(torch.cat([background, channels], dim=1).argmax(dim=1), cfg.data.label_values)


def logits_to_labels(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """(B, K+1, *S) class logits (background first) -> (B, 1, *S) label values (long)."""
    return _to_values(logits.argmax(dim=1), cfg.data.label_values)


def split(x: torch.Tensor, cfg: GenerationConfig, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image channels, label values (B, 1, *S) or None) of a generated/decoded tensor: ``logits`` for the
    autoencoder's decoder output, else one-hot channels (DDPM samples)."""
    c = cfg.data.in_channels
    if not label_channels(cfg):
        return x, None
    rest = x[:, c:].float()
    return x[:, :c], logits_to_labels(rest, cfg) if logits else onehot_to_labels(rest, cfg)


def dice_per_label(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, values) -> dict[int, float]:
    """Dice of each foreground label value between two label maps (NaN where both lack it)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    out = {}
    for v in values:
        a, b = pred == int(v), ref == int(v)
        denom = a.sum() + b.sum()
        out[int(v)] = float(2 * np.logical_and(a, b).sum() / denom) if denom else float("nan")
    return out
