"""`medimgen export-dataset`: synthetic images (and labels) as a new nnU-Net raw dataset, ready for nnU-Net.

Images are sampled by a trained DDPM/LDM and written in the source dataset's geometry and
intensity units. A joint model (``data.generate_labels``) generates a label map with every image: those
become labelsTr (uint8, the image's geometry, the source dataset's label values and names). nnU-Net needs a
label per case, so an image-only model's images get a foreground mask (as `medimgen import` makes) as label 1
instead, computed from the image as written, and dataset.json says so (medimgen.models.labels.GENERATED_MASK_KEY).

``mix_real``: the new dataset also holds the source dataset's real training cases (copied from nnUNet_raw),
and nnUNet_preprocessed/DatasetXXX_*/splits_final.json (also kept in the raw folder) has nnU-Net's 5 folds over
the real cases with every synthetic case added to the training side of every fold: validation stays real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from medimgen.config.kinds import kind
from medimgen.core.atomic import atomic_path, publish_folder, scratch_folder, write_json_atomic
from medimgen.core.names import check_name
from medimgen.core.devices import resolve_device
from medimgen.core.errors import MedimgenError
from medimgen.nnunet.importer import foreground_mask
from medimgen.models.labels import GENERATED_MASK_KEY
from medimgen.core.requests import LabelRequest, ModelRef, SampleOptions
from medimgen.generation.sampler import conditioned_triples, resolve_controlnet, resolve_sampler, save_samples

SYNTH_PREFIX = "synth"
FOLDS = 5


def _mask_like(image_file: Path, mask_file: Path) -> Path:
    """The foreground mask of a written image as a uint8 label file with the image's geometry."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_file))
    mask = sitk.GetImageFromArray(foreground_mask(sitk.GetArrayFromImage(image)).astype(np.uint8))
    mask.CopyInformation(image)
    with atomic_path(mask_file, suffix=".nii.gz") as tmp:
        sitk.WriteImage(mask, str(tmp), useCompression=True)
    return mask_file


def _source_raw(src: str | None) -> tuple[Path, dict]:
    """The source dataset's raw folder and dataset.json (for --mix-real)."""
    from medimgen.core.paths import nnunet_raw

    folder = nnunet_raw() / src if src else None
    if folder is None or not (folder / "dataset.json").is_file():
        raise MedimgenError(f"--mix-real needs the source dataset's raw folder with dataset.json "
                            f"({folder or 'nnUNet_raw/DatasetXXX_*'} is missing)")
    return folder, json.loads((folder / "dataset.json").read_text())


def _real_cases(folder: Path, ds: dict) -> list[str]:
    ending = ds.get("file_ending", ".nii.gz")
    if ending != ".nii.gz":
        raise MedimgenError(f"--mix-real copies the real cases of {folder.name}, whose files end in {ending}; "
                            f"synthetic cases are .nii.gz and nnU-Net needs one file ending per dataset")
    cases = sorted(p.name[:-len(ending)] for p in (folder / "labelsTr").glob(f"*{ending}"))
    if len(cases) < 2:
        raise MedimgenError(f"--mix-real needs at least 2 labelled real cases in {folder / 'labelsTr'}, found {len(cases)}")
    clash = [c for c in cases if c.startswith(f"{SYNTH_PREFIX}_")]
    if clash:
        raise MedimgenError(f"real case {clash[0]} of {folder.name} is named like a synthetic case ({SYNTH_PREFIX}_*)")
    return cases


def _copy_real(folder: Path, cases: list[str], channels: int, out: Path) -> None:
    for case in cases:
        for c in range(channels):
            image = folder / "imagesTr" / f"{case}_{c:04d}.nii.gz"
            if not image.is_file():
                raise MedimgenError(f"real case {case} of {folder.name} has no channel {c} ({image} is missing)")
            shutil.copy2(image, out / "imagesTr" / image.name)
        shutil.copy2(folder / "labelsTr" / f"{case}.nii.gz", out / "labelsTr" / f"{case}.nii.gz")


def _is_3d(src: str) -> bool:
    """Whether the raw cases of dataset ``src`` are 3D (nnU-Net plans a 3d_fullres configuration for them)."""
    from medimgen.nnunet.plans import DatasetPlans

    try:
        return "3d_fullres" in DatasetPlans.from_id(src).manager.available_configurations
    except MedimgenError:
        return False


def mixed_splits(real: list[str], synthetic: list[str], seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net's folds (its KFold split, up to 5 folds) over the real cases; the synthetic cases join the training
    side of every fold and are never validated on."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    folds = generate_crossval_split(list(real), seed=seed, n_splits=min(FOLDS, len(real)))
    return [{"train": [*f["train"], *synthetic], "val": list(f["val"])} for f in folds]


def export_dataset(dataset_id: int | str, num_images: int, target_id: int, ref: ModelRef,
                   options: SampleOptions = SampleOptions(), name: str | None = None, mix_real: bool = False,
                   labels: LabelRequest | None = None) -> Path:
    """Sample ``num_images`` from the model ``ref`` names into nnUNet_raw/DatasetXXX_<name> (imagesTr, labelsTr,
    dataset.json, provenance/); ``mix_real``: with the source's real training cases and a splits_final.json
    that validates on real cases only (see the module doc). ``labels``: a ControlNet's images for those label
    maps (the first ``num_images`` maps; each map is the case's label)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from medimgen.core.paths import dataset_name_from_id, nnunet_preprocessed, nnunet_raw

    if name is not None:
        check_name(name, "--name")
    src = dataset_name_from_id(dataset_id) if dataset_id is not None else None
    default_name = (src.split("_", 1)[1] if src else "Medimgen") + ("Mixed" if mix_real else "Synth")
    out = nnunet_raw() / f"Dataset{int(target_id):03d}_{name or default_name}"
    taken = [p for p in nnunet_raw().glob(f"Dataset{int(target_id):03d}_*")]
    if mix_real:  # the splits go to nnUNet_preprocessed: the id must be free there too
        taken += [p for p in nnunet_preprocessed().glob(f"Dataset{int(target_id):03d}_*")]
    if taken:
        raise MedimgenError(f"dataset id {int(target_id):03d} is taken ({taken[0]}): choose another target id")
    real_folder, real_cases, src_json, followed = None, [], {}, None
    if mix_real:
        real_folder, src_json = _source_raw(src)
        real_cases = _real_cases(real_folder, src_json)
    if labels is not None:
        sampler = resolve_controlnet(ref, options)
        request = labels
        images, labels, followed = conditioned_triples(sampler, dataclasses.replace(request, limit=request.limit or
                                                                                      num_images), ref, options)
        followed = [f"{request.source}:{n}" for n in followed]
        num_images = len(images)
    else:
        sampler = resolve_sampler(ref).to(resolve_device(options.device))
    if mix_real and sampler.cfg.data.spatial_dims == 2 and _is_3d(src):
        raise MedimgenError(f"--mix-real with a 2D model of {src}, whose cases are 3D: single-slice synthetic cases "
                            f"would sit beside 3D real ones (nnU-Net would plan 3d_fullres on them); use its 3d model, "
                            f"or export without --mix-real for a 2D dataset")
    if mix_real and not sampler.generates_labels and labels is None:
        raise MedimgenError(f"--mix-real needs a model that generates labels ({sampler.source} is image-only: its "
                            f"labels would be foreground masks next to real labels); plan with data.generate_labels=true")
    sched, n_steps = sampler.schedule(options.sampler, options.steps)  # for the dataset's description
    if labels is None:
        images, labels = sampler.sample_pairs(num_images, options)
    data = sampler.cfg.data
    preprocessed = nnunet_preprocessed() / out.name
    # built in a hidden scratch folder and published by one rename: nnU-Net never sees a half-written dataset,
    # and a failure leaves nnUNet_raw as it was
    with scratch_folder(out.with_name(f".{out.name}.exporting-{os.getpid()}")) as tmp:
        files = save_samples(images, sampler, tmp / "imagesTr", options, prefix=SYNTH_PREFIX,
                             channel_suffix=True, sidecar_dir=tmp / "provenance", labels=labels,
                             label_dir=tmp / "labelsTr", label_sources=followed)
        if len(files) != num_images * images.shape[1]:
            raise MedimgenError(f"wrote {len(files)} image files for {num_images} samples of "
                                f"{images.shape[1]} channel(s)")
        synthetic = [f.name[:-len("_0000.nii.gz")] for f in files if f.name.endswith("_0000.nii.gz")]
        extra: dict = {}
        if labels is None:
            for case in synthetic:
                _mask_like(tmp / "imagesTr" / f"{case}_0000.nii.gz", tmp / "labelsTr" / f"{case}.nii.gz")
            label_map = {"background": 0, "foreground": 1}
            extra[GENERATED_MASK_KEY] = True
            what = "synthetic images with foreground masks as labels (the model is image-only)"
        else:
            label_map = dict(src_json.get("labels") or {"background": 0, **{
                n: int(v) for n, v in zip(data.label_names, data.label_values)}})
            what = ("synthetic images for given label maps (ControlNet)" if kind(sampler.kind).steers
                    else "synthetic image+label pairs")
        channel_names = src_json.get("channel_names") or {str(i): n for i, n in enumerate(data.channel_names)}
        splits = None
        if mix_real:
            _copy_real(real_folder, real_cases, len(channel_names), tmp)
            splits = mixed_splits(real_cases, synthetic)
            write_json_atomic(tmp / "splits_final.json", splits)
            what += f" mixed with the {len(real_cases)} real training cases of {src} (validation folds: real only)"
        generate_dataset_json(
            str(tmp), channel_names=channel_names, labels=label_map,
            num_training_cases=len(synthetic) + len(real_cases), file_ending=".nii.gz", dataset_name=out.name,
            description=f"{what}, sampled by medimgen from {sampler.source} ({sched}, {n_steps} steps, "
                        f"seed {options.seed})",
            medimgen_source_dataset=src, medimgen_synthetic_cases=len(synthetic), medimgen_real_cases=len(real_cases),
            **extra)
        if splits is not None:  # the id was checked free in nnUNet_preprocessed: this folder is new
            try:
                preprocessed.mkdir(parents=True)
                write_json_atomic(preprocessed / "splits_final.json", splits)
            except BaseException:
                shutil.rmtree(preprocessed, ignore_errors=True)
                raise
        try:
            publish_folder(tmp, out, force=False)
        except BaseException:
            if splits is not None:
                shutil.rmtree(preprocessed, ignore_errors=True)
            raise
    return out
