"""Feature extractors for Fréchet distances; pretrained weights only from local files, never downloaded.

- ``NnUNetEncoderFeatures``: the encoder of a trained nnU-Net of the same dataset (from
  nnUNet_results), global-average-pooled deepest features; the most dataset-specific choice.
- ``TorchvisionFeatures``: ImageNet backbones (e.g. InceptionV3) applied slice-wise (2D, or 2.5D:
  central slices of three planes for volumes), with weights from the torch hub cache or a path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medimgen.errors import MedimgenError


class NnUNetEncoderFeatures(nn.Module):
    """Encoder features of a trained nnU-Net (checkpoint written by nnU-Net's trainer)."""

    def __init__(self, model_folder: Path | str, fold: int | str = 0, checkpoint: str = "checkpoint_final.pth"):
        super().__init__()
        import json

        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        folder = Path(model_folder)
        ckpt_path = folder / f"fold_{fold}" / checkpoint
        for f in (folder / "plans.json", folder / "dataset.json", ckpt_path):
            if not f.is_file():
                raise MedimgenError(f"nnU-Net model file {f} is missing (train nnU-Net for this dataset first, "
                                    f"or choose another feature extractor)")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # nnU-Net's own checkpoint format
        configuration = ckpt["init_args"]["configuration"]
        pm = PlansManager(str(folder / "plans.json"))
        cm = pm.get_configuration(configuration)
        dataset_json = json.loads((folder / "dataset.json").read_text())
        channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
        heads = pm.get_label_manager(dataset_json).num_segmentation_heads
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, channels, heads,
                                     allow_init=True, deep_supervision=False)
        net.load_state_dict(ckpt["network_weights"])
        self.encoder = net.encoder.eval()
        self.name = f"nnunet-encoder:{folder.name}/fold_{fold}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: nnU-Net-normalised (N, C, *spatial) -> (N, F)."""
        deepest = self.encoder(images)[-1]
        return deepest.flatten(2).mean(-1)


def torchvision_weights_path(arch: str, weights_path: Path | str | None = None) -> Path:
    import torchvision.models as tvm

    if weights_path:
        path = Path(weights_path)
    else:
        enum = tvm.get_model_weights(arch).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise MedimgenError(f"feature extractor '{arch}' needs pretrained weights {path.name} in {path.parent} "
                            f"(copy it there from a machine with internet, or pass a weights path), "
                            f"or use the nnU-Net encoder extractor")
    return path


class TorchvisionFeatures(nn.Module):
    """ImageNet backbone (pooled penultimate features) on 2D slices; 2.5D (three central planes) for volumes."""

    def __init__(self, arch: str = "inception_v3", weights_path: Path | str | None = None):
        super().__init__()
        import torchvision.models as tvm

        path = torchvision_weights_path(arch, weights_path)
        kwargs = {"aux_logits": True, "init_weights": False} if arch == "inception_v3" else {}
        net = tvm.get_model(arch, weights=None, **kwargs)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.fc = nn.Identity() if hasattr(net, "fc") else net.fc
        self.net = net.eval()
        self.name = f"{arch}:{path.name}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1], (N, C, H, W) or (N, C, D, H, W) -> (N, F)."""
        if images.ndim == 5:
            d, h, w = images.shape[2:]
            planes = [images[:, :, d // 2], images[:, :, :, h // 2], images[:, :, :, :, w // 2]]
            return torch.stack([self._2d(p) for p in planes]).mean(0)
        return self._2d(images)

    def _2d(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1].repeat(1, 3, 1, 1)
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out = self.net(x)
        return out.logits if hasattr(out, "logits") else out
