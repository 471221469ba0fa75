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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medimgen.errors import MedimgenError

_NII = re.compile(r"^(?P<case>.+?)(?:_(?P<chan>\d{4}))?\.nii(?:\.gz)?$")


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


def _cases(image_dir: Path) -> dict[str, list[Path]]:
    files = _nifti_files(image_dir)
    if not files:
        raise MedimgenError(f"no NIfTI images (.nii / .nii.gz) in {image_dir}")
    matches = [_NII.match(p.name) for p in files]
    channel_named = all(m and m.group("chan") for m in matches)
    cases: dict[str, list[Path]] = {}
    for p, m in zip(files, matches):
        case = m.group("case") if channel_named else _NII.match(p.name).group(0).split(".nii")[0]
        cases.setdefault(case, []).append(p)
    if channel_named:
        counts = {len(v) for v in cases.values()}
        if len(counts) != 1:
            raise MedimgenError(f"cases in {image_dir} have different numbers of channel files: {sorted(counts)}")
    return cases


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
) -> Path:
    """Write nnunet_raw/DatasetXXX_name (imagesTr, labelsTr, dataset.json) from ``source``."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from tqdm import tqdm

    source = Path(source)
    if not source.is_dir():
        raise MedimgenError(f"{source} is not a folder")
    msd_json = source / "dataset.json"
    image_dir = source / "imagesTr" if (source / "imagesTr").is_dir() else source
    label_dir = Path(labels) if labels else (source / "labelsTr" if (source / "labelsTr").is_dir() else None)
    if label_dir is not None and not label_dir.is_dir():
        raise MedimgenError(f"labels folder {label_dir} does not exist")
    cases = _cases(image_dir)
    label_names = {"background": 0, "foreground": 1}
    if msd_json.is_file() and label_dir is not None:
        try:
            msd = json.loads(msd_json.read_text())
            label_names = {v: int(k) for k, v in msd["labels"].items()}
            if channel_names is None:
                channel_names = [msd["modality"][k] for k in sorted(msd["modality"], key=int)]
        except (KeyError, ValueError, json.JSONDecodeError):
            pass

    out = Path(nnunet_raw) / f"Dataset{int(dataset_id):03d}_{name}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MedimgenError(f"{out} already exists: choose another dataset id or pass --overwrite")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)

    n_channels = None
    made_masks = 0
    any_foreground = False
    for case, paths in tqdm(sorted(cases.items()), desc="importing", disable=not progress):
        chans, ref = _channels(paths)
        if n_channels is None:
            n_channels = len(chans)
        elif len(chans) != n_channels:
            raise MedimgenError(f"case {case} has {len(chans)} channels, earlier cases have {n_channels}")
        for c, arr in enumerate(chans):
            _save(np.asarray(arr, dtype=np.float32), ref, out / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        if label_dir is not None:
            found = [p for p in (label_dir / f"{case}.nii.gz", label_dir / f"{case}.nii") if p.is_file()]
            if not found:
                raise MedimgenError(f"no label for case {case} in {label_dir} (expected {case}.nii.gz)")
            seg = np.asarray(_load(found[0]).dataobj)
            any_foreground = any_foreground or bool(np.any(seg > 0))
            _save(np.asarray(seg, dtype=np.uint8), ref, out / "labelsTr" / f"{case}.nii.gz")
        else:
            mask = foreground_mask(np.asarray(chans[0], dtype=np.float32)).astype(np.uint8)
            made_masks += 1
            _save(mask, ref, out / "labelsTr" / f"{case}.nii.gz")

    if label_dir is not None and not any_foreground:
        import shutil

        shutil.rmtree(out)
        raise MedimgenError(f"every label in {label_dir} is empty (nnU-Net cannot fingerprint that): "
                            f"import without --labels to generate foreground masks")
    names = list(channel_names) if channel_names else (
        ["CT"] * n_channels if modality.upper() == "CT" else [modality if n_channels == 1 else f"{modality}{c}" for c in range(n_channels)])
    if len(names) != n_channels:
        raise MedimgenError(f"{len(names)} channel names given for {n_channels} channels")
    generate_dataset_json(
        str(out), channel_names={str(i): n for i, n in enumerate(names)}, labels=label_names,
        num_training_cases=len(cases), file_ending=".nii.gz", dataset_name=out.name,
        description=f"imported by medimgen from {source}" + (f"; {made_masks} foreground masks generated" if made_masks else ""))
    return out
