"""`medimgen import`: image-only folders become nnU-Net datasets that nnU-Net and `medimgen plan` accept."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.nnunet.importer import foreground_mask, import_dataset
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.nnunet.synthetic import make_synthetic_dataset


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
    # the generated masks are marked, so the planner plans an image-only model
    from medimgen.config.io import load_config
    from medimgen.models.labels import GENERATED_MASK_KEY

    assert json.loads((out / "dataset.json").read_text())[GENERATED_MASK_KEY] is True
    cfg = load_config(empty_env["nnUNet_preprocessed"] / "Dataset031_NoLabels" / "medimgen_config.yaml")
    assert not any(c.data.generate_labels for c in cfg.configs.values())


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
    assert list(empty_env["nnUNet_raw"].iterdir()) == []  # no dataset, no temporary folder


def test_import_refuses_existing(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=2)
    import_dataset(src, empty_env["nnUNet_raw"], 35, "Twice")
    with pytest.raises(Exception, match="already exists"):
        import_dataset(src, empty_env["nnUNet_raw"], 35, "Twice")


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _import(src, dataset_id, name, *extra):
    return CliRunner().invoke(main, ["import", str(src), "-d", str(dataset_id), "--name", name, *extra])


def test_numbered_files_are_cases_not_channels(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=5)
    for i, p in enumerate(sorted(src.iterdir())):
        p.rename(src / f"sub_{i + 1:04d}.nii.gz")  # sub_0001 ... sub_0005: scans, not channels of case 'sub'
    r = _import(src, 36, "Numbered")
    assert r.exit_code == 0, r.output
    assert "5 files -> 5 cases, 1 channel each" in r.output
    out = empty_env["nnUNet_raw"] / "Dataset036_Numbered"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"sub_{i:04d}_0000.nii.gz" for i in range(1, 6)]
    assert len(list((out / "labelsTr").iterdir())) == 5


def test_numbered_from_zero_in_one_prefix_are_cases(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=3)
    for i, p in enumerate(sorted(src.iterdir())):
        p.rename(src / f"scan_{i:04d}.nii.gz")  # one prefix, 0000..0002: one 3-channel case would be no dataset
    r = _import(src, 37, "FromZero")
    assert r.exit_code == 0, r.output
    assert "3 files -> 3 cases, 1 channel each" in r.output


def test_nnunet_channel_naming_is_grouped(empty_env, tmp_path):
    made = make_synthetic_dataset(tmp_path / "raw", 1, "Two", num_cases=5, shape=(32, 32, 12),
                                  spacing=(1.0, 1.0, 2.0), channels=2, seed=3)
    src = made / "imagesTr"
    r = _import(src, 38, "TwoChan")
    assert r.exit_code == 0, r.output
    assert "10 files -> 5 cases x 2 channels (nnU-Net _XXXX naming)" in r.output
    out = empty_env["nnUNet_raw"] / "Dataset038_TwoChan"
    assert len(list((out / "imagesTr").glob("*_0001.nii.gz"))) == 5
    assert len(list((out / "labelsTr").iterdir())) == 5


def test_inconsistent_channel_sets_are_separate_cases(empty_env, tmp_path):
    made = make_synthetic_dataset(tmp_path / "raw", 1, "Two", num_cases=3, shape=(32, 32, 12),
                                  spacing=(1.0, 1.0, 2.0), channels=2, seed=3)
    src = made / "imagesTr"
    (src / "case_002_0001.nii.gz").unlink()  # case_002 has only channel 0000: the names are not a channel layout
    r = _import(src, 39, "Uneven")
    assert r.exit_code == 0, r.output
    assert "5 files -> 5 cases, 1 channel each" in r.output


def test_4d_files_grouping_is_reported(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=3, four_d=True)
    r = _import(src, 40, "FourD")
    assert r.exit_code == 0, r.output
    assert "3 files -> 3 cases x 2 channels (4D files, channels last)" in r.output


def test_2d_image_among_3d_is_named_and_nothing_written(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=3)
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), str(src / "scan9.nii.gz"))
    before = _listing(empty_env["nnUNet_raw"])
    r = _import(src, 41, "Mixed")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "scan9.nii.gz is 2D" in r.output and "3D" in r.output
    assert _listing(empty_env["nnUNet_raw"]) == before


def test_failed_import_leaves_nothing_and_retry_works(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=4)
    good = (src / "scan3.nii.gz").read_bytes()
    (src / "scan3.nii.gz").write_bytes(good[: len(good) // 2])  # header reads, data is truncated: fails mid-import
    r = _import(src, 42, "Retry")
    assert r.exit_code == 2 and "cannot read NIfTI" in r.output and "scan3.nii.gz" in r.output, r.output
    assert list(empty_env["nnUNet_raw"].iterdir()) == []  # neither the dataset nor the temporary folder
    (src / "scan3.nii.gz").write_bytes(good)
    r = _import(src, 42, "Retry")
    assert r.exit_code == 0, r.output
    out = empty_env["nnUNet_raw"] / "Dataset042_Retry"
    assert len(list((out / "imagesTr").iterdir())) == 4 and (out / "dataset.json").is_file()
    assert [p.name for p in empty_env["nnUNet_raw"].iterdir()] == ["Dataset042_Retry"]


def test_failed_overwrite_keeps_the_old_dataset(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=3)
    assert _import(src, 43, "Keep").exit_code == 0
    out = empty_env["nnUNet_raw"] / "Dataset043_Keep"
    before = _listing(out)
    good = (src / "scan2.nii.gz").read_bytes()
    (src / "scan2.nii.gz").write_bytes(good[: len(good) // 2])
    r = _import(src, 43, "Keep", "--overwrite")
    assert r.exit_code == 2 and "scan2.nii.gz" in r.output
    assert _listing(out) == before
    assert [p.name for p in empty_env["nnUNet_raw"].iterdir()] == ["Dataset043_Keep"]


def test_dataset_id_taken_by_another_name(empty_env, tmp_path):
    src = _image_only_folder(tmp_path, n=2)
    assert _import(src, 44, "First").exit_code == 0
    r = _import(src, 44, "Second")
    assert r.exit_code == 2 and "Dataset044_First" in r.output
    assert not (empty_env["nnUNet_raw"] / "Dataset044_Second").exists()
