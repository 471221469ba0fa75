"""Floor 2, building blocks: MONAI networks, losses, perceptual networks, label channels, noise processes and the
sampling inferer, tiled latent decoding, pretrained weight files.

Imports core, config and (for constants) nnunet."""
