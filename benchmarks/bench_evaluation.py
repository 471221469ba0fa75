"""Cost of `medimgen evaluate` / a tuning trial's scoring on the demo plan's image size.

    python benchmarks/bench_evaluation.py [--dataset ID] [--k 16 64 128]

Timing only: the images are random tensors of the planned size and the nnU-Net encoder is a
random-weight network built by nnU-Net's own builder (speed does not depend on weights or
content). Reports, per K images: feature extraction (nnU-Net encoder, both sets), Fréchet
distance + MMD on those features, and pairwise MS-SSIM (capped at 200 pairs per set).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import demo_dataset, device_name  # noqa: E402

from medimgen.config import load_config  # noqa: E402
from medimgen.evaluation.api import generation_scores  # noqa: E402
from medimgen.evaluation.features import NnUNetEncoderFeatures  # noqa: E402
from medimgen.evaluation.metrics import frechet_distance, mean_pairwise_ms_ssim, mmd  # noqa: E402
from medimgen.nnunet.plans import DatasetPlans  # noqa: E402
from tests.nnunet_helpers import make_nnunet_model  # noqa: E402


def _time(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=int, default=None)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64])
    args = ap.parse_args()
    plans = DatasetPlans.from_id(args.dataset or demo_dataset())
    cfg = load_config(plans.folder / "medimgen_config.yaml").get("3d")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_nnunet_model(Path(tmp), plans.folder, "3d_fullres")
        ext = NnUNetEncoderFeatures(folder, 0)
        print(f"device: {device_name()}; image {list(cfg.data.image_size)} x {cfg.data.in_channels} channel(s)")
        print("| K | features (2K images) s | FID + MMD s | pairwise MS-SSIM (both sets) s | all scores s |")
        print("|---|---|---|---|---|")
        for k in args.k:
            torch.manual_seed(0)
            gen = torch.rand(k, cfg.data.in_channels, *cfg.data.image_size) * 2 - 1
            real = torch.rand(k, cfg.data.in_channels, *cfg.data.image_size) * 2 - 1
            t_feat, (fg, fr) = _time(lambda: (ext.extract(gen, 8, device), ext.extract(real, 8, device)))
            t_dist, _ = _time(lambda: (frechet_distance(fg, fr), mmd(fg, fr)))
            t_ssim, _ = _time(lambda: (mean_pairwise_ms_ssim(gen), mean_pairwise_ms_ssim(real)))
            t_all, _ = _time(lambda: generation_scores(gen, real, ext, device))
            print(f"| {k} | {t_feat:.2f} | {t_dist:.3f} | {t_ssim:.2f} | {t_all:.2f} |")


if __name__ == "__main__":
    main()
