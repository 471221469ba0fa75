"""Trainer overhead vs a bare MONAI loop, and saved-activation bytes with/without checkpointing.

    python benchmarks/bench_training.py [--steps 5]

1. One DDPM optimiser step of medimgen's Trainer (hooks, phases, AMP/scaler plumbing, EMA off,
   clipping) vs a hand-written loop doing the same maths on the same model and batch.
   Batches come from memory in both, so the loader is not measured. Goal: ratio <= 1.05.
2. Peak CUDA memory of one bf16 training forward + backward of the 3D DDPM UNet and the 3D
   KL-autoencoder, with and without activation checkpointing, simulated on fake tensors with
   CUDA's autocast policy (planning/cuda_sim.py; the simulation reproduces H100 measurements
   within 3 %, tests/test_memory.py), at a real size. Goal: checkpointing cuts the activation
   peak by >= 50 %.
3. The same for attention: a 3D UNet level with self-attention over 32^3 positions, MONAI's
   plain (einsum) attention vs use_flash_attention (torch scaled-dot-product attention).
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
from medimgen.models.diffusion import training_scheduler  # noqa: E402
from medimgen.models.networks import build_autoencoder, build_unet  # noqa: E402
from medimgen.planning.cuda_sim import peak_of  # noqa: E402

SIZE_3D = (16, 32, 32)  # the overhead timing: small enough for a CPU; pass --size for real sizes on a GPU
MEMORY_SIZE_3D = (64, 128, 128)  # the simulated memory rows (no computation: any size runs on a CPU)
UNET = UNetConfig(channels=(32, 64, 128), strides=((1, 2, 2), (2, 2, 2)), attention_levels=(False, False, True),
                  num_res_blocks=2, num_head_channels=32, norm_num_groups=32)
AE = AutoencoderConfig(channels=(32, 64, 64), strides=((1, 2, 2), (2, 2, 2)), latent_channels=3, num_res_blocks=2,
                       norm_num_groups=32)


def _peak(build_net, forward):
    def build():
        net = build_net()
        x = torch.randn(1, 1, *MEMORY_SIZE_3D)
        return lambda: forward(net, x)

    return peak_of(build)


def activation_table():
    """(network, checkpointing, peak bytes, parameter bytes) of one forward + backward."""
    rows = []
    for label, build, cfg, forward in (
            ("DDPM UNet", lambda c: build_unet(c, 3, 1), UNET, lambda n, x: n(x, torch.tensor([500]))),
            ("KL autoencoder", lambda c: build_autoencoder(c, 3, 1), AE, lambda n, x: n(x)[0])):
        params = 4 * sum(p.numel() for p in build(cfg).parameters())
        for ckpt in (False, True):
            rows.append((label, ckpt, _peak(lambda: build(dataclasses.replace(cfg, activation_checkpointing=ckpt)),
                                            forward), params))
    return rows


def attention_table():
    from medimgen.models import networks

    cfg = UNetConfig(channels=(32, 32), strides=((2, 2, 2),), attention_levels=(False, True), num_res_blocks=1,
                     num_head_channels=32, norm_num_groups=32)
    rows = []
    for flash in (False, True):
        networks.FLASH_ATTENTION = flash

        def build():
            net = networks.build_unet(cfg, 3, 1)
            x = torch.randn(1, 1, 64, 64, 64)
            return lambda: net(x, timesteps=torch.tensor([3]))

        rows.append((flash, peak_of(build)))
    networks.FLASH_ATTENTION = True
    return rows


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
    print("| network (3D, %s, batch 1, bf16) | checkpointing | simulated CUDA peak of forward + backward (MiB) |"
          % "x".join(map(str, MEMORY_SIZE_3D)))
    print("|---|---|---|")
    rows = activation_table()
    for name, ckpt, peak, _ in rows:
        print(f"| {name} | {'on' if ckpt else 'off'} | {peak / 2**20:.1f} |")
    for i in (0, 2):
        params = rows[i][3]
        cut = 100 * (1 - (rows[i + 1][2] - params) / (rows[i][2] - params))
        print(f"{rows[i][0]}: checkpointing cuts the peak by {100 * (1 - rows[i + 1][2] / rows[i][2]):.0f} % "
              f"(the part above the fp32 weights by {cut:.0f} %)")
    print()
    print("| attention (3D UNet level of 32^3 positions, batch 1, bf16) | simulated CUDA peak of forward + backward (GiB) |")
    print("|---|---|")
    for flash, peak in attention_table():
        print(f"| {'use_flash_attention (torch SDPA)' if flash else 'plain (einsum + softmax)'} | {peak / 2**30:.2f} |")


if __name__ == "__main__":
    main()
