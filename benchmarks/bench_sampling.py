"""Time per sample: DDPM-1000 vs DDIM-50 vs DDIM-20, DDPM and LDM UNets of the demo plan.

    python benchmarks/bench_sampling.py [--dataset ID] [--full-ddpm]

Speed does not depend on the weights, so the planned networks are used untrained. Without
--full-ddpm, DDPM-1000 is extrapolated from the measured per-step time (each step is one
UNet forward, as in DDIM) and marked so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_dataset, device_name  # noqa: E402

from medimgen.config import load_config  # noqa: E402
from medimgen.networks import build_autoencoder, build_unet  # noqa: E402
from medimgen.plans import DatasetPlans  # noqa: E402
from medimgen.sampling import Geometry, Sampler  # noqa: E402


def timed_sample(sampler: Sampler, scheduler: str, steps: int) -> float:
    t = time.perf_counter()
    sampler.sample(1, seed=0, sampler=scheduler, steps=steps)
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=int, default=None)
    ap.add_argument("--full-ddpm", action="store_true")
    args = ap.parse_args()
    plans = DatasetPlans.from_id(args.dataset or demo_dataset())
    config = load_config(plans.folder / "medimgen_config.yaml")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device_name()}; dataset {plans.name}; 1 image per call")
    print("| dim | model | image size | DDIM-20 (s) | DDIM-50 (s) | DDPM-1000 (s) |")
    print("|---|---|---|---|---|---|")
    for dim in config.configs:
        cfg = config.get(dim)
        nd, c = cfg.data.spatial_dims, cfg.data.in_channels
        geo = Geometry(tuple(cfg.data.spacing), (0, 1, 2), tuple(cfg.data.spacing))
        for kind in ("ddpm", "ldm"):
            if kind == "ddpm":
                s = Sampler("ddpm", cfg, build_unet(cfg.ddpm_unet, nd, c).eval(), None, None, geo, plans.name)
            else:
                s = Sampler("ldm", cfg, build_unet(cfg.ldm_unet, nd, cfg.autoencoder.latent_channels).eval(),
                            build_autoencoder(cfg.autoencoder, nd, c).eval(), 1.0, geo, plans.name)
            s.to(dev)
            timed_sample(s, "ddim", 2)  # warm-up
            t20 = timed_sample(s, "ddim", 20)
            t50 = timed_sample(s, "ddim", 50)
            if args.full_ddpm:
                t1000 = f"{timed_sample(s, 'ddpm', 1000):.1f}"
            else:
                t1000 = f"~{(t50 - t20) / 30 * 1000 + (t20 - (t50 - t20) / 30 * 20):.1f} (extrapolated)"
            size = "x".join(map(str, cfg.data.image_size))
            print(f"| {dim} | {kind} | {size} | {t20:.2f} | {t50:.2f} | {t1000} |")


if __name__ == "__main__":
    main()
