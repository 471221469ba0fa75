"""Foundation autoencoders: published KL-autoencoders an LDM can start from instead of training one
(``autoencoder.source``; README "Start from a foundation autoencoder").

MAISI (``maisi``): MONAI's ``AutoencoderKlMaisi`` with the published network of Project-MONAI model-zoo
``maisi_ct_generative`` (configs/inference.json ``autoencoder_def``): channels [64, 128, 256], 2 residual blocks per
level, 4 latent channels, 4x downsampling per axis, 32 groups (eps 1e-6), no attention. The weights are NVIDIA's
``autoencoder_v1.pt`` of Hugging Face ``nvidia/NV-Generate-CT`` (NV-Generate-CTMR's "foundation VAE", trained on
37,243 CT and 17,887 MR volumes), fetched by ``medimgen weights download maisi-vae`` (medimgen.models.weights) and
read with ``torch.load(weights_only=True)``.

Two of MAISI's constructor arguments change how it runs, not its weights, and are set here for every device:
``norm_float16`` (casts group-norm outputs to float16: published true for their GPUs; on a CPU float16 convolutions
with float32 biases fail) is false, mixed precision on a GPU comes from medimgen's AMP; ``num_splits`` (splits each
convolution's input along an axis to lower its peak memory: published 2) is 1, because a split must be several voxels
thick at every level and medimgen's tiled decoding (models.decoding) bounds decoding memory instead.

Intensities: the published weights saw CT as Hounsfield units windowed [-1000, 1000] -> [0, 1] (clipped) and MR scaled
by its 0th-99.5th percentiles to [0, 1] (NV-Generate-CTMR scripts/transforms.py). The planner sets the data section's
intensity map to that around the autoencoder (medimgen.planning.foundation; CT: the window of the HU nnU-Net's
preprocessing kept, i.e. clipped to the foreground's 0.5/99.5th percentiles), so samples map back to the data's
units through the usual inverse (medimgen.data.intensity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medimgen.config.schema import FOUNDATION_ARCHITECTURES, AutoencoderConfig
from medimgen.core.errors import MedimgenError


@dataclass(frozen=True)
class Foundation:
    """One published foundation autoencoder."""

    source: str  # the autoencoder.source value
    weights: str  # the `medimgen weights download` name of its weights file
    title: str  # what it is, for messages
    modalities: tuple[str, ...]  # what its published weights were trained on ('ct', 'mr')
    licence: str  # the licence its weights are published under (README quotes it)
    url: str  # where the weights are published
    file_name: str  # the weights file in the torch hub cache (medimgen.models.weights)


MAISI = Foundation(
    source="maisi", weights="maisi-vae",
    title="MAISI foundation VAE (NV-Generate-CT autoencoder_v1.pt)",
    modalities=("ct", "mr"),
    licence="NVIDIA Open Model License Agreement",
    url="https://huggingface.co/nvidia/NV-Generate-CT/resolve/main/models/autoencoder_v1.pt",
    file_name="nv-generate-ct_autoencoder_v1.pt",
)
FOUNDATIONS = {MAISI.source: MAISI}

# nnU-Net dataset.json channel names (lower case, split at non-letters/digits) -> modality
_CT = {"ct", "cect", "ncct", "cta"}
_MR = {"mr", "mri", "t1", "t1w", "t1c", "t1ce", "t1gd", "t1km", "t2", "t2w", "flair", "t2flair", "pd", "pdw",
       "swi", "mprage"}


def foundation(source: str) -> Foundation:
    try:
        return FOUNDATIONS[source]
    except KeyError:
        raise MedimgenError(f"autoencoder.source {source!r} is not a foundation autoencoder "
                            f"(choose one of {', '.join(FOUNDATIONS)})") from None


def architecture(source: str) -> AutoencoderConfig:
    """The published architecture of ``source`` as an autoencoder config section."""
    return FOUNDATION_ARCHITECTURES[foundation(source).source]


def modality(channel_name: str, normalization: str = "") -> str | None:
    """'ct', 'mr' or None (unknown) from an nnU-Net channel name (and its normalisation: CTNormalization is CT)."""
    if normalization == "CTNormalization":
        return "ct"
    tokens = {t for t in re.split(r"[^a-z0-9]+", channel_name.lower()) if t}
    if tokens & _CT:
        return "ct"
    if tokens & _MR:
        return "mr"
    return None


def build_foundation_autoencoder(source: str, in_channels: int = 1):
    """The published network of ``source`` (random weights until :func:`load_foundation_weights`)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    foundation(source)
    arch = architecture(source)
    return AutoencoderKlMaisi(
        spatial_dims=3, in_channels=in_channels, out_channels=in_channels, latent_channels=arch.latent_channels,
        num_channels=list(arch.channels), num_res_blocks=[arch.num_res_blocks] * len(arch.channels),
        norm_num_groups=arch.norm_num_groups, norm_eps=1e-6, attention_levels=list(arch.attention_levels),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_checkpointing=False,
        use_convtranspose=False, norm_float16=False, num_splits=1, dim_split=1, print_info=False, save_mem=False)


def weights_path(source: str) -> Path:
    """Where ``medimgen weights download`` puts the weights of ``source``: $TORCH_HOME/hub/checkpoints/<file>."""
    from medimgen.models.weights import hub_dir

    return hub_dir() / "checkpoints" / foundation(source).file_name


def weights_present(source: str) -> bool:
    return weights_path(source).is_file()


def read_state_dict(path: Path) -> dict:
    """The state dict in a published weights file (``weights_only``: nothing is unpickled)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MedimgenError(f"cannot read foundation weights {path} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint around it
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MedimgenError(f"{path} is not a state dict")
    return state


def load_foundation_weights(net, source: str) -> None:
    """The published weights of ``source`` into ``net``; a missing file is one line naming it and the command."""
    path = weights_path(source)
    if not path.is_file():
        raise MedimgenError(f"foundation autoencoder weights {path} not found: run `medimgen weights download "
                            f"{foundation(source).weights}` (or set autoencoder.source=trained)")
    try:
        net.load_state_dict(read_state_dict(path))
    except RuntimeError as e:
        raise MedimgenError(f"{path} does not fit the published {foundation(source).title} network "
                            f"({' '.join(str(e).split())[:200]})") from None
