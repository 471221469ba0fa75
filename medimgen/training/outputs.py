"""Training plots: loss curves and sample/reconstruction images of the run folder's plots/ (titled, radiological
orientation, >= 256 px per image)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch

from medimgen.core.atomic import atomic_path


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_NOTE: ContextVar[str | None] = ContextVar("plot_note", default=None)
_PROGRESS: ContextVar[bool] = ContextVar("plot_progress", default=False)


def plot_progress() -> bool:
    """Whether the sampling behind a training plot shows a progress bar (the run's --progress, set by the loop)."""
    return _PROGRESS.get()


@contextmanager
def plot_note(note: str | None, progress: bool = False):
    """Within the block, training plot titles (plot_images) end with ``note`` (e.g. which weights: EMA or raw), and
    the sampling behind a plot shows progress when ``progress``."""
    token, shown = _NOTE.set(note), _PROGRESS.set(progress)
    try:
        yield
    finally:
        _NOTE.reset(token)
        _PROGRESS.reset(shown)


@contextmanager
def plot_style():
    """matplotlib's own default style (and a 10 pt font) within the block, whatever nnU-Net or seaborn set globally
    in this process (`sns.set(font_scale=2.5)` would otherwise give giant fonts and legends over the curves)."""
    plt = _matplotlib()
    with plt.style.context("default"), plt.rc_context({"font.size": 10, "legend.fontsize": 8}):
        yield plt


def plot_losses(history: dict[str, list], path: Path) -> Path:
    """One panel per loss name; train and val curves together (an EMA copy's ``val_<name>_ema`` beside ``val``)."""
    with plot_style() as plt:
        return _plot_losses(plt, history, path)


def _plot_losses(plt, history: dict[str, list], path: Path) -> Path:
    names = sorted({k.split("_", 1)[1].removesuffix("_ema") for k in history if k.startswith(("train_", "val_"))})
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split, key in (("train", f"train_{name}"), ("val", f"val_{name}"), ("val (EMA)", f"val_{name}_ema")):
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


PLOT_EXAMPLES = 4  # images per plot (samples, or input/output pairs of reconstructions)
PLOT_MIN_SIZE = 256  # px on the short side of every shown image (nearest-neighbour upscaling)


def plot_geometry(path_stem: Path):
    """The geometry.json of the run a plot belongs to (``<run>/plots/epoch_NNNN``), None when absent or unreadable."""
    from medimgen.core.errors import MedimgenError
    from medimgen.data.geometry import FILE, Geometry

    path = Path(path_stem).parent.parent / FILE
    try:
        return Geometry.from_dict(json.loads(path.read_text()), str(path)) if path.is_file() else None
    except (MedimgenError, ValueError, UnicodeDecodeError):
        return None


def _view(a: np.ndarray, view: tuple[bool, bool, bool], scale: tuple[int, int]) -> np.ndarray:
    transpose, flip_rows, flip_cols = view
    if flip_rows:
        a = a[::-1]
    if flip_cols:
        a = a[:, ::-1]
    if transpose:
        a = a.T
    return np.repeat(np.repeat(a, scale[0], axis=0), scale[1], axis=1)


def _scale(shape: tuple[int, int], spacing, transpose: bool) -> tuple[int, int]:
    """Integer nearest-neighbour factors: square pixels in mm (within rounding), short side >= PLOT_MIN_SIZE."""
    sp = [float(s) for s in spacing] if spacing is not None and len(spacing) == 2 else [1.0, 1.0]
    if transpose:
        shape, sp = shape[::-1], sp[::-1]
    ratio = [max(1, min(8, round(s / min(sp)))) for s in sp]
    k = max(1, -(-PLOT_MIN_SIZE // min(n * r for n, r in zip(shape, ratio))))
    return ratio[0] * k, ratio[1] * k


def _font(size: int = 16):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px (broken between words; ' | ' parts kept whole where they fit)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return [ln.strip(" |") for ln in lines] or [""]


def save_images(rows, path_stem: Path, value_range=(-1.0, 1.0), title: str = "", geometry=None,
                spacing=None) -> Path:
    """A titled grid of images (each (C, *spatial), first channel shown): a PNG for 2D, a GIF across the
    first preprocessed axis (the through-plane one) for 3D, one frame per slice, named in the header.

    ``rows``: a list of rows, each a list of images (a flat list of images is one row). Slices are shown
    in radiological orientation (medimgen.data.geometry.radiological_view: the patient's left on the image's
    right, anterior/superior up) from ``geometry`` (the run's geometry.json; None: arrays as stored) and
    upscaled with nearest neighbours so that each image is at least PLOT_MIN_SIZE px on its short side,
    with square pixels in mm when ``spacing`` (of the two shown axes) is given."""
    from PIL import Image, ImageDraw

    from medimgen.data.geometry import radiological_view

    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [rows]
    arrays = [[to_uint8(im[0], *value_range) for im in row] for row in rows]
    three_d = arrays[0][0].ndim == 3
    view = radiological_view(geometry, (1, 2))
    shape = arrays[0][0].shape[-2:]
    scale = _scale(shape, spacing, view[0])
    gap, font = 4, _font()
    h, w = _view(arrays[0][0][0] if three_d else arrays[0][0], view, scale).shape
    ncols = max(len(r) for r in arrays)
    lines = _wrap(title, font, ncols * (w + gap) - gap - 8)
    header = 20 * len(lines) + 4 + (20 if three_d else 0)

    def frame(z: int | None) -> Image.Image:
        tiles = [[_view(a[z] if z is not None else a, view, scale) for a in row] for row in arrays]
        canvas = np.zeros((header + len(tiles) * (h + gap) - gap, ncols * (w + gap) - gap), np.uint8)
        for i, row in enumerate(tiles):
            for j, t in enumerate(row):
                y, x = header + i * (h + gap), j * (w + gap)
                canvas[y:y + h, x:x + w] = t
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for i, line in enumerate(lines):
            draw.text((4, 3 + 20 * i), line, fill=255, font=font)
        if z is not None:
            draw.text((4, 3 + 20 * len(lines)), f"slice {z + 1}/{depth}, preprocessed axis 0", fill=200, font=font)
        return image

    if not three_d:
        path = path_stem.with_suffix(".png")
        with atomic_path(path, suffix=".png") as tmp:
            frame(None).save(tmp, format="PNG")
        return path
    path = path_stem.with_suffix(".gif")
    depth = arrays[0][0].shape[0]
    frames = [frame(z) for z in range(depth)]
    with atomic_path(path, suffix=".gif") as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
    return path


def plot_images(rows, path_stem: Path, cfg, what: str) -> Path:
    """save_images for a training plot of ``cfg`` (GenerationConfig): titled with the model, dimensionality,
    epoch (from ``epoch_NNNN``) and ``what`` is shown, oriented by the run's geometry.json."""
    stem = Path(path_stem)
    epoch = stem.name.split("_")[-1].lstrip("0") or "0"
    title = f"{what} | {cfg.data.spatial_dims}D, epoch {epoch}" + (f" | {_NOTE.get()}" if _NOTE.get() else "")
    return save_images(rows, stem, tuple(cfg.data.intensity_range), title, plot_geometry(stem),
                       tuple(cfg.data.spacing)[-2:])
