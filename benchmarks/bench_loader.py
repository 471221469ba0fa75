"""Loader throughput vs training step rate, 2D and 3D, 0 and 2 workers.

    python benchmarks/bench_loader.py [--dataset ID] [--batches 20]

Without --dataset it uses the demo dataset (made in ./demo_workspace if needed). For each
dimensionality it reports batches/s of medimgen's nnU-Net-based training loader (mild
augmentation) with 0 and 2 worker processes, and optimiser steps/s of the planned DDPM UNet
on batches of the same size, so one sees whether loading is the bottleneck.
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
from medimgen.data.cases import open_cases  # noqa: E402
from medimgen.data.loader import TrainBatches  # noqa: E402
from medimgen.models.networks import build_unet  # noqa: E402
from medimgen.nnunet.plans import DatasetPlans  # noqa: E402


def loader_rate(cfg, plans, ids, batch, workers, n):
    tb = TrainBatches(cfg, plans, ids, batch, num_workers=workers, seed=0)
    try:
        next(tb)  # start-up (worker processes) not counted
        t = time.perf_counter()
        for _ in range(n):
            next(tb)
        return n / (time.perf_counter() - t)
    finally:
        tb.close()


def step_rate(cfg, batch, n):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    unet = build_unet(cfg.ddpm_unet, cfg.data.spatial_dims, cfg.data.in_channels).to(dev)
    opt = torch.optim.Adam(unet.parameters(), 1e-4)
    x = torch.randn(batch, cfg.data.in_channels, *cfg.data.image_size, device=dev)
    t_steps = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(unet(x, t_steps), x)
        loss.backward()
        opt.step()

    step()
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=int, default=None)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    dataset = args.dataset or demo_dataset()
    plans = DatasetPlans.from_id(dataset)
    config = load_config(plans.folder / "medimgen_config.yaml")
    print(f"device: {device_name()}; dataset {plans.name}")
    print("| dim | image size | batch | loader 0 workers (batches/s) | loader 2 workers (batches/s) | DDPM train steps/s |")
    print("|---|---|---|---|---|---|")
    for dim in config.configs:
        cfg = config.get(dim)
        ids = open_cases(plans.preprocessed_folder(dim)).identifiers
        b = cfg.train_ddpm.batch_size
        r0 = loader_rate(cfg, plans, ids, b, 0, args.batches)
        r2 = loader_rate(cfg, plans, ids, b, 2, args.batches)
        s = step_rate(cfg, b, args.steps)
        print(f"| {dim} | {'x'.join(map(str, cfg.data.image_size))} | {b} | {r0:.1f} | {r2:.1f} | {s:.2f} |")


if __name__ == "__main__":
    main()
