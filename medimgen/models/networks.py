"""MONAI networks built from the config (they know nothing of diffusion or training).

MONAI's DiffusionModelUNet and AutoencoderKL downsample by 2 on every axis. nnU-Net plans
per-axis strides (e.g. [1, 2, 2] for an anisotropic axis), so after building the MONAI
network its down/upsampling layers are set to the planned per-axis strides:
convolution strides and paddings of the downsamplers, scale factors of the upsamplers.
Weights and state-dict keys stay MONAI's.

Attention uses MONAI's ``use_flash_attention`` (torch's scaled-dot-product attention: flash or
memory-efficient kernels on CUDA, no N x N matrix in memory) wherever the installed torch has it.

Activation checkpointing: each block of the UNet (down/middle/up) and of the autoencoder's
encoder and decoder is wrapped so its forward is recomputed in backward
(torch.utils.checkpoint), without changing state-dict keys. MONAI's UNet has no option;
AutoencoderKL's ``use_checkpoint`` checkpoints the whole encoder/decoder, so backward would
recompute half the network at once (measured in benchmarks/README.md).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medimgen.config.kinds import kind
from medimgen.config.schema import AutoencoderConfig, DiscriminatorConfig, GenerationConfig, UNetConfig
from medimgen.config.validate import check_network

FLASH_ATTENTION = hasattr(torch.nn.functional, "scaled_dot_product_attention")


def total_stride(strides: Sequence[Sequence[int]], dims: int) -> tuple[int, ...]:
    """Per-axis product of a network's downsampling strides."""
    out = [1] * dims
    for s in strides:
        out = [a * b for a, b in zip(out, s)]
    return tuple(out)


def latent_size(cfg: GenerationConfig) -> tuple[int, ...]:
    """Spatial size of the autoencoder's latents for the config's image size."""
    return tuple(s // f for s, f in zip(cfg.data.image_size, total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)))


def _set_upsample_scale(module: nn.Module, stride: Sequence[int]) -> None:
    ups = [m for m in module.modules() if isinstance(m, nn.Upsample)]
    if len(ups) != 1:  # pragma: no cover - MONAI layout changed
        raise RuntimeError("expected exactly one nn.Upsample in a MONAI upsampler")
    ups[0].scale_factor = tuple(float(s) for s in stride)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def enable_unet_checkpointing(unet: nn.Module) -> None:
    for block in [*unet.down_blocks, unet.middle_block, *unet.up_blocks]:
        block.forward = _checkpointed(block.forward)
    unet._checkpointed = True


def enable_autoencoder_checkpointing(ae: nn.Module) -> None:
    # per block rather than MONAI's use_checkpoint (whole encoder/decoder): backward then recomputes
    # one block at a time instead of a whole half of the network
    for block in [*ae.encoder.blocks, *ae.decoder.blocks]:
        block.forward = _checkpointed(block.forward)
    ae._checkpointed = True


def build_unet(cfg: UNetConfig, spatial_dims: int, in_channels: int, out_channels: int | None = None) -> nn.Module:
    """MONAI DiffusionModelUNet with nnU-Net's per-axis strides."""
    from monai.networks.nets import DiffusionModelUNet

    levels = len(cfg.channels)
    check_network(cfg, "unet", spatial_dims)
    unet = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        use_flash_attention=FLASH_ATTENTION,
    )
    for level, stride in enumerate(cfg.strides):
        down = unet.down_blocks[level].downsampler
        conv = [m for m in down.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][0]
        conv.stride = tuple(int(s) for s in stride)
        up = unet.up_blocks[levels - 2 - level].upsampler
        _set_upsample_scale(up, stride)
    if cfg.activation_checkpointing:
        enable_unet_checkpointing(unet)
    return unet


def build_autoencoder(cfg: AutoencoderConfig, spatial_dims: int, in_channels: int,
                      out_channels: int | None = None) -> nn.Module:
    """MONAI AutoencoderKL with nnU-Net's per-axis strides (``out_channels``: default ``in_channels``)."""
    from monai.networks.nets import AutoencoderKL
    from monai.networks.nets.autoencoderkl import AEKLDownsample

    levels = len(cfg.channels)
    check_network(cfg, "autoencoder", spatial_dims)
    ae = AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        channels=tuple(cfg.channels),
        latent_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_levels=tuple(cfg.attention_levels) or (False,) * levels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        use_flash_attention=FLASH_ATTENTION,
    )
    downs = [m for m in ae.encoder.blocks if isinstance(m, AEKLDownsample)]
    ups = [m for m in ae.decoder.blocks if any(isinstance(x, nn.Upsample) for x in m.modules())]
    if len(downs) != levels - 1 or len(ups) != levels - 1:  # pragma: no cover - MONAI layout changed
        raise RuntimeError("unexpected MONAI AutoencoderKL layout")
    for stride, down in zip(cfg.strides, downs):
        down.conv.conv.stride = tuple(int(s) for s in stride)
        # kernel 3: stride 2 pads (0, 1) as MONAI does, stride 1 pads (1, 1) to keep the size
        pad: list[int] = []
        for s in reversed(stride):
            pad += [0, 1] if s == 2 else [1, 1]
        down.pad.pad = tuple(pad)
    for stride, up in zip(reversed(cfg.strides), ups):
        _set_upsample_scale(up, stride)
    if cfg.activation_checkpointing:
        enable_autoencoder_checkpointing(ae)
    return ae


def autoencoder_for(cfg: GenerationConfig) -> nn.Module:
    """The autoencoder of a config: encodes image (+ one-hot label) channels, decodes image channels (+ one label
    logit per class for a joint model, medimgen.models.labels); ``autoencoder.source`` other than 'trained': the
    published foundation network (medimgen.models.foundation; weights loaded by whoever adopts it)."""
    from medimgen.models.labels import autoencoder_out_channels, network_channels

    if cfg.autoencoder.is_foundation:  # a published foundation network (models.foundation), validated
        from medimgen.config.validate import check_foundation
        from medimgen.models.foundation import build_foundation_autoencoder

        check_foundation(cfg)
        return build_foundation_autoencoder(cfg.autoencoder.source, cfg.data.in_channels)
    return build_autoencoder(cfg.autoencoder, cfg.data.spatial_dims, network_channels(cfg), autoencoder_out_channels(cfg))


def unet_for(cfg: GenerationConfig, model: str) -> nn.Module:
    """The diffusion UNet of ``model``: on autoencoder latents (a latent kind: the LDM) or on image (+ one-hot label)
    channels (the DDPM)."""
    from medimgen.models.labels import network_channels

    if kind(model).build is not None:  # a kind registered with its own network builder
        return kind(model).build(cfg)
    channels = cfg.autoencoder.latent_channels if cfg.space_of(model) == "latent" else network_channels(cfg)
    return build_unet(cfg.unet_for(model), cfg.data.spatial_dims, channels)


def conditioning_levels(cfg: GenerationConfig) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(channels, per-axis strides) of the ControlNet's conditioning embedding: for an LDM base it downsamples the
    image-size label map to the latent size by the autoencoder's strides (``controlnet.conditioning_strides``,
    empty: the autoencoder's); a DDPM base generates at image size, so one level, no downsampling."""
    channels = tuple(cfg.controlnet.conditioning_channels)
    if cfg.space_of(cfg.controlnet_base()) == "image":
        return channels[:1], ()
    strides = tuple(tuple(s) for s in (cfg.controlnet.conditioning_strides or cfg.autoencoder.strides))
    if not cfg.controlnet.conditioning_strides:  # a config from before the ControlNet: levels as planned
        channels = tuple(channels[min(i, len(channels) - 1)] for i in range(len(strides) + 1))
    return channels, strides


def build_controlnet(cfg: GenerationConfig) -> nn.Module:
    """MONAI ControlNet for the base generator of ``cfg`` (``controlnet_base``): the base UNet's architecture and
    per-axis strides, a conditioning embedding reading the one-hot label map (background first) at image size."""
    from monai.networks.nets import ControlNet

    from medimgen.models.labels import network_channels

    base = cfg.controlnet_base()
    latent = cfg.space_of(base) == "latent"
    ucfg = cfg.unet_for(base)
    channels, strides = conditioning_levels(cfg)
    if total_stride(strides, cfg.data.spatial_dims) != (
            total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims) if latent else
            (1,) * cfg.data.spatial_dims):
        from medimgen.core.errors import MedimgenError

        raise MedimgenError(f"controlnet.conditioning_strides {[list(s) for s in strides]} do not bring the label map "
                            f"to the latent size: their product must equal the autoencoder's strides' "
                            f"{list(total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims))}")
    net = ControlNet(
        spatial_dims=cfg.data.spatial_dims,
        in_channels=cfg.autoencoder.latent_channels if latent else network_channels(cfg),
        channels=tuple(ucfg.channels),
        attention_levels=tuple(ucfg.attention_levels),
        num_res_blocks=ucfg.num_res_blocks,
        num_head_channels=ucfg.num_head_channels,
        norm_num_groups=ucfg.norm_num_groups,
        conditioning_embedding_in_channels=len(cfg.data.label_values) + 1,
        conditioning_embedding_num_channels=channels,
        use_flash_attention=FLASH_ATTENTION,
    )
    for level, stride in enumerate(ucfg.strides):  # the base UNet's per-axis strides
        down = net.down_blocks[level].downsampler
        conv = [m for m in down.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][0]
        conv.stride = tuple(int(s) for s in stride)
    embedding = net.controlnet_cond_embedding  # blocks: (conv, strided conv) per level transition
    for i, stride in enumerate(strides):
        conv = [m for m in embedding.blocks[2 * i + 1].modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][0]
        conv.stride = tuple(int(s) for s in stride)
    if cfg.controlnet.activation_checkpointing:
        enable_controlnet_checkpointing(net)
    return net


def enable_controlnet_checkpointing(net: nn.Module) -> None:
    for block in [*net.down_blocks, net.middle_block]:
        block.forward = _checkpointed(block.forward)
    net._checkpointed = True


def build_discriminator(cfg: DiscriminatorConfig, spatial_dims: int, in_channels: int) -> nn.Module:
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=spatial_dims, num_layers_d=cfg.num_layers, channels=cfg.channels,
                              in_channels=in_channels, out_channels=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
