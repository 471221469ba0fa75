"""Feature extractors for Fréchet distances and MMD; pretrained weights only from local files, never downloaded.

Every extractor takes images in the model's range ([-1, 1], (N, C, *spatial)) and returns
(N, F) features; ``name`` identifies the network *and* its weights and goes with every score.

- ``nnunet``: the encoder of a trained nnU-Net of the same dataset and dimensionality (from
  nnUNet_results), global-average-pooled deepest features. The most dataset-specific choice.
- ``radimagenet_resnet50`` (2D / 2.5D) and ``medicalnet_resnet10_23datasets`` /
  ``medicalnet_resnet50_23datasets`` (3D): MONAI's torch.hub repository
  Project-MONAI/perceptual-models (the networks of MONAI's perceptual loss), loaded from the
  torch hub cache with downloads switched off.
- any torchvision classifier (``inception_v3`` is the classic FID network, ``resnet50``, ...):
  ImageNet weights from the torch hub checkpoints folder or a given file.

2D networks on volumes are applied 2.5D: to the central slice of each of the three planes, features averaged.
Multi-channel images: each channel goes through the network on its own, features are averaged over channels.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from medimgen.core.errors import MedimgenError
from medimgen.models.weights import HUB_REPO, checkpoint_path, hub_repo_dir

HUB_NETWORKS = {"radimagenet_resnet50": 2, "medicalnet_resnet10_23datasets": 3, "medicalnet_resnet50_23datasets": 3}
NNUNET_CONFIGURATION = {2: "2d", 3: "3d_fullres"}


def _key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


class FeatureExtractor(nn.Module):
    """Base: batching and the 2.5D / per-channel handling; subclasses implement ``_features``."""

    name: str = "features"
    key: str = "features"  # short form for metric names, e.g. fid.radimagenet_resnet50
    spatial_dims: tuple[int, ...] = (2, 3)

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1 or C, *spatial) -> (N, F)
        raise NotImplementedError

    per_channel = True  # single-channel networks see one channel at a time

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        nd = images.ndim - 2
        if nd not in self.spatial_dims:
            raise MedimgenError(f"feature extractor '{self.name}' works on {' or '.join(f'{d}D' for d in self.spatial_dims)} "
                                f"images, not {nd}D: choose another --extractor")
        if nd == 3 and 3 not in self._native_dims():
            d, h, w = images.shape[2:]
            planes = [images[:, :, d // 2], images[:, :, :, h // 2], images[:, :, :, :, w // 2]]
            return torch.stack([self._channels(p) for p in planes]).mean(0)
        return self._channels(images)

    def _native_dims(self) -> tuple[int, ...]:
        return self.spatial_dims

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return self._features(x).float()
        return torch.stack([self._features(x[:, c:c + 1]).float() for c in range(x.shape[1])]).mean(0)

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 8, device: torch.device | str = "cpu") -> torch.Tensor:
        self.to(device)
        out = [self(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out).double()


def _numpy_scalar_globals() -> list:
    """What nnU-Net's checkpoints hold besides tensors and plain Python data: numpy scalars (logged
    losses and Dice values, ``_best_ema``), i.e. numpy's scalar constructor and numeric dtypes."""
    import numpy as np

    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                          np.uint32, np.uint64, np.float16, np.float32, np.float64)]
    # the scalar constructor under both module names: checkpoints written with numpy 1.x and 2.x
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dict.fromkeys(d for d in dtypes if d is not np.dtype)]


def load_nnunet_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint read with ``weights_only=True``: tensors, Python data and numpy scalars only;
    anything else (code) is refused in one line, never executed."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MedimgenError(f"cannot read nnU-Net checkpoint {path} safely (weights only): "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise MedimgenError(f"{path} is not an nnU-Net checkpoint (no network_weights)")
    return ckpt


def load_nnunet_network(model_folder: Path | str, fold: int | str = 0, checkpoint: str = "checkpoint_final.pth"):
    """(network in eval mode without deep supervision, its ConfigurationManager, its LabelManager) of a trained
    nnU-Net model folder (plans.json, dataset.json, fold_X/<checkpoint>), read weights-only."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(model_folder)
    ckpt_path = folder / f"fold_{fold}" / checkpoint
    for f in (folder / "plans.json", folder / "dataset.json", ckpt_path):
        if not f.is_file():
            raise MedimgenError(f"nnU-Net model file {f} is missing (train nnU-Net for this dataset first, "
                                f"or choose another feature extractor)")
    ckpt = load_nnunet_checkpoint(ckpt_path)
    configuration = ckpt["init_args"]["configuration"]
    pm = PlansManager(str(folder / "plans.json"))
    cm = pm.get_configuration(configuration)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    labels = pm.get_label_manager(dataset_json)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, channels, labels.num_segmentation_heads,
                                 allow_init=True, deep_supervision=False)
    net.load_state_dict(ckpt["network_weights"])
    return net.eval(), cm, labels


class NnUNetEncoderFeatures(FeatureExtractor):
    """Encoder features of a trained nnU-Net (checkpoint written by nnU-Net's trainer).

    ``intensity_map`` (medimgen's IntensityMap) converts model-range images back to nnU-Net's
    normalisation first; without it, inputs are taken as nnU-Net-normalised.
    """

    per_channel = False

    def __init__(self, model_folder: Path | str, fold: int | str = 0, checkpoint: str = "checkpoint_final.pth",
                 intensity_map=None):
        super().__init__()
        net, cm, _ = load_nnunet_network(model_folder, fold, checkpoint)
        folder = Path(model_folder)
        self.encoder = net.encoder.eval()
        self.imap = intensity_map
        self.spatial_dims = (len(cm.patch_size),)
        self.name = f"nnunet-encoder:{folder.name}/fold_{fold}"
        self.key = "nnunet_encoder"

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.imap is not None:
            images = self.imap.to_normalized(images.float(), channel_axis=1)
        deepest = self.encoder(images)[-1]
        return deepest.flatten(2).mean(-1)


class NnUNetSegmenter:
    """Segmentations by a trained nnU-Net of model-range images (``intensity_map`` maps them back to nnU-Net's
    normalisation): the "does the generated image follow its mask" check. One forward pass per image padded to a
    multiple of the network's downsampling (no sliding window: generated images are about the patch size)."""

    def __init__(self, model_folder: Path | str, fold: int | str = 0, checkpoint: str = "checkpoint_final.pth",
                 intensity_map=None):
        self.net, cm, labels = load_nnunet_network(model_folder, fold, checkpoint)
        if labels.has_regions:
            raise MedimgenError(f"{model_folder} is a region-based nnU-Net: its outputs are not label values")
        self.values = torch.as_tensor([int(v) for v in labels.all_labels])
        self.divisor = [math.prod(int(v) for v in k) for k in zip(*cm.pool_op_kernel_sizes)]
        self.imap = intensity_map
        self.name = f"nnunet:{Path(model_folder).name}/fold_{fold}"

    @torch.no_grad()
    def segment(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(N, 1, *spatial) long label values of (N, C, *spatial) images."""
        x = images.float()
        if self.imap is not None:
            x = self.imap.to_normalized(x, channel_axis=1)
        spatial = x.shape[2:]
        pad = []
        for size, d in zip(reversed(spatial), reversed(self.divisor)):
            pad += [0, (-size) % d]
        x = torch.nn.functional.pad(x, pad)
        out = []
        for start in range(0, len(x), batch_size):
            logits = self.net(x[start:start + batch_size])
            out.append(logits.argmax(1, keepdim=True)[(...,) + tuple(slice(0, n) for n in spatial)])
        return self.values[torch.cat(out)]


def find_nnunet_model(dataset: str, spatial_dims: int, plans_identifier: str = "nnUNetPlans") -> tuple[Path, str] | None:
    """(model folder, fold) of a finished nnU-Net training of ``dataset`` with the matching configuration."""
    from medimgen.core.paths import nnunet_results

    try:
        root = nnunet_results() / dataset
    except MedimgenError:
        return None
    configuration = NNUNET_CONFIGURATION[spatial_dims]
    for folder in sorted(root.glob(f"*__{plans_identifier}__{configuration}")):
        for fold in ("0", "1", "2", "3", "4", "all"):
            if (folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
                return folder, fold
    return None


def nnunet_model(name: str, dataset: str | None, spatial_dims: int, plans_identifier: str = "nnUNetPlans",
                 option: str = "--extractor ") -> tuple[Path, str]:
    """(model folder, fold) that ``name`` gives: 'nnunet' the dataset's trained nnU-Net of this dimensionality,
    'nnunet:/path/to/model_folder[/fold_X]' a named one (fold 0 unless named); one line when there is none."""
    if name.startswith("nnunet:"):
        folder, fold = Path(name.split(":", 1)[1]), "0"
        if folder.name.startswith("fold_"):
            folder, fold = folder.parent, folder.name[5:]
        return folder, fold
    found = find_nnunet_model(dataset or "", spatial_dims, plans_identifier)
    if found is None:
        raise MedimgenError(f"no trained nnU-Net ({NNUNET_CONFIGURATION[spatial_dims]}, checkpoint_final.pth) "
                            f"for {dataset} in nnUNet_results: train one (medimgen train-feature-nnunet), pass "
                            f"{option}nnunet:/path/to/model_folder, or choose another")
    return found


def build_segmenter(name: str = "auto", dataset: str | None = None, spatial_dims: int = 3, intensity_map=None,
                    plans_identifier: str = "nnUNetPlans") -> "NnUNetSegmenter | None":
    """The nnU-Net that segments generated images for the follow-the-mask Dice (config ``controlnet.segmenter``):
    'auto' the dataset's trained one if there is one (else None), 'nnunet' / 'nnunet:/path' as
    :func:`nnunet_model` (one line when absent), 'none' None."""
    if name == "none":
        return None
    if name == "auto":
        if find_nnunet_model(dataset or "", spatial_dims, plans_identifier) is None:
            return None
        name = "nnunet"
    if name != "nnunet" and not name.startswith("nnunet:"):
        raise MedimgenError(f"segmenter {name!r}: choose auto, none, nnunet or nnunet:/path/to/model_folder")
    folder, fold = nnunet_model(name, dataset, spatial_dims, plans_identifier, "controlnet.segmenter=")
    return NnUNetSegmenter(folder, fold, intensity_map=intensity_map)


def torchvision_weights_path(arch: str, weights_path: Path | str | None = None) -> Path:
    import torchvision.models as tvm

    if weights_path:
        path = Path(weights_path)
    else:
        try:
            enum = tvm.get_model_weights(arch).DEFAULT
        except (ValueError, KeyError):
            raise MedimgenError(f"unknown feature extractor {arch!r}: use nnunet, radimagenet_resnet50, "
                                f"medicalnet_resnet10_23datasets, medicalnet_resnet50_23datasets, inception_v3 "
                                f"or another torchvision classifier") from None
        path = checkpoint_path(enum.url)
    if not path.is_file():
        raise MedimgenError(f"feature extractor '{arch}' needs pretrained weights {path.name} in {path.parent} "
                            f"({'run `medimgen weights download inception`, ' if arch == 'inception_v3' else ''}"
                            f"copy it there from a machine with internet, or pass --weights FILE), "
                            f"or use the nnU-Net encoder extractor (--extractor nnunet)")
    return path


class TorchvisionFeatures(FeatureExtractor):
    """ImageNet classifier (pooled penultimate features) on 2D slices (ImageNet mean/std normalisation)."""

    def __init__(self, arch: str = "inception_v3", weights_path: Path | str | None = None):
        super().__init__()
        import torchvision.models as tvm

        path = torchvision_weights_path(arch, weights_path)
        kwargs = {"aux_logits": True, "init_weights": False} if arch == "inception_v3" else {}
        net = tvm.get_model(arch, weights=None, **kwargs)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise MedimgenError(f"cannot load {arch} weights from {path} ({type(e).__name__}: {str(e)[:200]})") from None
        if hasattr(net, "fc"):
            net.fc = nn.Identity()
        self.net = net.eval()
        self.size = 299 if arch == "inception_v3" else 224
        self.spatial_dims = (2, 3)
        self.name = f"{arch}:{path.name}"
        self.key = _key(arch)

    def _native_dims(self):
        return (2,)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        out = self.net((x - mean) / std)
        return out.logits if hasattr(out, "logits") else out


@contextlib.contextmanager
def _offline():
    """No downloads while loading hub networks: Hugging Face Hub offline mode."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


class HubFeatures(FeatureExtractor):
    """RadImageNet / MedicalNet networks from MONAI's torch.hub repository, with the same input
    preprocessing as MONAI's perceptual loss; spatially pooled last feature map."""

    def __init__(self, network: str, repo_dir: Path | str | None = None):
        super().__init__()
        repo = Path(repo_dir) if repo_dir else hub_repo_dir()
        if not (repo / "hubconf.py").is_file():
            raise MedimgenError(
                f"feature extractor '{network}' needs the torch.hub repository {HUB_REPO} with its weights in "
                f"{repo.parent} (run `medimgen weights download {network.split('_')[0]}`, or copy the hub folder "
                f"from a machine that has them, or pass --weights REPO_DIR), or use --extractor nnunet")
        try:
            with _offline():
                self.net = torch.hub.load(str(repo), network, source="local", verbose=False).eval()
        except Exception as e:
            raise MedimgenError(f"cannot load '{network}' from {repo} without downloading ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}): put its weights file in the torch hub cache") from None
        self.network = network
        self.medicalnet = network.startswith("medicalnet")
        self.spatial_dims = (3,) if self.medicalnet else (2, 3)
        self.name = f"{network}:{repo.name}"
        self.key = network

    def _native_dims(self):
        return (3,) if self.medicalnet else (2,)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        from monai.losses.perceptual import medicalnet_intensity_normalisation, subtract_mean

        if self.medicalnet:
            fmap = self.net(medicalnet_intensity_normalisation(x))
        else:
            x = ((x + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)[:, [2, 1, 0]]
            fmap = self.net(subtract_mean(x))
        return fmap.flatten(2).mean(-1)


def build_extractor(name: str = "auto", weights: Path | str | None = None, dataset: str | None = None,
                    spatial_dims: int = 3, intensity_map=None, plans_identifier: str = "nnUNetPlans"
                    ) -> FeatureExtractor | None:
    """A named extractor; 'auto': the dataset's nnU-Net if trained, else RadImageNet (2D) / MedicalNet (3D),
    else InceptionV3, whichever has weights on disk; None when nothing is available ('none' too)."""
    if name == "none":
        return None
    if name == "auto":
        for candidate in ("nnunet", "radimagenet_resnet50" if spatial_dims == 2 else "medicalnet_resnet10_23datasets",
                          "inception_v3"):
            try:
                return build_extractor(candidate, None, dataset, spatial_dims, intensity_map, plans_identifier)
            except MedimgenError:
                continue
        return None
    if name == "nnunet" or name.startswith("nnunet:"):
        folder, fold = nnunet_model(name, dataset, spatial_dims, plans_identifier)
        return NnUNetEncoderFeatures(folder, fold, intensity_map=intensity_map)
    if name in HUB_NETWORKS:
        return HubFeatures(name, weights)
    return TorchvisionFeatures(name, weights)
