"""`medimgen export-dataset`: synthetic images as a new nnU-Net raw dataset, ready for nnU-Net.

Images are sampled by a trained DDPM/LDM and written in the source dataset's geometry and
intensity units. nnU-Net needs a label per case, so until label generation exists each
image gets a foreground mask (as `medimgen import` makes) as label 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from medimgen.errors import MedimgenError
from medimgen.importer import foreground_mask
from medimgen.sampling import crop_to_data, resolve_device, resolve_sampler, save_samples, write_nifti


def export_dataset(
    dataset_id: int | str,
    model_type: str,
    num_images: int,
    target_id: int,
    name: str | None = None,
    model: str = "auto",
    splitting: str = "train-val-test",
    fold: int = 0,
    scheduler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = False,
    crop: bool = True,
) -> Path:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from medimgen.paths import dataset_name_from_id, nnunet_raw

    src = dataset_name_from_id(dataset_id) if dataset_id is not None else None
    default_name = (src.split("_", 1)[1] if src else "Medimgen") + "Synth"
    out = nnunet_raw() / f"Dataset{int(target_id):03d}_{name or default_name}"
    taken = [p for p in nnunet_raw().glob(f"Dataset{int(target_id):03d}_*")]
    if taken:
        raise MedimgenError(f"dataset id {int(target_id):03d} is taken ({taken[0]}): choose another target id")
    sampler = resolve_sampler(model, dataset_id, model_type, splitting, fold).to(resolve_device(device))
    sched, n_steps = sampler.schedule(scheduler, steps)
    images = sampler.sample(num_images, seed, sched, n_steps, batch_size, progress=progress)
    try:
        files = save_samples(images, sampler, out / "imagesTr", seed, sched, n_steps, prefix="synth",
                             channel_suffix=True, sidecar_dir=out / "provenance", crop=crop)
        (out / "labelsTr").mkdir()
        images, pad = crop_to_data(images, sampler.cfg, crop)  # the labels cover what the images cover
        shift = [-p * s for p, s in zip(pad, sampler.geometry.spacing)]
        for i, image in enumerate(images):
            mask = foreground_mask(image[0]).astype(np.uint8)
            write_nifti(mask, out / "labelsTr" / f"synth_{i:04d}.nii.gz", sampler.geometry, sampler.geometry.spacing,
                        dtype=np.uint8, shift=shift)
        generate_dataset_json(
            str(out), channel_names={str(i): n for i, n in enumerate(sampler.cfg.data.channel_names)},
            labels={"background": 0, "foreground": 1}, num_training_cases=len(images), file_ending=".nii.gz",
            dataset_name=out.name,
            description=f"synthetic images sampled by medimgen from {sampler.source} ({sched}, {n_steps} steps, seed {seed})")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written dataset left behind
        raise
    assert len(files) == num_images * images.shape[1]
    return out
