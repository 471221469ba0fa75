"""Batches for the trainers, drawn by nnU-Net's own data loader and augmentation.

Training batches: nnunetv2's ``nnUNetDataLoader`` (random cases, nnU-Net's foreground
oversampling, 2D slices when the size has two axes) with batchgeneratorsv2 transforms,
run in torch DataLoader worker processes when ``num_workers > 0``.
Validation batches: deterministic (every validation case centre-cropped/padded; for 2D,
slices at 25/50/75 % depth), no augmentation.

Every batch is a dict: ``image`` float32 (B, C, *image_size) in the model range,
``label`` int16 (B, 1, *image_size) with -1 where the image was padded, ``keys``.
Padded voxels of ``image`` hold the background value (the lower end of the range).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from medimgen.config.schema import GenerationConfig
from medimgen.data.cases import load_case, open_cases
from medimgen.data.intensity import IntensityMap
from medimgen.core.errors import MedimgenError
from medimgen.nnunet.plans import DatasetPlans

MILD_ROTATION_DEG = 10.0
MILD_SCALING = (0.9, 1.1)
ANISOTROPY_RATIO = 3.0  # nnU-Net's threshold for in-plane-only ("dummy 2D") spatial augmentation


class CheckedCases:
    """nnU-Net dataset proxy whose load_case names a missing/corrupt case in one line."""

    def __init__(self, ds):
        self._ds = ds
        self.identifiers = ds.identifiers
        self.source_folder = ds.source_folder

    def load_case(self, identifier):
        try:
            return self._ds.load_case(identifier)
        except Exception as e:
            raise MedimgenError(
                f"preprocessed case '{identifier}' in {self.source_folder} is missing or corrupt "
                f"({type(e).__name__}: {e}); re-run nnUNetv2_preprocess for this dataset") from None

    def __getattr__(self, name):
        return getattr(self._ds, name)


def _bg_base():
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

    return BasicTransform


class ToModelRange(_bg_base()):
    """nnU-Net-normalised -> model range; voxels padded by cropping/augmentation get the background value."""

    def __init__(self, imap: IntensityMap):
        super().__init__()
        self.imap = imap

    def apply(self, data_dict, **params):
        image = self.imap.to_model(data_dict["image"].float(), channel_axis=0)
        seg = data_dict.get("segmentation")
        if seg is not None:
            pad = seg[0] < 0
            if pad.any():
                image[:, pad] = torch.as_tensor(self.imap.background(), dtype=image.dtype)[:, None]
        data_dict["image"] = image
        return data_dict


class ResizeTo(_bg_base()):
    """Resample a crop of ``crop_size`` native voxels to the generated ``image_size`` (coarser spacing)."""

    def __init__(self, size):
        super().__init__()
        self.size = tuple(int(s) for s in size)

    def apply(self, data_dict, **params):
        mode = "trilinear" if len(self.size) == 3 else "bilinear"
        data_dict["image"] = torch.nn.functional.interpolate(data_dict["image"][None].float(), self.size, mode=mode,
                                                             align_corners=False)[0]
        seg = data_dict.get("segmentation")
        if seg is not None:
            data_dict["segmentation"] = torch.nn.functional.interpolate(
                seg[None].float(), self.size, mode="nearest")[0].to(seg.dtype)
        return data_dict


def crop_size(cfg: GenerationConfig) -> tuple[int, ...]:
    return tuple(cfg.data.crop_size) or tuple(cfg.data.image_size)


def maybe_resize(cfg: GenerationConfig) -> list:
    return [ResizeTo(cfg.data.image_size)] if crop_size(cfg) != tuple(cfg.data.image_size) else []


def check_cases(folder: Path, identifiers: list[str]) -> None:
    """Fail early, naming the case, when a preprocessed case's files are missing."""
    for i in identifiers:
        if not (folder / f"{i}.pkl").is_file() or not any(
                (folder / f"{i}{ext}").is_file() for ext in (".b2nd", ".npz", ".npy")):
            raise MedimgenError(f"preprocessed case '{i}' is missing from {folder}: re-run nnUNetv2_preprocess")


def is_anisotropic(spacing) -> bool:
    return len(spacing) == 3 and max(spacing) / min(spacing) > ANISOTROPY_RATIO


def training_transforms(cfg: GenerationConfig, plans: DatasetPlans):
    """batchgeneratorsv2 transforms for cfg.data.augmentation ('none' | 'mild' | 'nnunet')."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform

    data = cfg.data
    imap = IntensityMap.from_config(data)
    size = crop_size(cfg)
    mode = data.augmentation
    dummy_2d = data.spatial_dims == 3 and is_anisotropic(data.spacing)
    if mode == "none":
        return ComposeTransforms([ToModelRange(imap), *maybe_resize(cfg)])
    if mode == "mild":
        spatial_size = size[1:] if dummy_2d else size
        rot = math.radians(MILD_ROTATION_DEG)
        ts = [Convert3DTo2DTransform()] if dummy_2d else []
        ts.append(SpatialTransform(
            spatial_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
            p_rotation=0.2, rotation=(-rot, rot), p_scaling=0.2, scaling=MILD_SCALING,
            p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
            border_mode_seg="constant", padding_value_seg=-1))
        if dummy_2d:
            ts.append(Convert2DTo3DTransform())
        ts.append(ToModelRange(imap))
        return ComposeTransforms(ts + maybe_resize(cfg))
    # nnU-Net's segmentation augmentation, unchanged, with the range mapping before label clean-up
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rotation = (-math.pi, math.pi) if data.spatial_dims == 2 else (-math.radians(30), math.radians(30))
    mirror_axes = tuple(range(data.spatial_dims))
    cm = plans.configuration("2d" if data.spatial_dims == 2 else "3d")
    compose = nnUNetTrainer.get_training_transforms(
        size, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm)
    ts = list(compose.transforms)
    idx = next(i for i, t in enumerate(ts) if type(t).__name__.startswith("RemoveLabel"))
    ts.insert(idx, ToModelRange(imap))
    del ts[idx + 1]  # keep -1 as the padding marker in the label
    return ComposeTransforms(ts + maybe_resize(cfg))


def _as_batch(raw: dict) -> dict:
    return {"image": raw["data"], "label": raw["target"], "keys": list(raw["keys"])}


class _Stream(torch.utils.data.IterableDataset):
    """nnU-Net's (endless) data loader as a torch IterableDataset; each worker draws its own batches."""

    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def __iter__(self):
        while True:
            yield _as_batch(self.loader.generate_train_batch())


def _seed_worker(base_seed: int):
    def init(worker_id: int) -> None:
        np.random.seed((base_seed + 1000 * (worker_id + 1)) % 2**32)
        torch.manual_seed(base_seed + 1000 * (worker_id + 1))

    return init


class TrainBatches:
    """Endless augmented training batches (``next(batches)``); ``close()`` stops worker processes.

    Workers are torch DataLoader processes, each running nnU-Net's loader and transforms with
    its own seed. With 0 workers batches are drawn in this process from numpy's global RNG, so
    a run that restores that RNG (checkpoint resume) draws exactly the same batches.
    """

    def __init__(self, cfg: GenerationConfig, plans: DatasetPlans, identifiers: list[str], batch_size: int,
                 num_workers: int | None = None, seed: int = 0):
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

        if not identifiers:
            raise MedimgenError("no training cases in this split")
        folder = plans.preprocessed_folder("2d" if cfg.data.spatial_dims == 2 else "3d")
        check_cases(folder, identifiers)
        ds = CheckedCases(open_cases(folder, identifiers))
        size = list(crop_size(cfg))
        loader = nnUNetDataLoader(
            ds, batch_size, size, size, plans.manager.get_label_manager(plans.dataset_json),
            oversample_foreground_percent=cfg.data.oversample_foreground_percent,
            transforms=training_transforms(cfg, plans))
        workers = cfg.data.num_workers if num_workers is None else num_workers
        workers = min(workers, os.cpu_count() or 1)  # a plan made for a bigger machine
        self._loader = torch.utils.data.DataLoader(
            _Stream(loader), batch_size=None, num_workers=workers,
            worker_init_fn=_seed_worker(seed) if workers > 0 else None,
            pin_memory=torch.cuda.is_available() and workers > 0,
            prefetch_factor=2 if workers > 0 else None, persistent_workers=False)
        self._it = iter(self._loader)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def center_bbox(shape, size):
    """[[start, stop], ...] of a ``size`` window centred in ``shape`` (negative start: padding before)."""
    bbox = []
    for s, p in zip(shape, size):
        lb = (s - p) // 2
        bbox.append([lb, lb + p])
    return bbox


def validation_samples(cfg: GenerationConfig, plans: DatasetPlans, identifiers: list[str]) -> Iterator[dict]:
    """Deterministic, un-augmented samples: (image (C,*size) model range, label (1,*size), key)."""
    folder = plans.preprocessed_folder("2d" if cfg.data.spatial_dims == 2 else "3d")
    check_cases(folder, identifiers)
    ds = open_cases(folder, identifiers)
    imap = IntensityMap.from_config(cfg.data)
    size = crop_size(cfg)
    resize = maybe_resize(cfg)
    for ident in identifiers:
        data, seg, _ = load_case(ds, ident)
        if cfg.data.spatial_dims == 2:
            depth = data.shape[1]
            slices = sorted({min(depth - 1, int(depth * f)) for f in (0.25, 0.5, 0.75)})
            items = [(data[:, z], seg[:, z], f"{ident}_z{z}") for z in slices]
        else:
            items = [(data, seg, ident)]
        for d, s, key in items:
            image, label = centred_sample(d, s, size, imap, resize)
            yield {"image": image, "label": label, "key": key}


def centred_sample(data: np.ndarray, seg: np.ndarray, size, imap: IntensityMap, resize: list
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """An image (C, *spatial) and its seg centre-cropped/padded to ``size`` native voxels: the image in the model
    range (padding: the background value), the label int16 (padding: -1), both resampled by ``resize`` (a
    ResizeTo or nothing)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    bbox = center_bbox(data.shape[1:], size)
    d = crop_and_pad_nd(data, [[0, data.shape[0]]] + bbox, 0)
    s = crop_and_pad_nd(seg, [[0, seg.shape[0]]] + bbox, -1)
    image = imap.to_model(torch.from_numpy(np.ascontiguousarray(d)).float(), channel_axis=0)
    label = torch.from_numpy(np.ascontiguousarray(s)).to(torch.int16)
    image[:, label[0] < 0] = torch.as_tensor(imap.background())[:, None]
    if resize:
        out = resize[0](image=image, segmentation=label)
        image, label = out["image"], out["segmentation"]
    return image, label


def validation_batches(cfg: GenerationConfig, plans: DatasetPlans, identifiers: list[str], batch_size: int) -> Iterator[dict]:
    buf: list[dict] = []
    for sample in validation_samples(cfg, plans, identifiers):
        buf.append(sample)
        if len(buf) == batch_size:
            yield _stack(buf)
            buf = []
    if buf:
        yield _stack(buf)


def _stack(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]),
            "label": torch.stack([s["label"] for s in samples]),
            "keys": [s["key"] for s in samples]}
