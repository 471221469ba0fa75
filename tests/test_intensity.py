"""Samples in the dataset's units: raw -> nnU-Net preprocessed -> model range -> medimgen's inverse -> raw.

On cases really preprocessed by nnU-Net: z-score MRI over all voxels (201, use_mask_for_norm false),
z-score MRI over the nonzero mask (204, made here with a zero background so that nnU-Net plans
use_mask_for_norm true) and CT (202). The model range is reached with the training loader's own
mapping (medimgen.data.loader.ToModelRange), so voxels outside nnU-Net's nonzero mask get the lower
bound exactly as in training.

Stated tolerances:
- a case mapped back with its own statistics: exact up to float32 (1e-4 of its std);
- any case mapped back with the planned (representative) statistics: per voxel, the error is the
  difference between the case's and the representative statistics, |z| * |std_rep - std_case| +
  |mean_rep - mean_case| (+1e-4 of its std); on these phantoms the mean absolute error of a case is
  below 0.1 of the dataset's std (measured: 0.001-0.07; the fingerprint's mean/std used before: 1.1-3.2);
- background (outside nnU-Net's nonzero mask): exactly the raw value 0;
- CT: exact (1e-4 of the std, float32) everywhere, nnU-Net's clip to [p0.5, p99.5] aside;
- voxels outside [intensity_low, intensity_high] (the model range clips them in training, <= 1 %)
  come back at the range's ends.
"""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medimgen.config.io import from_dict, to_dict
from medimgen.config.schema import GenerationConfig
from medimgen.data.cases import load_case, open_cases
from medimgen.data.intensity import IntensityMap
from medimgen.data.loader import ToModelRange
from medimgen.planning.intensity_stats import case_statistics, raw_case_files
from medimgen.nnunet.plans import DatasetPlans
from tests.conftest import ANISO_3D, FLAT_2D, plan_once

MASKED_2D = 204  # 2D z-score MRI with a zero background: nnU-Net normalises over the nonzero mask
EXACT = 1e-4  # float32 round trip, relative to the case's std


@pytest.fixture(scope="module")
def masked_dataset(nnunet_roots):
    from medimgen.nnunet.commands import plan_and_preprocess
    from medimgen.nnunet.synthetic import make_synthetic_dataset

    folder = make_synthetic_dataset(nnunet_roots["nnUNet_raw"], MASKED_2D, "Masked", num_cases=5, shape=(48, 48),
                                    spacing=(1.0, 1.0), channels=1, modality="MRI", seed=3, overwrite=True)
    for f in sorted((folder / "imagesTr").glob("*.nii.gz")):  # skull-stripped-like: exact zeros around the body
        img = nib.load(str(f))
        data = img.get_fdata().astype(np.float32)
        data[data < 100] = 0
        nib.save(nib.Nifti1Image(data, img.affine), str(f))
    plan_and_preprocess(MASKED_2D, configurations=("2d",), num_processes=1, quiet=True)
    plans_file = DatasetPlans.from_id(MASKED_2D).plans_file
    plans = json.loads(plans_file.read_text())
    if plans["configurations"]["2d"]["use_mask_for_norm"] != [True]:  # nnU-Net's rule: crop shrank the image >= 25 %
        plans["configurations"]["2d"]["use_mask_for_norm"] = [True]
        plans_file.write_text(json.dumps(plans))
        plan_and_preprocess(MASKED_2D, configurations=("2d",), num_processes=1, quiet=True)
    return MASKED_2D


@pytest.fixture(scope="module")
def planned(nnunet_roots, masked_dataset):
    return {d: plan_once(d).config for d in (ANISO_3D, FLAT_2D, masked_dataset)}


CASES = [(ANISO_3D, "3d", False), (MASKED_2D, "2d", True), (FLAT_2D, "2d", False)]


def _raw_cropped(plans: DatasetPlans, identifier: str, props: dict) -> np.ndarray:
    """The raw case as nnU-Net read it (its reader), transposed and cropped as its preprocessor does."""
    rw = plans.manager.image_reader_writer_class()
    raw, _ = rw.read_images(raw_case_files(plans)[identifier]["images"])
    raw = raw.astype(np.float64).transpose([0, *[i + 1 for i in plans.manager.transpose_forward]])
    return raw[(slice(None), *[slice(a, b) for a, b in props["bbox_used_for_cropping"]])]


def _through_model(imap: IntensityMap, data: np.ndarray, seg: np.ndarray) -> torch.Tensor:
    """nnU-Net-normalised case -> model range, with the training loader's own transform."""
    seg = torch.from_numpy(seg.astype(np.int16))
    out = ToModelRange(imap).apply({"image": torch.from_numpy(data), "segmentation": seg})
    return out["image"]


def _cases(dataset: int, dim: str):
    plans = DatasetPlans.from_id(dataset)
    ds = open_cases(plans.preprocessed_folder(dim))
    for ident in sorted(ds.identifiers):
        data, seg, props = load_case(ds, ident)
        assert tuple(props["shape_after_cropping_and_before_resampling"]) == data.shape[1:]  # no resampling
        yield plans, ident, data, seg, _raw_cropped(plans, ident, props)


@pytest.mark.parametrize("dataset,dim,masked", CASES)
def test_planned_statistics_are_the_ones_nnunet_used(nnunet_env, planned, dataset, dim, masked):
    """Per-case mean/std collected from the raw images == what nnU-Net divided out (regressed from its output)."""
    cfg = planned[dataset].get(dim)
    plans = DatasetPlans.from_id(dataset)
    assert list(plans.configuration(dim).use_mask_for_norm) == [masked] * cfg.data.in_channels
    stats = {s.identifier: s for s in case_statistics(plans, dim)}
    for _, ident, data, seg, raw in _cases(dataset, dim):
        inside = seg[0] >= 0
        for c in range(cfg.data.in_channels):
            used = inside if masked else np.ones_like(inside)
            scale, offset = np.polyfit(data[c][used].astype(np.float64), raw[c][used], 1)
            if cfg.data.normalization_schemes[c] == "CTNormalization":  # nnU-Net clipped: fit the unclipped voxels
                fg = plans.foreground_intensity_properties[c]
                keep = used & (raw[c] > fg["percentile_00_5"]) & (raw[c] < fg["percentile_99_5"])
                scale, offset = np.polyfit(data[c][keep].astype(np.float64), raw[c][keep], 1)
            assert stats[ident].offset[c] == pytest.approx(offset, abs=1e-4 * scale)
            assert stats[ident].scale[c] == pytest.approx(scale, rel=1e-4)
            if masked:
                assert np.all(data[c][~inside] == 0) and np.all(raw[c][~inside] == 0)
        if masked:
            assert stats[ident].outside_mask == int((~inside).sum()) > 0
    # the config's statistics: medians of the per-case ones (CT: the fingerprint's, as nnU-Net uses them)
    for c, scheme in enumerate(cfg.data.normalization_schemes):
        if scheme == "CTNormalization":
            fg = plans.foreground_intensity_properties[c]
            assert cfg.data.intensity_case_mean[c] == fg["mean"] and cfg.data.intensity_case_std[c] == fg["std"]
        else:
            assert cfg.data.intensity_case_mean[c] == pytest.approx(np.median([s.offset[c] for s in stats.values()]))
            assert cfg.data.intensity_case_std[c] == pytest.approx(np.median([s.scale[c] for s in stats.values()]))


@pytest.mark.parametrize("dataset,dim,masked", CASES)
def test_round_trip_to_raw_intensities(nnunet_env, planned, dataset, dim, masked):
    cfg = planned[dataset].get(dim)
    imap = IntensityMap.from_config(cfg.data)
    ct = [s == "CTNormalization" for s in cfg.data.normalization_schemes]
    plans = DatasetPlans.from_id(dataset)
    stats = {s.identifier: s for s in case_statistics(plans, dim)} if not all(ct) else {}
    pooled_std = [np.std(np.concatenate([raw[c].ravel() for *_, raw in _cases(dataset, dim)]))
                  for c in range(cfg.data.in_channels)]
    for _, ident, data, seg, raw in _cases(dataset, dim):
        back = imap.to_original(_through_model(imap, data, seg)).numpy()
        inside = seg[0] >= 0
        for c in range(cfg.data.in_channels):
            # background outside nnU-Net's nonzero mask: exactly the raw value (0)
            np.testing.assert_array_equal(back[c][~inside], raw[c][~inside])
            if ct[c]:  # exact, up to nnU-Net's own clip
                fg = plans.foreground_intensity_properties[c]
                expected = np.clip(raw[c], fg["percentile_00_5"], fg["percentile_99_5"])
                np.testing.assert_allclose(back[c], expected, atol=EXACT * fg["std"], rtol=0)
                continue
            lo, hi = cfg.data.intensity_low[c], cfg.data.intensity_high[c]
            in_range = inside & (data[c] >= lo) & (data[c] <= hi)
            assert in_range.sum() >= 0.95 * inside.sum()  # the model range clips a few % of a case at most
            own_m, own_s = stats[ident].offset[c], stats[ident].scale[c]
            rep_m, rep_s = imap.mean[c], imap.std[c]
            z = data[c][in_range].astype(np.float64)
            err = np.abs(back[c][in_range] - raw[c][in_range])
            bound = np.abs(z) * abs(rep_s - own_s) + abs(rep_m - own_m) + EXACT * own_s
            assert np.all(err <= bound)
            assert err.mean() < 0.1 * pooled_std[c], (ident, c, err.mean() / pooled_std[c])
            assert np.abs(back[c] - raw[c]).mean() < 0.1 * pooled_std[c]  # the whole case, clipped voxels included
            # voxels the model range clipped come back at its ends (or the background, at the lower end)
            clipped = inside & ~in_range
            ends = {float(imap.to_original(np.full((cfg.data.in_channels, 1), v))[c, 0])
                    for v in cfg.data.intensity_range}
            assert all(any(abs(v - e) <= 1e-3 * own_s for e in ends) for v in back[c][clipped])
            # the case whose statistics are the representative ones round-trips tightly
            own = dataclasses.replace(imap, mean=stats[ident].offset, std=stats[ident].scale)
            exact = own.to_original(_through_model(own, data, seg)).numpy()
            np.testing.assert_allclose(exact[c][in_range], raw[c][in_range], atol=EXACT * own_s, rtol=0)
            np.testing.assert_array_equal(exact[c][~inside], raw[c][~inside])


def test_background_value_only_where_nnunet_left_voxels_out(planned):
    masked = planned[MASKED_2D].get("2d").data
    assert masked.intensity_background == (0.0,)
    for dataset, dim in ((ANISO_3D, "3d"), (FLAT_2D, "2d")):  # no voxel outside the mask: the lower bound is linear
        data = planned[dataset].get(dim).data
        assert data.intensity_background == ()


def test_samples_not_clipped_to_percentiles(planned):
    """A sample between the dataset's 0.5/99.5 percentiles' mapping and the model range's bounds comes back as is."""
    from medimgen.generation.sampler import Sampler

    cfg = planned[ANISO_3D].get("3d")
    imap = IntensityMap.from_config(cfg.data)
    fg = DatasetPlans.from_id(ANISO_3D).foreground_intensity_properties
    r0, r1 = cfg.data.intensity_range
    n = cfg.data.in_channels
    model = torch.linspace(r0, r1, 2001)[None, :].repeat(n, 1)  # (C, values): every value of the model range
    back = imap.to_original(model, channel_axis=0).numpy()
    for c in range(n):
        assert np.all(np.diff(back[c]) > 0)  # strictly increasing: no flat (clipped) stretch anywhere
        outside = (back[c] < fg[c]["percentile_00_5"]) | (back[c] > fg[c]["percentile_99_5"])
        assert outside.any()  # the model range reaches beyond the fingerprint's percentiles ...
        linear = cfg.data.intensity_low[c] + (model[c].numpy() - r0) / (r1 - r0) * (
            cfg.data.intensity_high[c] - cfg.data.intensity_low[c])
        np.testing.assert_allclose(back[c][outside], linear[outside] * imap.std[c] + imap.mean[c], rtol=1e-5)
    # ... and the sampler returns those values unchanged (the model's range is its only bound)
    shape = (1, n, *cfg.data.image_size)
    values = torch.linspace(r0, r1, int(np.prod(shape))).reshape(shape)
    sampler = Sampler(kind="ddpm", cfg=cfg, unet=torch.nn.Identity(), autoencoder=None, scale_factor=None,
                      geometry=None, dataset="Dataset201_Aniso")
    sampler.sample_model_range = lambda *a, labels=False, **k: (values, None) if labels else values
    out = sampler.sample(1)
    np.testing.assert_allclose(out, imap.to_original(values, channel_axis=1).numpy(), rtol=1e-6)
    assert out[0, 0].max() > fg[0]["percentile_99_5"] or out[0, 0].min() < fg[0]["percentile_00_5"]


def test_config_without_new_fields_loads_and_uses_fingerprint(planned):
    cfg = planned[ANISO_3D].get("3d")
    data = to_dict(cfg)
    for key in ("intensity_case_mean", "intensity_case_std", "intensity_background"):
        del data["data"][key]
    old = from_dict(GenerationConfig, data)
    assert old.data.intensity_case_mean == () and old.data.intensity_background == ()
    imap = IntensityMap.from_config(old.data)
    assert imap.mean == cfg.data.intensity_mean and imap.std == cfg.data.intensity_std and imap.raw_background == ()
    x = torch.tensor([[-1.0, 0.0, 1.0]] * cfg.data.in_channels)
    expected = imap.normalized_to_original(imap.to_normalized(x))
    torch.testing.assert_close(imap.to_original(x), expected)
