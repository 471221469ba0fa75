"""Is it the sampler or the training? medimgen's sampling code (models.diffusion.generate) checked three ways.

1. ``oracle``: exact denoisers (tests/sampler_oracle.py) instead of a trained UNet: a dataset of K fixed images
   (every sample must be one of them) and Gaussian data (the samples' spread must be the data's), for each sampler
   medimgen uses (DDIM, DDPM, rectified flow, v-prediction, cosine schedule). Tests the schedule, timesteps,
   prediction type and label handling without any training.
2. ``tiny``: a small UNet trained on 8 smooth 32x32 images (CPU, a minute or two); after each number of steps its
   noise-prediction MSE per timestep and its DDIM-25 samples with and without the x0 clamp (``clip``), and DDPM.
3. ``--runs``: trained medimgen DDPM runs (run folders; ``--workspace``: the nnU-Net folders they were trained
   from), sampled as the scorer samples them (DDIM at ``--sample-steps``, seed 100), with and without the clamp,
   scored by the image-statistics MMD against the dataset's real images; and their noise-prediction MSE per
   timestep on the held-out cases.

    python benchmarks/sampler_check.py [--parts oracle,tiny] [--tiny-steps 100,300,1000]
        [--runs RUN ... --workspace WS] [--out sampler_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medimgen.config import apply_overrides, load_config  # noqa: E402
from medimgen.models.diffusion import generate, noised, sample, sampling_scheduler, training_scheduler  # noqa: E402
from medimgen.models.networks import build_unet  # noqa: E402
from tests.sampler_oracle import FiniteDataDenoiser, GaussianDenoiser, nearest_rms, smooth_images  # noqa: E402

CONFIG = ROOT / "tests" / "data" / "Dataset501_config_8GB.yaml"
TIMESTEPS = (0, 10, 100, 300, 500, 900, 999)
SAMPLERS = [("ddim", 25, []), ("ddim", 50, []), ("ddpm", None, []), ("rflow", 20, ["ddpm_scheduler.type=rflow"]),
            ("ddim", 25, ["ddpm_scheduler.prediction_type=v_prediction"]), ("ddim", 10, ["ddpm_scheduler.schedule=cosine"])]


def _cfg(sets=()):
    return apply_overrides(load_config(CONFIG).get("2d"), ["data.image_size=[32,32]", *sets])


def oracle(log) -> list[dict]:
    rows = []
    for sampler, steps, sets in SAMPLERS:
        cfg = _cfg(sets)
        name = sampler if sampler != "rflow" else None
        data = smooth_images(4, 1, (32, 32))
        dist, _ = nearest_rms(generate(cfg, "ddpm", FiniteDataDenoiser(data, cfg.ddpm_scheduler, 2), 8, seed=3,
                                       sampler=name, steps=steps), data)
        mean = 0.3 * smooth_images(1, 1, (32, 32))[0]
        res = generate(cfg, "ddpm", GaussianDenoiser(mean, 0.2, cfg.ddpm_scheduler, 2), 16, seed=3, sampler=name,
                       steps=steps).double() - mean
        row = {"sampler": sampler, "steps": steps or 1000, "config": " ".join(sets) or "planned (linear_beta, epsilon)",
               "finite_rms_to_nearest_max": float(dist.max()), "gaussian_std": float(res.std()),
               "gaussian_bias": float(res.mean())}
        rows.append(row)
        log(row)
    return rows


def per_timestep_mse(unet, sched, x: torch.Tensor, seed: int = 0) -> dict[int, float]:
    """Noise-prediction MSE of ``unet`` on ``x`` at fixed timesteps (same noise for every model)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for t0 in TIMESTEPS:
            n = torch.randn(x.shape, generator=g)
            t = torch.full((x.shape[0],), t0, dtype=torch.long)
            out[t0] = round(F.mse_loss(unet(sched.add_noise(x, n, t), timesteps=t), n).item(), 4)
    return out


def _sample_stats(y: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> dict:
    c = y.clamp(lo, hi)
    return {"raw_std": round(float(y.std()), 3), "saturated": round(float(((c <= lo + 1e-3) | (c >= hi - 1e-3))
                                                                             .float().mean()), 3)}


def tiny(steps: list[int], log, lr: float = 1e-3) -> list[dict]:
    torch.manual_seed(0)
    cfg = _cfg(["ddpm_unet.channels=[16,32]", "ddpm_unet.strides=[[2,2]]", "ddpm_unet.attention_levels=[false,true]",
                "ddpm_unet.num_res_blocks=1", "ddpm_unet.norm_num_groups=8", "ddpm_unet.num_head_channels=8"])
    data = smooth_images(8, 1, (32, 32))
    unet = build_unet(cfg.ddpm_unet, 2, 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    sched = training_scheduler(cfg.ddpm_scheduler, 2)
    noise_ref = nearest_rms(torch.randn((8, 1, 32, 32), generator=torch.Generator().manual_seed(9)).clamp(-1, 1), data)[0]
    mean_ref = nearest_rms(data.mean(0, keepdim=True), data)[0]
    log({"reference": "rms to the nearest training image", "clamped_gaussian_noise": float(noise_ref.mean()),
         "mean_image": float(mean_ref.mean())})
    rows, t0, done = [], time.time(), 0
    for target in steps:
        unet.train()
        for _ in range(target - done):
            noisy, t, eps = noised(sched, "epsilon", data[torch.randint(len(data), (8,))])
            loss = F.mse_loss(unet(noisy, timesteps=t), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
        done = target
        unet.eval()
        row = {"step": target, "train_seconds": round(time.time() - t0, 1),
               "mse_per_timestep": per_timestep_mse(unet, sched, data.repeat(4, 1, 1, 1))}
        with torch.no_grad():
            for label, name, n, clip in (("ddim25_unclipped", "ddim", 25, None), ("ddim25_clipped", "ddim", 25, (-1.0, 1.0)),
                                         ("ddpm1000_clipped", "ddpm", None, (-1.0, 1.0))):
                y = sample(unet, sampling_scheduler(cfg.ddpm_scheduler, name, n, (32, 32), clip), (8, 1, 32, 32), seed=3)
                row[label] = {**_sample_stats(y), "rms_to_nearest": round(float(nearest_rms(y.clamp(-1, 1), data)[0]
                                                                                 .mean()), 3)}
        rows.append(row)
        log(row)
    return rows


def runs(run_dirs: list[str], workspace: str | None, sample_steps: int, num: int, log) -> list[dict]:
    if workspace:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[k] = str(Path(workspace) / k)
    from medimgen.evaluation.api import real_cases
    from medimgen.evaluation.statistics import statistics_mmd
    from medimgen.models.labels import join, network_channels
    from medimgen.runs.folders import TrainedModel

    rows, real = [], None
    for run in run_dirs:
        m = TrainedModel.from_run(run, "last")
        cfg, unet = m.cfg, m.unet.eval()
        if real is None:
            real = real_cases(cfg, str(m.dataset), subset="all")[0]
            noise = torch.randn((num, *real.shape[1:]), generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
            log({"reference": "image-statistics MMD", "clamped_gaussian_noise": round(statistics_mmd(noise, real), 3),
                 "real_images": len(real)})
        held = [real_cases(cfg, str(m.dataset), subset=s) for s in ("val", "test")]
        x = join(torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held]), cfg)
        row = {"run": Path(run).name, "channels": list(cfg.ddpm_unet.channels),
               "mse_per_timestep": per_timestep_mse(unet, training_scheduler(cfg.ddpm_scheduler, 2), x)}
        lo, hi = cfg.data.intensity_range
        c = cfg.data.in_channels
        for label, clip in (("unclipped (before #27)", None), ("clipped (now)", (lo, hi))):
            sched = sampling_scheduler(cfg.ddpm_scheduler, "ddim", sample_steps, tuple(cfg.data.image_size), clip)
            with torch.no_grad():
                y = sample(unet, sched, (num, network_channels(cfg), *cfg.data.image_size), seed=100)
            row[label] = {**_sample_stats(y[:, :c], lo, hi),
                          "mmd_stats": round(statistics_mmd(y[:, :c].clamp(lo, hi), real, (lo, hi)), 3)}
        rows.append(row)
        log(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="oracle,tiny")
    p.add_argument("--tiny-steps", default="100,300,1000")
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--workspace")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--out", default="sampler_check.json")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out: dict = {}

    def log(x):
        print(json.dumps(x), flush=True)

    parts = a.parts.split(",")
    if "oracle" in parts:
        out["oracle"] = oracle(log)
    if "tiny" in parts:
        out["tiny"] = tiny([int(s) for s in a.tiny_steps.split(",")], log)
    if a.runs:
        out["runs"] = runs(a.runs, a.workspace, a.sample_steps, a.samples, log)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
