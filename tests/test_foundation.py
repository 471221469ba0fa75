"""Foundation autoencoder (autoencoder.source=maisi): planning, adoption after a reconstruction check, fallback.

The published MAISI weights cannot be downloaded here. These tests write a weights file with the same architecture
(MONAI's AutoencoderKlMaisi built as medimgen.models.foundation builds it, its random state_dict saved with
torch.save) to the path `medimgen weights download maisi-vae` uses, under a temporary TORCH_HOME: the file is
found, loaded with weights_only=True and adopted exactly as the published one would be. Nothing here measures the
published model's quality (random weights reconstruct nothing: the fallback test relies on that).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from medimgen.core.errors import MedimgenError
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.nnunet.synthetic import make_synthetic_dataset

CT_3D = 281  # one CT channel, 3D (and 2D)
MR_3D = 282  # one MRI channel, 3D

_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results")


@pytest.fixture(scope="module")
def fae(tmp_path_factory):
    """Own nnU-Net folders with the two tiny datasets preprocessed, an MLflow store, and a TORCH_HOME holding a
    weights file of the published architecture (random weights, written here)."""
    from medimgen.models.foundation import build_foundation_autoencoder, weights_path

    base = tmp_path_factory.mktemp("fae")
    mp = pytest.MonkeyPatch()
    roots = {v: base / v for v in _VARS}
    for k, p in roots.items():
        p.mkdir()
        mp.setenv(k, str(p))
    mp.setenv("TORCH_HOME", str(base / "torch"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
    mp.chdir(base)
    make_synthetic_dataset(roots["nnUNet_raw"], CT_3D, "FaeCT", num_cases=4, shape=(16, 16, 16),
                           spacing=(1.0, 1.0, 1.0), modality="CT", seed=3)
    make_synthetic_dataset(roots["nnUNet_raw"], MR_3D, "FaeMR", num_cases=4, shape=(16, 16, 16),
                           spacing=(1.0, 1.0, 1.0), modality="MRI", seed=4)
    plan_and_preprocess(CT_3D, quiet=True)
    plan_and_preprocess(MR_3D, configurations=("3d_fullres",), quiet=True)
    path = weights_path("maisi")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_foundation_autoencoder("maisi").state_dict(), path)
    yield {"roots": roots, "weights": path, "base": base}
    mp.undo()


IMAGE_ONLY = ["data.generate_labels=false"]  # the synthetic datasets have real labels: plan the LDM image-only


def _plan(dataset_id, overrides=IMAGE_ONLY):
    from medimgen.planning import plan_dataset

    return plan_dataset(dataset_id, force=True, overrides=overrides, gpu_memory_gb=80)


def test_plan_picks_the_foundation_autoencoder_for_ct_with_its_intensity_window(fae):
    from medimgen.nnunet.plans import DatasetPlans

    result = _plan(CT_3D)
    c3, c2 = result.config.get("3d"), result.config.get("2d")
    assert c3.autoencoder.source == "maisi" and c3.derived.autoencoder_choice.startswith("maisi (")
    assert c3.autoencoder.channels == (64, 128, 256) and c3.autoencoder.latent_channels == 4
    assert all(s % 4 == 0 for s in c3.data.image_size)
    # the HU window [-1000, 1000] -> [0, 1], exact through nnU-Net's CT normalisation
    fg = DatasetPlans.from_id(CT_3D).foreground_intensity_properties[0]
    assert c3.data.intensity_range == (0.0, 1.0)
    assert c3.data.intensity_low[0] == pytest.approx((-1000 - fg["mean"]) / fg["std"])
    assert c3.data.intensity_high[0] == pytest.approx((1000 - fg["mean"]) / fg["std"])
    assert c3.derived.fallback_autoencoder["channels"] != [64, 128, 256]
    # 2D: the published network is 3D
    assert c2.autoencoder.source == "trained" and "3D network" in c2.derived.autoencoder_choice
    explained = result.explain()
    assert "3d autoencoder: maisi (" in explained and "2d autoencoder: trained (" in explained
    # a joint image+label model keeps a trained autoencoder, saying why
    joint = _plan(CT_3D, overrides=[]).config.get("3d")
    assert joint.autoencoder.source == "trained" and "encodes images only" in joint.derived.autoencoder_choice


def test_ct_window_is_maisis_window_of_the_hu_nnunet_kept_and_maps_back(fae):
    """The values entering the foundation autoencoder are MAISI's window of the raw HU ((HU + 1000) / 2000 in
    [0, 1]) for every voxel nnU-Net's CT clip kept, the clipped ones the window of the clip bound; decoded values
    map back to HU (the window's), and to nnU-Net's space within its clip (what evaluation features read)."""
    import nibabel as nib
    import numpy as np

    from medimgen.data.cases import load_case, open_cases
    from medimgen.data.intensity import IntensityMap
    from medimgen.data.loader import centred_sample
    from medimgen.nnunet.plans import DatasetPlans

    cfg = _plan(CT_3D).config.get("3d")
    assert cfg.autoencoder.source == "maisi" and "nnU-Net clipped this CT" in cfg.derived.autoencoder_choice
    plans = DatasetPlans.from_id(CT_3D)
    fg = plans.foreground_intensity_properties[0]
    p_lo, p_hi = fg["percentile_00_5"], fg["percentile_99_5"]
    imap = IntensityMap.from_config(cfg.data)
    raw = fae["roots"]["nnUNet_raw"] / plans.name / "imagesTr"
    for case in ("case_000", "case_001"):
        hu = np.asarray(nib.load(str(raw / f"{case}_0000.nii.gz")).get_fdata(), dtype=np.float64)
        data, seg, _ = load_case(open_cases(plans.preprocessed_folder("3d"), [case]), case)
        assert sorted(data.shape[1:]) == sorted(hu.shape)  # 1 mm, nothing cropped: the same voxels, reordered
        image, _ = centred_sample(data, seg, data.shape[1:], imap, [])  # as the loader and the latent cache feed it
        entering = np.sort(image.numpy().ravel().astype(np.float64))
        window = np.sort(np.clip((np.clip(hu, p_lo, p_hi) + 1000.0) / 2000.0, 0.0, 1.0).ravel())
        np.testing.assert_allclose(entering, window, atol=1e-5)
        kept = (hu > p_lo) & (hu < p_hi)
        assert kept.sum() > 50  # the comparison covers real HU values, not only clipped ones
        np.testing.assert_allclose(np.sort(np.clip((hu[kept] + 1000.0) / 2000.0, 0, 1)),
                                   entering[(entering > (p_lo + 1000) / 2000 + 1e-6)
                                            & (entering < (p_hi + 1000) / 2000 - 1e-6)], atol=1e-5)
        # round trip: back to the HU nnU-Net kept, and to nnU-Net's own normalised values
        np.testing.assert_allclose(np.sort(imap.to_original(image).numpy().ravel()),
                                   np.sort(np.clip(hu, p_lo, p_hi).ravel()), atol=0.05)
        np.testing.assert_allclose(imap.to_normalized(image).numpy(), data, atol=1e-4)
    # a decoded value anywhere in the window maps back to HU in the window, to nnU-Net's space within its clip
    decoded = torch.tensor([0.0, 0.25, 1.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(imap.to_original(decoded).ravel().numpy(), [-1000.0, -500.0, 1000.0], atol=0.05)
    norm = imap.to_normalized(decoded).ravel().numpy()
    np.testing.assert_allclose(norm[[0, 2]], [(p_lo - fg["mean"]) / fg["std"], (p_hi - fg["mean"]) / fg["std"]],
                               atol=1e-4)


def test_plan_picks_it_for_mr_and_trains_without_weights_or_for_another_modality(fae, monkeypatch, tmp_path):
    from medimgen.nnunet.plans import DatasetPlans

    mr = _plan(MR_3D).config.get("3d")
    assert mr.autoencoder.source == "maisi" and "MR images" in mr.derived.autoencoder_choice
    assert mr.data.intensity_range == (0.0, 1.0) and mr.data.intensity_low[0] < mr.data.intensity_high[0]
    # no weights file: trained, naming the file and the command
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    absent = _plan(MR_3D).config.get("3d")
    assert absent.autoencoder.source == "trained"
    assert "medimgen weights download maisi-vae" in absent.derived.autoencoder_choice
    assert absent.data.intensity_range == (-1.0, 1.0)
    # forced: planned anyway, with the note
    forced = _plan(MR_3D, IMAGE_ONLY + ["autoencoder.source=maisi"]).config.get("3d")
    assert forced.autoencoder.source == "maisi" and "forced" in forced.derived.autoencoder_choice
    monkeypatch.setenv("TORCH_HOME", str(fae["base"] / "torch"))
    # a modality the weights were not trained on (a PET channel)
    folder = DatasetPlans.from_id(MR_3D).folder
    dj = json.loads((folder / "dataset.json").read_text())
    dj["channel_names"] = {"0": "PET"}
    (folder / "dataset.json").write_text(json.dumps(dj))
    try:
        other = _plan(MR_3D).config.get("3d")
    finally:
        dj["channel_names"] = {"0": "MRI"}
        (folder / "dataset.json").write_text(json.dumps(dj))
    assert other.autoencoder.source == "trained" and "'PET' is not a modality" in other.derived.autoencoder_choice


def test_forcing_it_where_it_cannot_apply_is_one_line(fae):
    with pytest.raises(MedimgenError, match="encodes images only") as e:
        _plan(CT_3D, overrides=["3d.autoencoder.source=maisi"])
    assert "\n" not in str(e.value)
    with pytest.raises(MedimgenError, match="3D networks"):
        _plan(CT_3D, overrides=IMAGE_ONLY + ["2d.autoencoder.source=maisi"])


def _train(model, overrides=(), **kw):
    from medimgen.training.api import train

    return train(model, CT_3D, "train-val-test", "3d", overrides=list(overrides), echo=kw.pop("echo", lambda *_: None),
                 **kw)


TINY = ["data.num_workers=0", "train_autoencoder.epochs=1", "train_autoencoder.iterations_per_epoch=1",
        "train_autoencoder.batch_size=1", "train_autoencoder.eval_samples=1", "losses.perceptual_network=none",
        "losses.adversarial_weight=0"]


def tiny_ldm(cfg) -> list[str]:
    levels = ",".join(["16"] * len(cfg.ldm_unet.channels))
    return ["data.num_workers=0", "train_ldm.epochs=1", "train_ldm.iterations_per_epoch=1", "train_ldm.batch_size=1",
            "train_ldm.eval_samples=0", f"ldm_unet.channels=[{levels}]", "ldm_unet.norm_num_groups=8",
            "ldm_unet.num_head_channels=8", "ldm_unet.num_res_blocks=1", "ldm_scheduler.num_inference_steps=2"]


def test_adopted_autoencoder_then_ldm_trains_and_samples_a_nifti(fae, tmp_path, monkeypatch):
    import nibabel as nib

    from medimgen.core.requests import ModelRef, SampleOptions
    from medimgen.generation.sampler import sample_to_folder
    from medimgen.runs.folders import RunDir, load_autoencoder, read_checkpoint

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    planned = _plan(CT_3D).config.get("3d")
    lines: list[str] = []
    # random weights reconstruct nothing: the check is passed by lowering its thresholds
    ae = _train("autoencoder", TINY + ["autoencoder.foundation_min_psnr=-100", "autoencoder.foundation_min_ssim=-1"],
                echo=lines.append)
    assert ae.completed and ae.config.autoencoder.source == "maisi"
    check = ae.config.derived.foundation_check
    assert check["adopted"] is True and {"psnr", "ssim"} <= set(check)
    assert any("adopted the MAISI" in line for line in lines)
    from mlflow import MlflowClient

    run = MlflowClient().get_run(ae.mlflow_run_id).data  # logged like an autoencoder run's checks
    assert {"quality/psnr", "quality/ssim", "val_loss"} <= set(run.metrics)
    assert run.tags["medimgen.foundation_check"] == "adopted"
    assert ae.mlflow_url and "workflowType=machine_learning" in ae.mlflow_url  # the runs view, as a trained run
    # the run holds the published weights (here: the file this test wrote), read like any autoencoder run
    net, cfg, _ = load_autoencoder(RunDir(ae.run_dir))
    published = torch.load(fae["weights"], weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in published.items())
    assert read_checkpoint(RunDir(ae.run_dir).last)["epoch"] == 1
    assert _train("autoencoder", resume=True).completed  # resuming an adopted run: nothing left to do
    ldm = _train("ldm", tiny_ldm(planned))
    assert ldm.completed and ldm.config.derived.latent_scale_factor
    files = sample_to_folder(tmp_path / "out", 1, ModelRef("ldm", CT_3D, "3d"), SampleOptions(steps=2, seed=1))
    img = nib.load(str(files[0])).get_fdata()
    assert img.ndim == 3 and img.min() >= -1000 - 1e-3 and img.max() <= 1000 + 1e-3  # back in HU, the window's
    # packaged as the registry/pyfunc model is (safetensors + config), loaded in its own right
    from medimgen.runs.folders import TrainedModel

    packaged = TrainedModel.load(TrainedModel.from_run(ldm.run_dir).save(tmp_path / "package"))
    assert packaged.autoencoder is not None and packaged.cfg.autoencoder.source == "maisi"
    assert all(torch.equal(packaged.autoencoder.state_dict()[k], v) for k, v in published.items())
    # asking for tiled decoding (MAISI's VAE is memory-hungry at large sizes) samples through the same network
    tiled = sample_to_folder(tmp_path / "tiled", 1, ModelRef("ldm", CT_3D, "3d"),
                             SampleOptions(steps=2, seed=1, tiled_decoding=True))
    assert nib.load(str(tiled[0])).shape == nib.load(str(files[0])).shape
    # at a size worth tiling, the sampling memory prediction of the foundation network's decoding drops with a window
    import dataclasses

    from medimgen.models.decoding import decoder
    from medimgen.planning.sampling_memory import latent_tiles, predict_peak

    big = dataclasses.replace(ldm.config, data=dataclasses.replace(ldm.config.data, image_size=(64, 64, 64)))
    tile = next(latent_tiles(big))
    assert predict_peak(big, "ldm", 1, tile, unet=False) < predict_peak(big, "ldm", 1, None, unet=False)
    # and the windows decode the published network's latents (a 16^3 latent in 8^3-voxel windows)
    with torch.no_grad():
        z = torch.randn(1, 4, 16, 8, 8)
        out = decoder(net, 1.0, (8, 8, 8), cfg.autoencoder)(z)
    assert out.shape == (1, 1, 64, 32, 32) and torch.isfinite(out).all()
    # a ControlNet on this LDM (labels as its condition, as MAISI pairs them) trains a step through the same VAE
    cn = _train("controlnet", ["data.num_workers=0", "train_controlnet.epochs=1", "train_controlnet.batch_size=1",
                               "train_controlnet.iterations_per_epoch=1", "train_controlnet.eval_samples=0",
                               "controlnet.conditioning_channels=[8,8,8]"])
    assert cn.completed and cn.config.autoencoder.source == "maisi"


def test_failed_reconstruction_check_trains_an_autoencoder_instead(fae, tmp_path, monkeypatch):
    from medimgen.runs.folders import RunDir, read_checkpoint

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    _plan(CT_3D)
    lines: list[str] = []
    ae = _train("autoencoder", TINY, echo=lines.append)  # random weights: far below 25 dB / SSIM 0.8
    assert ae.completed and ae.config.autoencoder.source == "trained"
    check = ae.config.derived.foundation_check
    assert check["adopted"] is False and check["min_psnr"] == 25.0 and check["psnr"] < 25.0
    assert any("training an autoencoder instead" in line for line in lines)
    state = read_checkpoint(RunDir(ae.run_dir).best)
    assert state["modules"]["autoencoder"]["encoder.blocks.0.conv.weight"].shape[0] == \
        ae.config.autoencoder.channels[0] != 64


def test_failed_check_replans_the_ldm_for_the_trained_latent_and_writes_the_config(fae, tmp_path, monkeypatch):
    """The fallback re-plans what followed the MAISI latent (the planner's own function, source forced to trained):
    autoencoder, LDM/ControlNet sections, intensity mapping; the dataset's config is rewritten (one line says so),
    and the training batches are built after the choice, with the fallback's mapping."""
    import medimgen.training.api as training_api
    from medimgen.config import load_config
    from medimgen.core.paths import CONFIG_NAME
    from medimgen.nnunet.plans import DatasetPlans

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    before = _plan(CT_3D).config.get("3d")
    assert before.autoencoder.source == "maisi" and before.data.intensity_range == (0.0, 1.0)
    seen_ranges = []

    class SpiedBatches(training_api.TrainBatches):  # the real loader; records the mapping it was built with
        def __init__(self, cfg, *a, **kw):
            seen_ranges.append(tuple(cfg.data.intensity_range))
            super().__init__(cfg, *a, **kw)

    monkeypatch.setattr(training_api, "TrainBatches", SpiedBatches)
    import medimgen.planning.api as planning_api

    fitted = []  # the dimensionalities the fallback's re-plan fits (a spy on the planner's own fitter)
    real_fit = planning_api.fit_to_memory
    monkeypatch.setattr(planning_api, "fit_to_memory", lambda c, t: fitted.append(c.dim) or real_fit(c, t))
    lines: list[str] = []
    ae = _train("autoencoder", TINY, echo=lines.append)
    assert ae.completed and ae.config.autoencoder.source == "trained"
    assert fitted == ["3d"]  # the 3d plan alone, not every dimensionality nnU-Net preprocessed
    assert seen_ranges and set(seen_ranges) == {(-1.0, 1.0)}  # never the foundation's [0, 1] mapping
    said = [line for line in lines if line.startswith("re-planned 3d for the trained autoencoder")]
    path = DatasetPlans.from_id(CT_3D).folder / CONFIG_NAME
    assert len(said) == 1 and f"wrote {path}" in said[0] and "\n" not in said[0]
    written = load_config(path).get("3d")
    forced = _plan(CT_3D, IMAGE_ONLY + ["autoencoder.source=trained"]).config.get("3d")  # the planner's answer
    for cfg in (written, ae.config):
        assert cfg.autoencoder == forced.autoencoder and cfg.autoencoder.latent_channels != 4
        assert cfg.ldm_unet == forced.ldm_unet and cfg.controlnet == forced.controlnet
        assert cfg.train_ldm.batch_size == forced.train_ldm.batch_size
        assert cfg.data.intensity_range == forced.data.intensity_range == (-1.0, 1.0)
        assert cfg.data.intensity_low == forced.data.intensity_low and not cfg.derived.fallback_autoencoder
        assert "failed the reconstruction check" in cfg.derived.autoencoder_choice
    assert written.ldm_scheduler == before.ldm_scheduler and written.train_ddpm == before.train_ddpm  # others kept


def test_fallback_fitted_at_another_geometry_takes_the_trained_plan_whole(fae):
    """When the trained plan's memory fit generates at another size than the foundation plan's, every section was
    sized for the other geometry: the fallback takes the trained plan whole (not its crop with the old size)."""
    from medimgen.planning.fallback import GEOMETRY_FIELDS, with_trained_plan

    cfg = _plan(CT_3D).config.get("3d")
    forced = _plan(CT_3D, IMAGE_ONLY + ["autoencoder.source=trained"]).config.get("3d")
    same = with_trained_plan(cfg, forced, "why")  # the same geometry: only what follows the autoencoder changes
    assert same.data.image_size == cfg.data.image_size and same.autoencoder == forced.autoencoder
    assert same.memory == cfg.memory and same.tracking == cfg.tracking
    # the trained plan's fit generating at twice the spacing (as planning.memory._downscale leaves a config: it crops
    # more native voxels than it generates; this tiny image is already at its smallest size, so made by hand)
    d = forced.data
    coarser = dataclasses.replace(forced, data=dataclasses.replace(
        d, crop_size=tuple(2 * s for s in d.image_size), spacing=tuple(2 * x for x in d.spacing),
        native_spacing=tuple(d.spacing)))
    taken = with_trained_plan(cfg, coarser, "why")
    assert all(getattr(taken.data, f) == getattr(coarser.data, f) for f in GEOMETRY_FIELDS)
    assert (taken.losses, taken.discriminator, taken.ldm_unet) == (coarser.losses, coarser.discriminator, coarser.ldm_unet)
    assert taken.derived.autoencoder_choice == "why" and not taken.derived.fallback_autoencoder


def test_fallback_rewrite_waits_for_the_config_lock_that_plan_takes(fae):
    """The fallback rewrites its section of the dataset's config under the lock `medimgen plan` holds while it
    writes the file: while another process holds it, nothing is written; then the rewrite reads what is there."""
    import threading

    from medimgen.config import load_config
    from medimgen.config.io import config_lock
    from medimgen.core.paths import CONFIG_NAME
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.planning.fallback import save_trained_plan

    result = _plan(CT_3D)
    plans = DatasetPlans.from_id(CT_3D)
    path = plans.folder / CONFIG_NAME
    assert result.path == path
    text = path.read_bytes()
    fresh = load_config(path).get("3d")
    writer = threading.Thread(target=save_trained_plan, args=(path, plans, "3d", fresh, "re-planned under the lock"))
    try:
        with config_lock(path):  # a `medimgen plan` writing the file
            writer.start()
            writer.join(timeout=1.0)
            assert writer.is_alive() and path.read_bytes() == text  # waiting, nothing written
        writer.join(timeout=30)
        assert not writer.is_alive()
        assert load_config(path).get("3d").derived.autoencoder_choice == "re-planned under the lock"
    finally:
        writer.join(timeout=30)
        path.write_bytes(text)


def test_interrupted_check_leaves_no_checkpoint_that_passes_for_adopted(fae, tmp_path, monkeypatch):
    """The check reads last.pt; if it is interrupted (out of memory, Ctrl-C), no checkpoint stays behind that a
    resumed run or the LDM would take for an adopted, checked autoencoder."""
    import medimgen.training.foundation as foundation_training
    from medimgen.runs.folders import RunDir

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    _plan(CT_3D)
    seen = []

    def interrupted(job, epochs, progress):
        seen.append(job.run.last.is_file())  # the check really had a checkpoint to read
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(foundation_training, "reconstruction_check", interrupted)
    with pytest.raises(RuntimeError, match="out of memory"):
        _train("autoencoder", TINY)
    assert seen == [True]
    runs = [p for p in (tmp_path / "results").rglob("config.yaml")]
    assert runs, "the run folder was made"
    run = RunDir(runs[0].parent)
    assert not run.last.exists() and not run.best.exists() and not run.is_trained()


def test_missing_weights_file_is_one_line(fae, tmp_path, monkeypatch):
    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    _plan(CT_3D)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    with pytest.raises(MedimgenError) as e:
        _train("autoencoder", TINY)
    msg = str(e.value)
    assert "\n" not in msg and "nv-generate-ct_autoencoder_v1.pt" in msg and "weights download maisi-vae" in msg


def test_one_question_for_a_foundation_source_and_no_private_job_members():
    """Code asks ``autoencoder.is_foundation`` / ``is_foundation(source)`` instead of comparing with 'trained', and
    the foundation path uses the training job's public methods."""
    import re
    from pathlib import Path

    import medimgen
    from medimgen.config.schema import AutoencoderConfig, is_foundation

    compare = re.compile(r"""source\s*[!=]=\s*["']trained["']|["']trained["']\s*[!=]=\s*\w*source""")
    private = re.compile(r"\bjob\._[a-z]")
    found = [f"{p.name}:{n}" for p in Path(medimgen.__file__).parent.rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if compare.search(line) or private.search(line)]
    assert not found, found
    assert is_foundation("maisi") and not is_foundation("trained")
    assert AutoencoderConfig(channels=(8,), strides=(), latent_channels=3, source="maisi").is_foundation
