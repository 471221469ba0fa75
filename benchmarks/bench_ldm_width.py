"""3D LDM UNet width: parameters vs validation loss at equal optimiser steps (CPU-sized).

    python benchmarks/bench_ldm_width.py [--steps 30] [--size 8] [--batch 2] [--widths '64,128,128;128,256,320']

The planner gives the 3D LDM UNet nnU-Net's encoder widths from the stage after the
autoencoder's downsamplings (typically 128-256-320: ~88 M parameters). This trains the same
3-level UNet (strides 2, attention where a level has <= 16^3 positions, 2 residual blocks,
32 channels per head, the planned scaled-linear schedule) at several widths on the same
synthetic latents (3 channels, ``--size``^3: a fixed smooth "anatomy" template plus smooth
per-case variation, unit std as after the latent scale factor), with the same seed, batches,
noise and learning rate, and reports the validation loss (fixed noise and timesteps on held-out
latents, as the training loop's validation) after ``--steps`` steps, and seconds per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402

from medimgen.config.schema import SchedulerConfig, UNetConfig  # noqa: E402
from medimgen.models.diffusion import target_for, training_scheduler  # noqa: E402
from medimgen.models.networks import build_unet, count_parameters  # noqa: E402
from medimgen.planning.heuristics import attention_levels, norm_groups  # noqa: E402

WIDTHS = [(32, 64, 64), (64, 128, 128), (64, 128, 256), (128, 256, 320)]
CHANNELS = 3
SCHEDULER = SchedulerConfig(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)


def _smooth(x: torch.Tensor, passes: int = 3) -> torch.Tensor:
    for _ in range(passes):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x


def latents(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    template = _smooth(torch.randn(1, CHANNELS, size, size, size, generator=torch.Generator().manual_seed(0)))
    template = template / template.std()
    variation = _smooth(torch.randn(n, CHANNELS, size, size, size, generator=g))
    z = template + 0.5 * variation / variation.std() + 0.1 * torch.randn(n, CHANNELS, size, size, size, generator=g)
    return z / z.std()


def unet_config(channels, size: int) -> UNetConfig:
    strides = ((2, 2, 2),) * (len(channels) - 1)
    return UNetConfig(channels=tuple(channels), strides=strides, attention_levels=attention_levels((size,) * 3, strides, 3),
                      norm_num_groups=norm_groups(channels))


def loss(unet, scheduler, x, gen=None):
    if gen is None:
        noise, t = torch.randn_like(x), torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],))
    else:
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), generator=gen)
    pred = unet(scheduler.add_noise(original_samples=x, noise=noise, timesteps=t), timesteps=t)
    return F.mse_loss(pred, target_for(scheduler, SCHEDULER.prediction_type, x, noise, t))


@torch.no_grad()
def validate(unet, scheduler, val: torch.Tensor, repeats: int) -> float:
    unet.eval()
    gen = torch.Generator().manual_seed(1234)
    out = sum(loss(unet, scheduler, val, gen).item() for _ in range(repeats)) / repeats
    unet.train()
    return out


def run(channels, args, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(0)
    unet = build_unet(unet_config(channels, args.size), 3, CHANNELS)
    scheduler = training_scheduler(SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(1)
    curve = {0: validate(unet, scheduler, val, args.val_repeats)}
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), generator=order)
        torch.manual_seed(step)  # same noise/timesteps for every width
        loss(unet, scheduler, train[idx]).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.val_every == 0 or step == args.steps:
            curve[step] = validate(unet, scheduler, val, args.val_repeats)
    seconds = (time.time() - t0) / args.steps
    return {"channels": channels, "params": count_parameters(unet), "curve": curve, "s_per_step": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--val-repeats", type=int, default=2)
    ap.add_argument("--widths", default=None, help="e.g. '32,64,64;128,256,320'")
    args = ap.parse_args()
    widths = [tuple(int(c) for c in w.split(",")) for w in args.widths.split(";")] if args.widths else WIDTHS
    train, val = latents(64, args.size, seed=1), latents(8, args.size, seed=2)
    print(f"{time.strftime('%Y-%m-%d')}, {device_name()}, latent {CHANNELS}x{args.size}^3 synthetic, batch {args.batch}, "
          f"lr {args.lr:g}, {args.steps} steps, validation on 8 held-out latents x {args.val_repeats} fixed noise draws\n")
    steps = sorted({0, *range(args.val_every, args.steps + 1, args.val_every), args.steps})
    print("| channels | params (M) | " + " | ".join(f"val loss @{s}" for s in steps) + " | s/step |")
    print("|---|---|" + "---|" * len(steps) + "---|", flush=True)
    for w in widths:  # one row at a time: a run cut short still shows the widths it finished
        r = run(w, args, train, val)
        print(f"| {'-'.join(map(str, r['channels']))} | {r['params'] / 1e6:.1f} | "
              + " | ".join(f"{r['curve'][s]:.4f}" for s in steps) + f" | {r['s_per_step']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
