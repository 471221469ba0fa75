"""Metric references, feature extractors and `medimgen evaluate`.

Pretrained weights cannot be downloaded here: every extractor test below runs on weights files
(or torch.hub repositories, or nnU-Net checkpoints) that THE TEST ITSELF CREATES with random
weights. They exercise loading and feature paths; the distances they produce are not FIDs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from medimgen.core.errors import MedimgenError
from medimgen.evaluation.features import HubFeatures, NnUNetEncoderFeatures, TorchvisionFeatures, build_extractor
from medimgen.evaluation.metrics import frechet_distance, mean_pairwise_ms_ssim, mmd, ms_ssim, reconstruction_metrics


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
    torch.manual_seed(0)
    x = (0.5 * torch.rand(shape[1:]) + 0.5 * torch.rand(shape)) * 2 - 1  # a shared half: similar, not equal
    assert torch.allclose(ms_ssim(x, x), torch.ones(shape[0]), atol=1e-4)
    assert float(ms_ssim(x, (x + 0.5 * torch.randn(shape)).clamp(-1, 1)).mean()) < 0.95
    assert 0 < mean_pairwise_ms_ssim(x) < 1
    assert mean_pairwise_ms_ssim(x[:1].repeat(3, *[1] * (len(shape) - 1))) == pytest.approx(1.0, abs=1e-4)


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


def _reference_mmd_rbf(a: np.ndarray, b: np.ndarray, h: float) -> float:
    """Textbook unbiased MMD^2 with explicit loops."""
    def k(x, y):
        return np.exp(-np.sum((x - y) ** 2) / h)

    n, m = len(a), len(b)
    saa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return saa + sbb - 2 * sab


def test_mmd_matches_reference_and_grows_with_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 5)), rng.normal(loc=0.7, size=(25, 5))
    assert mmd(torch.from_numpy(a), torch.from_numpy(b), bandwidth=4.0) == pytest.approx(_reference_mmd_rbf(a, b, 4.0), rel=1e-9)
    real = torch.from_numpy(rng.normal(size=(200, 6)))
    same = torch.from_numpy(rng.normal(size=(200, 6)))
    values = [mmd(real, same + s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 0.02
    assert values == sorted(values) and values[-1] > 10 * max(abs(values[0]), 1e-3)
    assert mmd(real, same, kernel="poly") < mmd(real, same + 1.0, kernel="poly")
    with pytest.raises(ValueError, match="kernel"):
        mmd(real, same, kernel="linear")


@pytest.mark.parametrize("shape", [(3, 1, 32, 32), (2, 2, 12, 24, 24)])
def test_reconstruction_metrics(shape):
    x = torch.rand(shape) * 2 - 1
    same = reconstruction_metrics(x, x)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4) and same["ms_ssim"] == pytest.approx(1.0, abs=1e-4)
    assert same["l1"] == 0.0 and same["psnr"] > 80
    noisy = reconstruction_metrics((x + 0.2 * torch.randn(shape)).clamp(-1, 1), x)
    noisier = reconstruction_metrics((x + 0.6 * torch.randn(shape)).clamp(-1, 1), x)
    assert noisier["psnr"] < noisy["psnr"] < 80 and noisier["ssim"] < noisy["ssim"] < 1
    assert noisy["l1"] < noisier["l1"]


_HUBCONF = """
# A stand-in for MONAI's Project-MONAI/perceptual-models hub repository, WRITTEN BY A TEST:
# same entry-point names, tiny networks, random weights loaded from a file the test created.
import os
import torch
from torch import nn

HERE = os.path.dirname(__file__)


def _load(net, name):
    net.load_state_dict(torch.load(os.path.join(HERE, name), weights_only=True))
    return net


def radimagenet_resnet50():
    return _load(nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 5, 3)), "radimagenet.pt")


def medicalnet_resnet10_23datasets():
    return _load(nn.Sequential(nn.Conv3d(1, 4, 3, stride=2), nn.ReLU(), nn.Conv3d(4, 7, 3)), "medicalnet.pt")
"""


def _stand_in_hub(folder):
    """A hub folder whose networks have random weights made here (not RadImageNet/MedicalNet weights)."""
    from torch import nn

    folder.mkdir(parents=True)
    (folder / "hubconf.py").write_text(_HUBCONF)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 5, 3)).state_dict(), folder / "radimagenet.pt")
    torch.save(nn.Sequential(nn.Conv3d(1, 4, 3, stride=2), nn.ReLU(), nn.Conv3d(4, 7, 3)).state_dict(), folder / "medicalnet.pt")
    return folder


def test_hub_extractors_load_from_the_torch_hub_cache_only(tmp_path, monkeypatch):
    """RadImageNet / MedicalNet are looked up in $TORCH_HOME/hub; the repository there is a stand-in made by this test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MedimgenError, match="Project-MONAI_perceptual-models_main"):
        build_extractor("radimagenet_resnet50", spatial_dims=2)
    _stand_in_hub(tmp_path / "hub" / "Project-MONAI_perceptual-models_main")
    rad = build_extractor("radimagenet_resnet50", spatial_dims=2)
    assert isinstance(rad, HubFeatures) and rad.name == "radimagenet_resnet50:Project-MONAI_perceptual-models_main"
    assert rad(torch.rand(3, 2, 32, 32) * 2 - 1).shape == (3, 5)  # two channels, features averaged
    assert rad(torch.rand(2, 1, 16, 32, 32) * 2 - 1).shape == (2, 5)  # 2.5D on volumes
    med = build_extractor("medicalnet_resnet10_23datasets", spatial_dims=3)
    assert med(torch.rand(2, 1, 16, 16, 16)).shape == (2, 7)
    with pytest.raises(MedimgenError, match="3D"):
        med(torch.rand(2, 1, 16, 16))
    # without an nnU-Net model, 'auto' picks the medical networks available on disk
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_results"))
    assert build_extractor("auto", dataset="Dataset999_X", spatial_dims=2).key == "radimagenet_resnet50"
    assert build_extractor("auto", dataset="Dataset999_X", spatial_dims=3).key == "medicalnet_resnet10_23datasets"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert build_extractor("auto", dataset="Dataset999_X", spatial_dims=3) is None
    with pytest.raises(MedimgenError, match="unknown feature extractor 'nonsense'"):
        build_extractor("nonsense")


def test_auto_extractor_prefers_the_datasets_nnunet(nnunet_env, tmp_path, monkeypatch):
    """The nnU-Net model is a random-weight stand-in written by tests/nnunet_helpers.py."""
    from tests.nnunet_helpers import make_nnunet_model

    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    with pytest.raises(MedimgenError, match="no trained nnU-Net"):
        build_extractor("nnunet", dataset="Dataset202_Flat", spatial_dims=2)
    make_nnunet_model(results, nnunet_env["nnUNet_preprocessed"] / "Dataset202_Flat", "2d")
    ext = build_extractor("auto", dataset="Dataset202_Flat", spatial_dims=2)
    assert ext.name == "nnunet-encoder:nnUNetTrainer__nnUNetPlans__2d/fold_0"
    assert ext(torch.rand(2, 1, 64, 64) * 2 - 1).ndim == 2


def _evaluation_runs(parent_run_id):
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.parametrize("dim", ["3d", "2d"])
def test_evaluate_ldm_writes_json_and_a_linked_mlflow_run(dim, request, nnunet_env, tmp_path):
    """Features from a random-weight nnU-Net stand-in made here: the numbers test the plumbing only."""
    from click.testing import CliRunner

    from medimgen.cli import main
    from tests.nnunet_helpers import make_nnunet_model

    runs = request.getfixturevalue(f"flow_{dim}")
    model_dir = make_nnunet_model(tmp_path, nnunet_env["nnUNet_preprocessed"] / "Dataset201_Aniso",
                                  "3d_fullres" if dim == "3d" else "2d")
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(main, ["evaluate", "201", "--model", str(runs["ldm"].run_dir), "-t", dim, "-k", "3",
                                    "--real", "train", "--steps", "2", "--extractor", f"nnunet:{model_dir}", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["kind"] == "ldm" and report["dim"] == dim and report["num_generated"] == 3
    assert report["feature_extractor"] == f"nnunet-encoder:{model_dir.name}/fold_0"
    scores = report["scores"]
    assert {"fid.nnunet_encoder", "mmd.nnunet_encoder", "ms_ssim_generated", "ms_ssim_real", "ms_ssim_gap"} <= set(scores)
    assert scores["fid.nnunet_encoder"] > 0
    assert scores["ms_ssim_gap"] == pytest.approx(abs(scores["ms_ssim_generated"] - scores["ms_ssim_real"]))
    assert report["real"]["images"] == report["real"]["cases"] * (3 if dim == "2d" else 1)
    assert "fid.nnunet_encoder" in res.output
    children = _evaluation_runs(runs["ldm"].mlflow_run_id)
    assert len(children) >= 1
    row = children.iloc[0]
    assert row["tags.feature_extractor"] == report["feature_extractor"]
    assert row["metrics.fid.nnunet_encoder"] == pytest.approx(scores["fid.nnunet_encoder"])


def test_evaluate_autoencoder_reconstructions(flow_2d, nnunet_env, tmp_path):
    from medimgen.evaluation.api import evaluate
    from medimgen.core.requests import ModelRef

    report = evaluate(ModelRef("autoencoder", 201, "2d"), real="val", extractor="none", output=tmp_path / "ae.json", track=False)
    assert report["kind"] == "autoencoder" and report["feature_extractor"] is None
    s = report["scores"]
    assert 0 < s["psnr"] < 100 and -1 <= s["ssim"] <= 1 and s["l1"] > 0
    assert report["objectives"]["ms_ssim_loss"] == pytest.approx(1 - s["ms_ssim"])
    assert any("LPIPS" in n for n in report["notes"])  # no AlexNet weights here: no LPIPS, said so
    assert "lpips.alex" not in s
    assert json.loads((tmp_path / "ae.json").read_text())["objectives"]["rfid"] is None


def test_evaluate_bad_input(flow_2d, nnunet_env, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from medimgen.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, even on a machine that has the weights

    run = CliRunner().invoke(main, ["evaluate", "201", "--model", "ldm", "-t", "2d", "--extractor", "nonsense"])
    assert run.exit_code == 2 and "unknown feature extractor 'nonsense'" in run.output
    run = CliRunner().invoke(main, ["evaluate", "201", "--model", "ldm", "-t", "2d", "-k", "1", "--steps", "1",
                                    "--real", "train", "--extractor", "resnet18", "--no-mlflow"])
    assert run.exit_code == 2 and "resnet18-f37072fd.pth" in run.output
    run = CliRunner().invoke(main, ["evaluate", "201", "--model", "vae", "-t", "2d"])
    assert run.exit_code == 2 and "--model must be" in run.output


def test_mlflow_run_evaluate_entry_point_logs_into_its_run(flow_2d, nnunet_env, tmp_path):
    """`mlflow run . -e evaluate --env-manager local`: the scores land in the run MLflow created."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{exe}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run([str(exe / "mlflow"), "run", str(repo), "-e", "evaluate", "-P", "dataset=201",
                          "-P", f"model={flow_2d['ldm'].run_dir}", "-P", "model_type=2d", "-P", "num_samples=2",
                          "-P", "real=val", "-P", "extractor=none", "--env-manager", "local",
                          "--experiment-name", "evaluate-mlproject"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("evaluate-mlproject").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["feature_extractor"] == "none"
    assert {"ms_ssim_generated", "ms_ssim_real", "ms_ssim_gap"} <= set(run.data.metrics)
    assert run.data.params["real_subset"] == "val"


def test_autoencoder_lpips_when_alexnet_weights_are_on_disk(flow_2d, nnunet_env, tmp_path, monkeypatch):
    """The AlexNet file here is a RANDOM-weight AlexNet that THIS TEST CREATES in the torch hub cache: it exercises
    the LPIPS path (lpips' own linear heads ship with the lpips package); the value is not a meaningful LPIPS."""
    import torchvision

    from medimgen.evaluation.api import evaluate
    from medimgen.core.requests import ModelRef
    from medimgen.models.perceptual import torchvision_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, _ = torchvision_weights_file("alex")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    report = evaluate(ModelRef("autoencoder", 201, "2d"), real="val", extractor="none", output=tmp_path / "ae.json", track=False)
    assert report["scores"]["lpips.alex"] >= 0
    assert not any("LPIPS" in n for n in report["notes"])


def test_evaluate_single_real_image_says_why_ms_ssim_is_nan(flow_3d, nnunet_env, tmp_path):
    """The 3D test split of the 6-case dataset is one case: no pairs, so MS-SSIM diversity is nan, with a note."""
    from click.testing import CliRunner

    from medimgen.cli import main

    res = CliRunner().invoke(main, ["evaluate", "201", "--model", "ddpm", "-t", "3d", "-k", "2", "--real", "test",
                                    "--steps", "2", "--extractor", "none", "--no-mlflow", "-o", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "ms_ssim_real = nan" in res.output
    assert "note: ms_ssim_real and ms_ssim_gap are nan: MS-SSIM diversity compares pairs, so it needs at least " \
           "2 images (here 1; use --real train or all)" in res.output
    assert "ms_ssim_generated and" not in res.output  # 2 generated images make a pair
