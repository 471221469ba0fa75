"""The CPU verdict of bench_defaults.py: held-out DDPM objective of both configs against steps and CPU seconds.

    python benchmarks/bench_defaults_verdict.py --points points.json --probes p1.json,p2.json,... \
        [--ablation a.json,b.json] --out benchmarks/bench_defaults_cpu_verdict.json \
        --png benchmarks/bench_defaults_cpu_verdict.png

``points.json``: [{"side", "seed", "step", "heldout_loss", "mmd_stats", "source"}, ...], each the
``heldout_loss`` (bench_defaults.heldout_loss) and image-statistics MMD of one side's run at one step (the bench's
rows, or a run folder's checkpoint scored afterwards). ``--probes``: bench_defaults result JSONs of short
``--cpu-clock`` runs of each side in the same conditions; their CPU seconds per step turn steps into CPU seconds.
``--ablation``: result JSONs of planned runs with one tutorial value each (their overrides and rows are kept).
Writes the points, the per-step costs and the ablation rows; plots held-out loss against steps and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SIDES = ("planned", "monai_tutorial")


def per_step(probes: list[Path]) -> dict[str, float]:
    """Mean CPU seconds per optimiser step of each side over the probe runs (the last row of each)."""
    costs: dict[str, list[float]] = {}
    for p in probes:
        curves = json.loads(Path(p).read_text())["dims"]["2d"]
        for side in SIDES:
            if side in curves:
                last = curves[side]["ddpm"]["rows"][-1]
                costs.setdefault(side, []).append(last["train_seconds"] / last["step"])
    return {s: float(np.mean(v)) for s, v in costs.items()}


def mean_at(points: list[dict], side: str, step: int, key: str) -> tuple[float, float, int] | None:
    """(mean, half the range, count) over the seeds of ``side`` at ``step``."""
    vals = [p[key] for p in points if p["side"] == side and p["step"] == step and p.get(key) is not None]
    if not vals:
        return None
    return float(np.mean(vals)), float((max(vals) - min(vals)) / 2), len(vals)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=Path, required=True)
    ap.add_argument("--probes", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--ablation", default="", help="bench_defaults result JSONs of planned runs with one --set each")
    args = ap.parse_args(argv)
    points = json.loads(args.points.read_text())
    cost = per_step([Path(p) for p in args.probes.split(",")])
    for p in points:
        p["cpu_seconds"] = round(p["step"] * cost[p["side"]], 1)
    out = {"cpu_seconds_per_step": cost, "points": points, "ablation": [
        {"overrides": [o for o in r["args"]["set"]], "rows": r["dims"]["2d"]["planned"]["ddpm"]["rows"]}
        for r in (json.loads(Path(f).read_text()) for f in args.ablation.split(",") if f)]}
    args.out.write_text(json.dumps(out, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for side, color in zip(SIDES, ("C0", "C1")):
        for seed in sorted({p["seed"] for p in points if p["side"] == side}):
            pts = sorted((p for p in points if p["side"] == side and p["seed"] == seed), key=lambda p: p["step"])
            for ax, x, y in zip(axes, ("step", "cpu_seconds", "step"), ("heldout_loss", "heldout_loss", "mmd_stats")):
                xy = [(p[x], p[y]) for p in pts if p.get(y) is not None]
                ax.plot(*zip(*xy), "o-", color=color, alpha=1.0 if seed == 12345 else 0.5, label=f"{side} seed {seed}")
    for ax, x, y in zip(axes, ("optimiser steps", "CPU seconds (steps x measured cost per step)", "optimiser steps"),
                        ("held-out DDPM loss (lower is better)", "held-out DDPM loss", "image-statistics MMD")):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    fig.suptitle("2D DDPM, planned vs MONAI tutorial, real heads at 5.25 mm (32x28), widths/4, batches/8; CPU, "
                 "2026-12-07", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    return out


if __name__ == "__main__":
    main()
