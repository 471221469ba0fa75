"""Training plots: loss curves and sample/reconstruction images of the run folder's plots/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medimgen.atomic import atomic_path


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: dict[str, list], path: Path) -> Path:
    """One panel per loss name; train and val curves together."""
    plt = _matplotlib()
    names = sorted({k.split("_", 1)[1] for k in history if k.startswith(("train_", "val_"))})
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split in ("train", "val"):
            key = f"{split}_{name}"
            pts = [(e, v) for e, v in zip(history.get("epoch", []), history.get(key, [])) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
    return path


def to_uint8(x: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    a = ((x.detach().float().cpu().numpy() - lo) / (hi - lo)).clip(0, 1)
    return (a * 255).round().astype(np.uint8)


def save_images(images: list[torch.Tensor], path_stem: Path, value_range=(-1.0, 1.0)) -> Path:
    """Side-by-side images (each (C, *spatial)): a PNG for 2D, a GIF across the first axis for 3D."""
    from PIL import Image

    arrays = [to_uint8(im[0], *value_range) for im in images]  # first channel
    if arrays[0].ndim == 2:
        path = path_stem.with_suffix(".png")
        Image.fromarray(np.concatenate(arrays, axis=1)).save(path)
        return path
    path = path_stem.with_suffix(".gif")
    depth = arrays[0].shape[0]
    frames = [Image.fromarray(np.concatenate([a[z] for a in arrays], axis=1)) for z in range(depth)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return path
