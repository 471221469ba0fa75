"""Memory estimator (simulated CUDA step) against H100 measurements, and the fitter at 3 GB vs 80 GB targets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medimgen.config import apply_overrides, load_config
from medimgen.config.schema import AutoencoderConfig, DiscriminatorConfig, UNetConfig
from medimgen.models.losses import kl_loss
from medimgen.models.networks import build_autoencoder, build_discriminator, build_unet
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.planning import memory as mem
from medimgen.planning import plan_dataset
from medimgen.nnunet.synthetic import make_synthetic_dataset

BIG_3D = 203


# Measured on an NVIDIA H100 80GB (torch 2.11 + cu130, MONAI 1.6.1, bf16 autocast): MLflow's
# max_memory_allocated_gb of `medimgen train M 501 train-val-test DIM` (2 epochs x 10 iterations,
# discriminator from the start, AlexNet weights present) for the config tests/data/Dataset501_config_8GB.yaml,
# copied from ../shared/reference/GPU.md (planned by `medimgen plan -d 501 --gpu-memory 8` with the old estimator).
H100_MEASURED_GB = {("autoencoder", "3d"): 5.73, ("ldm", "3d"): 2.18, ("ddpm", "3d"): 10.64,
                    ("autoencoder", "2d"): 5.87, ("ldm", "2d"): 6.71, ("ddpm", "2d"): 14.28}
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def h100_config():
    return load_config(DATA / "Dataset501_config_8GB.yaml")


@pytest.mark.parametrize("model,dim", list(H100_MEASURED_GB))
def test_estimate_reproduces_h100_measurements(h100_config, model, dim, monkeypatch):
    from medimgen.models import networks

    monkeypatch.setattr(networks, "FLASH_ATTENTION", False)  # the measured runs used MONAI's plain attention
    predicted = mem.estimate(h100_config.get(dim), model).peak_gb
    measured = H100_MEASURED_GB[(model, dim)]
    assert abs(predicted - measured) / measured < 0.15, (model, dim, predicted, measured)


def _dtype_trace(build, policy):
    """(op, output dtypes) of a forward under bf16 autocast: 'cuda' = CUDA's own policy on fake CUDA tensors,
    'emulated' = medimgen's emulation on meta tensors, 'cpu' = plain CPU autocast on fake CPU tensors (prim ops and
    batch-norm statistics left out)."""
    from contextlib import ExitStack

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from medimgen.planning.cuda_sim import cuda_autocast_policy

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not str(func).startswith("prim."):
                dtypes = [t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                ops.append((str(func), dtypes[:1] if "batch_norm" in str(func) else dtypes))
            return out

    with ExitStack() as stack:
        if policy == "emulated":  # what the simulation runs: meta tensors
            stack.enter_context(torch.device("meta"))
            stack.enter_context(cuda_autocast_policy())
        else:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(torch.device(policy))
        fn = build()
        if policy == "cuda":  # torch.autocast refuses without a GPU; the switches underneath do not
            prev = torch.is_autocast_enabled("cuda")
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            stack.callback(torch.set_autocast_enabled, "cuda", prev)
        else:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        with Record():
            fn()
    return ops


UNET = UNetConfig(channels=(32, 64, 64), strides=((2, 2), (1, 2)), attention_levels=(False, True, True),
                  num_res_blocks=1, num_head_channels=32, norm_num_groups=32)
AE = AutoencoderConfig(channels=(32, 64), strides=((2, 2),), latent_channels=4, num_res_blocks=1, norm_num_groups=32)


def _unet_step():
    unet = build_unet(UNET, 2, 1)
    x = torch.randn(2, 1, 32, 32)
    return lambda: F.mse_loss(unet(x, timesteps=torch.full((2,), 5)).float(), x.float())


def _autoencoder_step():
    ae, disc = build_autoencoder(AE, 2, 1), build_discriminator(DiscriminatorConfig(channels=32, num_layers=2), 2, 1)
    x = torch.randn(2, 1, 32, 32)

    def step():
        recon, mu, sigma = ae(x)
        logits = disc(recon.contiguous().float())[-1]
        return F.l1_loss(recon.float(), x.float()) + kl_loss(mu.float(), sigma.float()) + F.mse_loss(
            logits, torch.ones_like(logits))
    return step


@pytest.mark.parametrize("build", [_unet_step, _autoencoder_step])
def test_emulated_autocast_casts_like_cuda_autocast(build, monkeypatch):
    """Every op of a forward gets the dtype CUDA autocast gives it (oracle: fake CUDA tensors, no GPU needed).

    Attention runs MONAI's plain (einsum) path here: which scaled-dot-product kernel a fake CUDA
    tensor gets is not the one a real GPU picks."""
    from medimgen.models import networks

    monkeypatch.setattr(networks, "FLASH_ATTENTION", False)
    cuda, emulated = _dtype_trace(build, "cuda"), _dtype_trace(build, "emulated")
    assert [op for op, _ in cuda] == [op for op, _ in emulated]
    assert cuda == emulated
    plain_cpu = [d for _, d in _dtype_trace(build, "cpu")]
    assert plain_cpu != [d for _, d in emulated]  # the emulation changes what CPU autocast does (group_norm, ...)


def test_adamw_and_ema_are_counted_as_their_foreach_calls_allocate():
    """AdamW's moments, its step's temporaries and the EMA copy are counted, not run (cuda_sim._Phase): the same
    live bytes after every allocation as the tensors torch.optim.AdamW(foreach=True) makes (its
    _multi_tensor_adam calls, run here on fake tensors; the real optimiser reads the step count with .item()).
    Gradient clipping has a test of its own."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from medimgen.planning.cuda_sim import LiveBytes, _Phase

    with FakeTensorMode(allow_non_fake_inputs=True):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 40, 3), torch.nn.GroupNorm(4, 40), torch.nn.Conv2d(40, 5, 1))
        net(torch.randn(2, 3, 9, 9)).sum().backward()
        net[1].bias.grad = None  # a parameter without a gradient gets no temporary
        params = list(net.parameters())
        made = LiveBytes("cpu")
        with made:
            made.track(params)  # as simulate tracks the networks it builds
            m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
            ema = [p.detach().clone() for p in params]
            keep = [i for i, p in enumerate(params) if p.grad is not None]
            grads = [params[i].grad for i in keep]
            weights = [params[i].detach() for i in keep]
            torch._foreach_mul_(weights, 1 - 1e-4 * 0.01)
            torch._foreach_lerp_([m[i] for i in keep], grads, 0.1)
            torch._foreach_mul_([v[i] for i in keep], 0.999)
            torch._foreach_addcmul_([v[i] for i in keep], grads, grads, 0.001)
            denom = torch._foreach_sqrt([v[i] for i in keep])
            torch._foreach_add_(denom, 1e-8)
            torch._foreach_addcdiv_(weights, [m[i] for i in keep], denom, -1e-4)
            del denom
            torch._foreach_lerp_(ema, [p.detach() for p in params], 0.001)
        counted = LiveBytes("cpu")
        with counted:
            counted.track(params)
            phase = _Phase([net], SimpleNamespace(grad_clip=None))
            counted.allocate(phase.state_sizes() + [p.numel() * p.element_size() for p in params])
            phase.step(counted)
    assert len(made.trace) == len(params) + 3 * len(params) + len(params) - 1
    assert counted.trace == made.trace and counted.live == made.live


def test_gradient_clipping_is_counted_as_torch_allocates():
    """cuda_sim._clip_grad_norm counts what torch.nn.utils.clip_grad_norm_(foreach=True) allocates, in order."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from medimgen.planning.cuda_sim import LiveBytes, _clip_grad_norm

    for n in (1, 3, 200):
        with FakeTensorMode(allow_non_fake_inputs=True):
            params = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(n)]
            for p in params:
                p.grad = torch.randn(7, 5)
            grads = [p.grad for p in params]
            made, counted = LiveBytes("cpu"), LiveBytes("cpu")
            with made:
                made.track(grads)
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            counted.track(grads)
            _clip_grad_norm(counted, n)
        assert counted.trace == made.trace and counted.live == made.live, n


def test_networks_built_on_meta_hold_what_a_fake_build_holds():
    """cuda_sim._built (a network made on the meta device, tensors made on the CPU moved to it) holds meta tensors of
    the same sizes, dtypes and storages as building it under the fake mode (parameters, buffers, MONAI's plain
    tensor attributes), and its build dispatches nothing to the tracker."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from medimgen.planning.cuda_sim import LiveBytes, _built, _tensors

    ucfg = UNetConfig(channels=(32, 64), strides=((2, 2),), attention_levels=(False, True), num_res_blocks=1,
                      num_head_channels=32, norm_num_groups=32)
    build = lambda: build_unet(ucfg, 2, 1)

    def held(tracker, tensors):
        tracker.track(tensors)
        return tracker.live, [(tuple(t.shape), t.dtype, t.requires_grad) for t in tensors]

    fake = LiveBytes("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True), fake:
        tensors = _tensors(build())
        assert all(isinstance(t, FakeTensor) for t in tensors)
        expected = held(fake, tensors)
    meta = LiveBytes()
    with torch.device("meta"), meta:
        tensors = _tensors(_built(build))
        assert meta.trace == [] and all(t.device.type == "meta" for t in tensors)
        assert held(meta, tensors) == expected


def test_2d_ddpm_estimate_grows_with_batch_as_simulated(h100_config):
    """Every micro-batch >= 2 follows from two simulated ones (checked against a direct one)."""
    from medimgen.planning.cuda_sim import simulate

    cfg = h100_config.get("2d")
    peaks = [mem.estimate(apply_overrides(cfg, [f"train_ddpm.batch_size={b}"]), "ddpm").peak_bytes for b in (1, 8, 53, 106)]
    assert peaks == sorted(peaks) and peaks[-1] > 10 * peaks[0]
    direct = simulate(apply_overrides(cfg, ["train_ddpm.batch_size=37"]), "ddpm").peak_bytes * mem.CUDA_OVERHEAD
    assert mem.estimate(apply_overrides(cfg, ["train_ddpm.batch_size=37"]), "ddpm").peak_bytes == pytest.approx(direct, rel=0.01)
    # per sample: the slope of the measured plan, ~0.13 GB per 192x160 image with checkpointing
    assert 0.08 < (peaks[-1] - peaks[-2]) / 53 / mem.GIB < 0.2


def test_ema_is_the_step_without_it_plus_the_copy(h100_config):
    """A step with EMA is the step without it, every live count higher by the EMA copy (it exists before the step):
    so one simulation serves both, and the estimate adds the copy to the EMA-off profile."""
    from medimgen.planning.cuda_sim import simulate

    cfg = h100_config.get("3d")
    on, off = (simulate(apply_overrides(cfg, [f"train_ldm.ema_decay={v}"]), "ldm") for v in ("0.999", "null"))
    assert on.ema_bytes == off.ema_bytes >= 4 * on.params
    assert on.trace == tuple(x + on.ema_bytes for x in off.trace)
    assert on.static_bytes == off.static_bytes + on.ema_bytes
    mem._profiles.clear()
    estimated = mem.estimate(apply_overrides(cfg, ["train_ldm.ema_decay=0.999"]), "ldm").peak_bytes
    assert estimated == pytest.approx(on.peak_bytes * mem.CUDA_OVERHEAD, rel=1e-9)


@pytest.mark.parametrize("model", ["ddpm", "autoencoder"])
def test_remembered_meta_kernels_allocate_as_the_decompositions(h100_config, model, monkeypatch):
    """The group norm and addmm meta kernels run once per signature (cuda_sim._remembered): every later call's
    outputs have the layouts the first one gave, so the whole step's trace equals the one without memory."""
    from medimgen.planning import cuda_sim

    cfg = apply_overrides(h100_config.get("3d"), ["train_ddpm.grad_accumulation_steps=2"])
    monkeypatch.setattr(cuda_sim, "_LAYOUTS", {})
    remembered = cuda_sim.simulate(cfg, model)
    assert sum(len(v) for v in cuda_sim._LAYOUTS.values()) > 3  # signatures were remembered and reused
    monkeypatch.setattr(cuda_sim, "_REMEMBERED", ())
    plain = cuda_sim.simulate(cfg, model)
    assert remembered == plain


def test_checkpointing_lowers_the_estimate(h100_config):
    cfg = h100_config.get("3d")
    for model, key in (("ddpm", "ddpm_unet"), ("autoencoder", "autoencoder")):
        off = mem.estimate(apply_overrides(cfg, [f"{key}.activation_checkpointing=false"]), model).peak_bytes
        on = mem.estimate(apply_overrides(cfg, [f"{key}.activation_checkpointing=true"]), model).peak_bytes
        assert on < 0.8 * off, (model, on / off)


def test_flash_attention_keeps_attention_memory_linear(monkeypatch):
    """3D UNet with attention at a 32^3 level: plain attention holds 32768^2 scores (> 4 GiB in float32)."""
    from medimgen.models import networks
    from medimgen.planning.cuda_sim import peak_of

    unet_cfg = UNetConfig(channels=(32, 32), strides=((2, 2, 2),), attention_levels=(False, True), num_res_blocks=1,
                          num_head_channels=32, norm_num_groups=32)

    def build():
        unet = networks.build_unet(unet_cfg, 3, 1)
        x = torch.randn(1, 1, 64, 64, 64)
        return lambda: unet(x, timesteps=torch.tensor([3]))

    assert networks.FLASH_ATTENTION
    flash = peak_of(build)
    monkeypatch.setattr(networks, "FLASH_ATTENTION", False)
    plain = peak_of(build)
    # what remains with flash attention is the convolutions' activations at 64^3 (~1 GiB)
    assert plain > 4 * mem.GIB and flash < plain / 10, (plain / mem.GIB, flash / mem.GIB)


@pytest.fixture(scope="module")
def planned_3d(nnunet_roots):
    from tests.conftest import ANISO_3D, plan_once

    return plan_once(ANISO_3D).config.get("3d")


def test_prediction_grows_with_batch_and_size_and_checkpointing_lowers_it(planned_3d):
    cfg = planned_3d
    base = mem.estimate(cfg, "ddpm").peak_bytes
    bigger_batch = mem.estimate(apply_overrides(cfg, [f"train_ddpm.batch_size={cfg.train_ddpm.batch_size * 2}"]), "ddpm")
    assert bigger_batch.peak_bytes > base
    size = [2 * s for s in cfg.data.image_size]
    bigger_image = mem.estimate(apply_overrides(cfg, [f"data.image_size={size}".replace(" ", "")]), "ddpm")
    assert bigger_image.activation_bytes > 7 * mem.estimate(cfg, "ddpm").activation_bytes  # 8x voxels (+attention)
    ckpt = mem.estimate(apply_overrides(cfg, ["ddpm_unet.activation_checkpointing=true"]), "ddpm")
    assert ckpt.peak_bytes < base
    ae_ckpt = mem.estimate(apply_overrides(cfg, ["autoencoder.activation_checkpointing=true"]), "autoencoder")
    assert ae_ckpt.peak_bytes < mem.estimate(cfg, "autoencoder").peak_bytes
    no_amp = mem.estimate(apply_overrides(cfg, ["train_ddpm.amp=off"]), "ddpm")
    assert no_amp.activation_bytes > mem.estimate(cfg, "ddpm").activation_bytes


@pytest.fixture(scope="module")
def big_dataset(nnunet_roots):
    make_synthetic_dataset(nnunet_roots["nnUNet_raw"], BIG_3D, "Big", num_cases=4, shape=(96, 96, 56),
                           spacing=(1.0, 1.0, 1.5), seed=9)
    plan_and_preprocess(BIG_3D, quiet=True)
    return BIG_3D


def test_fitter_3gb_vs_80gb(big_dataset, nnunet_env):
    from click.testing import CliRunner

    from medimgen.cli import main

    small = plan_dataset(big_dataset, gpu_memory_gb=3, force=True).config.get("3d")
    r = CliRunner().invoke(main, ["plan", "-d", str(big_dataset), "--gpu-memory", "80", "--force", "--explain"])
    assert r.exit_code == 0, r.output
    assert "peak GB" in r.output and "ddpm" in r.output
    large = load_config(nnunet_env["nnUNet_preprocessed"] / "Dataset203_Big" / "medimgen_config.yaml").get("3d")
    assert small.derived.memory_fitted and large.derived.memory_fitted
    # the LDM's 88 M parameters with AdamW need ~1.8 GB at any size: 3 GB (2.35 usable) is the smallest card here
    assert all(v <= 3 * 0.95 - 0.5 for v in small.derived.predicted_peak_gb.values())
    assert max(large.derived.predicted_peak_gb.values()) >= 2.0  # the 80 GB plan did not need squeezing
    settings = lambda c: (c.ddpm_unet.activation_checkpointing, c.autoencoder.activation_checkpointing,
                          c.train_ddpm.batch_size, c.train_ddpm.grad_accumulation_steps, c.data.image_size)
    assert settings(small) != settings(large)
    # the effective batch is kept
    for m in ("autoencoder", "ddpm", "ldm"):
        s, l = getattr(small, f"train_{m}"), getattr(large, f"train_{m}")
        assert s.batch_size * s.grad_accumulation_steps >= l.batch_size * l.grad_accumulation_steps
    # the 3 GB plan is valid: its networks build and its estimate agrees with what it recorded
    build_unet(small.ddpm_unet, 3, small.data.in_channels)
    assert mem.estimate(small, "ddpm").peak_gb == pytest.approx(small.derived.predicted_peak_gb["ddpm"], rel=1e-3)
    assert small.memory.target_gb == 3 and large.memory.target_gb == 80


def test_fitter_leaves_a_size_at_its_first_misfit(planned_3d, monkeypatch, tmp_path):
    """A size where one model does not fit is left before the models after it are simulated; for a plan that fits,
    the result is each model's cheapest settings at the first size where all fit, as fitting every model at every
    size gave (a plan that cannot fit at all may stop at another size: the parameter bound sees the models tried)."""
    from medimgen.config.kinds import names
    from medimgen.planning import cuda_sim

    cfg = apply_overrides(planned_3d, [f"data.image_size={[2 * s for s in planned_3d.data.image_size]}".replace(" ", "")])
    # a target the DDPM cannot meet at this size even at its cheapest settings, but meets one size down
    cheapest = lambda c: mem.fit_model(c, "ddpm", 0.0)[0]
    here, below = (mem.estimate(cheapest(c), "ddpm").peak_bytes for c in (cfg, mem._downscale(cfg, mem.DOWNSCALE_STEP)))
    assert below < here
    target_gb = ((here + below) / 2 + mem.CONTEXT_BYTES) / mem.USABLE / mem.GIB
    monkeypatch.setenv("MEDIMGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mem, "_profiles", {})
    simulated = []  # (image size, model) of every simulation, in order
    real = cuda_sim.simulate
    monkeypatch.setattr(cuda_sim, "simulate", lambda c, m: simulated.append((tuple(c.data.image_size), m)) or real(c, m))
    fitted = mem.fit_to_memory(cfg, target_gb)
    assert fitted.derived.memory_fitted
    sizes = list(dict.fromkeys(size for size, _ in simulated))
    assert len(sizes) >= 2 and sizes[-1] == tuple(fitted.data.image_size)
    order = list(names())
    for size in sizes[:-1]:  # a left size: only the models up to the first that did not fit were simulated
        models = list(dict.fromkeys(m for s, m in simulated if s == size))
        assert models == order[:len(models)] and len(models) < len(order)
    assert {m for s, m in simulated if s == sizes[-1]} == set(order)
    # the same plan as fitting each model on its own at the chosen size
    at = mem._downscale(cfg, mem.DOWNSCALE_STEP ** (len(sizes) - 1))
    for m in order:
        alone = mem.fit_model(at, m, target_gb * mem.GIB)[0]
        assert (alone.train_for(m), alone.network_for(m)) == (fitted.train_for(m), fitted.network_for(m))


def test_downscaled_plan_loads_batches_at_generated_size(planned_3d, nnunet_env):
    """The last resort (coarser spacing) crops native voxels and resamples them to image_size."""
    from medimgen.data.cases import open_cases
    from medimgen.data.loader import TrainBatches, validation_batches
    from medimgen.nnunet.plans import DatasetPlans
    from tests.conftest import ANISO_3D

    cfg = mem._downscale(planned_3d, 2.0)
    assert tuple(cfg.data.crop_size) == tuple(planned_3d.data.image_size)
    assert math.prod(cfg.data.image_size) < math.prod(cfg.data.crop_size)
    assert all(s <= c and s % d == 0 for s, c, d in zip(cfg.data.image_size, cfg.data.crop_size, cfg.data.size_divisor))
    assert cfg.data.spacing[1] > planned_3d.data.spacing[1]
    # samples are still cropped back to the data, now fewer (coarser) voxels
    expected = [min(s, round(d * s / c)) for d, s, c in zip(planned_3d.data.data_size, cfg.data.image_size,
                                                             cfg.data.crop_size)]
    assert list(cfg.data.data_size) == expected and planned_3d.data.data_size
    plans = DatasetPlans.from_id(ANISO_3D)
    ids = open_cases(plans.preprocessed_folder("3d")).identifiers
    b = next(TrainBatches(cfg, plans, ids, 2, num_workers=0))
    assert b["image"].shape[2:] == tuple(cfg.data.image_size)
    v = next(validation_batches(cfg, plans, ids[:1], 1))
    assert v["image"].shape[2:] == tuple(cfg.data.image_size)


def test_memory_command_flags_what_does_not_fit(h100_config):
    """The config the H100 run used: its 2D and 3D DDPM need 14.3 and 10.6 GB, more than an 8 GB card holds."""
    from click.testing import CliRunner

    from medimgen.cli import main

    r = CliRunner().invoke(main, ["memory", "--config", str(DATA / "Dataset501_config_8GB.yaml")])
    assert r.exit_code == 1, r.output
    flagged = [line for line in r.stderr.splitlines() if line.startswith("does not fit")]
    assert len(flagged) == 2 and "2d ddpm" in flagged[0] + flagged[1] and "3d ddpm" in flagged[0] + flagged[1]
    assert all("activation_checkpointing" in line or "batch_size" in line for line in flagged)
    assert "peak GB" in r.stdout and "ldm" in r.stdout and "Traceback" not in r.output
    ok = CliRunner().invoke(main, ["memory", "--config", str(DATA / "Dataset501_config_8GB.yaml"), "--gpu-memory", "80"])
    assert ok.exit_code == 0, ok.output


@pytest.mark.slow
def test_dataset501_recipe_plans_under_8gb(nnunet_env):
    """GPU.md's recipe (16 cases of 160x192x144 at 1 mm): every planned peak fits an 8 GB card."""
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 501, "Brainish", num_cases=16, shape=(160, 192, 144),
                           spacing=(1.0, 1.0, 1.0), seed=0)
    plan_and_preprocess(501, quiet=True)
    cfg = plan_dataset(501, gpu_memory_gb=8, force=True).config
    for dim, c in cfg.configs.items():
        assert c.derived.memory_fitted, dim
        assert all(gb <= 8.0 for gb in c.derived.predicted_peak_gb.values()), (dim, c.derived.predicted_peak_gb)
        assert not mem.misfits(c, dim)
