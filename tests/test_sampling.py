"""Sampling to NIfTI, the MLflow registry, and export as an nnU-Net dataset (models trained by fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.data.intensity import IntensityMap
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.core.requests import ModelRef, SampleOptions
from medimgen.generation.sampler import from_run, sample_to_folder
from tests.conftest import ANISO_3D, FLAT_2D, plan_once


def _raw_reference(nnunet_env, dataset: str):
    return nib.load(str(next((nnunet_env["nnUNet_raw"] / dataset / "imagesTr").glob("*_0000.nii.gz"))))


@pytest.mark.parametrize("dim", ["3d", "2d"])
@pytest.mark.parametrize("kind", ["ldm", "ddpm"])
def test_samples_match_dataset_geometry_and_range(dim, kind, request, nnunet_env, tmp_path):
    runs = request.getfixturevalue(f"flow_{dim}")
    cfg = runs[kind].config
    files = sample_to_folder(tmp_path, 2, ModelRef(kind, ANISO_3D, dim), SampleOptions(steps=2, seed=7))
    assert len(files) == 2 * cfg.data.in_channels  # one file per channel
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["sample_0000.json", "sample_0001.json"]
    ref = _raw_reference(nnunet_env, "Dataset201_Aniso")
    imap = IntensityMap.from_config(cfg.data)
    lo = imap.to_original(np.full((cfg.data.in_channels, 1), -1.0))[:, 0]
    hi = imap.to_original(np.full((cfg.data.in_channels, 1), 1.0))[:, 0]
    for f in files:
        img = nib.load(str(f))
        data = img.get_fdata()
        c = int(f.name.split("_")[-1][:4])
        assert lo[c] - 1e-3 <= data.min() and data.max() <= hi[c] + 1e-3
        assert data.std() > 0
        if dim == "3d":
            # nnU-Net order (z, y, x) written back in the raw files' (x, y, z) order, same spacing and orientation,
            # cropped back to the data size the plan recorded
            assert img.shape == tuple(cfg.data.data_size[::-1])
            assert img.header.get_zooms() == pytest.approx(tuple(cfg.data.spacing[::-1]), rel=1e-5)
            np.testing.assert_allclose(img.affine[:3, :3], ref.affine[:3, :3], atol=1e-5)
        else:  # a one-slice volume in the source's orientation: nnU-Net's 2d slices along z here
            assert img.shape == (*cfg.data.data_size[::-1], 1)
            assert img.header.get_zooms()[:2] == pytest.approx(tuple(cfg.data.spacing[::-1]), rel=1e-5)
            np.testing.assert_allclose(img.affine[:3, :2], ref.affine[:3, :2], atol=1e-5)
    side = json.loads((tmp_path / "sample_0000.json").read_text())
    assert side["kind"] == kind and side["seed"] == 7 and side["scheduler"] == "ddim" and side["steps"] == 2
    assert side["model"].endswith("checkpoints/best.pt")


def test_seed_reproducible_and_no_overwrite(flow_2d, tmp_path):
    sampler = from_run(flow_2d["ldm"].run_dir)
    a = sampler.sample(2, seed=11, steps=2)
    b = sampler.sample(2, seed=11, steps=2)
    c = sampler.sample(2, seed=12, steps=2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    sample_to_folder(tmp_path, 1, ModelRef("ldm", ANISO_3D, "2d"), SampleOptions(steps=2))
    first = (tmp_path / "sample_0000_0001.nii.gz").read_bytes()  # 2 channels: one file each
    sample_to_folder(tmp_path, 1, ModelRef("ldm", ANISO_3D, "2d"), SampleOptions(steps=2, seed=3))
    assert (tmp_path / "sample_0000_0001.nii.gz").read_bytes() == first  # kept
    assert (tmp_path / "sample_0001_0000.nii.gz").is_file() and (tmp_path / "sample_0001.json").is_file()


def test_ddpm_scheduler_and_seed_cli(flow_2d, tmp_path):
    exe = Path(sys.executable).parent / "medimgen_sample"
    out = subprocess.run([str(exe), str(ANISO_3D), "2d", "1", str(tmp_path), "--model", "ddpm", "--scheduler", "ddpm",
                          "-p"], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    side = json.loads((tmp_path / "sample_0000.json").read_text())
    assert side["scheduler"] == "ddpm" and side["steps"] == 1000


def test_resample_to_original_spacing(flow_3d, tmp_path):
    cfg = flow_3d["ddpm"].config
    files = sample_to_folder(tmp_path, 1, ModelRef("ddpm", ANISO_3D, "3d"), SampleOptions(steps=2, resample=True))
    plans = json.loads((flow_3d["ddpm"].run_dir / "nnUNetPlans.json").read_text())
    target = plans["original_median_spacing_after_transp"]
    img = nib.load(str(files[0]))
    assert img.header.get_zooms() == pytest.approx(tuple(target[::-1]), rel=1e-4)
    expected = [round(s * c / t) for s, c, t in zip(cfg.data.data_size, cfg.data.spacing, target)]
    assert img.shape == tuple(expected[::-1])


def test_ct_samples_in_hounsfield_range(nnunet_env, workspace, tmp_path, monkeypatch):
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    cfg = plan_once(FLAT_2D).config.get("2d")
    train("ddpm", FLAT_2D, "train-val-test", "2d", overrides=tiny_overrides(cfg, epochs=1), echo=lambda *_: None)
    files = sample_to_folder(tmp_path / "out", 2, ModelRef("ddpm", FLAT_2D, "2d"), SampleOptions(steps=2))
    fg = DatasetPlans.from_id(FLAT_2D).foreground_intensity_properties[0]
    for f in files:
        hu = nib.load(str(f)).get_fdata()
        assert fg["percentile_00_5"] - 0.5 <= hu.min() and hu.max() <= fg["percentile_99_5"] + 0.5


def test_training_registers_and_alias_sampling_in_fresh_process(flow_2d, workspace, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    name = "Dataset201_Aniso_ldm_2d"
    versions = client.search_model_versions(f"name='{name}'")
    assert versions, "training should have registered the LDM"
    assert any(v.run_id == flow_2d["ldm"].mlflow_run_id for v in versions)
    r = CliRunner().invoke(main, ["register", str(flow_2d["ldm"].run_dir), "--alias", "champion"])
    assert r.exit_code == 0, r.output
    version = client.get_model_version_by_alias(name, "champion")
    assert version.run_id == flow_2d["ldm"].mlflow_run_id
    # a separate process with only the URI
    exe = Path(sys.executable).parent / "medimgen"
    out = subprocess.run([str(exe), "sample", str(ANISO_3D), "2d", "2", str(tmp_path / "reg"), "--model",
                          f"models:/{name}@champion", "--steps", "2", "--seed", "5"],
                         capture_output=True, text=True, env=dict(os.environ), cwd=workspace["base"])
    assert out.returncode == 0, out.stderr[-2000:]
    from_registry = np.stack([nib.load(str(p)).get_fdata() for p in sorted((tmp_path / "reg").glob("*.nii.gz"))])
    sample_to_folder(tmp_path / "local", 2, ModelRef("ldm", ANISO_3D, "2d"), SampleOptions(steps=2, seed=5))
    local = np.stack([nib.load(str(p)).get_fdata() for p in sorted((tmp_path / "local").glob("*.nii.gz"))])
    np.testing.assert_allclose(from_registry, local, rtol=1e-4, atol=1e-3)
    assert json.loads((tmp_path / "reg" / "sample_0000.json").read_text())["model"] == f"models:/{name}@champion"
    # pyfunc predict returns arrays
    code = ("import mlflow,sys; m=mlflow.pyfunc.load_model(sys.argv[1]); "
            "a=m.predict({'num_images': 1, 'seed': 2, 'steps': 2}); print(type(a).__name__, a.shape)")
    out = subprocess.run([sys.executable, "-c", code, f"models:/{name}/{version.version}"], capture_output=True,
                         text=True, env=dict(os.environ), cwd=workspace["base"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ndarray (1, 2,")


@pytest.mark.slow  # exports pass nnU-Net's check in tests/test_labels.py and tests/test_controlnet.py too
def test_export_dataset_passes_nnunet_integrity_check(flow_3d, nnunet_env, tmp_path):
    r = CliRunner().invoke(main, ["export-dataset", str(ANISO_3D), "3d", "3", "-t", "301", "--steps", "2"])
    assert r.exit_code == 0, r.output
    out = nnunet_env["nnUNet_raw"] / "Dataset301_AnisoSynth"
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 3 * 2 and len(list((out / "labelsTr").glob("*"))) == 3
    plan_and_preprocess(301, configurations=("3d_fullres",), quiet=True)  # runs --verify_dataset_integrity
    assert (nnunet_env["nnUNet_preprocessed"] / "Dataset301_AnisoSynth" / "nnUNetPlans.json").is_file()
    r = CliRunner().invoke(main, ["export-dataset", str(ANISO_3D), "3d", "1", "-t", "301"])
    assert r.exit_code == 2 and "is taken" in r.output


def test_failed_export_leaves_nnunet_raw_as_it_was(flow_3d, nnunet_env, monkeypatch):
    """The export is built in a hidden scratch folder and published by one rename: a failure at its last step
    (dataset.json) leaves neither the dataset nor the scratch folder in nnUNet_raw, and the id stays free."""
    import nnunetv2.dataset_conversion.generate_dataset_json as gdj

    raw = nnunet_env["nnUNet_raw"]
    before = sorted(p.name for p in raw.iterdir())

    seen = []

    def broken(*args, **kwargs):  # while it is written, the dataset is invisible to nnU-Net
        seen.extend(sorted(p.name for p in raw.iterdir()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gdj, "generate_dataset_json", broken)
    r = CliRunner().invoke(main, ["export-dataset", str(ANISO_3D), "3d", "1", "-t", "305", "--steps", "2"])
    assert r.exit_code != 0
    assert "Dataset305_AnisoSynth" not in seen and any(n.startswith(".Dataset305_AnisoSynth.") for n in seen)
    assert sorted(p.name for p in raw.iterdir()) == before
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["export-dataset", str(ANISO_3D), "3d", "1", "-t", "305", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in raw.iterdir()) == sorted([*before, "Dataset305_AnisoSynth"])


def test_sample_without_trained_model_is_clear(nnunet_env, tmp_path, monkeypatch):
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "3d", "1", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no trained ldm or ddpm" in r.output
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "3d", "1", str(tmp_path / "o"), "--model", "models:/Nope@x"])
    assert r.exit_code == 2 and "cannot load MLflow model models:/Nope@x" in r.output


def test_moved_results_folder_keeps_the_ldm_working(flow_2d, nnunet_env, tmp_path):
    """An LDM run refers to its autoencoder run by a relative path: a copied results tree samples the same images,
    with the original autoencoder run out of the way."""
    import shutil

    from medimgen.runs.folders import RunDir, read_checkpoint

    ldm = RunDir(flow_2d["ldm"].run_dir)
    dataset_root = ldm.root.parents[2]  # results/DatasetXXX
    moved = tmp_path / "moved" / dataset_root.name
    shutil.copytree(dataset_root, moved)
    assert not Path(read_checkpoint(ldm.last)["extra"]["upstream_run"]).is_absolute()
    ae = dataset_root / "autoencoder"
    hidden = dataset_root / "autoencoder.hidden"
    reference = from_run(ldm.root).sample(1, seed=3, steps=2)
    ae.rename(hidden)
    try:
        with pytest.raises(Exception):
            from_run(ldm.root)  # the original LDM really needs its autoencoder run
        copy = from_run(moved / ldm.root.relative_to(dataset_root)).sample(1, seed=3, steps=2)
    finally:
        hidden.rename(ae)
    np.testing.assert_allclose(copy, reference, rtol=1e-5, atol=1e-5)


def test_export_dataset_honours_checkpoint_amp_and_resample(flow_3d, nnunet_env, tmp_path):
    """`export-dataset --checkpoint last --amp --resample` (these options were once accepted and dropped)."""
    r = CliRunner().invoke(main, ["export-dataset", str(ANISO_3D), "3d", "1", "-t", "302", "--steps", "2",
                                  "--model", "ddpm", "--checkpoint", "last", "--amp", "--resample"])
    assert r.exit_code == 0, r.output
    out = nnunet_env["nnUNet_raw"] / "Dataset302_AnisoSynth"
    sidecar = json.loads((out / "provenance" / "synth_0000.json").read_text())
    assert sidecar["model"].endswith("last.pt") and sidecar["amp_requested"] is True
    assert sidecar["device"] == "cpu" and sidecar["amp"] is False  # what really ran: no mixed precision on a CPU
    assert sidecar["resampled_to_original_spacing"] is True
    target = json.loads((flow_3d["ddpm"].run_dir / "nnUNetPlans.json").read_text())["original_median_spacing_after_transp"]
    image = nib.load(str(out / "imagesTr" / "synth_0000_0000.nii.gz"))
    label = nib.load(str(out / "labelsTr" / "synth_0000.nii.gz"))
    assert image.header.get_zooms() == pytest.approx(tuple(target[::-1]), rel=1e-4)
    assert label.shape == image.shape and np.allclose(label.affine, image.affine)  # labels follow the written image
