"""Access to nnU-Net's preprocessed cases through nnunetv2's own dataset classes.

Whatever nnU-Net wrote (blosc2 or numpy) is read in place; nothing is unpacked to a
second copy. A missing or corrupt case is reported by its identifier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medimgen.core.errors import MedimgenError


def open_cases(folder: Path | str, identifiers: list[str] | None = None):
    """nnU-Net dataset object (nnUNetDatasetBlosc2 or nnUNetDatasetNumpy) over ``folder``."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(folder)
    if not folder.is_dir():
        raise MedimgenError(f"preprocessed folder {folder} does not exist: run nnUNetv2_plan_and_preprocess first")
    try:
        cls = infer_dataset_class(str(folder))
    except Exception as e:  # nnU-Net raises a bare RuntimeError when nothing is there
        raise MedimgenError(f"{folder} holds no nnU-Net preprocessed cases ({e})") from None
    ds = cls(str(folder), identifiers)
    if not ds.identifiers:
        raise MedimgenError(f"{folder} holds no nnU-Net preprocessed cases")
    return ds


def load_case(ds, identifier: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(data (C, *spatial) float32, seg (1, *spatial), properties) of one case, fully read."""
    try:
        data, seg, _, props = ds.load_case(identifier)
        return np.asarray(data[:], dtype=np.float32), np.asarray(seg[:]), props
    except Exception as e:
        raise MedimgenError(
            f"preprocessed case '{identifier}' in {ds.source_folder} is missing or corrupt "
            f"({type(e).__name__}: {e}); re-run nnUNetv2_preprocess for this dataset") from None
