"""A trained-nnU-Net stand-in for feature-extractor tests.

The checkpoint is written in nnU-Net's own format and folder layout, with the network built by
nnU-Net's own trainer class, but its weights are RANDOM (made here): distances computed on its
features exercise the code paths; they are not FIDs of any meaning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def make_nnunet_model(nnunet_results: Path, preprocessed_dataset: Path, configuration: str, seed: int = 0) -> Path:
    """nnUNet_results/<Dataset>/nnUNetTrainer__nnUNetPlans__<configuration>/fold_0/checkpoint_final.pth."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(nnunet_results) / preprocessed_dataset.name / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    shutil.copy(preprocessed_dataset / "nnUNetPlans.json", folder / "plans.json")
    shutil.copy(preprocessed_dataset / "dataset.json", folder / "dataset.json")
    pm = PlansManager(str(folder / "plans.json"))
    cm = pm.get_configuration(configuration)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    channels = len(dataset_json["channel_names"])
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(seed)
    net = nnUNetTrainer.build_network_architecture(pm, cm, channels, heads, enable_deep_supervision=True)
    torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": configuration, "fold": 0},
                "trainer_name": "nnUNetTrainer", "current_epoch": 1}, folder / "fold_0" / "checkpoint_final.pth")
    return folder
