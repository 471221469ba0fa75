"""Floor 2, the nnU-Net side: a read-only view of nnU-Net's plans, calls into nnU-Net, importing raw image folders,
synthetic phantom datasets and the short nnU-Net trainers `nnUNetv2_train -tr` finds.

Imports core and config only (and models.labels' constants)."""
