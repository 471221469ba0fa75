"""Floor 10, benchmarks of the product: nnU-Net trained on real vs real + synthetic cases.

Imports every floor up to tuning."""
