"""Trainer overhead vs a bare MONAI loop, and saved-activation bytes with/without checkpointing.

    python benchmarks/bench_training.py [--steps 5]

1. One DDPM optimiser step of medimgen's Trainer (hooks, phases, AMP/scaler plumbing, EMA off,
   clipping) vs a hand-written loop doing the same maths on the same model and batch.
   Batches come from memory in both, so the loader is not measured. Goal: ratio <= 1.05.
2. Bytes saved for backward by autograd in one training forward of the 3D DDPM UNet and the 3D
   KL-autoencoder, counted with torch.autograd.graph.saved_tensors_hooks (distinct storages),
   with and without activation checkpointing. Goal: checkpointing cuts them by >= 50 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402

from medimgen.config.schema import AutoencoderConfig, SchedulerConfig, TrainConfig, UNetConfig  # noqa: E402
from medimgen.diffusion import training_scheduler  # noqa: E402
from medimgen.networks import build_autoencoder, build_unet  # noqa: E402
from medimgen.planning.memory import saved_bytes  # noqa: E402


def region_bytes(model, regions, fn) -> int:
    return saved_bytes(fn, exclude=[model], regions=regions)[1]

SIZE_3D = (16, 32, 32)  # small enough for a CPU; pass --size for real sizes on a GPU
UNET = UNetConfig(channels=(32, 64, 128), strides=((1, 2, 2), (2, 2, 2)), attention_levels=(False, False, True),
                  num_res_blocks=2, num_head_channels=32, norm_num_groups=32)
AE = AutoencoderConfig(channels=(32, 64, 64), strides=((1, 2, 2), (2, 2, 2)), latent_channels=3, num_res_blocks=2,
                       norm_num_groups=32)


def _checkpointing_rows(label, build, cfg, regions, forward):
    """Saved-activation bytes without and with checkpointing, and what checkpointing recomputes."""
    rows = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = build(dataclasses.replace(cfg, activation_checkpointing=ckpt))
        recompute = 0
        if ckpt:
            plain = build(cfg)
            recompute = region_bytes(plain, regions(plain), lambda: forward(plain))
        rows.append((label, ckpt, saved_bytes(lambda: forward(net), exclude=[net])[0], recompute))
    return rows


def activation_table(dev):
    x = torch.randn(1, 1, *SIZE_3D, device=dev)
    t = torch.tensor([500], device=dev)
    return [
        *_checkpointing_rows("DDPM UNet", lambda c: build_unet(c, 3, 1).to(dev), UNET,
                             lambda n: [*n.down_blocks, n.middle_block, *n.up_blocks], lambda n: n(x, t)),
        *_checkpointing_rows("KL autoencoder", lambda c: build_autoencoder(c, 3, 1).to(dev), AE,
                             lambda n: [*n.encoder.blocks, *n.decoder.blocks], lambda n: n(x)[0]),
    ]


def overhead(dev, steps):
    from medimgen.training.loop import LoopOptions, Trainer

    class FixedTask:
        name = "ddpm"
        ema_module = None

        def __init__(self, unet, sched):
            self.unet, self.sched = unet, sched
            self.modules = {"unet": unet}
            self.phase_modules = {"diffusion": ["unet"]}

        def active_phases(self, epoch):
            return ["diffusion"]

        def loss(self, phase, batch, state):
            noise = torch.randn_like(batch["image"])
            ts = torch.randint(0, 1000, (batch["image"].shape[0],), device=dev)
            pred = self.unet(self.sched.add_noise(batch["image"], noise, ts), timesteps=ts)
            loss = F.mse_loss(pred, noise)
            return loss, {"loss": loss.item()}

    x = torch.randn(2, 1, *SIZE_3D, device=dev)
    sched = training_scheduler(SchedulerConfig())

    def batches():
        while True:
            yield {"image": x}

    torch.manual_seed(0)
    unet_a = build_unet(UNET, 3, 1).to(dev)
    cfg = TrainConfig(epochs=1, batch_size=2, iterations_per_epoch=steps, amp="off", grad_clip=1.0)
    trainer = Trainer(FixedTask(unet_a, sched), cfg, None, None, torch.device(dev), batches(), None, None,
                      LoopOptions(), "")
    torch.manual_seed(0)
    unet_b = build_unet(UNET, 3, 1).to(dev)
    opt = torch.optim.AdamW(unet_b.parameters(), lr=1e-4)

    def bare():
        for _ in range(steps):
            noise = torch.randn_like(x)
            ts = torch.randint(0, 1000, (2,), device=dev)
            loss = F.mse_loss(unet_b(sched.add_noise(x, noise, ts), timesteps=ts), noise)
            loss.item()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet_b.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def ours():
        trainer.train_epoch(0)

    def timed(fn):
        fn()  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps

    results = {"bare": [], "ours": []}
    for _ in range(3):  # interleave to even out machine noise
        results["bare"].append(timed(bare))
        results["ours"].append(timed(ours))
    return min(results["bare"]), min(results["ours"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", default=None, help="3D size z,y,x (default 16,32,32)")
    args = ap.parse_args()
    global SIZE_3D
    if args.size:
        SIZE_3D = tuple(int(v) for v in args.size.split(","))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device_name()}")
    bare, ours = overhead(dev, args.steps)
    print("| loop | s/step (DDPM UNet 3D, batch 2, %s) |" % "x".join(map(str, SIZE_3D)))
    print("|---|---|")
    print(f"| bare MONAI loop | {bare:.3f} |\n| medimgen Trainer | {ours:.3f} |\n| ratio | {ours / bare:.3f} |")
    print()
    print("| network | checkpointing | saved activations after forward (MiB) | + largest region recomputed in backward (MiB) |")
    print("|---|---|---|---|")
    rows = activation_table(dev)
    for name, ckpt, b, r in rows:
        print(f"| {name} | {'on' if ckpt else 'off'} | {b / 2**20:.1f} | {r / 2**20:.1f} |")
    for i in (0, 2):
        saved = 100 * (1 - rows[i + 1][2] / rows[i][2])
        peak = 100 * (1 - (rows[i + 1][2] + rows[i + 1][3]) / rows[i][2])
        print(f"{rows[i][0]}: checkpointing cuts saved activations by {saved:.0f} %, "
              f"the activation peak (saved + one recomputed region) by {peak:.0f} %")


if __name__ == "__main__":
    main()
