"""Samples and plots in the source data's geometry: an oblique, anisotropic RAS dataset whose coarse axis is not
the file's last (so nnU-Net transposes it), padded by the plan; samples cropped back to the data (or not, with
--no-crop), 2D samples as a slice of the source; training plots in radiological orientation, readable, titled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.data.geometry import Geometry, case_geometry, radiological_view, resample, training_geometry
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.nnunet.synthetic import make_synthetic_dataset

OBLIQUE = 231  # 3D MRI, 0.9 x 3.5 x 0.8 mm (coarse NIfTI y: nnU-Net moves it first), rotated 20 degrees, RAS
SHAPE, SPACING = (40, 12, 36), (0.9, 3.5, 0.8)
_c, _s = np.cos(np.radians(20)), np.sin(np.radians(20))
ROTATION = [[1, 0, 0], [0, _c, -_s], [0, _s, _c]]  # about the RAS x axis
ORIGIN = (-21.5, 34.0, 12.25)


@pytest.fixture(scope="module")
def oblique(nnunet_roots):
    from medimgen.planning import plan_dataset
    from medimgen.nnunet.plans import DatasetPlans

    make_synthetic_dataset(nnunet_roots["nnUNet_raw"], OBLIQUE, "Oblique", num_cases=4, shape=SHAPE, spacing=SPACING,
                           seed=3, rotation=ROTATION, origin=ORIGIN, overwrite=True)
    plan_and_preprocess(OBLIQUE, quiet=True)
    return {"plans": DatasetPlans.from_id(OBLIQUE), "config": plan_dataset(OBLIQUE, force=True).config}


def _sampler(oblique, dim):
    """An untrained tiny DDPM (what it draws does not matter here) with the geometry training would record."""
    from medimgen.config import apply_overrides
    from medimgen.runs.folders import _networks
    from medimgen.generation.sampler import Sampler
    from tests.training_helpers import tiny_overrides

    cfg = oblique["config"].get(dim)
    cfg = apply_overrides(cfg, tiny_overrides(cfg))
    geometry = case_geometry(oblique["plans"], dim, "case_000", cfg.data.spacing)
    unet, _ = _networks("ddpm", cfg)
    return Sampler("ddpm", cfg, unet.eval(), None, None, geometry, oblique["plans"].name, "test")


def _source(nnunet_roots) -> sitk.Image:
    return sitk.ReadImage(str(nnunet_roots["nnUNet_raw"] / "Dataset231_Oblique" / "imagesTr" / "case_000_0000.nii.gz"))


def _run_sample(monkeypatch, sampler, dim, out, *flags):
    import medimgen.generation.sampler

    monkeypatch.setattr(medimgen.generation.sampler, "resolve_sampler", lambda *a, **k: sampler)
    r = CliRunner().invoke(main, ["sample", str(OBLIQUE), dim, "1", str(out), "--steps", "1", *flags])
    assert r.exit_code == 0, r.output
    return sitk.ReadImage(str(out / "sample_0000.nii.gz"))


def test_plan_records_the_data_size_that_image_size_pads(oblique):
    for dim, cfg in oblique["config"].configs.items():
        data = cfg.data
        assert tuple(data.data_size) == tuple(data.median_image_size), dim
        assert all(d <= s for d, s in zip(data.data_size, data.image_size)), dim
    assert oblique["config"].get("3d").data.data_size != oblique["config"].get("3d").data.image_size  # padded


def test_3d_sample_cropped_to_the_source_geometry_and_no_crop_keeps_image_size(oblique, nnunet_roots, monkeypatch,
                                                                               tmp_path):
    sampler = _sampler(oblique, "3d")
    src = _source(nnunet_roots)
    cropped = _run_sample(monkeypatch, sampler, "3d", tmp_path / "crop")
    # the source case has the median shape and nnU-Net's spacing: the cropped sample lies exactly on its grid
    assert cropped.GetSize() == src.GetSize() == SHAPE
    np.testing.assert_allclose(cropped.GetSpacing(), src.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(cropped.GetDirection(), src.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(cropped.GetOrigin(), src.GetOrigin(), atol=1e-4)
    assert json.loads((tmp_path / "crop" / "sample_0000.json").read_text())["cropped_to_data_size"] is True

    full = _run_sample(monkeypatch, sampler, "3d", tmp_path / "full", "--no-crop")
    tb = sampler.geometry.transpose_backward
    image_size, data_size = sampler.cfg.data.image_size, sampler.cfg.data.data_size
    assert full.GetSize() == tuple(image_size[i] for i in tb)[::-1]
    start = [(s - d + 1) // 2 for s, d in zip(image_size, data_size)]  # the loader's centring
    start_xyz = [start[i] for i in tb][::-1]
    # the origin moved by the crop offset: the data's first voxel is where the source's is
    np.testing.assert_allclose(full.TransformIndexToPhysicalPoint(start_xyz), src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(full.GetDirection(), src.GetDirection(), atol=1e-6)
    a, b = sitk.GetArrayFromImage(full), sitk.GetArrayFromImage(cropped)
    z, y, x = start_xyz[::-1]
    np.testing.assert_allclose(a[z:z + b.shape[0], y:y + b.shape[1], x:x + b.shape[2]], b, rtol=1e-5, atol=1e-3)


def test_2d_sample_of_3d_data_is_a_slice_of_the_source(oblique, nnunet_roots, monkeypatch, tmp_path):
    sampler = _sampler(oblique, "2d")
    src = _source(nnunet_roots)
    img = _run_sample(monkeypatch, sampler, "2d", tmp_path / "crop")
    # nnU-Net's 2d slices along the coarse axis (NIfTI y here): one slice of it, on the source's grid
    assert img.GetDimension() == 3 and img.GetSize() == (SHAPE[0], 1, SHAPE[2])
    np.testing.assert_allclose(img.GetDirection(), src.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(img.GetSpacing(), src.GetSpacing(), rtol=1e-5)
    for index in [(0, 0, 0), (SHAPE[0] - 1, 0, SHAPE[2] - 1), (7, 0, 30)]:
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(index), src.TransformIndexToPhysicalPoint(index),
                                   atol=1e-4)
    full = _run_sample(monkeypatch, sampler, "2d", tmp_path / "full", "--no-crop")
    assert full.GetSize() == (sampler.cfg.data.image_size[1], 1, sampler.cfg.data.image_size[0])


def test_training_geometry_origin_is_that_of_nnunets_cropped_region():
    direction = tuple(np.asarray(ROTATION, float).ravel())
    props = {"sitk_stuff": {"direction": direction, "origin": (1.0, 2.0, 3.0)},
             "spacing": [2.0, 1.0, 0.5],  # file (z, y, x) order
             "bbox_used_for_cropping": [[4, 20], [3, 30], [5, 40]]}  # transposed order (transpose_forward [1, 0, 2])
    g = training_geometry({"transpose_backward": [1, 0, 2]}, (1.0, 2.0, 0.5), props)
    lower_xyz = np.array([5 * 0.5, 4 * 1.0, 3 * 2.0])  # file axes (z, y, x) = transposed (1, 0, 2), reversed
    np.testing.assert_allclose(g.origin, np.array([1.0, 2.0, 3.0]) + np.asarray(ROTATION) @ lower_xyz)


@pytest.mark.parametrize("dim", ["3d", "2d"])
def test_plots_radiological_readable_several_titled(dim, tmp_path):
    """A bright block at the patient's left-anterior-superior corner shows at the image's top right."""
    from PIL import Image

    from medimgen.training.outputs import PLOT_EXAMPLES, save_images

    # RAS NIfTI read by SimpleITK: LPS direction diag(-1, -1, 1); array (z, y, x): x runs to the patient's right
    geometry = Geometry((3.0, 0.8, 0.8), (0, 1, 2), (3.0, 0.8, 0.8), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), (0.0, 0.0, 0.0))
    assert radiological_view(geometry, (1, 2)) == (False, True, True)
    shape = (6, 20, 24) if dim == "3d" else (20, 24)
    image = -torch.ones((1, *shape))
    image[..., -5:, :6] = 1.0  # high y index: anterior; low x index: the patient's left (x runs to the right)
    stem = tmp_path / "plots" / "epoch_0003"
    stem.parent.mkdir()
    path = save_images([image] * PLOT_EXAMPLES, stem, title="DDPM samples | epoch 3", geometry=geometry,
                       spacing=(0.8, 0.8))
    assert path.name == f"epoch_0003.{'gif' if dim == '3d' else 'png'}"
    frame = np.asarray(Image.open(path).convert("L"))
    scale = -(-256 // 20)
    h, w = 20 * scale, 24 * scale
    assert h >= 256 and frame.shape[1] >= PLOT_EXAMPLES * w  # several images, each >= 256 px on its short side
    top = frame.shape[0] - h  # the images fill the bottom; the title sits above them
    assert top >= 20 and frame[:top].max() > 0  # a title was drawn
    tile = frame[top:, :w]
    assert tile[: h // 4, -w // 4:].mean() > 200 and tile[-h // 4:, : w // 4].mean() < 50  # left-anterior at top right


def test_data_size_validated_and_old_configs_load_without_it():
    from pathlib import Path

    from medimgen.config import apply_overrides
    from medimgen.config.io import load_config
    from medimgen.core.errors import MedimgenError
    from medimgen.generation.sampler import data_crop

    old = load_config(Path(__file__).parent / "data" / "Dataset501_config_8GB.yaml")  # planned before data_size
    assert old.get("3d").data.data_size == () and data_crop(old.get("3d")) is None  # no crop, no crash
    with pytest.raises(MedimgenError, match=r"'3d\.data\.data_size': must be a list of 3 values"):
        apply_overrides(old, ["3d.data.data_size=[10,20]"])
    with pytest.raises(MedimgenError, match=r"'3d\.data\.data_size': must be a list of values >= 1"):
        apply_overrides(old, ["3d.data.data_size=[0,20,20]"])
    cfg = apply_overrides(old, ["3d.data.data_size=[95,100,111]"]).get("3d")  # image_size [96, 128, 112]
    assert [(b.start, b.stop) for b in data_crop(cfg)] == [(1, 96), (14, 114), (1, 112)]  # ceil(padding / 2) first


@pytest.mark.parametrize("nd", [2, 3])
def test_resample_as_nnunet_2d_and_3d(nd):
    """Images and label maps of either dimension to a new spacing: the shape of spacing x size, labels kept."""
    rng = np.random.default_rng(0)
    size, current, target = (12, 10, 8)[:nd], (1.0, 0.5, 2.0)[:nd], (0.5, 1.0, 2.0)[:nd]
    image = rng.normal(size=(2, *size)).astype(np.float32)
    seg = np.zeros((1, *size), np.int16)
    seg[(0, *[slice(2, 6)] * nd)] = 3
    out = resample(image, current, target)
    expected = tuple(int(round(n * c / t)) for n, c, t in zip(size, current, target))
    assert out.shape == (2, *expected)
    labels = resample(seg, current, target, is_seg=True)
    assert labels.shape == (1, *expected) and set(np.unique(labels)) == {0, 3}
    assert resample(seg, current, current, is_seg=True).tolist() == seg.tolist()
