"""`medimgen import`: image-only folders become nnU-Net datasets that nnU-Net and `medimgen plan` accept."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.importer import foreground_mask, import_dataset
from medimgen.nnunet import plan_and_preprocess
from medimgen.synthetic import make_synthetic_dataset


def _image_only_folder(tmp_path, n=5, four_d=False):
    """Synthetic phantoms with their labels thrown away (image-only data)."""
    raw = tmp_path / "src_raw"
    made = make_synthetic_dataset(raw, 1, "Src", num_cases=n, shape=(32, 32, 12), spacing=(1.0, 1.0, 2.0),
                                  channels=2 if four_d else 1, seed=5)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        files = sorted((made / "imagesTr").glob(f"case_{i:03d}_*.nii.gz"))
        if four_d:  # MSD style: one 4D file, channels last
            imgs = [nib.load(str(f)) for f in files]
            data = np.stack([im.get_fdata() for im in imgs], axis=-1).astype(np.float32)
            nib.save(nib.Nifti1Image(data, imgs[0].affine), str(folder / f"scan{i}.nii.gz"))
        else:
            shutil.copy(files[0], folder / f"scan{i}.nii.gz")
    return folder


def test_import_image_only_then_nnunet_and_plan(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, four_d=True)
    r = CliRunner().invoke(main, ["import", str(src), "-d", "31", "--name", "NoLabels"])
    assert r.exit_code == 0, r.output
    out = empty_env["nnUNet_raw"] / "Dataset031_NoLabels"
    assert len(list((out / "imagesTr").glob("*_0001.nii.gz"))) == 5  # 4D split into 2 channels
    labels = sorted((out / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 5
    for p in labels:
        m = nib.load(str(p)).get_fdata()
        assert 0.05 < m.mean() < 0.95 and set(np.unique(m)) <= {0, 1}
    plan_and_preprocess(31, quiet=True)
    r = CliRunner().invoke(main, ["plan", "-d", "31"])
    assert r.exit_code == 0, r.output
    assert (empty_env["nnUNet_preprocessed"] / "Dataset031_NoLabels" / "medimgen_config.yaml").is_file()


def test_foreground_mask_finds_body():
    img = np.zeros((40, 40, 10), np.float32)
    img[10:30, 8:32, 2:8] = 100
    img[18:22, 18:22, 4:6] = 0  # a dark hole inside the body is filled
    img += np.random.default_rng(0).normal(0, 3, img.shape).astype(np.float32)
    mask = foreground_mask(img)
    assert mask[20, 20, 5] and not mask[2, 2, 5]
    assert abs(mask.sum() - 20 * 24 * 6) / (20 * 24 * 6) < 0.25


def test_import_corrupt_nifti_named(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=3)
    bad = src / "scan1.nii.gz"
    bad.write_bytes(gzip.compress(b"garbage")[:20])
    with pytest.raises(Exception, match="cannot read NIfTI .*scan1.nii.gz"):
        import_dataset(src, empty_env["nnUNet_raw"], 32, "Bad")
    r = CliRunner().invoke(main, ["import", str(src), "-d", "33", "--name", "Bad"])
    assert r.exit_code == 2 and r.output.startswith("Error: cannot read NIfTI") and len(r.output.strip().splitlines()) == 1


def test_import_all_empty_labels_refused(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=3)
    lab = tmp_path / "labels"
    lab.mkdir()
    for p in src.iterdir():
        img = nib.load(str(p))
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(lab / p.name))
    with pytest.raises(Exception, match="every label .* is empty"):
        import_dataset(src, empty_env["nnUNet_raw"], 34, "Empty", labels=lab)
    assert not (empty_env["nnUNet_raw"] / "Dataset034_Empty").exists()


def test_import_refuses_existing(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=2)
    import_dataset(src, empty_env["nnUNet_raw"], 35, "Twice")
    with pytest.raises(Exception, match="already exists"):
        import_dataset(src, empty_env["nnUNet_raw"], 35, "Twice")
