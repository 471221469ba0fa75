"""Floor 6, generation: the sampler (NIfTI in the dataset's geometry and units), conditioning label maps, export
as an nnU-Net dataset, the pyfunc model MLflow serves.

Imports every floor up to runs."""
