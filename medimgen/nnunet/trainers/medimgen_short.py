"""Short nnU-Net trainers for tests and CPU smoke runs of `medimgen benchmark-segmentation` (nnU-Net's own
nnUNetTrainer_1epoch still runs 250 iterations per epoch). Their Dice says that the pipeline works, not what
synthetic data is worth: measure that with nnUNetTrainer (1000 epochs) or at least nnUNetTrainer_100epochs."""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerMedimgenTiny(nnUNetTrainer):
    """2 epochs x 10 iterations (2 validation iterations each), then nnU-Net's usual final validation."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net records these exact argument names
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 2
