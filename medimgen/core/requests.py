"""What a command asks for, typed once by the CLI and passed by keyword: which trained model, how to sample."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRef:
    """A trained model: ``model`` is a run folder, an MLflow model URI (models:/NAME@alias, models:/NAME/3,
    runs:/ID/model), or a kind (medimgen.config.kinds: ddpm, ldm, autoencoder, controlnet; auto: the LDM if trained,
    else the DDPM) whose
    standard run of ``dataset_id`` / ``dim`` / ``splitting`` (+ ``fold``) is meant."""

    model: str = "auto"
    dataset_id: int | str | None = None
    dim: str = "3d"
    splitting: str = "train-val-test"
    fold: int = 0
    checkpoint: str = "best"  # best | last (run folders)
    dim_given: bool = False  # MODEL_TYPE was given by the user: a model of the other dimensionality is refused

    @property
    def is_uri(self) -> bool:
        return ":/" in self.model


@dataclass(frozen=True)
class SampleOptions:
    """How to sample: ``sampler`` ddim/ddpm/rflow and ``steps`` (None: the config's), ``batch_size`` images per
    forward pass (None: all), ``amp`` mixed precision on a GPU (bf16 where supported; nothing on the CPU),
    ``tiled_decoding`` the LDM's decoder over latent tiles (None: when its predicted memory exceeds the GPU's),
    ``resample`` to the dataset's original median spacing, ``crop`` back to the data size the model's image size
    pads (see README, Sampling)."""

    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    device: str | None = None
    amp: bool = True
    tiled_decoding: bool | None = None
    resample: bool = False
    crop: bool = True
    progress: bool = False


@dataclass(frozen=True)
class LabelRequest:
    """Label maps to generate images for (a ControlNet): ``source`` a folder of NIfTI label maps or a split of the
    dataset (train, val, test); ``augment`` N: N images per map, each after nnU-Net's spatial augmentation of the
    map (0: one image per map, the map as given); ``limit``: use the first maps only (None: all)."""

    source: str
    augment: int = 0
    limit: int | None = None
