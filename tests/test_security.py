"""Nothing executes from data: planted pickles are never unpickled, nnU-Net checkpoints load weights-only."""

from __future__ import annotations

import json
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.core.errors import MedimgenError
from medimgen.evaluation.features import NnUNetEncoderFeatures
from medimgen.generation.sampler import Sampler, from_run
from tests.conftest import ANISO_3D, FLAT_2D


class _Planted:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _raw_direction(nnunet_roots) -> np.ndarray:
    raw = next((nnunet_roots["nnUNet_raw"] / "Dataset201_Aniso" / "imagesTr").glob("*_0000.nii.gz"))
    return nib.load(str(raw)).affine[:3, :3]


def _copy_run(run_dir, tmp_path):
    """A copy of a run folder at .../Dataset201_Aniso/<model>/<dim>/<split> (the layout sampling reads)."""
    dst = tmp_path / "results" / "Dataset201_Aniso" / "ddpm" / "3d" / "train-val-test"
    shutil.copytree(run_dir, dst)
    return dst


def test_planted_pickles_are_never_unpickled_by_sampling(flow_3d, nnunet_roots, tmp_path, monkeypatch):
    marker = tmp_path / "pickle_was_executed"
    planted = pickle.dumps(_Planted(marker))
    pickle.loads(planted)  # the payload works ...
    assert marker.is_file()
    marker.unlink()  # ... and from here on must never run
    run = _copy_run(flow_3d["ddpm"].run_dir, tmp_path)
    for name in ("loss_dict.pkl", "geometry.pkl", "checkpoints/best.pkl"):
        (run / name).write_bytes(planted)
    # an nnU-Net preprocessed folder whose case properties are the planted pickle
    plans = json.loads((run / "nnUNetPlans.json").read_text())
    pre = tmp_path / "preprocessed"
    case_folder = pre / plans["dataset_name"] / plans["configurations"]["3d_fullres"]["data_identifier"]
    case_folder.mkdir(parents=True)
    (case_folder / "case_0000.pkl").write_bytes(planted)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    out = tmp_path / "samples"
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "3d", "1", str(out), "--model", str(run), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert not marker.exists()
    image = nib.load(str(next(out.glob("*.nii.gz"))))
    np.testing.assert_allclose(np.sign(image.affine[:3, :3]), np.sign(_raw_direction(nnunet_roots)), atol=0)
    # the copied plans pointing outside nnUNet_preprocessed (an absolute dataset name) at another planted pickle
    elsewhere = tmp_path / "elsewhere" / "cases"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.pkl").write_bytes(planted)
    name = plans["dataset_name"]
    plans["dataset_name"] = str(elsewhere.parent)
    plans["configurations"]["3d_fullres"]["data_identifier"] = "cases"
    (run / "nnUNetPlans.json").write_text(json.dumps(plans))
    with pytest.raises(MedimgenError, match="not a dataset folder name"):  # a path as a name: refused (issue 24)
        from_run(run)  # what `medimgen register RUN_FOLDER` and `sample --model RUN_FOLDER` do
    assert not marker.exists()
    plans["dataset_name"] = name
    (run / "nnUNetPlans.json").write_text(json.dumps(plans))
    sampler = from_run(run)
    model = sampler.save(tmp_path / "model")  # the packaged model (MLflow artifact), with a planted pickle too
    (model / "sampler.pkl").write_bytes(planted)
    assert Sampler.load(model).geometry == sampler.geometry
    assert not marker.exists()


def test_sampling_geometry_comes_from_the_run_folder_alone(flow_3d, nnunet_roots, tmp_path, monkeypatch):
    """No nnU-Net variable set: samples still get the training data's orientation and origin."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    run_dir = flow_3d["ddpm"].run_dir
    out = tmp_path / "samples"
    r = CliRunner().invoke(main, ["sample", str(ANISO_3D), "3d", "1", str(out), "--model", str(run_dir), "--steps", "2"])
    assert r.exit_code == 0, r.output
    image = nib.load(str(next(out.glob("*.nii.gz"))))
    raw = _raw_direction(nnunet_roots)
    assert not np.allclose(np.sign(np.diag(raw)), [-1, -1, 1])  # what SimpleITK's identity direction gives in RAS
    np.testing.assert_allclose(image.affine[:3, :3], raw, atol=1e-5)
    geometry = json.loads((run_dir / "geometry.json").read_text())
    assert image.affine[:3, 3] == pytest.approx(np.array(geometry["origin"]) * [-1, -1, 1])  # LPS -> RAS


def test_nnunet_written_checkpoint_loads_weights_only(nnunet_env, tmp_path, monkeypatch):
    """A checkpoint written by nnU-Net's own trainer (a real, very short run): numpy scalars inside."""
    from medimgen.nnunet.commands import train_nnunet_briefly

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    monkeypatch.setenv("nnUNet_compile", "false")
    folder = train_nnunet_briefly(FLAT_2D, "2d", 0, epochs=1, iterations=1)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)  # not plain tensors: the allow-list matters
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)
    extractor = NnUNetEncoderFeatures(folder, 0)
    expected = torch.load(ckpt, weights_only=False)["network_weights"]  # nnU-Net's own way, on the test's file
    for k, v in extractor.encoder.state_dict().items():
        torch.testing.assert_close(v, expected[f"encoder.{k}"])
    feats = extractor(torch.rand(2, 1, 64, 64) * 2 - 1)
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()


def test_nnunet_checkpoint_with_code_is_refused(nnunet_env, tmp_path):
    from tests.nnunet_helpers import make_nnunet_model

    marker = tmp_path / "pickle_was_executed"
    folder = make_nnunet_model(tmp_path, nnunet_env["nnUNet_preprocessed"] / "Dataset202_Flat", "2d")
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "logging": _Planted(marker)}, ckpt)
    with pytest.raises(MedimgenError, match="cannot read nnU-Net checkpoint .* safely"):
        NnUNetEncoderFeatures(folder, 0)
    assert not marker.exists()
