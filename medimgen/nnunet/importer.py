"""`medimgen import`: any folder of NIfTI images (or an MSD task) -> a valid nnU-Net raw dataset.

nnU-Net's fingerprinting needs a label per case with some foreground (all-zero labels crash
it). Generation datasets often have no labels, so where none is given a body/foreground mask
is made (Otsu threshold of the smoothed first channel, largest connected component, holes
filled) and written as label 1 'foreground'. nnU-Net then uses it for cropping statistics,
the foreground intensity fingerprint and foreground oversampling.

Accepted layouts of SOURCE:
- an MSD task (dataset.json + imagesTr, 4D images for several channels; labelsTr optional),
- a flat folder of images, one file per case (3D, 2D, or 4D with channels last),
- a folder in nnU-Net's channel naming (CASE_0000.nii.gz, CASE_0001.nii.gz, ...).

Names are read as channel naming only when every file ends in _XXXX and every case has the same
channels 0000..N-1 (sub_0001 ... sub_0005 are five cases); the output says how files were grouped.
Everything is checked from the headers before anything is written, and the dataset is written
into a hidden temporary folder that is renamed at the end: a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medimgen.core.atomic import publish_folder, scratch_folder
from medimgen.core.errors import MedimgenError
from medimgen.core.names import check_name, short_repr
from medimgen.models.labels import GENERATED_MASK_KEY

_NII = re.compile(r"^(?P<stem>.+)\.nii(?:\.gz)?$")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.name.endswith(".nii.gz") or p.name.endswith(".nii")))


def _load(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # force a full read: truncated gzip fails here
        return img
    except Exception as e:
        raise MedimgenError(f"cannot read NIfTI {path} ({type(e).__name__}: {e})") from None


def _shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as e:
        raise MedimgenError(f"cannot read NIfTI {path} ({type(e).__name__}: {e})") from None


def _stem(path: Path) -> str:
    return _NII.match(path.name).group("stem")


def _channel_groups(files: list[Path]) -> dict[str, list[Path]] | None:
    """Cases in nnU-Net's channel naming (CASE_0000, CASE_0001, ...), or None when the names are not that.

    Channel naming needs every file to end in _XXXX, every case to have the same channels 0000..N-1, and
    (for several channels) at least two cases: sub_0000 ... sub_0004 alone are five numbered scans."""
    matches = [_CHANNEL.match(_stem(p)) for p in files]
    if not all(matches):
        return None
    cases: dict[str, dict[int, Path]] = {}
    for p, m in zip(files, matches):
        cases.setdefault(m.group("case"), {})[int(m.group("chan"))] = p
    channel_sets = {tuple(sorted(c)) for c in cases.values()}
    if len(channel_sets) != 1 or channel_sets.pop() != tuple(range(len(files) // len(cases))):
        return None
    if len(cases) == 1 and len(files) > 1:
        return None
    return {case: [chans[c] for c in sorted(chans)] for case, chans in cases.items()}


def _spatial(shape: tuple[int, ...], single_file: bool) -> tuple[int, int]:
    """(spatial dims, channels) of one case file: a 4D file is 3D with channels last."""
    if len(shape) == 4 and single_file:
        return 3, shape[3]
    if len(shape) in (2, 3):
        return len(shape), 1
    raise MedimgenError(f"expected a 2D or 3D image{' (or 4D with channels last)' if single_file else ''}, "
                        f"got shape {shape}")


def _cases(image_dir: Path) -> tuple[dict[str, list[Path]], int, str]:
    """Files grouped into cases, checked from the headers (dimensions and channels agree): the cases, their
    number of channels and how the files were grouped."""
    files = _nifti_files(image_dir)
    if not files:
        raise MedimgenError(f"no NIfTI images (.nii / .nii.gz) in {image_dir}")
    grouped = _channel_groups(files)
    cases = grouped if grouped is not None else {_stem(p): [p] for p in files}
    first: tuple[Path, int, int] | None = None
    for paths in cases.values():
        shapes = [_shape(p) for p in paths]
        for p, s in zip(paths[1:], shapes[1:]):
            if s != shapes[0]:
                raise MedimgenError(f"{p} has shape {s} but {paths[0].name} of the same case has {shapes[0]}")
        try:
            dims, chans = _spatial(shapes[0], len(paths) == 1)
        except MedimgenError as e:
            raise MedimgenError(f"{paths[0]}: {e}") from None
        chans = len(paths) if len(paths) > 1 else chans
        if first is None:
            first = (paths[0], dims, chans)
        elif dims != first[1]:
            raise MedimgenError(f"{paths[0]} is {dims}D but {first[0].name} (and the images before it) are "
                                f"{first[1]}D: all images of a dataset must have the same dimensionality")
        elif chans != first[2]:
            raise MedimgenError(f"{paths[0]} has {chans} channel(s) but {first[0].name} has {first[2]}")
    n_chan, n_cases = first[2], len(cases)
    how = "nnU-Net _XXXX naming" if grouped is not None else "4D files, channels last" if n_chan > 1 else ""
    layout = f"{n_cases} case{'s' * (n_cases != 1)}" + (f" x {n_chan} channels" if n_chan > 1 else ", 1 channel each")
    return cases, n_chan, f"{len(files)} files -> {layout}" + (f" ({how})" if how else "")


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Body/foreground mask: Otsu on the smoothed image, largest component, holes filled; never empty."""
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(image.astype(np.float32), 1.0)
    if float(smooth.max()) == float(smooth.min()):
        return np.ones(image.shape, bool)
    mask = smooth > threshold_otsu(smooth)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        mask = image > image.min()
    return mask


def _channels(paths: list[Path]) -> tuple[list[np.ndarray], nib.Nifti1Image]:
    """Channel arrays of one case (splitting a 4D file along its last axis) and the reference image."""
    if len(paths) == 1:
        img = _load(paths[0])
        data = np.asarray(img.dataobj)
        if data.ndim == 4:
            return [data[..., c] for c in range(data.shape[-1])], img
        return [data], img
    imgs = [_load(p) for p in paths]
    return [np.asarray(i.dataobj) for i in imgs], imgs[0]


def _save(array: np.ndarray, ref: nib.Nifti1Image, path: Path) -> None:
    header = ref.header.copy()
    header.set_data_dtype(array.dtype)
    affine = ref.affine
    out = nib.Nifti1Image(array, affine, header)
    if array.ndim < len(ref.shape):  # 4D source split into channels keeps the 3D geometry
        out.header.set_zooms(ref.header.get_zooms()[: array.ndim])
    nib.save(out, str(path))


@dataclass(frozen=True)
class Imported:
    folder: Path
    grouping: str  # how the source files were grouped into cases and channels
    backup: Path | None = None  # the replaced dataset (--force), kept


def import_dataset(
    source: Path | str,
    nnunet_raw: Path | str,
    dataset_id: int,
    name: str,
    labels: Path | str | None = None,
    modality: str = "MRI",
    channel_names: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Imported:
    """Write nnunet_raw/DatasetXXX_name (imagesTr, labelsTr, dataset.json) from ``source``.

    Everything is written into a hidden temporary folder beside the target and renamed at the end, so a
    failed import leaves nothing behind (and a retry works)."""
    source = Path(source)
    if not source.is_dir():
        raise MedimgenError(f"{source} is not a folder")
    check_name(name, "--name")
    if not 1 <= int(dataset_id) <= 999:
        raise MedimgenError(f"dataset id {dataset_id}: nnU-Net dataset ids are 1..999")
    msd_json = source / "dataset.json"
    image_dir = source / "imagesTr" if (source / "imagesTr").is_dir() else source
    label_dir = Path(labels) if labels else (source / "labelsTr" if (source / "labelsTr").is_dir() else None)
    if label_dir is not None and not label_dir.is_dir():
        raise MedimgenError(f"labels folder {label_dir} does not exist")
    cases, n_channels, grouping = _cases(image_dir)
    label_names = {"background": 0, "foreground": 1}
    if msd_json.is_file() and label_dir is not None:
        try:
            msd = json.loads(msd_json.read_text())
            label_names = {v: int(k) for k, v in msd["labels"].items()}
            if channel_names is None:
                channel_names = [msd["modality"][k] for k in sorted(msd["modality"], key=int)]
        except (KeyError, ValueError, json.JSONDecodeError):
            pass
    names = list(channel_names) if channel_names else (
        ["CT"] * n_channels if modality.upper() == "CT" else [modality if n_channels == 1 else f"{modality}{c}" for c in range(n_channels)])
    if len(names) != n_channels:
        raise MedimgenError(f"{len(names)} channel names given for {n_channels} channels ({grouping})")

    out = Path(nnunet_raw) / f"Dataset{int(dataset_id):03d}_{name}"
    if out.exists() and not overwrite:
        raise MedimgenError(f"{out} already exists: choose another dataset id or pass --force (the existing "
                            f"dataset is kept as a backup)")
    same_id = [d.name for d in Path(nnunet_raw).glob(f"Dataset{int(dataset_id):03d}_*") if d.name != out.name]
    if same_id:
        raise MedimgenError(f"dataset id {dataset_id} is taken by {Path(nnunet_raw) / same_id[0]}: choose another id")
    # hidden: nnU-Net never sees it as a dataset; removed without a trace on failure
    with scratch_folder(out.with_name(f".{out.name}.importing-{os.getpid()}")) as tmp:
        made_masks = _write_cases(cases, tmp, label_dir, progress, {int(v) for v in label_names.values()})
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

        generate_dataset_json(
            str(tmp), channel_names={str(i): n for i, n in enumerate(names)}, labels=label_names,
            num_training_cases=len(cases), file_ending=".nii.gz", dataset_name=out.name,
            description=f"imported by medimgen from {source} ({grouping})"
                        + (f"; {made_masks} foreground masks generated" if made_masks else ""),
            # the planner must not take generated body masks for real labels (medimgen.models.labels.real_labels)
            **({GENERATED_MASK_KEY: True} if made_masks else {}))
        backup = publish_folder(tmp, out, overwrite)
    return Imported(out, grouping, backup)


def _checked_image(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise MedimgenError(f"{path} has {bad} NaN or infinite voxel(s): nnU-Net's statistics and training need "
                            f"finite values; fix or mask them first")
    return arr


def _checked_label(seg: np.ndarray, path: Path, shape: tuple[int, ...], values: set[int]) -> np.ndarray:
    """A label map of the image's shape whose values are labels of dataset.json, as uint8."""
    seg = np.asarray(seg)
    if seg.shape != shape:
        raise MedimgenError(f"label {path} has shape {seg.shape} but its image has {shape}: a label map must match "
                            f"its image voxel for voxel")
    found = np.unique(seg)
    bad = [int(v) if np.isfinite(v) and float(v).is_integer() else v for v in found.tolist()
           if not (np.isfinite(v) and float(v).is_integer() and int(v) in values)]
    if bad:
        raise MedimgenError(f"label {path} has value(s) {short_repr(bad)} that are not labels of the dataset "
                            f"(dataset.json: {sorted(values)}; labels are the integers 0..N)")
    return seg.astype(np.uint8)


def _write_cases(cases: dict[str, list[Path]], out: Path, label_dir: Path | None, progress: bool,
                 label_values: set[int] = frozenset({0, 1})) -> int:
    """imagesTr/labelsTr of every case under ``out``; the number of generated foreground masks."""
    from tqdm import tqdm

    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    made_masks = 0
    any_foreground = False
    for case, paths in tqdm(sorted(cases.items()), desc="importing", disable=not progress):
        chans, ref = _channels(paths)
        for c, arr in enumerate(chans):
            _save(_checked_image(arr, paths[min(c, len(paths) - 1)]), ref, out / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        if label_dir is not None:
            found = [p for p in (label_dir / f"{case}.nii.gz", label_dir / f"{case}.nii") if p.is_file()]
            if not found:
                raise MedimgenError(f"no label for case {case} in {label_dir} (expected {case}.nii.gz)")
            seg = _checked_label(_load(found[0]).dataobj, found[0], np.shape(chans[0]), label_values)
            any_foreground = any_foreground or bool(np.any(seg > 0))
            _save(seg, ref, out / "labelsTr" / f"{case}.nii.gz")
        else:
            mask = foreground_mask(np.asarray(chans[0], dtype=np.float32)).astype(np.uint8)
            made_masks += 1
            _save(mask, ref, out / "labelsTr" / f"{case}.nii.gz")
    if label_dir is not None and not any_foreground:
        raise MedimgenError(f"every label in {label_dir} is empty (nnU-Net cannot fingerprint that): "
                            f"import without --labels to generate foreground masks")
    return made_masks


