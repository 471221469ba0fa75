"""Seconds per sample: DDIM vs rectified flow at equal steps, float32 vs AMP; and the peak CUDA memory of an LDM's
decoding, whole and tiled, next to its prediction.

    python benchmarks/bench_sampling.py [--config FILE] [--dims 2d,3d] [--models ddpm,ldm] [--steps 20]
        [--size 2d=64x64 --size 3d=32x64x64] [--tiny] [--batch 1] [--repeats 1] [--out results.json]
    python benchmarks/bench_sampling.py --decode-memory [--config FILE] [--gpu-memory GB] [--out decode.json]

Networks are built from a medimgen config (default: tests/data/Dataset501_config_8GB.yaml, the planned 2d/3d
networks of an 8 GB plan) without a dataset: only torch, MONAI, numpy and PyYAML are needed (no nnU-Net, no
MLflow). Speed does not depend on the weights, so the networks are untrained. ``--size`` generates at another
image size (a multiple of the config's size_divisor), ``--tiny`` uses the tests' tiny networks. AMP (bf16 where the
GPU supports it) only exists on a GPU: on the CPU its columns are "-". DDPM (1000 steps) is DDIM's per-step time
x 1000: every step is one UNet forward.

``--decode-memory`` (needs a GPU for the measured column; the prediction is printed anywhere): the 3D LDM
autoencoder of the config at its planned native image size, decoding one latent in one piece, in the first
latent window, and in the window `medimgen sample` picks for ``--gpu-memory`` (default: this GPU), each run with
``torch.cuda.max_memory_allocated`` reset after the autoencoder and the latent are on the GPU, next to
medimgen.planning.sampling_memory's prediction (which counts the autoencoder's weights and the latent too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medimgen.config import apply_overrides, load_config  # noqa: E402
from medimgen.models.decoding import decoder  # noqa: E402
from medimgen.core.devices import amp_dtype, autocast  # noqa: E402
from medimgen.models.diffusion import generate  # noqa: E402
from medimgen.models.networks import autoencoder_for, unet_for  # noqa: E402

DEFAULT_CONFIG = ROOT / "tests" / "data" / "Dataset501_config_8GB.yaml"
GIB = 2**30


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def configs(args):
    cfg = load_config(args.config)
    sizes = dict(s.split("=") for s in args.size)
    out = {}
    for dim in args.dims.split(","):
        c = cfg.get(dim)
        sets = []
        if args.tiny:
            sys.path.insert(0, str(ROOT / "tests"))
            from training_helpers import tiny_overrides

            sets += [s for s in tiny_overrides(c) if "num_inference_steps" not in s]
        if dim in sizes:
            sets.append(f"data.image_size=[{sizes[dim].replace('x', ',')}]")
        out[dim] = apply_overrides(c, sets) if sets else c
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(cfg, model, unet, decode, scheduler_type, steps, amp, batch, device, repeats) -> float:
    """Seconds per image, best of ``repeats``."""
    cfg = apply_overrides(cfg, [f"{model}_scheduler.type={scheduler_type}"])
    best = float("inf")
    for r in range(repeats + 1):  # the first call warms up (cuDNN autotuning, allocations)
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad(), autocast(device, amp_dtype("auto" if amp else "off", device)):
            generate(cfg, model, unet, batch, seed=r, steps=1 if r == 0 else steps, device=device, decode=decode)
        _sync(device)
        if r:
            best = min(best, (time.perf_counter() - t) / batch)
    return best


def speed(args, device) -> list[dict]:
    rows = []
    gpu = device.type == "cuda"
    s = args.steps
    print(f"device: {device_name()}; {args.batch} image(s) per call, best of {args.repeats}; seconds per image")
    print(f"| dim | model | image size | DDIM-{s} | DDIM-{s} AMP | RFlow-{s} | RFlow-{s} AMP | DDPM-1000 (from DDIM) |")
    print("|---|---|---|---|---|---|---|---|")
    for dim, cfg in configs(args).items():
        for model in args.models.split(","):
            torch.manual_seed(0)
            unet = unet_for(cfg, model).to(device).eval()
            decode = None
            if model == "ldm":
                decode = decoder(autoencoder_for(cfg).to(device).eval(), 1.0)
            row = {"dim": dim, "model": model, "image_size": list(cfg.data.image_size), "steps": s,
                   "batch": args.batch, "device": device_name()}
            for name, sched in (("ddim", "ddpm"), ("rflow", "rflow")):
                row[name] = timed(cfg, model, unet, decode, sched, s, False, args.batch, device, args.repeats)
                row[f"{name}_amp"] = (timed(cfg, model, unet, decode, sched, s, True, args.batch, device, args.repeats)
                                      if gpu else None)
            row["ddpm_1000"] = row["ddim"] / s * 1000
            rows.append(row)
            f = (lambda v: "-" if v is None else f"{v:.3f}")
            print(f"| {dim} | {model} | {'x'.join(map(str, cfg.data.image_size))} | {f(row['ddim'])} | "
                  f"{f(row['ddim_amp'])} | {f(row['rflow'])} | {f(row['rflow_amp'])} | ~{row['ddpm_1000']:.1f} |")
            del unet, decode
            if gpu:
                torch.cuda.empty_cache()
    return rows


def decode_memory(args, device) -> list[dict]:
    from medimgen.models.networks import latent_size
    from medimgen.planning.sampling_memory import latent_tiles, plan_sampling, predict_peak

    cfg = load_config(args.config).get("3d")
    if args.size:
        cfg = configs(argparse.Namespace(**{**vars(args), "dims": "3d"}))["3d"]
    gpu = device.type == "cuda"
    target = (args.gpu_memory * GIB if args.gpu_memory else
              torch.cuda.get_device_properties(device).total_memory if gpu else cfg.memory.target_gb * GIB)
    chosen = plan_sampling(cfg, "ldm", 1, target, amp=True).tile
    tiles = {"whole": None, "first window": next(latent_tiles(cfg), None)}
    if chosen is not None:
        tiles[f"fits {target / GIB:g} GB"] = chosen
    print(f"device: {device_name()}; 3D LDM autoencoder decoding 1 latent {list(latent_size(cfg))} -> image "
          f"{list(cfg.data.image_size)}, AMP (bf16 where supported)")
    print("| decoding | latent tile | predicted peak GB | measured peak GB | measured / predicted | seconds |")
    print("|---|---|---|---|---|---|")
    rows = []
    ae = autoencoder_for(cfg).to(device).eval() if gpu else None
    for name, tile in tiles.items():
        predicted = predict_peak(cfg, "ldm", 1, tile, amp=True, unet=False)
        measured = seconds = None
        if gpu:
            z = torch.randn(1, cfg.autoencoder.latent_channels, *latent_size(cfg), device=device)
            run = decoder(ae, 1.0, tile, cfg.autoencoder)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            with torch.no_grad(), autocast(device, amp_dtype("auto", device)):
                run(z)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            measured = torch.cuda.max_memory_allocated(device)
            del z
            torch.cuda.empty_cache()
        rows.append({"decoding": name, "tile": list(tile) if tile else None, "predicted_bytes": predicted,
                     "measured_bytes": measured, "seconds": seconds, "device": device_name(),
                     "image_size": list(cfg.data.image_size)})
        f = (lambda v, d=GIB: "-" if v is None else f"{v / d:.2f}")
        print(f"| {name} | {list(tile) if tile else '-'} | {f(predicted)} | {f(measured)} | "
              f"{'-' if measured is None else f'{measured / predicted:.3f}'} | {f(seconds, 1)} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a medimgen_config.yaml")
    ap.add_argument("--dims", default="2d,3d")
    ap.add_argument("--models", default="ddpm,ldm")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of DDIM and rectified flow")
    ap.add_argument("--size", action="append", default=[], metavar="DIM=AxB[xC]", help="image size per dim")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny networks")
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--decode-memory", action="store_true", help="peak memory of decoding instead of speed")
    ap.add_argument("--gpu-memory", type=float, default=None, help="GB the picked decoding window must fit")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = decode_memory(args, device) if args.decode_memory else speed(args, device)
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": device_name(),
                                        "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
