"""Floor 5, runs and tracking: run folders and checkpoints, loading a trained model, the one MLflow layer, the
model registry.

Imports core, config, nnunet, models, data and planning."""
