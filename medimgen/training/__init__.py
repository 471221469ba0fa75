"""One training loop with hooks, and the tasks of the model kinds (DDPM, autoencoder, LDM, ControlNet; training.tasks)
that plug into it."""
