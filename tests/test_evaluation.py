"""Metric references and feature extractors (groundwork of `medimgen evaluate`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from medimgen.errors import MedimgenError
from medimgen.evaluation.features import NnUNetEncoderFeatures, TorchvisionFeatures
from medimgen.evaluation.metrics import frechet_distance, mean_pairwise_ms_ssim, ms_ssim


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(loc=0.5, scale=1.3, size=(400, 8)) @ rng.normal(size=(8, 8)) * 0.5
    ours = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(_reference_fd(a, b), rel=1e-4)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_grows_with_noise():
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.normal(size=(300, 6)))
    values = [frechet_distance(real, real + s * torch.from_numpy(rng.normal(size=(300, 6)))) for s in (0.1, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < values[-1]


@pytest.mark.parametrize("shape", [(4, 1, 64, 64), (3, 1, 16, 32, 32)])
def test_ms_ssim_identical_is_one_and_noise_lowers_it(shape):
    x = torch.rand(shape) * 2 - 1
    assert torch.allclose(ms_ssim(x, x), torch.ones(shape[0]), atol=1e-4)
    assert float(ms_ssim(x, (x + 0.5 * torch.randn(shape)).clamp(-1, 1)).mean()) < 0.95
    assert 0 < mean_pairwise_ms_ssim(x) < 1


def test_nnunet_encoder_extractor_loads_nnunet_checkpoint(nnunet_env, tmp_path):
    """A checkpoint in nnU-Net's own format and folder layout, made here with nnU-Net's network builder."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pre = nnunet_env["nnUNet_preprocessed"] / "Dataset201_Aniso"
    folder = tmp_path / "Dataset201_Aniso" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(pre / "nnUNetPlans.json", folder / "plans.json")
    shutil.copy(pre / "dataset.json", folder / "dataset.json")
    pm = PlansManager(str(folder / "plans.json"))
    cm = pm.get_configuration("3d_fullres")
    heads = pm.get_label_manager(json.loads((folder / "dataset.json").read_text())).num_segmentation_heads
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 2, heads, enable_deep_supervision=True)
    torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": "3d_fullres", "fold": 0},
                "trainer_name": "nnUNetTrainer", "current_epoch": 1}, folder / "fold_0" / "checkpoint_final.pth")
    extractor = NnUNetEncoderFeatures(folder, fold=0)
    x = torch.randn(3, 2, *cm.patch_size)
    feats = extractor(x)
    assert feats.shape == (3, cm.network_arch_init_kwargs["features_per_stage"][-1])
    net.eval()
    with torch.no_grad():
        expected = net.encoder(x)[-1].flatten(2).mean(-1)
    torch.testing.assert_close(feats, expected)
    assert extractor.name.startswith("nnunet-encoder:nnUNetTrainer__nnUNetPlans__3d_fullres")
    with pytest.raises(MedimgenError, match="checkpoint_final.pth is missing"):
        NnUNetEncoderFeatures(folder, fold=3)


def test_torchvision_extractor_weights_only_from_disk(tmp_path, monkeypatch):
    """The weights file here is a randomly initialised ResNet-18 that THIS TEST CREATES: it exercises the loading
    path offline; distances on it are not FIDs."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MedimgenError, match="resnet18-f37072fd.pth"):
        TorchvisionFeatures("resnet18")
    path = tmp_path / "stand_in_resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    ext = TorchvisionFeatures("resnet18", weights_path=path)
    assert ext(torch.rand(2, 1, 32, 32) * 2 - 1).shape == (2, 512)
    assert ext(torch.rand(2, 1, 8, 32, 32) * 2 - 1).shape == (2, 512)  # 2.5D: three central planes
    assert ext.name == "resnet18:stand_in_resnet18.pth"
