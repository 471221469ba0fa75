"""Scoring cost: what scoring a tuning trial and a training run's quality checks cost, before and after issue 25.

Times the one scorer (evaluation.api.score_model: sampling + statistics MMD + MS-SSIM + memorisation; FID where an
extractor has weights) on a trained DDPM/LDM run folder, for

- before: a trial scored with the old fixed budget (16 samples x 50 DDIM steps), training runs not scored at all;
- after: a trial scored with the budget planned for its run length (planning.quality_budget, one check), and a
  training run's planned checks (its config's eval_samples x eval_steps, times the number of checks).

    python benchmarks/bench_scoring.py RUN_FOLDER [--trial-epochs 1 --trial-iterations 2] [--device cpu]

Prints one line per budget and the share of the run's own training time (epoch_seconds in loss_dict.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a trained ddpm/ldm run folder")
    ap.add_argument("--trial-epochs", type=int, default=1)
    ap.add_argument("--trial-iterations", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from medimgen.core.requests import SampleOptions
    from medimgen.evaluation.api import real_cases, reference, score_model
    from medimgen.planning.quality_budget import checks, plan
    from medimgen.runs.folders import TrainedModel
    from medimgen.training.quality import optimizer_steps

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = TrainedModel.from_run(args.run)
    cfg, train = model.cfg, model.cfg.train_for(model.kind)
    real, labels, _ = real_cases(cfg, model.dataset, "train")
    ref = reference(cfg, model.dataset, real, heldout="val")
    history = json.loads((Path(args.run) / "loss_dict.json").read_text())
    epoch_s = sum(history.get("epoch_seconds", [])) / max(1, len(history.get("epoch_seconds", [])))
    trial = dataclasses.replace(train, epochs=args.trial_epochs, iterations_per_epoch=args.trial_iterations)
    trial_plan = plan(trial, max_checks=1)

    def timed(n: int, steps: int) -> float:
        t0 = time.perf_counter()
        score_model(model, ref, n, None, SampleOptions(seed=0, steps=steps, device=args.device), labels)
        return time.perf_counter() - t0

    rows = [("trial, before (16 x 50)", 16, 50, 1, args.trial_epochs * epoch_s),
            (f"trial, after (planned {trial_plan['eval_samples']} x {trial_plan['eval_steps']})",
             trial_plan["eval_samples"], trial_plan["eval_steps"], 1, args.trial_epochs * epoch_s),
            (f"training run, after ({checks(train)} checks of {train.eval_samples} x "
             f"{train.eval_steps or 'config'} steps)", train.eval_samples,
             train.eval_steps or cfg.scheduler_for(model.kind).num_inference_steps, checks(train),
             train.epochs * epoch_s)]
    print(f"{model.kind} {model.dim} run {args.run}: {train.epochs} epochs x {train.iterations_per_epoch} iterations "
          f"({optimizer_steps(train, train.epochs)} optimiser steps), {epoch_s:.2f} s/epoch on this machine")
    for name, n, steps, k, training_s in rows:
        s = timed(n, steps)
        print(f"  {name:<55} {s:8.2f} s per check, {k * s:8.2f} s in all = {100 * k * s / max(training_s, 1e-9):6.1f}% "
              f"of its training ({training_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
