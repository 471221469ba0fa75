"""medimgen: hyperparameter-free medical image generation planned by nnU-Net."""

__version__ = "0.1.0"
