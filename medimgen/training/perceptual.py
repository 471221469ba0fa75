"""Perceptual loss (MONAI PerceptualLoss) with pretrained weights that are never downloaded silently.

Pretrained backbones are looked up where torch/torchvision/MONAI cache them
(``$TORCH_HOME/hub`` = ``torch.hub.get_dir()``). When a file is missing, training stops at
start-up with one message naming the file, where to put it, and how to switch the
perceptual loss off (``losses.perceptual_network=none``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from medimgen.errors import MedimgenError
from medimgen.losses import PerChannel

# lpips backbones (MONAI's alex/vgg/squeeze go through lpips -> torchvision weights)
_TORCHVISION = {
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}
# torch.hub repositories used by MONAI for the medical backbones
_HUB_REPOS = {
    "radimagenet_resnet50": "Project-MONAI_perceptual-models_main",
    "medicalnet_resnet10_23datasets": "Project-MONAI_perceptual-models_main",
    "medicalnet_resnet50_23datasets": "Project-MONAI_perceptual-models_main",
}
NETWORKS = (*_TORCHVISION, *_HUB_REPOS, "none")


def torchvision_weights_file(network: str) -> tuple[Path, str]:
    """(expected local path, download URL) of the torchvision weights lpips loads for ``network``."""
    import torchvision.models as tvm

    _, enum_name = _TORCHVISION[network]
    url = getattr(tvm, enum_name).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def check_weights_available(network: str) -> None:
    """Raise a one-line MedimgenError when ``network``'s pretrained weights are not on disk."""
    if network == "none":
        return
    if network not in NETWORKS:
        raise MedimgenError(f"losses.perceptual_network must be one of {', '.join(NETWORKS)}, got {network!r}")
    off = "or set losses.perceptual_network=none to train without the perceptual loss"
    if network in _TORCHVISION:
        path, url = torchvision_weights_file(network)
        if not path.is_file():
            raise MedimgenError(
                f"perceptual network '{network}' needs pretrained weights {path.name} in {path.parent} "
                f"(download {url} on a machine with internet and copy it there, or set TORCH_HOME), {off}")
        return
    repo = Path(torch.hub.get_dir()) / _HUB_REPOS[network]
    if not repo.is_dir():
        raise MedimgenError(
            f"perceptual network '{network}' needs the torch.hub repository {repo.name} and its weights in "
            f"{repo.parent} (run torch.hub.load once on a machine with internet and copy the hub folder), {off}")


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
