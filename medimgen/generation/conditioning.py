"""Label maps a ControlNet is conditioned on, brought to the model's size the way nnU-Net brings segmentations.

Two sources:

- a folder of NIfTI label maps (a real case's segmentation, edited or deformed, or a sample's ``_label`` file):
  read with nnU-Net's SimpleITKIO, axes transposed as nnU-Net transposes them (``transpose_forward``), resampled
  to the model's spacing with nnU-Net's segmentation resampling (only where the spacing differs), then centred
  in the model's image size (cropped or padded with background) exactly as samples are cropped back to the data
  size on output (medimgen.generation.sampler.data_crop): a map of the data size comes back voxel for voxel;
- the preprocessed labels of a split of the dataset (``train`` / ``val`` / ``test``), as the validation loader
  centres them (2D: three slices per case).

``augment``: nnU-Net's spatial augmentation (batchgeneratorsv2 SpatialTransform, rotation and scaling in
nnU-Net's ranges, nearest-neighbour label interpolation; in-plane only for anisotropic 3D data, as nnU-Net)
makes new maps from each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medimgen.config.schema import GenerationConfig
from medimgen.core.errors import MedimgenError
from medimgen.data.geometry import resample

SPLITS = ("train", "val", "test")


@dataclass
class LabelMaps:
    """(N, 1, *image_size) long label maps in nnU-Net's label values, and where each came from."""

    maps: torch.Tensor
    names: list[str]


def centre(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``volume`` (*spatial) cropped/padded (background 0) to ``size``, the data centred with ceil(padding / 2)
    before it (as the loader centres cases and medimgen.generation.sampler.data_crop cuts them out again)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    from medimgen.data.loader import center_bbox

    return crop_and_pad_nd(volume, center_bbox(volume.shape, size), 0)


def _unknown_values(volume: np.ndarray, values: Sequence[int], where: str) -> None:
    extra = sorted(set(np.unique(volume).tolist()) - {0, *[int(v) for v in values]})
    if extra:
        raise MedimgenError(f"{where} has label values {extra} the model does not know (it knows 0 and "
                            f"{', '.join(str(v) for v in values)}, from dataset.json)")


def read_label_file(path: Path, cfg: GenerationConfig, transpose_backward: Sequence[int]) -> np.ndarray:
    """One NIfTI label map -> (*image_size) int16 in the model's space (see the module doc)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    try:
        seg, props = SimpleITKIO().read_seg(str(path))
    except Exception as e:
        raise MedimgenError(f"cannot read label map {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    tf = [int(a) for a in np.argsort(transpose_backward)]
    seg = seg[0].transpose(tf)
    spacing = [float(props["spacing"][a]) for a in tf]
    nd = cfg.data.spatial_dims
    if nd == 2:
        if seg.shape[0] != 1:
            raise MedimgenError(f"{path} has {seg.shape[0]} slices; a 2D model is conditioned on one-slice maps")
        seg, spacing = seg[0], spacing[1:]
    target = [float(s) for s in cfg.data.spacing]
    if not np.allclose(spacing, target, rtol=1e-3):
        seg = resample(seg[None].astype(np.int16), spacing, target, is_seg=True)[0]
    seg = np.asarray(seg).astype(np.int16)
    _unknown_values(seg, cfg.data.label_values, str(path))
    out = centre(seg, cfg.data.image_size)
    lost = int(np.count_nonzero(seg)) - int(np.count_nonzero(out))
    if lost > 0:
        raise MedimgenError(f"label map {path} is {'x'.join(map(str, seg.shape))} voxels at the model's spacing, "
                            f"larger than the model's image size {'x'.join(map(str, cfg.data.image_size))}: "
                            f"{lost} labelled voxels would be cut off; crop the map to the labelled region first")
    return out


def from_folder(folder: Path | str, cfg: GenerationConfig, transpose_backward: Sequence[int],
                limit: int | None = None) -> LabelMaps:
    """The NIfTI label maps of ``folder`` (sorted by name; the first ``limit``)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii"))) if folder.is_dir() else []
    if not files:
        raise MedimgenError(f"--labels {folder}: expected a folder of NIfTI label maps or one of {', '.join(SPLITS)}")
    files = files[:limit] if limit else files
    maps = [torch.from_numpy(read_label_file(p, cfg, transpose_backward)).long()[None] for p in files]
    return LabelMaps(torch.stack(maps), [p.name.split(".nii")[0] for p in files])


def from_split(cfg: GenerationConfig, plans, identifiers: list[str], limit: int | None = None) -> LabelMaps:
    """The preprocessed labels of ``identifiers`` (``plans``: medimgen.nnunet.plans.DatasetPlans), centred in the image
    size as the validation loader centres them."""
    from medimgen.data.loader import validation_samples

    maps, names = [], []
    for s in validation_samples(cfg, plans, identifiers):
        maps.append(s["label"].long().clamp(min=0))  # -1 (padding) is background
        names.append(s["key"])
        if limit and len(maps) >= limit:
            break
    if not maps:
        raise MedimgenError("no labelled cases in that split")
    return LabelMaps(torch.stack(maps), names)


def augment(maps: LabelMaps, n: int, seed: int, cfg: GenerationConfig) -> LabelMaps:
    """``n`` spatially augmented copies of every map (nnU-Net's rotation and scaling ranges, each applied,
    nearest-neighbour label interpolation, background outside), reproducible for ``seed``."""
    import math

    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform

    from medimgen.data.loader import is_anisotropic

    size = tuple(int(s) for s in cfg.data.image_size)
    dummy_2d = cfg.data.spatial_dims == 3 and is_anisotropic(cfg.data.spacing)  # as nnU-Net: in-plane only
    rotation = (-math.pi, math.pi) if cfg.data.spatial_dims == 2 or dummy_2d else (-math.radians(30), math.radians(30))
    spatial = SpatialTransform(size[1:] if dummy_2d else size, patch_center_dist_from_border=0, random_crop=False,
                               p_elastic_deform=0, p_rotation=1.0, rotation=rotation, p_scaling=1.0,
                               scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                               mode_seg="nearest", border_mode_seg="constant", padding_value_seg=0)
    transform = ComposeTransforms([Convert3DTo2DTransform(), spatial, Convert2DTo3DTransform()] if dummy_2d
                                  else [spatial])
    out, names = [], []
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            for m, name in zip(maps.maps, maps.names):
                for k in range(n):
                    res = transform(image=torch.zeros((1, *size)), segmentation=m.to(torch.int16))
                    out.append(res["segmentation"].long())
                    names.append(f"{name}_aug{k}")
    finally:
        np.random.set_state(np_state)
    return LabelMaps(torch.stack(out), names)
