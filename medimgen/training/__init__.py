"""One training loop with hooks, and the DDPM / autoencoder / LDM tasks that plug into it."""
