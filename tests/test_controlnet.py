"""Mask-conditioned generation (#16): a MONAI ControlNet on a trained LDM/DDPM, images for given label maps, nnU-Net
export of those pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medimgen.cli import main
from tests.conftest import ANISO_3D, FLAT_2D, plan_once


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def controlnet_2d(flow_2d, workspace):
    """The dataset's 2D ControlNet, trained (tiny, 2 epochs) on the LDM of the session's flow ('auto' base)."""
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    return train("controlnet", ANISO_3D, "train-val-test", "2d", overrides=tiny_overrides(workspace["config"].get("2d")),
                 echo=lambda *_: None)


def test_planned_controlnet_section(workspace):
    """`medimgen plan` plans the ControlNet: its training section, an embedding whose strides bring the image to the
    latent size, and a memory prediction; configs from before it load (the section's defaults)."""
    from medimgen.config.io import from_dict, to_dict
    from medimgen.config.schema import GenerationConfig
    from medimgen.models.networks import conditioning_levels, latent_size, total_stride

    for dim, cfg in workspace["config"].configs.items():
        assert cfg.train_for("controlnet") is cfg.train_controlnet and cfg.train_controlnet.epochs >= 1
        channels, strides = conditioning_levels(cfg)
        size = tuple(s // f for s, f in zip(cfg.data.image_size, total_stride(strides, cfg.data.spatial_dims)))
        assert size == latent_size(cfg) and len(channels) == len(strides) + 1
        assert cfg.derived.predicted_peak_gb["controlnet"] > 0
        assert cfg.controlnet.base == "auto" and cfg.controlnet_base() == "ldm"
    data = to_dict(workspace["config"].get("2d"))  # a section written before the ControlNet existed
    del data["controlnet"], data["train_controlnet"]
    loaded = from_dict(GenerationConfig, data, "2d")
    assert loaded.train_controlnet is None and loaded.train_for("controlnet") == loaded.train_ldm
    assert conditioning_levels(loaded)[1] == tuple(loaded.autoencoder.strides)


def test_controlnet_trains_on_the_ldm_and_is_registered(controlnet_2d, flow_2d, workspace, tmp_path):
    """The ControlNet run refers to its LDM by a relative path, starts from the LDM UNet's weights, keeps the base
    frozen (its checkpoint holds only the ControlNet), and is logged and registered in MLflow like the others."""
    from mlflow import MlflowClient

    from medimgen.runs.folders import TrainedModel

    run = controlnet_2d.run_dir
    assert controlnet_2d.completed and run.parts[-3:] == ("controlnet", "2d", "train-val-test")
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert set(last["modules"]) == {"controlnet"} and last["extra"]["base"] == "ldm"
    assert not Path(last["extra"]["upstream_run"]).is_absolute()
    assert (run / last["extra"]["upstream_run"]).resolve() == flow_2d["ldm"].run_dir.resolve()
    model = TrainedModel.from_run(run)
    assert model.kind == "controlnet" and model.base_kind == "ldm" and model.autoencoder is not None
    assert model.cfg.controlnet.base == "ldm" and model.scale_factor == flow_2d["ldm"].config.derived.latent_scale_factor
    assert (run / "plots" / "epoch_0002.png").is_file()
    # packaged (the MLflow model's artifact) and back: the same networks
    again = TrainedModel.load(model.save(tmp_path / "pkg"))
    assert again.kind == "controlnet" and again.base_kind == "ldm"
    for a, b in ((model.controlnet, again.controlnet), (model.unet, again.unet)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    client = MlflowClient()
    assert client.get_run(controlnet_2d.mlflow_run_id).data.tags["medimgen.model"] == "controlnet"
    assert client.get_registered_model(f"Dataset{ANISO_3D}_Aniso_controlnet_2d").name


def test_controlnet_starts_as_its_base(flow_2d, workspace):
    """MONAI's pattern: the ControlNet copies the base UNet's weights; its zero convolutions make it a no-op at
    first, so the steered UNet predicts exactly what the base predicts."""
    from medimgen.runs.folders import RunDir
    from medimgen.training.controlnet import ControlNetTask

    cfg = workspace["config"].get("2d")
    from medimgen.config import apply_overrides
    from tests.training_helpers import tiny_overrides

    cfg = apply_overrides(cfg, tiny_overrides(cfg))
    task = ControlNetTask(cfg, torch.device("cpu"), RunDir(flow_2d["ddpm"].run_dir), flow_2d["ddpm"].run_dir / "x")
    base = task.base.unet.state_dict()
    shared = [k for k in task.controlnet.state_dict() if k in base]
    assert any(k.startswith("down_blocks") for k in shared)
    for k in shared:
        assert torch.equal(task.controlnet.state_dict()[k], base[k]), k
    assert not any(p.requires_grad for p in task.base.unet.parameters())
    x = torch.randn(2, task.base.unet.in_channels, *cfg.data.image_size)
    t = torch.tensor([10, 500])
    cond = torch.zeros(2, len(cfg.data.label_values) + 1, *cfg.data.image_size)
    cond[:, 1, 10:20, 10:20] = 1
    with torch.no_grad():
        down, mid = task.controlnet(x=x, timesteps=t, controlnet_cond=cond)
        steered = task.base.unet(x, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        torch.testing.assert_close(steered, task.base.unet(x, timesteps=t))


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def test_controlnet_resume_equals_uninterrupted(flow_2d, workspace, tmp_path):
    """Stop after epoch 1, continue with -c: identical to an uninterrupted 2-epoch run (here on the DDPM)."""
    from medimgen.training.api import RunSetup, train
    from tests.training_helpers import tiny_overrides

    sets = tiny_overrides(workspace["config"].get("2d")) + ["train_controlnet.val_plot_interval=5",
                                                              "tracking.log_models=false"]
    base = flow_2d["ddpm"].run_dir
    full = train("controlnet", ANISO_3D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None,
                 setup=RunSetup(run_root=tmp_path / "a", upstream_run=base))
    first = train("controlnet", ANISO_3D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None,
                  stop_after_epoch=1, setup=RunSetup(run_root=tmp_path / "b", upstream_run=base))
    assert not first.completed and _state(first.run_dir)["epoch"] == 1
    resumed = train("controlnet", ANISO_3D, "train-val-test", "2d", resume=True, echo=lambda *_: None,
                    setup=RunSetup(run_root=tmp_path / "b"))
    assert resumed.completed and resumed.config.controlnet.base == "ddpm"
    a, b = _state(full.run_dir), _state(resumed.run_dir)
    for k, v in a["modules"]["controlnet"].items():
        torch.testing.assert_close(b["modules"]["controlnet"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert a["history"]["train_loss"] == pytest.approx(b["history"]["train_loss"], rel=1e-5)
    assert a["history"]["val_loss"] == pytest.approx(b["history"]["val_loss"], rel=1e-5)
    for k, v in a["ema"].items():
        if torch.is_tensor(v) and v.is_floating_point():
            torch.testing.assert_close(b["ema"][k], v, rtol=1e-5, atol=1e-6)
    assert a["history"]["train_loss"][0] != a["history"]["train_loss"][1]


def test_sample_labels_writes_the_maps_it_followed(controlnet_2d, nnunet_env, tmp_path):
    """`sample --labels val` writes image + map pairs; those maps given back as a folder come back voxel for voxel;
    with --augment-labels N each map gives N images, each written with the augmented map it followed."""
    from medimgen.generation import conditioning
    from medimgen.runs.folders import TrainedModel
    from medimgen.generation.sampler import crop_to_data

    out = tmp_path / "val"
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "2d", "2", str(out), "--labels", "val", "--steps", "2"])
    assert r.exit_code == 0, r.output
    labels = sorted(out.glob("sample_*_label.nii.gz"))
    assert len(labels) == 2 and len(list(out.glob("sample_????.json"))) == 2  # 2 channels: sample_NNNN_000C.nii.gz
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["kind"] == "controlnet" and sidecar["label_file"] == "sample_0000_label.nii.gz"
    maps = tmp_path / "maps"
    maps.mkdir()
    for p in labels:
        (maps / p.name.replace("sample_", "case_")).write_bytes(p.read_bytes())
    assert any(len(np.unique(_read(p))) > 1 for p in maps.iterdir())

    again = tmp_path / "again"
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "2d", "5", str(again), "--labels", str(maps),
                                  "--model", "controlnet", "--steps", "2"])
    assert r.exit_code == 0, r.output
    for i, p in enumerate(sorted(maps.iterdir())):
        np.testing.assert_array_equal(_read(again / f"sample_{i:04d}_label.nii.gz"), _read(p))

    aug = tmp_path / "aug"
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "2d", "5", str(aug), "--labels", str(maps),
                                  "--augment-labels", "3", "--steps", "2"])
    assert r.exit_code == 0, r.output
    written = sorted(aug.glob("sample_*_label.nii.gz"))
    assert len(written) == 6 and len(list(aug.glob("sample_????_0001.nii.gz"))) == 6
    model = TrainedModel.from_run(controlnet_2d.run_dir)
    given = conditioning.from_folder(maps, model.cfg, model.geometry.transpose_backward)
    _finer_map_reads_as_the_map(maps, tmp_path / "fine", model)
    expected = conditioning.augment(given, 3, 0, model.cfg)  # the declared augmentation, same seed
    expected = crop_to_data(expected.maps.numpy(), model.cfg)[0][:, 0]
    arrays = [_read(p) for p in written]
    for e, a in zip(expected, arrays):
        np.testing.assert_array_equal(a.reshape(e.shape) if a.size == e.size else a, e)
    j = next(i for i, p in enumerate(sorted(maps.iterdir())) if len(np.unique(_read(p))) > 1)
    assert not all(np.array_equal(arrays[3 * j], a) for a in arrays[3 * j + 1:3 * j + 3])  # augmented copies differ

    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "2d", "1", str(tmp_path / "x"), "--labels",
                                  str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "--labels" in r.output
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "2d", "1", str(tmp_path / "y"), "--labels", "val",
                                  "--model", "ddpm"])
    assert r.exit_code != 0 and "ControlNet" in r.output and "Traceback" not in r.output


def _finer_map_reads_as_the_map(maps: Path, fine: Path, model) -> None:
    """A 2D map at twice the in-plane resolution is resampled (nnU-Net's segmentation resampling) to the map."""
    import SimpleITK as sitk

    from medimgen.generation import conditioning

    fine.mkdir()
    for p in maps.iterdir():
        img = sitk.ReadImage(str(p))
        a = sitk.GetArrayFromImage(img)
        up = sitk.GetImageFromArray(a.repeat(2, axis=-1).repeat(2, axis=-2))
        up.SetSpacing((img.GetSpacing()[0] / 2, img.GetSpacing()[1] / 2, *img.GetSpacing()[2:]))
        up.SetOrigin(img.GetOrigin())
        up.SetDirection(img.GetDirection())
        sitk.WriteImage(up, str(fine / p.name))
    coarse = conditioning.from_folder(maps, model.cfg, model.geometry.transpose_backward).maps
    again = conditioning.from_folder(fine, model.cfg, model.geometry.transpose_backward).maps
    assert again.shape == coarse.shape
    assert (again == coarse).float().mean() > 0.9  # linear per label: edges may move by a voxel


def test_export_with_labels_passes_nnunet(controlnet_2d, nnunet_env):
    """`export-dataset --labels train`: the ControlNet's images with the label maps they follow, a dataset nnU-Net
    plans and preprocesses after verifying its integrity."""
    from medimgen.nnunet.commands import plan_and_preprocess

    r = CliRunner().invoke(main, ["export-dataset", str(ANISO_3D), "2d", "3", "-t", "331", "--labels", "train",
                                  "--steps", "2"])
    assert r.exit_code == 0, r.output
    out = nnunet_env["nnUNet_raw"] / "Dataset331_AnisoSynth"
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 3 and ds["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert "ControlNet" in ds["description"]
    labels = sorted((out / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 3 and any(set(np.unique(_read(p))) == {0, 1, 2} for p in labels)
    plan_and_preprocess(331, configurations=("2d",), quiet=True)  # runs --verify_dataset_integrity
    assert (nnunet_env["nnUNet_preprocessed"] / out.name / "nnUNetPlans.json").is_file()


FOLLOW_EPOCHS = 12
FOLLOW_AGREEMENT = 0.75


def _inside_minus_outside(image: np.ndarray, label: np.ndarray, value: int) -> float | None:
    inside = label == value
    if inside.sum() < 4 or (~inside).sum() < 4:
        return None
    return float(image[inside].mean() - image[~inside].mean())


@pytest.mark.slow
def test_conditioned_samples_follow_the_map(workspace, nnunet_env, tmp_path, monkeypatch):
    """After a short training (a DDPM, then its ControlNet) on the easy 2D CT phantoms (every case has an organ and
    a lesion), the images generated for the training cases' label maps are brighter or darker inside each label
    than outside it, as the real image of that map is, for most (sample, label) pairs; and the map is what makes
    them so: from the same noise, the map moved elsewhere (rolled by half the image) gives images with less of
    that contrast inside the original labels, for most pairs."""
    from medimgen.data.cases import open_cases
    from medimgen.data.loader import validation_samples
    from medimgen.data.splits import get_split
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.core.requests import LabelRequest, ModelRef, SampleOptions
    from medimgen.generation.sampler import conditioned_pairs, resolve_controlnet
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    cfg = plan_once(FLAT_2D).config.get("2d")
    sets = tiny_overrides(cfg, epochs=FOLLOW_EPOCHS) + [
        "tracking.log_models=false", "data.generate_labels=false",
        f"ddpm_unet.attention_levels={str([False] * len(cfg.ddpm_unet.channels)).replace(' ', '').lower()}"]
    for model in ("ddpm", "controlnet"):
        sets += [f"train_{model}.learning_rate=1e-3", f"train_{model}.iterations_per_epoch=8",
                 f"train_{model}.batch_size=4", f"train_{model}.ema_decay=null", f"train_{model}.val_plot_interval=100",
                 f"train_{model}.val_interval={FOLLOW_EPOCHS}"]
    train("ddpm", FLAT_2D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None)
    trained = train("controlnet", FLAT_2D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None)
    assert trained.config.controlnet.base == "ddpm"

    plans = DatasetPlans.planned(FLAT_2D)
    ids = get_split(plans.folder, open_cases(plans.preprocessed_folder("2d")).identifiers, "train-val-test").train
    ref, options = ModelRef("controlnet", FLAT_2D, "2d"), SampleOptions(steps=20)
    sampler = resolve_controlnet(ref)
    images, maps = conditioned_pairs(sampler, LabelRequest("train"), ref, options)
    real = list(validation_samples(sampler.cfg, plans, sorted(ids)))
    assert len(real) == len(maps) >= 4
    moved = torch.roll(torch.from_numpy(maps).long()[:, None], (maps.shape[1] // 2, maps.shape[2] // 2), dims=(2, 3))
    elsewhere = sampler.sample_conditioned(moved, options)
    agree, stronger = [], []
    for image, other, label, r in zip(images, elsewhere, maps, real):
        assert np.array_equal(label, r["label"][0].clamp(min=0).numpy())  # the map of that real image
        for v in sampler.cfg.data.label_values:
            want = _inside_minus_outside(r["image"][0].numpy(), label, v)
            got = _inside_minus_outside(image[0], label, v)
            if want is not None and got is not None and abs(want) > 0.05:
                agree.append(bool(np.sign(want) == np.sign(got)))
                stronger.append(bool(np.sign(want) * (got - _inside_minus_outside(other[0], label, v)) > 0))
    assert len(agree) >= 2 * len(maps) - 1  # organ and lesion in (nearly) every case
    assert np.mean(agree) >= FOLLOW_AGREEMENT, agree
    assert np.mean(stronger) >= FOLLOW_AGREEMENT, stronger


def test_disk_estimate_of_the_controlnet_matches_its_run(controlnet_2d):
    """`plan --explain`'s ControlNet row: best.pt, last.pt and the registered model (the ControlNet with the frozen
    base UNet and autoencoder it samples through) within the disk estimator's tolerance of the trained run."""
    from mlflow import MlflowClient

    from medimgen.planning.disk import TOLERANCE, estimate_disk, explain_disk
    from tests.test_disk import _registered_size

    est = estimate_disk(controlnet_2d.config, "controlnet")
    for name, predicted in (("best.pt", est.best), ("last.pt", est.last)):
        real = (controlnet_2d.run_dir / "checkpoints" / name).stat().st_size
        assert predicted == pytest.approx(real, rel=TOLERANCE), (name, predicted, real)
    real, weights = _registered_size(MlflowClient(), controlnet_2d.mlflow_run_id)
    assert weights == {"controlnet", "unet", "autoencoder"}
    assert est.registered == pytest.approx(real, rel=TOLERANCE), (est.registered, real)
    assert any(line.split()[:1] == ["controlnet"] for line in explain_disk(controlnet_2d.config, "2d").splitlines())
