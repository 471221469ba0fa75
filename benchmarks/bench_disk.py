"""Disk used by a training run: checkpoints, MLflow artifacts and registered models, vs the plan's estimate.

    python benchmarks/bench_disk.py [--workspace DIR] [--dim 3d] [--epochs 1]

Plans the demo dataset (Dataset990_Phantom, synthetic), trains the autoencoder, the LDM and
the DDPM with the *planned* architectures for ``--epochs`` epochs of one iteration (sizes
depend on the architectures, not on training length), with MLflow tracking into a sqlite
database of the workspace (auto-registration on), and prints a Markdown table of the real
file sizes next to ``medimgen.planning.disk.estimate_disk`` (when that module exists).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402

MB = 1e6


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--dim", default="3d")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="bench_disk_")).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    os.chdir(ws)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    from medimgen.demo import DEMO_ID, run_demo
    from medimgen.nnunet.plans import DatasetPlans
    from medimgen.runs.folders import RunDir
    from medimgen.training.api import train

    run_demo(ws, echo=lambda *_: None, train_models=False)
    plans = DatasetPlans.from_id(DEMO_ID)
    sets = [f"train_{m}.{k}={v}" for m in ("autoencoder", "ddpm", "ldm")
            for k, v in (("epochs", args.epochs), ("iterations_per_epoch", 1), ("batch_size", 1),
                         ("val_plot_interval", args.epochs))]
    sets += ["ddpm_scheduler.num_inference_steps=2", "ldm_scheduler.num_inference_steps=2",
             "losses.perceptual_network=none", "losses.adversarial_warmup_epochs=0", "data.num_workers=0"]
    t0 = time.time()
    results = {}
    for model in ("autoencoder", "ldm", "ddpm"):
        run = RunDir.standard(plans.name, model, args.dim, "train-val-test")
        if not run.last.is_file():
            train(model, DEMO_ID, "train-val-test", args.dim, overrides=sets, echo=lambda *_: None)
        results[model] = run
    seconds = time.time() - t0
    try:
        from medimgen.config import load_generation_config
        from medimgen.planning.disk import estimate_disk
    except ImportError:
        estimate_disk = None
    mlruns = ws / "mlruns"
    print(f"{time.strftime('%Y-%m-%d')}, {device_name()}, demo plan {args.dim}, {args.epochs} epoch(s) x 1 "
          f"iteration, training {seconds:.0f} s, workspace {ws}\n")
    print("| model | params | best.pt MB | last.pt MB | predicted best / last MB | MLflow checkpoints MB | "
          "one registered version MB | predicted registered MB |")
    print("|---|---|---|---|---|---|---|---|")
    import mlflow
    import torch
    from mlflow import MlflowClient

    for model, run in results.items():
        ckpt = torch.load(run.last, map_location="cpu", weights_only=True, mmap=True)
        params = sum(v.numel() for m in ckpt["modules"].values() for v in m.values() if v.is_floating_point())
        run_id = ckpt["mlflow_run_id"]
        logged = [p for p in mlruns.rglob("*.pt") if run_id in str(p)] if mlruns.is_dir() else []
        registered = 0
        for v in MlflowClient().search_model_versions(f"run_id='{run_id}'"):  # what one version holds
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(mlflow.artifacts.download_artifacts(f"models:/{v.name}/{v.version}", dst_path=tmp))
                registered = _size(folder.rglob("*"))
        predicted = reg_pred = "-"
        if estimate_disk is not None:
            est = estimate_disk(load_generation_config(run.config), model)
            predicted = f"{est.best / MB:.2f} / {est.last / MB:.2f}"
            reg_pred = f"{est.registered / MB:.2f}" if est.registered else "-"
        print(f"| {model} | {params:,} | {_size([run.best]) / MB:.2f} | {_size([run.last]) / MB:.2f} | {predicted} | "
              f"{_size(logged) / MB:.2f} | {registered / MB:.2f} | {reg_pred} |")
    total_ws = _size(p for p in (ws / "medimgen_results").rglob("*"))
    total_ml = _size(mlruns.rglob("*")) if mlruns.is_dir() else 0
    print(f"\nrun folders (medimgen_results) {total_ws / MB:.2f} MB, MLflow artifacts (mlruns) {total_ml / MB:.2f} MB")


if __name__ == "__main__":
    main()
