"""The run folder: layout, atomic writes, loss history and plots.

medimgen_results/DatasetXXX_Name/<model>/<2d|3d>/<train-val-test|fold_N>/
    checkpoints/last.pt                         (full resume state: all networks, optimisers, EMA, RNG, ...)
    checkpoints/best.pt                         (sampling weights only, EMA where used; see training/loop.py)
                                                (both atomic: a uniquely named temporary file, then renamed)
    plots/loss.png, plots/epoch_NNNN.(gif|png)
    loss_dict.json                              (dict of per-epoch lists)
    config.yaml                                 (the resolved config of this run)
    geometry.json                               (spacing, axis order, orientation of a training case)
    nnUNetPlans.json, dataset.json              (copied from nnU-Net)
    log.txt                                     (when tracking.output_mode is 'log')
    .lock                                       (held by the training process; holds its PID)

Nothing here is ever unpickled: checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medimgen.atomic import atomic_path, write_bytes_atomic


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def for_run(cls, results: Path, dataset: str, model: str, dim: str, split: str) -> "RunDir":
        return cls(Path(results) / dataset / model / dim / split)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def sampling_checkpoint(self, checkpoint: str = "best") -> Path:
        """The checkpoint a reader that samples/evaluates/registers loads: ``checkpoint`` ('best' or 'last'),
        else last.pt (a run that has not validated yet has no best.pt), else best.pt."""
        from medimgen.errors import MedimgenError

        for path in (self.checkpoints / f"{checkpoint}.pt", self.last, self.best):
            if path.is_file():
                return path
        raise MedimgenError(f"no checkpoint in {self.checkpoints}: train the model first")

    def checkpoint_meta(self) -> dict:
        """``model`` kind and ``mlflow_run_id`` of the run's checkpoint, read memory-mapped (no weights loaded)."""
        state = torch.load(self.sampling_checkpoint("last"), map_location="cpu", weights_only=True, mmap=True)
        return {"model": state.get("model"), "mlflow_run_id": state.get("mlflow_run_id")}

    @property
    def loss_dict(self) -> Path:
        return self.root / "loss_dict.json"

    @property
    def geometry(self) -> Path:
        from medimgen.geometry import FILE

        return self.root / FILE

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    def make(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.plots.mkdir(parents=True, exist_ok=True)

    def copy_nnunet_files(self, dataset_folder: Path, plans_identifier: str) -> None:
        for name in (f"{plans_identifier}.json", "dataset.json"):
            src = Path(dataset_folder) / name
            if src.is_file():
                shutil.copy2(src, self.root / name)


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_json(obj, path: Path) -> None:
    write_bytes_atomic(path, json.dumps(obj).encode())


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
