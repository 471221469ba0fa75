"""Data layer on cases really preprocessed by nnU-Net: batches, splits, intensity round trip, errors."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medimgen.config import apply_overrides
from medimgen.data.cases import load_case, open_cases
from medimgen.data.intensity import IntensityMap
from medimgen.data.loader import TrainBatches, validation_batches
from medimgen.data.splits import SPLIT_FILE, get_split
from medimgen.core.errors import MedimgenError
from medimgen.nnunet.plans import DatasetPlans
from tests.conftest import ANISO_3D, FLAT_2D, plan_once


@pytest.fixture(scope="module")
def planned(nnunet_roots):
    return {ANISO_3D: plan_once(ANISO_3D).config, FLAT_2D: plan_once(FLAT_2D).config}


def _setup(planned, dataset, dim, **over):
    plans = DatasetPlans.from_id(dataset)
    cfg = planned[dataset].get(dim)
    if over:
        cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])
    ids = open_cases(plans.preprocessed_folder(dim)).identifiers
    return plans, cfg, ids


@pytest.mark.parametrize("dataset,dim", [(ANISO_3D, "3d"), (ANISO_3D, "2d"), (FLAT_2D, "2d")])
@pytest.mark.parametrize("augmentation", ["none", "mild", "nnunet"])
def test_train_batches_shape_dtype_range(nnunet_env, planned, dataset, dim, augmentation):
    plans, cfg, ids = _setup(planned, dataset, dim, **{"data.augmentation": augmentation})
    batches = TrainBatches(cfg, plans, ids, batch_size=3, num_workers=0, seed=0)
    for _ in range(2):
        b = next(batches)
        image, label = b["image"], b["label"]
        assert image.shape == (3, cfg.data.in_channels, *cfg.data.image_size)
        assert label.shape == (3, 1, *cfg.data.image_size)
        assert image.dtype == torch.float32 and label.dtype == torch.int16
        lo, hi = cfg.data.intensity_range
        assert float(image.min()) >= lo and float(image.max()) <= hi
        assert float(image.std()) > 0.05  # real content, not a constant
        # padded voxels (label -1) hold the background value
        pad = (label < 0).expand_as(image)
        if pad.any():
            assert torch.all(image[pad] == lo)
        assert set(b["keys"]) <= set(ids)
    batches.close()


def test_multichannel_batches(nnunet_env, planned):
    plans, cfg, ids = _setup(planned, ANISO_3D, "3d")
    assert cfg.data.in_channels == 2
    b = next(TrainBatches(cfg, plans, ids, 2, num_workers=0))
    assert b["image"].shape[1] == 2
    # the two synthetic channels have different contrast: not a copy of each other
    assert not torch.allclose(b["image"][:, 0], b["image"][:, 1])


def test_two_workers_deliver(nnunet_env, planned):
    plans, cfg, ids = _setup(planned, FLAT_2D, "2d")
    batches = TrainBatches(cfg, plans, ids, 2, num_workers=2, seed=3)
    try:
        shapes = {tuple(next(batches)["image"].shape) for _ in range(4)}
    finally:
        batches.close()
    assert shapes == {(2, 1, *cfg.data.image_size)}


def test_validation_batches_are_deterministic(nnunet_env, planned):
    plans, cfg, ids = _setup(planned, ANISO_3D, "2d")
    first = list(validation_batches(cfg, plans, ids[:2], 4))
    second = list(validation_batches(cfg, plans, ids[:2], 4))
    assert [b["keys"] for b in first] == [b["keys"] for b in second]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))
    assert sum(len(b["keys"]) for b in first) == 6  # 3 slices per case in 2D


def test_train_val_test_split_stable_and_disjoint(nnunet_env, planned):
    plans, _, ids = _setup(planned, ANISO_3D, "3d")
    path = plans.folder / SPLIT_FILE
    path.unlink(missing_ok=True)
    s1 = get_split(plans.folder, ids, "train-val-test")
    assert path.is_file()
    saved = path.read_text()
    s2 = get_split(plans.folder, ids, "train-val-test")
    assert s1 == s2 and path.read_text() == saved
    assert not (set(s1.train) & set(s1.val)) and not (set(s1.train) & set(s1.test)) and not (set(s1.val) & set(s1.test))
    assert sorted(s1.train + s1.val + s1.test) == sorted(ids)
    assert s1.val and s1.test
    # a saved split is reused as-is, even if someone edited it
    data = json.loads(saved)
    data["train"], data["test"] = data["train"][:-1], data["test"] + data["train"][-1:]
    path.write_text(json.dumps(data))
    assert get_split(plans.folder, ids, "train-val-test").test == data["test"]
    path.unlink()


def test_five_fold_uses_nnunet_splits_final(nnunet_env, planned):
    plans, _, ids = _setup(planned, ANISO_3D, "3d")
    path = plans.folder / "splits_final.json"
    path.unlink(missing_ok=True)
    made = get_split(plans.folder, ids, "5-fold", fold=1)
    # created with nnU-Net's own function and seed
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    expected = generate_crossval_split(list(np.sort(ids)), seed=12345, n_splits=5)
    assert made.train == list(expected[1]["train"]) and made.val == list(expected[1]["val"])
    # an existing splits_final.json (e.g. from nnU-Net training) wins
    custom = [{"train": ids[2:], "val": ids[:2]} for _ in range(5)]
    path.write_text(json.dumps(custom))
    s = get_split(plans.folder, ids, "5-fold", fold=3)
    assert s.val == ids[:2] and s.train == ids[2:] and s.name == "fold_3"
    with pytest.raises(MedimgenError, match="fold 7 does not exist"):
        get_split(plans.folder, ids, "5-fold", fold=7)
    path.unlink()


def test_bad_splitting_name(nnunet_env, planned):
    plans, _, ids = _setup(planned, ANISO_3D, "3d")
    with pytest.raises(MedimgenError, match="SPLITTING must be one of"):
        get_split(plans.folder, ids, "3-fold")


def test_ct_intensity_round_trip_to_hounsfield(nnunet_env, planned):
    """Preprocessed (nnU-Net-normalised) CT -> model range -> HU equals the raw HU clipped as nnU-Net clips."""
    plans, cfg, ids = _setup(planned, FLAT_2D, "2d")
    imap = IntensityMap.from_config(cfg.data)
    fg = plans.foreground_intensity_properties[0]
    ds = open_cases(plans.preprocessed_folder("2d"))
    for ident in ids[:3]:
        data, _, props = load_case(ds, ident)
        model = imap.to_model(torch.from_numpy(data), clip=False)
        assert float(model.min()) >= -1 - 1e-4 and float(model.max()) <= 1 + 1e-4  # CT bounds are exact
        hu = imap.to_original(model).numpy()
        raw = nib.load(str(nnunet_env["nnUNet_raw"] / "Dataset202_Flat" / "imagesTr" / f"{ident}_0000.nii.gz")).get_fdata()
        raw = raw.T[None]  # nibabel (x, y) -> nnU-Net (1, y, x)
        bbox = props["bbox_used_for_cropping"]
        raw = raw[tuple(slice(a, b) for a, b in bbox)]
        expected = np.clip(raw, fg["percentile_00_5"], fg["percentile_99_5"])
        np.testing.assert_allclose(hu[0], expected, atol=1e-2 * fg["std"], rtol=1e-4)


def test_model_range_round_trip_is_exact(planned):
    cfg = planned[ANISO_3D].get("3d")
    imap = IntensityMap.from_config(cfg.data)
    x = torch.randn(2, 2, 4, 5, 6)
    back = imap.to_normalized(imap.to_model(x, channel_axis=1, clip=False), channel_axis=1)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def _copy_dataset(nnunet_env, tmp_path, monkeypatch):
    """A private copy of the preprocessed 2D CT dataset to damage."""
    pre = tmp_path / "pre"
    shutil.copytree(nnunet_env["nnUNet_preprocessed"] / "Dataset202_Flat", pre / "Dataset202_Flat")
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    return pre / "Dataset202_Flat" / "nnUNetPlans_2d"


def test_missing_case_named(nnunet_env, planned, tmp_path, monkeypatch):
    folder = _copy_dataset(nnunet_env, tmp_path, monkeypatch)
    (folder / "case_004.b2nd").unlink()
    plans, cfg, _ = _setup(planned, FLAT_2D, "2d")
    ids = [f"case_{i:03d}" for i in range(6)]
    with pytest.raises(MedimgenError, match="case 'case_004' is missing"):
        TrainBatches(cfg, plans, ids, 2, num_workers=0)


def test_corrupt_case_named(nnunet_env, planned, tmp_path, monkeypatch):
    folder = _copy_dataset(nnunet_env, tmp_path, monkeypatch)
    (folder / "case_002.b2nd").write_bytes(b"this is not blosc2")
    plans, cfg, _ = _setup(planned, FLAT_2D, "2d")
    with pytest.raises(MedimgenError, match="case 'case_002' .* is missing or corrupt"):
        list(validation_batches(cfg, plans, ["case_001", "case_002"], 2))
    batches = TrainBatches(cfg, plans, ["case_002"], 1, num_workers=0)
    with pytest.raises(MedimgenError, match="case 'case_002' .* is missing or corrupt"):
        next(batches)
