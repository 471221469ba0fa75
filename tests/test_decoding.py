"""Tiled decoding of LDM latents: the same images as decoding in one piece (up to the windows' group-norm
statistics), with a lower predicted peak, chosen by the predicted memory of sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medimgen.config import apply_overrides, load_config
from medimgen.models.decoding import decoder, halo, overlap_for
from medimgen.models.networks import autoencoder_for, latent_size
from medimgen.planning.memory import CONTEXT_BYTES, USABLE
from medimgen.planning.sampling_memory import latent_tiles, plan_sampling, predict_peak
from tests.training_helpers import tiny_overrides

CONFIG = Path(__file__).parent / "data" / "Dataset501_config_8GB.yaml"


def _cfg(dim: str):
    cfg = load_config(CONFIG).get(dim)
    return apply_overrides(cfg, tiny_overrides(cfg))


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_tiled_decoding_equals_whole(dim):
    cfg = _cfg(dim)
    torch.manual_seed(0)
    ae = autoencoder_for(cfg).eval()
    lat = latent_size(cfg)
    z = torch.randn(1, cfg.autoencoder.latent_channels, *lat, generator=torch.Generator().manual_seed(1))
    tile = next(latent_tiles(cfg))  # the first window: half the latent along one axis
    assert sum(t < n for t, n in zip(tile, lat)) == 1
    with torch.no_grad():
        whole = decoder(ae, 0.5)(z)
        tiled = decoder(ae, 0.5, tile, cfg.autoencoder)(z)
    assert tiled.shape == whole.shape == (1, cfg.data.in_channels, *cfg.data.image_size)
    # the same image: only the windows' group-norm statistics differ from the whole latent's
    corr = torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1]
    assert corr > 0.95
    assert (tiled - whole).abs().mean() < 0.2 * whole.std()
    # the windows overlap by at least twice the decoder's receptive halo where they can
    h = halo(cfg.autoencoder, cfg.data.spatial_dims)
    assert all(o == 0 or o * t >= min(2 * hh, 0.5 * t) for o, t, hh in zip(overlap_for(tile, lat, h), tile, h))


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_tiled_decoding_lowers_predicted_memory_and_is_chosen_when_whole_does_not_fit(dim):
    cfg = _cfg(dim)
    tile = next(latent_tiles(cfg))
    whole = predict_peak(cfg, "ldm", 2, None, unet=False)
    tiled = predict_peak(cfg, "ldm", 2, tile, unet=False)
    assert tiled < whole
    with_unet = predict_peak(cfg, "ldm", 2)
    assert with_unet > whole  # the UNet's weights and step come on top
    # a GPU where decoding whole does not fit but the first window does
    middle = (predict_peak(cfg, "ldm", 2, tile) + with_unet) / 2
    target = (middle + CONTEXT_BYTES) / USABLE
    plan = plan_sampling(cfg, "ldm", 2, target)
    assert plan.tile == tile and plan.fits and plan.peak_bytes < plan.untiled_bytes
    assert "latent tiles" in plan.describe()
    big = plan_sampling(cfg, "ldm", 2, 100 * target)
    assert big.tile is None and big.fits and big.peak_bytes == with_unet
    assert plan_sampling(cfg, "ddpm", 2, target, tiled=True).tile is None  # a DDPM has nothing to decode
