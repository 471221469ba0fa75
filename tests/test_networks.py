"""MONAI networks with nnU-Net's per-axis strides; activation checkpointing; offline perceptual weights."""

from __future__ import annotations

import pytest
import torch

from medimgen.config.schema import AutoencoderConfig, UNetConfig
from medimgen.core.errors import MedimgenError
from medimgen.models.networks import build_autoencoder, build_unet


def _unet(strides, ckpt=False, dims=3):
    return UNetConfig(channels=(8, 16, 16), strides=strides, attention_levels=(False, False, True),
                      num_res_blocks=1, num_head_channels=8, norm_num_groups=8, activation_checkpointing=ckpt)


@pytest.mark.parametrize("strides,size", [(((1, 2, 2), (2, 2, 2)), (8, 16, 16)), (((2, 2, 2), (2, 2, 2)), (8, 8, 8))])
def test_unet_per_axis_strides(strides, size):
    torch.manual_seed(0)
    unet = build_unet(_unet(strides), 3, 1)
    x = torch.randn(2, 1, *size)
    feats = []
    hook = unet.middle_block.register_forward_hook(lambda m, i, o: feats.append(o.shape))
    out = unet(x, torch.tensor([1, 500]))
    hook.remove()
    assert out.shape == x.shape
    total = [a * b for a, b in zip(*strides)]
    assert tuple(feats[0][2:]) == tuple(s // t for s, t in zip(size, total))


def test_autoencoder_per_axis_strides_2d_and_3d():
    ae3 = build_autoencoder(AutoencoderConfig(channels=(8, 16, 16), strides=((1, 2, 2), (2, 2, 2)), latent_channels=3,
                                              num_res_blocks=1, norm_num_groups=8), 3, 2)
    x = torch.randn(1, 2, 8, 16, 24)
    z = ae3.encode_stage_2_inputs(x)
    assert z.shape == (1, 3, 4, 4, 6)
    assert ae3.decode_stage_2_outputs(z).shape == x.shape
    ae2 = build_autoencoder(AutoencoderConfig(channels=(8, 16), strides=((2, 2),), latent_channels=4,
                                              num_res_blocks=1, norm_num_groups=8), 2, 1)
    assert ae2.encode_stage_2_inputs(torch.randn(1, 1, 16, 16)).shape == (1, 4, 8, 8)


def test_unet_checkpointing_same_result_and_grads():
    torch.manual_seed(0)
    plain = build_unet(_unet(((1, 2, 2), (2, 2, 2))), 3, 1)
    ckpt = build_unet(_unet(((1, 2, 2), (2, 2, 2)), ckpt=True), 3, 1)
    ckpt.load_state_dict(plain.state_dict())  # same keys: checkpointing does not rename parameters
    x, t = torch.randn(1, 1, 8, 16, 16), torch.tensor([10])
    plain(x, t).square().mean().backward()
    ckpt(x, t).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bad_network_configs_are_clear():
    with pytest.raises(MedimgenError, match="norm_num_groups=8 does not divide"):
        build_unet(UNetConfig(channels=(8, 12), strides=((2, 2),), attention_levels=(False, False),
                              norm_num_groups=8), 2, 1)
    with pytest.raises(MedimgenError, match="3 channel levels need 2 strides"):
        build_unet(UNetConfig(channels=(8, 16, 16), strides=((2, 2),), attention_levels=(False,) * 3,
                              norm_num_groups=8), 2, 1)


# --- perceptual loss: pretrained weights are only read from the local cache.
# The weights file used here is a randomly initialised AlexNet that THIS TEST CREATES under a temporary
# TORCH_HOME, to exercise the loading path offline; its values are not a real perceptual (LPIPS) network.

def test_perceptual_missing_weights_names_file(tmp_path, monkeypatch):
    from medimgen.models.perceptual import build_perceptual_loss

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MedimgenError) as e:
        build_perceptual_loss("alex", 2, False, 0.2)
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "losses.perceptual_network=none" in msg and "\n" not in msg
    with pytest.raises(MedimgenError, match="torch.hub repository"):
        build_perceptual_loss("radimagenet_resnet50", 2, False, 0.2)


def test_perceptual_loads_weights_from_cache(tmp_path, monkeypatch):
    import torchvision

    from medimgen.models.perceptual import build_perceptual_loss, torchvision_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = torchvision_weights_file("alex")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)  # test-made stand-in weights
    loss2d = build_perceptual_loss("alex", 2, False, 0.2)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert loss2d(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss2d(x, torch.flip(x, dims=[-1])).item() > 0
    assert all(not p.requires_grad for p in loss2d.parameters())
    # the features really come from the file written above
    feats = [m for m in loss2d.modules() if isinstance(m, torch.nn.Conv2d)][0].weight
    torch.testing.assert_close(feats, torch.load(path)["features.0.weight"])
    loss3d = build_perceptual_loss("alex", 3, True, 0.1)
    y = torch.rand(1, 1, 40, 40, 40)
    assert torch.isfinite(loss3d(y, y.flip(-1)))


def test_autoencoder_checkpointing_same_result_and_grads():
    cfg = dict(channels=(8, 16, 16), strides=((1, 2, 2), (2, 2, 2)), latent_channels=3, num_res_blocks=1,
               norm_num_groups=8)
    torch.manual_seed(0)
    plain = build_autoencoder(AutoencoderConfig(**cfg), 3, 1)
    ckpt = build_autoencoder(AutoencoderConfig(**cfg, activation_checkpointing=True), 3, 1)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 8, 16, 16)
    z_a, _ = plain.encode(x)
    plain.decode(z_a).square().mean().backward()
    z_b, _ = ckpt.encode(x)
    ckpt.decode(z_b).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)
