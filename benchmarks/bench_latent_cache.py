"""LDM seconds per step with and without the latent cache (train_ldm.cache_latents), and the cache's disk size.

    python benchmarks/bench_latent_cache.py [--workspace DIR] [--dim 3d] [--iterations 6] [--tiny]

On the demo dataset (synthetic phantoms, planned and preprocessed by nnU-Net; made in ``--workspace`` unless the
nnU-Net variables point at one): an autoencoder trained briefly (its weights do not change the timing), then the
same LDM twice from the same seed, each 3 epochs of ``--iterations`` steps, as `medimgen train ldm` runs it:
once encoding every nnU-Net-augmented batch (the loader in this process, data.num_workers=0) and once drawing from
the cache. The second epoch's seconds per step is reported (the first includes warm-up, the third validation),
and the cache's build time (when this run built it) and size on disk (its manifest). ``--tiny`` shrinks the networks (the shares change: the
planned autoencoder is what the cache saves).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_dataset, device_name  # noqa: E402

def tiny(cfg) -> list[str]:
    """Small networks with the planned number of levels."""
    ae, ldm = len(cfg.autoencoder.strides), len(cfg.ldm_unet.channels)
    return [f"autoencoder.channels=[{','.join(['8'] + ['16'] * ae)}]", "autoencoder.norm_num_groups=8",
            "autoencoder.num_res_blocks=1", f"ldm_unet.channels=[{','.join(['16'] + ['32'] * (ldm - 1))}]",
            "ldm_unet.norm_num_groups=8", "ldm_unet.num_head_channels=8", "ldm_unet.num_res_blocks=1"]


def _overrides(model: str, iterations: int, small: list[str], out: Path) -> list[str]:
    sets = ["data.num_workers=0", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", "losses.perceptual_network=none", "tracking.log_models=false",
            f"train_{model}.epochs=3", f"train_{model}.iterations_per_epoch={iterations}",
            f"train_{model}.val_interval=100", f"train_{model}.val_plot_interval=100", f"train_{model}.eval_samples=0", f"train_{model}.batch_size=2",
            f"train_{model}.grad_accumulation_steps=1"]
    return sets + small


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", default="demo_workspace")
    ap.add_argument("--dim", default="3d")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()

    from medimgen.training.api import RunSetup, train

    dataset = demo_dataset(args.workspace)
    from medimgen.config import load_config
    from medimgen.core.paths import config_path

    small = tiny(load_config(config_path(dataset)).get(args.dim)) if args.tiny else []
    quiet = lambda *_: None  # noqa: E731
    out = Path(tempfile.mkdtemp(prefix="bench_latent_cache_"))
    ae = train("autoencoder", dataset, "train-val-test", args.dim, echo=quiet, overrides=_overrides(
        "autoencoder", 1, small, out), setup=RunSetup(run_root=out / "autoencoder", score=False))
    rows = []
    for cached in (False, True):
        t0 = time.time()
        result = train("ldm", dataset, "train-val-test", args.dim, echo=quiet,
                       overrides=_overrides("ldm", args.iterations, small, out) + [
                           f"train_ldm.cache_latents={str(cached).lower()}"],
                       setup=RunSetup(run_root=out / f"ldm_{cached}", upstream_run=ae.run_dir, score=False))
        total = time.time() - t0
        history = json.loads((result.run_dir / "loss_dict.json").read_text())
        rows.append({"cache": cached, "s_per_step": history["epoch_seconds"][1] / args.iterations,
                     "run_seconds": total})
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.training.latents import cache_root

    manifest = max(cache_root(DatasetPlans.planned(dataset), args.dim).glob("*/manifest.json"),
                   key=lambda p: p.stat().st_mtime)
    m = json.loads(manifest.read_text())
    rows[1]["cache_note"] = (f"{len(m['cases'])} cases, {m['bytes'] / 1e6:.2f} MB on disk, built in "
                             f"{m['seconds']:.1f} s ({manifest.parent})")
    rows[0]["cache_note"] = "-"
    print(f"device: {device_name()}, {args.dim}, image size {list(ae.config.data.image_size)}, "
          f"batch 2, {args.iterations} steps per epoch{', tiny networks' if args.tiny else ''}")
    print("| LDM training batches | s/step (epoch 2) | whole run (s) | cache |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {'latent cache' if r['cache'] else 'nnU-Net loader + encoder'} | {r['s_per_step']:.3f} | "
              f"{r['run_seconds']:.1f} | {r['cache_note']} |")


if __name__ == "__main__":
    main()
