"""Proof of learning: how far a short training moves the planned models, measured without downloaded weights.

    python benchmarks/bench_learning.py [--dataset ID] [--dim 2d] [--models ddpm,autoencoder]
        [--steps 0,100,200,400] [--samples 16] [--scheduler planned] [--set KEY=VALUE ...] [--workspace DIR]

DDPM: the image-statistics MMD (medimgen.evaluation.statistics) of samples of the raw and of the EMA weights
against all real images of the dataset (model range), after each number of optimiser steps; step 0 is the
untrained network, and Gaussian noise is the reference for "learned nothing". Autoencoder: PSNR / SSIM of
the reconstructions of the real images (evaluation.metrics.reconstruction_metrics). The networks are the
plan's, narrowed for a CPU (``--width``) and trained at the plan's learning rate with batch ``--batch``
(train_*.* overrides below); the data is the demo's synthetic phantoms (benchmarks/common.py) unless
``--dataset`` names another planned dataset. ``--scheduler`` picks the diffusion schedule (SCHEDULERS: config
overrides per name: the planned one, or rectified flow).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_dataset, device_name  # noqa: E402

from medimgen.config import apply_overrides, load_config  # noqa: E402
from medimgen.models.diffusion import generate  # noqa: E402
from medimgen.evaluation.api import real_cases, reconstruct  # noqa: E402
from medimgen.evaluation.metrics import reconstruction_metrics  # noqa: E402
from medimgen.evaluation.statistics import statistics_mmd  # noqa: E402
from medimgen.models.labels import label_channels, network_channels  # noqa: E402
from medimgen.models.networks import autoencoder_for, build_unet  # noqa: E402
from medimgen.nnunet.plans import DatasetPlans  # noqa: E402
from medimgen.runs.folders import read_checkpoint, unwrap_ema  # noqa: E402
from medimgen.training.api import RunSetup, train  # noqa: E402

# diffusion schedules to compare: name -> config overrides (a new scheduler type adds its entry here)
SCHEDULERS: dict[str, list[str]] = {"planned": [], "rflow": ["ddpm_scheduler.type=rflow", "ldm_scheduler.type=rflow"]}
SAMPLE_SEED = 100


def _l(values) -> str:
    return str(list(values)).replace(" ", "")


def cpu_overrides(cfg, model: str, width: int, batch: int, chunk: int, epochs: int) -> list[str]:
    """The plan's networks with ``width`` channels at the first level (x2 per level, at most x4), one residual
    block per level, batch ``batch``, ``chunk`` steps per epoch, no validation/plots until the end."""
    net = "autoencoder" if model == "autoencoder" else f"{model}_unet"
    levels = len(getattr(cfg, net).channels)
    sets = ["data.num_workers=0", "losses.perceptual_network=none",
            f"{net}.channels={_l(width * 2 ** min(i, 2) for i in range(levels))}", f"{net}.num_res_blocks=1",
            f"{net}.norm_num_groups={min(8, width)}",
            f"train_{model}.batch_size={batch}", f"train_{model}.grad_accumulation_steps=1",
            f"train_{model}.iterations_per_epoch={chunk}", f"train_{model}.epochs={epochs}",
            f"train_{model}.val_interval={epochs}", f"train_{model}.val_plot_interval={epochs}"]
    if model == "autoencoder":
        sets += ["discriminator.channels=8", f"losses.adversarial_warmup_epochs={epochs}"]
    else:
        sets += [f"{net}.num_head_channels={width}"]
    return sets


def ddpm_score(cfg, unet, real, samples: int) -> float:
    """MMD of ``samples`` samples (the sampler and steps of the config) against ``real``."""
    generated = generate(cfg, "ddpm", unet.eval(), samples, seed=SAMPLE_SEED)
    return statistics_mmd(generated, real, tuple(cfg.data.intensity_range))


def _ema_weights(state: dict) -> dict | None:
    return unwrap_ema(state["ema"]) if state.get("ema") else None


def run_curve(model: str, dataset: int, dim: str, cfg, steps: list[int], args, log) -> list[dict]:
    """Train ``model`` up to max(steps) optimiser steps; score it at 0 (untrained) and after each of ``steps``."""
    chunk = gcd_of(steps)
    sets = cpu_overrides(cfg, model, args.width, args.batch, chunk, max(steps) // chunk)
    if model != "autoencoder":
        sets += SCHEDULERS[args.scheduler]
    sets += list(args.set)
    run_cfg = apply_overrides(cfg, sets)
    real, real_labels, _ = real_cases(run_cfg, str(dataset), subset="all")
    joint = label_channels(run_cfg) > 0  # a joint image+label model (data.generate_labels): scored on images
    rows: list[dict] = []
    lo_hi = tuple(run_cfg.data.intensity_range)

    def score(weights: dict | None, ema: dict | None, step: int, seconds: float):
        torch.manual_seed(run_cfg.train_for(model).seed)
        if model == "autoencoder":
            ae = autoencoder_for(run_cfg)
            if weights is not None:
                ae.load_state_dict(weights)
            recon = reconstruct(ae.eval(), real, torch.device("cpu"), cfg=run_cfg, labels=real_labels)
            m = reconstruction_metrics(recon[0] if joint else recon, real)
            row = {"step": step, "psnr": m["psnr"], "ssim": m["ssim"], "seconds": seconds}
        else:
            unet = build_unet(run_cfg.unet_for(model), run_cfg.data.spatial_dims, network_channels(run_cfg))
            if weights is not None:
                unet.load_state_dict(weights)
            row = {"step": step, "mmd_raw": ddpm_score(run_cfg, unet, real, args.samples),
                   "seconds": seconds}
            if ema is not None:
                unet.load_state_dict(ema)
                row["mmd_ema"] = ddpm_score(run_cfg, unet, real, args.samples)
        rows.append(row)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    score(None, None, 0, 0.0)
    t0 = time.time()
    run_root = Path(args.workspace) / "runs" / f"{model}_{dim}_{int(t0)}"

    def on_epoch(epoch: int, metrics: dict):
        step = epoch * chunk
        if step in steps:
            state = read_checkpoint(run_root / "checkpoints" / "last.pt")
            name = "autoencoder" if model == "autoencoder" else "unet"
            score(state["modules"][name], _ema_weights(state), step, time.time() - t0)

    train(model, dataset, "train-val-test", dim, overrides=sets, echo=lambda *_: None,
          setup=RunSetup(run_root=run_root, on_epoch=on_epoch, run_name=f"bench_learning_{model}"))
    if model != "autoencoder":
        noise = torch.randn((args.samples, *real.shape[1:]), generator=torch.Generator().manual_seed(0)).clamp(*lo_hi)
        rows.append({"step": "noise", "mmd_raw": statistics_mmd(noise, real, lo_hi)})
    return rows


def gcd_of(values: list[int]) -> int:
    import math

    out = 0
    for v in values:
        out = math.gcd(out, v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=int, default=None)
    ap.add_argument("--dim", default="2d")
    ap.add_argument("--models", default="ddpm,autoencoder")
    ap.add_argument("--steps", default="100,200,400", help="optimiser steps after which to score (0 is always)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--width", type=int, default=32, help="channels of the first level")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--scheduler", default="planned", choices=sorted(SCHEDULERS))
    ap.add_argument("--set", action="append", default=[], help="extra config override (e.g. "
                    "train_ddpm.learning_rate=1e-3), repeatable")
    ap.add_argument("--workspace", default=None, help="folder for nnU-Net data, runs and MLflow (default: a temp one)")
    args = ap.parse_args()
    args.workspace = args.workspace or tempfile.mkdtemp(prefix="bench_learning_")
    ws = Path(args.workspace)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    os.environ["medimgen_results"] = str(ws / "results")
    dataset = args.dataset or demo_dataset(str(ws))
    plans = DatasetPlans.from_id(dataset)
    cfg = load_config(plans.folder / "medimgen_config.yaml").get(args.dim)
    steps = sorted({int(s) for s in args.steps.split(",") if int(s) > 0})
    print(f"device: {device_name()}; dataset {plans.name} {args.dim}, image {list(cfg.data.image_size)} "
          f"x{cfg.data.in_channels}; width {args.width}, batch {args.batch}, scheduler {args.scheduler}")
    for model in args.models.split(","):
        rows = run_curve(model, dataset, args.dim, cfg, steps, args, log=lambda m: print(f"  {model}: {m}", flush=True))
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "step"))
        print(f"\n{model}\n| step | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
        for r in rows:
            print(f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "-" for k in keys) + " |")


if __name__ == "__main__":
    main()
