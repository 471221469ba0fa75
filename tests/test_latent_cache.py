"""The latent cache (#28): the LDM (and a ControlNet on it) trains on latents encoded once per case, their posterior's
mean and std stored beside the preprocessed data, z drawn per step; rebuilt when the autoencoder or the data change;
planned by the disk/RAM rule."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from medimgen.training.api import RunSetup, train
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _cache_root(dim: str) -> Path:
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.training.latents import cache_root

    return cache_root(DatasetPlans.from_id(ANISO_3D), dim)


def _caches(dim: str) -> set[Path]:
    root = _cache_root(dim)
    return {p for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() else set()


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_cached_ldm_trains_samples_and_resumes_exactly(dim, workspace, tmp_path, request):
    """Stop after epoch 1, continue with -c: identical to an uninterrupted run, both on the cache, which the three
    runs (same autoencoder, same cases) build once; the run samples (plots at its end, and a sampler)."""
    flow = request.getfixturevalue(f"flow_{dim}")
    ae = flow["autoencoder"].run_dir
    sets = tiny_overrides(workspace["config"].get(dim)) + ["train_ldm.cache_latents=true", "tracking.log_models=false"]
    import shutil

    shutil.rmtree(_cache_root(dim), ignore_errors=True)  # the flow's LDM (planned cache_latents) made this one
    before = _caches(dim)
    full = train("ldm", ANISO_3D, "train-val-test", dim, overrides=sets, echo=lambda *_: None,
                 setup=RunSetup(run_root=tmp_path / "a", upstream_run=ae))
    built = _caches(dim) - before
    assert len(built) == 1  # this autoencoder's cache, new
    manifest = json.loads((next(iter(built)) / "manifest.json").read_text())
    first = train("ldm", ANISO_3D, "train-val-test", dim, overrides=sets, echo=lambda *_: None, stop_after_epoch=1,
                  setup=RunSetup(run_root=tmp_path / "b", upstream_run=ae))
    assert not first.completed and _state(first.run_dir)["epoch"] == 1
    resumed = train("ldm", ANISO_3D, "train-val-test", dim, resume=True, echo=lambda *_: None,
                    setup=RunSetup(run_root=tmp_path / "b"))
    assert resumed.completed and resumed.config.train_ldm.cache_latents
    assert _caches(dim) - before == built  # not rebuilt: nothing changed
    assert json.loads((next(iter(built)) / "manifest.json").read_text())["created"] == manifest["created"]
    a, b = _state(full.run_dir), _state(resumed.run_dir)
    for k, v in a["modules"]["unet"].items():
        torch.testing.assert_close(b["modules"]["unet"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert a["history"]["train_loss"] == pytest.approx(b["history"]["train_loss"], rel=1e-5)
    assert a["history"]["val_loss"] == pytest.approx(b["history"]["val_loss"], rel=1e-5)
    assert resumed.config.derived.latent_scale_factor == pytest.approx(full.config.derived.latent_scale_factor)
    assert (resumed.run_dir / "plots" / ("epoch_0002.png" if dim == "2d" else "epoch_0002.gif")).is_file()
    from medimgen.generation.sampler import from_run

    images = from_run(resumed.run_dir).sample(2, seed=1, steps=2)
    assert images.shape[:2] == (2, resumed.config.data.in_channels) and np.isfinite(images).all()


def test_cached_ldm_resumes_with_another_micro_batch_on_the_same_cache(flow_2d, workspace, tmp_path):
    """A run stopped at micro-batch 2 and resumed at micro-batch 1 (an override on resume; the memory guard's re-fit
    changes it the same way) reads the cache it built: the key and the cached regions do not depend on it."""
    ae = flow_2d["autoencoder"].run_dir
    sets = tiny_overrides(workspace["config"].get("2d")) + ["train_ldm.cache_latents=true", "tracking.log_models=false"]
    first = train("ldm", ANISO_3D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None, stop_after_epoch=1,
                  setup=RunSetup(run_root=tmp_path / "b", upstream_run=ae))
    assert not first.completed and first.config.train_ldm.batch_size == 2
    built = _caches("2d")
    resumed = train("ldm", ANISO_3D, "train-val-test", "2d", resume=True, overrides=["train_ldm.batch_size=1"],
                    echo=lambda *_: None, setup=RunSetup(run_root=tmp_path / "b"))
    assert resumed.completed and resumed.config.train_ldm.batch_size == 1
    assert _caches("2d") == built  # the same key: nothing encoded again


def test_uncached_ldm_still_encodes_every_batch_and_resumes_exactly(flow_2d, workspace, tmp_path):
    """`train_ldm.cache_latents=false` (what a user sets to keep nnU-Net's full augmentation): the LDM encodes the
    loader's batches every step, builds no cache, and resumes exactly (the planner turns the cache on for the test
    datasets, so the flows no longer run this path)."""
    import shutil

    ae = flow_2d["autoencoder"].run_dir
    sets = tiny_overrides(workspace["config"].get("2d")) + ["train_ldm.cache_latents=false", "tracking.log_models=false"]
    shutil.rmtree(_cache_root("2d"), ignore_errors=True)
    full = train("ldm", ANISO_3D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None,
                 setup=RunSetup(run_root=tmp_path / "a", upstream_run=ae))
    first = train("ldm", ANISO_3D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None, stop_after_epoch=1,
                  setup=RunSetup(run_root=tmp_path / "b", upstream_run=ae))
    resumed = train("ldm", ANISO_3D, "train-val-test", "2d", resume=True, echo=lambda *_: None,
                    setup=RunSetup(run_root=tmp_path / "b"))
    assert not first.completed and resumed.completed and not resumed.config.train_ldm.cache_latents
    assert not _caches("2d")  # nothing cached
    a, b = _state(full.run_dir), _state(resumed.run_dir)
    for k, v in a["modules"]["unet"].items():
        torch.testing.assert_close(b["modules"]["unet"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert a["history"]["train_loss"] == pytest.approx(b["history"]["train_loss"], rel=1e-5)


def _autoencoder_and_config(flow, workspace, dim):
    from medimgen.config import apply_overrides
    from medimgen.runs.folders import RunDir, load_autoencoder

    ae, ae_cfg, _ = load_autoencoder(RunDir(flow["autoencoder"].run_dir))
    cfg = apply_overrides(workspace["config"].get(dim), tiny_overrides(workspace["config"].get(dim)))
    return ae, dataclasses.replace(cfg, autoencoder=ae_cfg.autoencoder)


def test_cache_stores_mu_and_sigma_and_steps_draw_z(flow_2d, workspace):
    """The cache holds the posterior's mean (what the encoder's mean is for the centred case) and std, no sample;
    the LDM's targets draw a new z for the same cached case every step, around mu."""
    from medimgen.data.cases import load_case, open_cases
    from medimgen.data.intensity import IntensityMap
    from medimgen.data.loader import centred_sample
    from medimgen.models.labels import join
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.training import latents

    ae, cfg = _autoencoder_and_config(flow_2d, workspace, "2d")
    plans = DatasetPlans.from_id(ANISO_3D)
    ids = open_cases(plans.preprocessed_folder("2d")).identifiers[:2]
    folder = latents.build(cfg, plans, ids, ae, torch.device("cpu"), echo=lambda *_: None)
    with np.load(folder / "c00000.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["mu", "sigma"]
        mu, sigma = z["mu"], z["sigma"]
    data, seg, _ = load_case(open_cases(plans.preprocessed_folder("2d"), ids), ids[0])
    assert mu.shape[0] == data.shape[1]  # every slice of the case
    zs = data.shape[1] // 2
    native, resize = latents.region(cfg, data.shape[2:])
    image, label = centred_sample(data[:, zs], seg[:, zs], native, IntensityMap.from_config(cfg.data), resize)
    with torch.no_grad():
        ref_mu, ref_sigma = ae.encode(join(image[None], label[None], cfg))
    np.testing.assert_allclose(mu[zs], ref_mu[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma[zs], ref_sigma[0].numpy(), rtol=1e-4, atol=1e-5)
    assert (sigma > 0).all()

    from medimgen.training.ldm import LatentDiffusionTask

    task = LatentDiffusionTask.__new__(LatentDiffusionTask)  # only the latent draw: no UNet needed
    task.autoencoder, task.device, task.scale_factor = ae, torch.device("cpu"), 2.0
    one_slice = [{"key": ids[0], "mu": torch.from_numpy(mu[zs:zs + 1]), "sigma": torch.from_numpy(sigma[zs:zs + 1])}]
    batches = latents.CachedBatches(one_slice, cfg, batch_size=1)
    epoch1, epoch2 = next(batches), next(batches)  # the same case and slice (flips are off: 'mild')
    torch.testing.assert_close(epoch1["mu"], epoch2["mu"])
    z1, z2 = task.targets(epoch1), task.targets(epoch2)
    assert not torch.allclose(z1, z2)
    draws = torch.stack([task.targets(epoch1) for _ in range(400)])
    torch.testing.assert_close(draws.mean(0) / 2.0, epoch1["mu"], atol=4 * float(sigma.max()) / 20, rtol=0)
    # without the cache (cache_latents false) the same slice's batch is encoded: a z around the same mu
    task.cfg = cfg
    encoded = task.targets({"image": image[None], "label": label[None]}) / 2.0
    assert encoded.shape == ref_mu.shape
    assert (encoded - ref_mu).abs().max() <= 6 * float(sigma.max())


def test_cache_rebuilt_when_the_autoencoder_or_the_data_change(flow_2d, workspace):
    from medimgen.data.cases import open_cases
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.planning.disk import latent_cache_bytes
    from medimgen.training import latents

    ae, cfg = _autoencoder_and_config(flow_2d, workspace, "2d")
    plans = DatasetPlans.from_id(ANISO_3D)
    pre = plans.preprocessed_folder("2d")
    ids = open_cases(pre).identifiers[:2]
    quiet = {"echo": lambda *_: None}
    first = latents.build(cfg, plans, ids, ae, torch.device("cpu"), **quiet)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert latents.build(cfg, plans, ids, ae, torch.device("cpu"), **quiet) == first  # unchanged: reused
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    # the disk estimate of the cache (per slice of the cases, at their shapes) matches what was written
    from medimgen.data.cases import load_case
    from medimgen.planning.latent_cache import CachedCases

    manifest = json.loads((first / "manifest.json").read_text())
    shapes = [load_case(open_cases(pre, [i]), i)[0].shape[1:] for i in ids]
    cases = CachedCases(tuple((int(s[0]), tuple(s[1:])) for s in shapes))
    assert cases.samples == sum(c["shape"][0] for c in manifest["cases"])
    on = cfg.with_train("ldm", cache_latents=True)
    assert latent_cache_bytes(on, cases)["ldm"] == pytest.approx(manifest["bytes"], rel=0.02)
    # another autoencoder (one weight changed): a new cache with other latents
    p = next(ae.encoder.parameters())
    kept = p.detach().clone()
    with torch.no_grad():
        p.add_(0.5)
    try:
        second = latents.build(cfg, plans, ids, ae, torch.device("cpu"), **quiet)
    finally:
        with torch.no_grad():
            p.copy_(kept)
    assert second != first
    with np.load(first / "c00000.npz") as a, np.load(second / "c00000.npz") as b:
        assert not np.allclose(a["mu"], b["mu"])
    # preprocessing rewritten (a case file's identity changes): rebuilt
    case = next(pre.glob(f"{ids[0]}.*"))
    st = case.stat()
    os.utime(case, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        third = latents.build(cfg, plans, ids, ae, torch.device("cpu"), **quiet)
    finally:
        os.utime(case, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert third not in (first, second)
    assert latents.build(cfg, plans, ids, ae, torch.device("cpu"), **quiet) == first  # back as it was
    # another intensity mapping decides other latents too
    shifted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, intensity_range=(-1.0, 0.5)))
    assert latents.build(shifted, plans, ids, ae, torch.device("cpu"), **quiet) not in (first, second, third)


def test_concurrent_builds_make_one_cache(flow_2d, workspace):
    """Two processes (here threads) building the same cache: one builds, the other waits and reads it; no scratch
    folder is left."""
    from medimgen.data.cases import open_cases
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.training import latents

    ae, cfg = _autoencoder_and_config(flow_2d, workspace, "2d")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, intensity_range=(-1.0, 0.75)))  # a new key
    plans = DatasetPlans.from_id(ANISO_3D)
    ids = open_cases(plans.preprocessed_folder("2d")).identifiers[:2]
    messages: list[str] = []
    out: list[Path] = []
    workers = [threading.Thread(target=lambda: out.append(latents.build(cfg, plans, ids, ae, torch.device("cpu"),
                                                                        echo=messages.append))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(out) == 2 and out[0] == out[1] and (out[0] / "manifest.json").is_file()
    assert sum(m.startswith("encoding") for m in messages) == 1
    assert not [p for p in out[0].parent.iterdir() if ".building-" in p.name]


def test_planner_turns_the_cache_on_and_off_by_disk_and_ram(workspace):
    from medimgen.planning.latent_cache import (DISK_SHARE, NPZ_BYTES_PER_ARRAY, CachedCases, cache_bytes, decide,
                                                plan_cache)

    from medimgen.models.networks import latent_size

    cfg = workspace["config"].get("3d")
    hundred = CachedCases(tuple((1, tuple(cfg.data.image_size)) for _ in range(100)))  # cases of image_size
    size = cache_bytes(cfg, "ldm", hundred)
    latent = 2 * 4 * cfg.autoencoder.latent_channels * int(np.prod(latent_size(cfg)))  # mu + sigma, f32
    assert size == 100 * (latent + 2 * NPZ_BYTES_PER_ARRAY)
    plenty = 1e12
    assert decide(cfg, "ldm", hundred, plenty, plenty).on
    no_disk = decide(cfg, "ldm", hundred, size / DISK_SHARE * 0.9, plenty)
    assert not no_disk.on and "free disk" in no_disk.reason
    no_ram = decide(cfg, "ldm", hundred, plenty, size * 2)
    assert not no_ram.on and "available RAM" in no_ram.reason
    assert decide(cfg, "ldm", hundred, size / DISK_SHARE * 1.1, size / DISK_SHARE * 1.1).on
    few = cfg.with_train("ldm", epochs=1, iterations_per_epoch=1, batch_size=2)
    assert not decide(few, "ldm", hundred, plenty, plenty).on  # training draws fewer samples than it would encode
    # a ControlNet's cache also keeps its label maps (int8 here: label values below 128), a third array per case
    one = CachedCases(((1, tuple(cfg.data.image_size)),))
    assert cache_bytes(cfg, "controlnet", one) == \
        cache_bytes(cfg, "ldm", one) + int(np.prod(cfg.data.image_size)) + NPZ_BYTES_PER_ARRAY
    # the dataset's planned config (plan_dataset; this machine: the tiny dataset's cache fits) and its explanation
    config = _config()
    assert all(c.train_ldm.cache_latents and c.train_controlnet.cache_latents for c in config.configs.values())
    folder = Path(os.environ["nnUNet_preprocessed"]) / config.dataset.name
    from medimgen.planning.api import explain_costs

    text = "\n".join(explain_costs(config, folder))
    assert "latent cache" in text and "  ldm         on: " in text and "+ ldm latent cache:" in text
    # turned off by hand: the explanation says so, the plan keeps it
    hand = dataclasses.replace(config, configs={d: c.with_train("ldm", cache_latents=False)
                                                for d, c in config.configs.items()})
    assert "the config says false" in "\n".join(explain_costs(hand, folder))
    assert all(c.train_ldm.cache_latents for c in plan_cache(hand, folder).configs.values())  # the rule says on


def _config():
    from medimgen.config import load_config
    from medimgen.core.paths import config_path

    return load_config(config_path(ANISO_3D))


def test_memory_simulation_counts_the_cached_path():
    """With the cache the LDM's training step makes no encoder pass (its batch is the cached mu/sigma at latent
    size): a lower predicted peak than encoding each batch, the frozen autoencoder's weights still counted."""
    from medimgen.config import load_config
    from medimgen.models.networks import autoencoder_for
    from medimgen.planning import memory as mem

    cfg = load_config(Path(__file__).parent / "data" / "Dataset501_config_8GB.yaml").get("2d")
    encoded = mem.estimate(cfg, "ldm")
    cached = mem.estimate(cfg.with_train("ldm", cache_latents=True), "ldm")
    ae_bytes = 4 * sum(p.numel() for p in autoencoder_for(cfg).parameters())
    assert cached.peak_gb < encoded.peak_gb
    assert cached.peak_gb * 2**30 > ae_bytes  # the autoencoder stays on the device (validation, plots)


def test_controlnet_on_the_ldm_trains_on_a_cache_with_labels(flow_2d, workspace, tmp_path):
    """A ControlNet steering the (cached) LDM trains on the cache too; its cache also keeps the label maps it is
    conditioned on, so it is not the LDM's."""
    sets = tiny_overrides(workspace["config"].get("2d")) + ["train_controlnet.cache_latents=true",
                                                              "tracking.log_models=false"]
    before = _caches("2d")
    result = train("controlnet", ANISO_3D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None,
                   setup=RunSetup(run_root=tmp_path / "cn", upstream_run=flow_2d["ldm"].run_dir))
    assert result.completed and result.config.controlnet.base == "ldm"
    new = [p for p in _caches("2d") - before if json.loads((p / "manifest.json").read_text())["ingredients"]["with_labels"]]
    assert len(new) == 1
    with np.load(new[0] / "c00000.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["label", "mu", "sigma"]
        assert all(n >= s for n, s in zip(z["label"].shape[-2:], result.config.data.image_size))  # at image size
    history = json.loads((result.run_dir / "loss_dict.json").read_text())
    assert all(v == v for v in history["train_loss"])


def _prepare_worker(rank: int, world: int, port: int, cfg, ae_dir: str, ids: list, out: str) -> None:
    from medimgen.core import distributed
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.runs.folders import RunDir, load_autoencoder
    from medimgen.training import latents

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    ae, _, _ = load_autoencoder(RunDir(Path(ae_dir)))
    messages: list[str] = []
    with distributed.joined(torch.device("cpu")):
        cases = latents.prepare(cfg, DatasetPlans.from_id(ANISO_3D), ids, ae, torch.device("cpu"),
                                echo=messages.append)
    torch.save({"mu": [c["mu"] for c in cases], "messages": messages}, Path(out) / f"rank{rank}.pt")


def test_two_ranks_build_the_cache_once_and_both_read_it(flow_2d, workspace, tmp_path):
    """Several ranks (DDP): rank 0 builds the cache, the other waits at the barrier and reads the same folder."""
    import socket

    import torch.multiprocessing as mp

    from medimgen.data.cases import open_cases
    from medimgen.nnunet.plans import DatasetPlans

    _, cfg = _autoencoder_and_config(flow_2d, workspace, "2d")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, intensity_range=(-1.0, 0.625)))  # a new key
    ids = open_cases(DatasetPlans.from_id(ANISO_3D).preprocessed_folder("2d")).identifiers[:2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_prepare_worker, args=(2, port, cfg, str(flow_2d["autoencoder"].run_dir), ids, str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [sum(m.startswith("encoding") for m in r["messages"]) for r in ranks] == [1, 0]
    assert len(ranks[0]["mu"]) == len(ranks[1]["mu"]) == 2
    for a, b in zip(ranks[0]["mu"], ranks[1]["mu"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_cache_file_is_one_line(tmp_path, damage):
    """A cache file cut short (a full disk, a killed copy) or overwritten is a one-line error naming the cache,
    not a zipfile/zlib traceback."""
    import json

    import numpy as np

    from medimgen.core.errors import MedimgenError
    from medimgen.training import latents

    good = tmp_path / "good.npz"
    np.savez_compressed(good, mu=np.zeros((4, 8, 8), np.float32), sigma=np.ones((4, 8, 8), np.float32))
    data = good.read_bytes()
    (tmp_path / "case_0.npz").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04" + b"x" * 64)
    (tmp_path / latents.MANIFEST).write_text(json.dumps(
        {"format": latents.FORMAT, "cases": [{"case": "case_0", "file": "case_0.npz"}]}))
    with pytest.raises(MedimgenError, match="latent cache .* is unreadable"):
        latents.load(tmp_path)
    good.rename(tmp_path / "case_0.npz")  # the same manifest with an intact file loads
    assert latents.load(tmp_path)[0]["mu"].shape == (4, 8, 8)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cache_build_encodes_no_more_than_the_planned_encoder_pass(flow_2d, workspace, batch_size):
    """2D: every encoder pass of the build takes at most the run's micro-batch of image-size inputs (what the LDM step
    encodes without the cache, the pass the memory plan counts), slices grouped by the micro-batch; a region larger
    than image_size is not cut to fit the pass (it is tiled)."""
    import math

    from medimgen.data.cases import load_case, open_cases
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.training import latents

    ae, cfg = _autoencoder_and_config(flow_2d, workspace, "2d")
    new_key = dataclasses.replace(cfg.data, intensity_range=(-1.0, 0.75 + batch_size / 32))  # this test's own caches
    cfg = dataclasses.replace(cfg, data=new_key)
    plans = DatasetPlans.from_id(ANISO_3D)
    ids = open_cases(plans.preprocessed_folder("2d")).identifiers[:1]
    sizes = _spy_encoder(ae)
    try:
        latents.build(cfg, plans, ids, ae, torch.device("cpu"), echo=lambda *_: None, batch_size=batch_size)
    finally:
        del ae.encode
    limit = batch_size * math.prod(cfg.data.image_size)
    assert sizes and max(sizes) <= limit and latents.tiles_per_pass(cfg, batch_size) == batch_size
    data, _, _ = load_case(open_cases(plans.preprocessed_folder("2d"), ids), ids[0])
    assert latents.region(cfg, data.shape[2:])[0] == tuple(cfg.data.image_size)  # these slices: one input each
    assert len(sizes) == -(-data.shape[1] // batch_size)  # the micro-batch of slices per pass
    # a case larger than image_size on every axis: MAX_EXTENT x image_size, whatever the micro-batch
    big = latents.region(cfg, [4 * s for s in cfg.data.image_size])[0]
    assert big == tuple(latents.MAX_EXTENT * s for s in cfg.data.image_size)


def _spy_encoder(ae) -> list[int]:
    """Voxels (per channel) of every input the autoencoder's real encoder is called with, from now on (undo with
    ``del ae.encode``)."""
    sizes: list[int] = []
    real = ae.encode

    def recording(x):
        sizes.append(x.numel() // x.shape[1])
        return real(x)

    ae.encode = recording
    return sizes


def _small_3d(workspace, key: float):
    """A tiny random-weight autoencoder, a 3D config whose image_size is about half a case per axis (a case larger
    than image_size; ``key``: an intensity bound that makes the cache key this test's own), the plans and a case:
    the cache's geometry, not the latents' quality."""
    from medimgen.config import apply_overrides
    from medimgen.data.cases import load_case, open_cases
    from medimgen.models.networks import autoencoder_for, total_stride
    from medimgen.nnunet.plans import DatasetPlans

    base = workspace["config"].get("3d")
    cfg = apply_overrides(base, tiny_overrides(base))
    plans = DatasetPlans.from_id(ANISO_3D)
    ids = open_cases(plans.preprocessed_folder("3d")).identifiers[:1]
    data, _, _ = load_case(open_cases(plans.preprocessed_folder("3d"), ids), ids[0])
    stride = total_stride(cfg.autoencoder.strides, 3)
    size = tuple(max(k, (n // 2) // k * k) for n, k in zip(data.shape[1:], stride))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size, crop_size=(),
                                                            intensity_range=(-1.0, key)))
    torch.manual_seed(0)
    return autoencoder_for(cfg).eval(), cfg, plans, ids, tuple(data.shape[1:])


def test_cache_key_and_region_do_not_depend_on_the_micro_batch(workspace):
    """The same cache (key, region, latents) at micro-batch 1 and 4: a run whose micro-batch changes (a memory re-fit,
    an override on resume) keeps its cache and its crop positions."""
    from medimgen.training import latents

    ae, cfg, plans, ids, shape = _small_3d(workspace, 0.9375)
    quiet = {"echo": lambda *_: None}
    one = latents.build(cfg, plans, ids, ae, torch.device("cpu"), batch_size=1, **quiet)
    four = latents.build(cfg, plans, ids, ae, torch.device("cpu"), batch_size=4, **quiet)
    assert one == four  # the same key: reused, not rebuilt
    assert any(r > s for r, s in zip(latents.region(cfg, shape)[0], cfg.data.image_size))


def test_3d_case_larger_than_image_size_is_cached_beyond_it_in_image_size_passes(workspace):
    """At micro-batch 1 a 3D case larger than image_size is still cached beyond it (its random crops stay), encoded in
    image_size tiles (no encoder call takes more voxels than image_size: the pass the plan counts), and the batches
    take crops at several latent offsets."""
    import math

    from medimgen.models.networks import latent_size
    from medimgen.training import latents

    ae, cfg, plans, ids, _ = _small_3d(workspace, 0.96875)
    sizes = _spy_encoder(ae)
    try:
        folder = latents.build(cfg, plans, ids, ae, torch.device("cpu"), batch_size=1, echo=lambda *_: None)
    finally:
        del ae.encode
    assert len(sizes) > 1 and max(sizes) <= math.prod(cfg.data.image_size)
    cases = latents.load(folder)
    cached = tuple(cases[0]["mu"].shape[1:])
    assert all(c >= n for c, n in zip(cached, latent_size(cfg))) and cached != latent_size(cfg)
    batches = latents.CachedBatches(cases, cfg, batch_size=1)
    torch.manual_seed(1)
    offsets = {tuple(s.start for s in batches._draw().index[1:]) for _ in range(40)}
    assert len(offsets) >= 2


class _PatchEncoder(torch.nn.Module):
    """A purely convolutional encoder whose kernels equal its strides (total stride 4): each latent voxel sees its
    own 4^3 image voxels and nothing else, so the whole-region encode is defined voxel by voxel, and any tiling whose
    tiles start at multiples of 4 gives the same latents (up to the float rounding of the blending)."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = torch.nn.Conv3d(channels, 8, 2, 2)
        self.b = torch.nn.Conv3d(8, 6, 2, 2)

    def encode(self, x):
        h = self.b(torch.relu(self.a(x)))
        return h[:, :3], torch.nn.functional.softplus(h[:, 3:])


def _test_config(dim: str, sets: list[str]):
    from medimgen.config import apply_overrides, load_config

    return apply_overrides(load_config(Path(__file__).parent / "data" / "Dataset501_config_8GB.yaml").get(dim), sets)


def _geometry(cfg, image_size, strides):
    """``cfg`` with this image size and these autoencoder strides (all the tiler reads), unvalidated: the other
    networks' strides need not divide the size."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=image_size, crop_size=()),
                               autoencoder=dataclasses.replace(cfg.autoencoder, strides=strides))


def test_tiled_encode_matches_the_whole_region_encode():
    """A region larger than image_size, encoded in image_size tiles, gives the whole region's latents for an encoder
    without attention, normalisation or receptive fields across tile starts, to float32 rounding: the blend is a
    weighted mean of equal values (Sigma w p / Sigma w, a few ulp: 1e-6 on values of order 1); tiles off the stride
    (MONAI's default overlap at this tile) would not match. Every encoder call takes one image_size tile."""
    import math

    from monai.inferers import sliding_window_inference

    from medimgen.training import latents

    cfg = _geometry(_test_config("3d", []), (24, 16, 20), ((2, 2, 2), (2, 2, 2)))  # not a multiple of 8: ddpm_unet
    channels = cfg.data.in_channels
    torch.manual_seed(0)
    enc = _PatchEncoder(channels).eval()
    x = torch.randn(1, channels, 40, 32, 36)  # up to MAX_EXTENT x image_size, stride multiples
    sizes = _spy_encoder(enc)
    with torch.no_grad():
        mu, sigma = latents.encode_region(cfg, enc.encode, x, torch.device("cpu"), per_pass=1)
        del enc.encode
        whole_mu, whole_sigma = enc.encode(x)
        naive = sliding_window_inference(x, (24, 16, 20), 1, enc.encode, overlap=0.25, mode="gaussian")[0]
    assert len(sizes) > 1 and max(sizes) == math.prod(cfg.data.image_size)
    torch.testing.assert_close(mu, whole_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma, whole_sigma, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(naive, whole_mu, rtol=1e-3, atol=1e-3)  # this test sees misaligned tiles
    # 2D: how many inputs a pass groups (the micro-batch) does not change the values
    cfg2 = _geometry(_test_config("2d", []), (16, 24), ((2, 2),))
    conv = torch.nn.Conv2d(channels, 4, 3, 2, 1)
    slices = torch.randn(5, channels, 28, 40)
    with torch.no_grad():
        one = latents.encode_region(cfg2, lambda t: (conv(t), conv(t).exp()), slices, torch.device("cpu"), 1)
        three = latents.encode_region(cfg2, lambda t: (conv(t), conv(t).exp()), slices, torch.device("cpu"), 3)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-6)


def test_memory_simulation_counts_the_cache_builds_encoder_pass():
    """The cached LDM's simulated step includes the cache build's encoder pass (one image_size tile in 3D, before the
    first step): its peak is at least that pass's own; with a UNet this small the trace without that pass stays
    below it."""
    from medimgen.models.labels import network_channels
    from medimgen.models.networks import autoencoder_for
    from medimgen.planning.cuda_sim import peak_of, simulate

    cfg = _test_config("3d", ["train_ldm.cache_latents=true", "ldm_unet.channels=[8,8]", "ldm_unet.num_res_blocks=1",
                              "ldm_unet.attention_levels=[false,false]", "ldm_unet.strides=[[2,2,2]]",
                              "ldm_unet.norm_num_groups=8", "ldm_unet.num_head_channels=8"])

    def encoder_pass():
        ae = autoencoder_for(cfg).eval()
        for p in ae.parameters():
            p.requires_grad_(False)
        x = torch.randn(1, network_channels(cfg), *cfg.data.image_size)

        def step():
            with torch.no_grad():
                return ae.encode(x)[0]
        return step

    assert simulate(cfg, "ldm").peak_bytes >= peak_of(encoder_pass, amp=False)


def _sized(workspace, dim: str, geometry: str, key: float):
    """A tiny random-weight autoencoder and a ``dim`` config of the test dataset whose image_size is about half of
    every case per axis ('larger': each case is cached beyond image_size), larger than every case ('smaller': padded
    to image_size), or half of a crop_size of the smallest case ('resampled': the memory fitter's crop, resampled to
    image_size); ``key``: an intensity bound that makes the cache key this test's own. Returns (autoencoder, cfg,
    the dataset's config with cfg for ``dim``, plans, training cases, their preprocessed shapes)."""
    from medimgen.config import apply_overrides
    from medimgen.data.cases import load_case, open_cases
    from medimgen.models.networks import autoencoder_for, total_stride
    from medimgen.nnunet.plans import DatasetPlans

    config = workspace["config"]
    base = config.get(dim)
    cfg = apply_overrides(base, tiny_overrides(base))
    plans = DatasetPlans.from_id(ANISO_3D)
    pre = plans.preprocessed_folder(dim)
    ids = list(open_cases(pre).identifiers)
    shapes = [tuple(load_case(open_cases(pre, [i]), i)[0].shape[1:]) for i in ids]
    spatial = [s if dim == "3d" else s[1:] for s in shapes]
    stride = total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)
    low = [min(s[a] for s in spatial) for a in range(len(stride))]
    high = [max(s[a] for s in spatial) for a in range(len(stride))]
    half = tuple(max(k, (n // 2) // k * k) for n, k in zip(low, stride))
    size, crop = {"larger": (half, ()), "smaller": (tuple(-(-n // k) * k + k for n, k in zip(high, stride)), ()),
                  "resampled": (half, tuple(low))}[geometry]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size, crop_size=crop,
                                                            intensity_range=(-1.0, key)))
    torch.manual_seed(0)
    whole = dataclasses.replace(config, configs={**config.configs, dim: cfg})
    return autoencoder_for(cfg).eval(), cfg, whole, plans, ids, shapes


@pytest.mark.parametrize("dim,geometry", [("3d", "larger"), ("2d", "larger"), ("3d", "smaller"),
                                          ("2d", "resampled")])
def test_planned_cache_size_is_what_the_build_writes(workspace, dim, geometry):
    """The planner's cache size (per case, from nnU-Net's fingerprint and its resampling) is within 10 % of the bytes
    a cache of all training cases writes (its manifest), for cases larger than image_size (cached up to MAX_EXTENT x
    it: an estimate at image_size is far below), padded ones and a crop_size resampled to image_size; the LDM's cache
    and a ControlNet's (with its label maps)."""
    from medimgen.config.kinds import kind
    from medimgen.planning.latent_cache import CachedCases, cache_bytes, cached_cases
    from medimgen.training import latents

    key = {"larger": 0.90625, "smaller": 0.875, "resampled": 0.84375}[geometry]
    ae, cfg, config, plans, ids, shapes = _sized(workspace, dim, geometry, key)
    cases = cached_cases(config, dim, plans.folder)
    assert cases.from_fingerprint
    # nnU-Net's preprocessed shapes, predicted from the fingerprint (2D: slices of the in-plane shape)
    actual = [(1, s) for s in shapes] if dim == "3d" else [(s[0], s[1:]) for s in shapes]
    assert sorted(cases.cases) == sorted(actual)
    at_image_size = CachedCases(tuple((n, tuple(cfg.data.image_size)) for n, _ in cases.cases))
    for model in (["ldm", "controlnet"] if geometry == "larger" else ["ldm"]):
        folder = latents.build(cfg, plans, ids, ae, torch.device("cpu"), with_labels=kind(model).steers,
                               echo=lambda *_: None)
        manifest = json.loads((folder / "manifest.json").read_text())
        written = sum(c["bytes"] for c in manifest["cases"])
        assert len(manifest["cases"]) == len(ids) and written == manifest["bytes"]
        assert cache_bytes(cfg, model, cases) == pytest.approx(written, rel=0.10), model
        old = cache_bytes(cfg, model, at_image_size)
        if geometry == "larger":
            assert old < 0.5 * written  # every case counted at image_size: far too low
        else:
            assert old == cache_bytes(cfg, model, cases)  # what the cache holds is image_size


@pytest.mark.parametrize("dim", ["3d", "2d"])
def test_cache_that_fits_only_at_image_size_is_planned_off(workspace, dim, tmp_path):
    """Cases larger than image_size: with a free disk (or available RAM) that the cache counted at image_size would
    fit and its true size does not, the rule says off, naming the budget; without a readable fingerprint the estimate
    falls back to image_size samples and the reason says so."""
    from medimgen.planning.latent_cache import DISK_SHARE, RAM_SHARE, CachedCases, cache_bytes, cached_cases, decide

    _, cfg, config, plans, _, _ = _sized(workspace, dim, "larger", 0.90625)
    cfg = cfg.with_train("ldm", epochs=10_000)  # training draws far more samples than the cache holds
    cases = cached_cases(config, dim, plans.folder)
    at_image_size = CachedCases(tuple((n, tuple(cfg.data.image_size)) for n, _ in cases.cases))
    true, low = cache_bytes(cfg, "ldm", cases), cache_bytes(cfg, "ldm", at_image_size)
    assert true > 2 * low
    plenty, budget = 1e15, (low + true) / 2
    for disk, ram, where in ((budget / DISK_SHARE, plenty, "free disk"), (plenty, budget / RAM_SHARE, "available RAM")):
        assert decide(cfg, "ldm", at_image_size, disk, ram).on
        d = decide(cfg, "ldm", cases, disk, ram)
        assert not d.on and d.bytes == true and where in d.reason, d.reason
        slices = f" ({cases.samples} slices)" if dim == "2d" else ""
        assert d.reason.startswith(f"off: {len(cases.cases)} cases{slices}, {true / 1e6:.1f} MB is more than ")
    fallback = cached_cases(config, dim, tmp_path)  # no dataset_fingerprint.json there
    depth = config.get("3d").data.median_image_size[0] if dim == "2d" else 1
    assert not fallback.from_fingerprint and fallback.samples == config.dataset.num_training * depth
    assert "no readable dataset_fingerprint.json" in decide(cfg, "ldm", fallback, plenty, plenty).reason
