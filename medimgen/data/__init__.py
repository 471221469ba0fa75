"""Datasets over nnU-Net preprocessed cases."""
