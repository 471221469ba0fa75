"""Perceptual loss (MONAI PerceptualLoss) with pretrained weights that are never downloaded silently.

Pretrained backbones are looked up where torch/torchvision/MONAI cache them
(``$TORCH_HOME/hub`` = ``torch.hub.get_dir()``; medimgen.models.weights knows the paths). When a file is
missing, training stops at start-up with one message naming the file, the download command
(``medimgen weights download NAME``) and how to switch the perceptual loss off
(``losses.perceptual_network=none``).
"""

from __future__ import annotations

import torch

from medimgen.core.errors import MedimgenError
from medimgen.models.losses import PerChannel
from medimgen.models.weights import (  # noqa: F401 (torchvision_weights_file: where tests and users look)
    HUB_REPO,
    HUB_WEIGHTS,
    TORCHVISION,
    download_command,
    hub_repo_dir,
    missing_weights,
    torchvision_weights_file,
)

# alex/vgg/squeeze go through lpips -> torchvision weights; the others through MONAI's torch.hub repository
NETWORKS = ("alex", "vgg", "squeeze", *HUB_WEIGHTS, "none")


def check_weights_available(network: str) -> None:
    """Raise a one-line MedimgenError when ``network``'s pretrained weights are not on disk."""
    if network == "none":
        return
    if network not in NETWORKS:
        raise MedimgenError(f"losses.perceptual_network must be one of {', '.join(NETWORKS)}, got {network!r}")
    missing = missing_weights(network)
    if not missing:
        return
    off = "or set losses.perceptual_network=none to train without the perceptual loss"
    get = f"run `{download_command(network)}` (or copy the hub folder from a machine that has them)"
    if network in TORCHVISION:
        path, url = torchvision_weights_file(network)
        raise MedimgenError(f"perceptual network '{network}' needs pretrained weights {path.name} in {path.parent} "
                            f"({get}; source {url}; or set TORCH_HOME), {off}")
    if missing[0] == hub_repo_dir():
        raise MedimgenError(f"perceptual network '{network}' needs the torch.hub repository {HUB_REPO} and its weights "
                            f"in {missing[0].parent}: {get}, {off}")
    raise MedimgenError(f"perceptual network '{network}' needs pretrained weights {missing[0].name} in "
                        f"{missing[0].parent}: {get}, {off}")


MIN_SIZE = {"alex": 31, "squeeze": 16, "vgg": 16}


def build_perceptual_loss(network: str, spatial_dims: int, fake_3d: bool, fake_3d_ratio: float,
                          image_size: tuple[int, ...] | None = None):
    """MONAI PerceptualLoss in eval mode with frozen weights (per channel for multi-channel images), or None for 'none'."""
    if network == "none":
        return None
    need = MIN_SIZE.get(network)
    if need and image_size is not None and min(image_size) < need:
        raise MedimgenError(f"perceptual network '{network}' needs images (slices) of at least {need} voxels per side, "
                            f"data.image_size is {list(image_size)}: set losses.perceptual_network=none")
    check_weights_available(network)
    from monai.losses import PerceptualLoss

    try:
        loss = PerceptualLoss(spatial_dims=spatial_dims, network_type=network,
                              is_fake_3d=fake_3d and spatial_dims == 3, fake_3d_ratio=fake_3d_ratio)
    except Exception as e:  # a corrupt or incomplete cache
        raise MedimgenError(f"could not load perceptual network '{network}' from {torch.hub.get_dir()} "
                            f"({type(e).__name__}: {e}); set losses.perceptual_network=none to skip it") from None
    loss = PerChannel(loss)
    loss.eval()
    for p in loss.parameters():
        p.requires_grad_(False)
    return loss
