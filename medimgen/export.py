"""`medimgen export-dataset`: synthetic images as a new nnU-Net raw dataset, ready for nnU-Net.

Images are sampled by a trained DDPM/LDM and written in the source dataset's geometry and
intensity units. nnU-Net needs a label per case, so until label generation exists each
image gets a foreground mask (as `medimgen import` makes) as label 1, computed from the image as
written (after cropping/resampling), so both share one geometry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from medimgen.atomic import atomic_path
from medimgen.devices import resolve_device
from medimgen.errors import MedimgenError
from medimgen.importer import foreground_mask
from medimgen.requests import ModelRef, SampleOptions
from medimgen.sampling import resolve_sampler, save_samples


def _mask_like(image_file: Path, mask_file: Path) -> Path:
    """The foreground mask of a written image as a uint8 label file with the image's geometry."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_file))
    mask = sitk.GetImageFromArray(foreground_mask(sitk.GetArrayFromImage(image)).astype(np.uint8))
    mask.CopyInformation(image)
    with atomic_path(mask_file, suffix=".nii.gz") as tmp:
        sitk.WriteImage(mask, str(tmp), useCompression=True)
    return mask_file


def export_dataset(dataset_id: int | str, num_images: int, target_id: int, ref: ModelRef,
                   options: SampleOptions = SampleOptions(), name: str | None = None) -> Path:
    """Sample ``num_images`` from the model ``ref`` names into nnUNet_raw/DatasetXXX_<name> (imagesTr, labelsTr,
    dataset.json, provenance/)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from medimgen.paths import dataset_name_from_id, nnunet_raw

    src = dataset_name_from_id(dataset_id) if dataset_id is not None else None
    default_name = (src.split("_", 1)[1] if src else "Medimgen") + "Synth"
    out = nnunet_raw() / f"Dataset{int(target_id):03d}_{name or default_name}"
    taken = [p for p in nnunet_raw().glob(f"Dataset{int(target_id):03d}_*")]
    if taken:
        raise MedimgenError(f"dataset id {int(target_id):03d} is taken ({taken[0]}): choose another target id")
    sampler = resolve_sampler(ref).to(resolve_device(options.device))
    sched, n_steps = sampler.schedule(options.scheduler, options.steps)
    images = sampler.sample(num_images, options.seed, sched, n_steps, options.batch_size, options.amp, options.progress)
    try:
        files = save_samples(images, sampler, out / "imagesTr", options, sched, n_steps, prefix="synth",
                             channel_suffix=True, sidecar_dir=out / "provenance")
        (out / "labelsTr").mkdir()
        for first_channel in [f for f in files if f.name.endswith("_0000.nii.gz")]:
            _mask_like(first_channel, out / "labelsTr" / first_channel.name.replace("_0000.nii.gz", ".nii.gz"))
        generate_dataset_json(
            str(out), channel_names={str(i): n for i, n in enumerate(sampler.cfg.data.channel_names)},
            labels={"background": 0, "foreground": 1}, num_training_cases=len(images), file_ending=".nii.gz",
            dataset_name=out.name,
            description=f"synthetic images sampled by medimgen from {sampler.source} ({sched}, {n_steps} steps, "
                        f"seed {options.seed})")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written dataset left behind
        raise
    assert len(files) == num_images * images.shape[1]
    return out
