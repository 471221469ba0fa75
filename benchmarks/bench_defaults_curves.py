"""Curves of several bench_defaults.py runs in one figure and one table: each run's side and extra ``--set``
values (seed, learning rate, ...) name its line, so ablations and seeds of one comparison sit side by side.

    python benchmarks/bench_defaults_curves.py RESULT.json [RESULT.json ...] --dim 3d --model ldm \
        [--png curves.png] [--keys heldout_loss,mmd_stats,label_fraction_error]

Plots each key against optimiser steps and against training seconds (the runs' own ``train_seconds``: CPU seconds
with ``--cpu-clock``) and prints a Markdown table of every point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def lines(files: list[Path], dim: str, model: str) -> list[tuple[str, list[dict]]]:
    """(label, rows) of every side of every file that trained ``model``; the label is the side plus the run's extra
    overrides (``--set``). Runs with the same label (the same config and seed, e.g. a longer run continuing a
    curve's steps) make one curve; of a step scored twice the first file's row is kept."""
    out: dict[str, dict[int, dict]] = {}
    for f in files:
        res = json.loads(Path(f).read_text())
        extra = res.get("args", {}).get("set") or []
        for side, curves in res["dims"].get(dim, {}).items():
            if isinstance(curves, dict) and model in curves:
                into = out.setdefault(" ".join([side, *extra]), {})
                for r in curves[model]["rows"]:
                    into.setdefault(r["step"], r)
    return [(label, [rows[s] for s in sorted(rows)]) for label, rows in sorted(out.items())]


def table(curves: list[tuple[str, list[dict]]], keys: list[str]) -> str:
    rows = ["| run | step | train s | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for label, points in curves:
        for r in points:
            cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for k in keys]
            seconds = "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
            rows.append(f"| {label} | {r['step']} | {seconds} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(curves: list[tuple[str, list[dict]]], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.4 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        for i, (label, points) in enumerate(curves):
            pts = [r for r in points if r.get(key) is not None and r.get("train_seconds") is not None]
            for ax, x in zip(row, ("step", "train_seconds")):
                ax.plot([r[x] for r in pts], [r[key] for r in pts], "o-", color=f"C{i % 10}", label=label)
        for ax, x in zip(row, ("optimiser steps", "training seconds")):
            ax.set_xlabel(x)
            ax.set_ylabel(f"{key} (lower is better)")
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--dim", default="3d")
    ap.add_argument("--model", default="ldm")
    ap.add_argument("--keys", default="heldout_loss,mmd_stats,label_fraction_error")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k]
    try:
        curves = lines(args.results, args.dim, args.model)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot read the results: {e}") from None
    if not curves:
        raise SystemExit(f"error: no {args.dim} {args.model} rows in {', '.join(map(str, args.results))}")
    text = table(curves, keys)
    print(text)
    if args.png:
        first = json.loads(args.results[0].read_text())
        plot(curves, keys, args.png, f"{args.dim} {args.model}, {first.get('device', '')}, {first.get('date', '')}")
    return text


if __name__ == "__main__":
    main()
