"""Load a trained DDPM/LDM/ControlNet (run folder or MLflow URI), sample, write NIfTI in the dataset's geometry.

Samples are generated in nnU-Net's preprocessed space (target spacing, transposed axes,
normalised intensities mapped into the model range) and written back the way nnU-Net writes
images: axes transposed back (``transpose_backward``), spacing of the configuration,
origin/direction of a training case, cropped back to the data the model's padded image_size
holds (``data.data_size``; ``crop=False`` keeps image_size, its origin moved so the data stays
in place), intensities in the dataset's units (exactly HU for CT).
The geometry comes from the run folder's geometry.json or the model's meta.json (written at
training time); nothing from a run folder or a model is ever unpickled. Only ``--labels train|val|test`` reads
nnU-Net's preprocessed folder, through nnU-Net's own dataset class as training does (which unpickles each case's
properties: the user's own preprocessing output, never a downloaded model).
Optionally they are resampled to the dataset's original median spacing with nnU-Net's own
resampling function.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medimgen.core.atomic import atomic_path, check_output_folder, write_bytes_atomic, write_failure
from medimgen.config.kinds import kind, names, the
from medimgen.config.schema import GenerationConfig
from medimgen.data.intensity import IntensityMap
from medimgen.core.devices import amp_dtype, autocast, check_host_memory, resolve_device
from medimgen.models.decoding import decoder
from medimgen.models.diffusion import generate, sampling_plan
from medimgen.core.errors import MedimgenError
from medimgen.data.geometry import Geometry, resample, to_file_image
from medimgen.models.labels import condition_channels, label_channels
from medimgen.core.requests import LabelRequest, ModelRef, SampleOptions
from medimgen.runs.folders import TrainedModel


def _options(options: SampleOptions | None, fields: dict) -> SampleOptions:
    """The request: ``options`` with the SampleOptions ``fields`` given by keyword changed."""
    return dataclasses.replace(options or SampleOptions(), **fields)


class Sampler(TrainedModel):
    """A trained generator (DDPM/LDM), or a kind steering one (a ControlNet) towards label maps, that samples (EMA
    weights when the run had EMA). Every method takes the request whole (a SampleOptions, or its fields by
    keyword)."""

    @classmethod
    def of(cls, model: TrainedModel) -> "Sampler":
        """The sampler of a loaded model (same networks, no copy)."""
        if not kind(model.kind).samples:
            raise MedimgenError(f"{model.source} is a {model.kind} model; sampling needs one of "
                                f"{', '.join(names(samples=True))}")
        return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})

    def schedule(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(sampler name, number of steps) after defaults (medimgen.models.diffusion.sampling_plan)."""
        return sampling_plan(self.cfg.scheduler_for(self.kind), sampler, steps)

    @property
    def generates_labels(self) -> bool:
        """Whether the model generates a label map with every image (``data.generate_labels``; a kind steering a
        generator gets its label maps instead)."""
        return label_channels(self.cfg) > 0 and not kind(self.kind).steers

    @torch.no_grad()
    def sample_conditioned(self, maps: torch.Tensor, options: SampleOptions | None = None, **fields) -> np.ndarray:
        """ControlNet: one image per label map ((N, 1, *image_size) nnU-Net label values), (N, C, *image_size)
        float32 in the dataset's units; same seed and maps -> same images."""
        model_range = self.sample_model_range(len(maps), _options(options, fields), condition=maps)
        return IntensityMap.from_config(self.cfg.data).to_original(model_range, channel_axis=1).numpy().astype(np.float32)

    def memory(self, batch: int, amp: bool = True, tiled: bool | None = None):
        """The predicted sampling peak of ``batch`` images per pass and an LDM's decoding (whole, or the latent tile
        that fits): medimgen.planning.sampling_memory.SamplingMemory, for this GPU (else the config's target)."""
        from medimgen.planning.sampling_memory import plan_sampling

        if self.device.type == "cuda":
            target = torch.cuda.get_device_properties(self.device).total_memory
        else:
            target = self.cfg.memory.target_gb * 2**30
        return plan_sampling(self.cfg, self.generator, batch, target, amp, tiled)

    @torch.no_grad()
    def sample(self, num_images: int, options: SampleOptions | None = None, **fields) -> np.ndarray:
        """(N, C, *image_size) float32 in the dataset's intensity units; same seed -> same images."""
        return self.sample_pairs(num_images, _options(options, fields))[0]

    @torch.no_grad()
    def sample_pairs(self, num_images: int, options: SampleOptions | None = None,
                     **fields) -> tuple[np.ndarray, np.ndarray | None]:
        """(images (N, C, *image_size) float32 in the dataset's units, label maps (N, *image_size) uint8 in
        nnU-Net's label values, or None for an image-only model); same seed -> same pairs."""
        model_range, labels = self.sample_model_range(num_images, _options(options, fields), labels=True)
        imap = IntensityMap.from_config(self.cfg.data)
        images = imap.to_original(model_range, channel_axis=1).numpy().astype(np.float32)
        return images, None if labels is None else labels[:, 0].numpy().astype(np.uint8)

    @torch.no_grad()
    def sample_model_range(self, num_images: int, options: SampleOptions | None = None, labels: bool = False,
                           condition: torch.Tensor | None = None, **fields):
        """(N, C, *image_size) float32 CPU tensor in the model's range (what the evaluation compares); ``labels``:
        (that, label maps (N, 1, *image_size) long or None for an image-only model). An LDM decodes in latent
        tiles when ``options.tiled_decoding``, or (None) on a GPU when decoding whole is predicted not to fit it
        (:meth:`memory`). ``condition``: a ControlNet's N label maps (N, 1, *image_size)."""
        o = _options(options, fields)
        if num_images < 1:
            raise MedimgenError("NUM_IMAGES must be at least 1")
        steers = kind(self.kind).steers
        if steers != (condition is not None):
            raise MedimgenError(f"{self.source}: a ControlNet generates images for label maps (sample --labels), "
                                f"and only a ControlNet does" if steers else
                                f"{self.source} is a {self.kind}: label maps need a ControlNet (--model controlnet)")
        generator, tiled = self.generator, o.tiled_decoding
        bs = o.batch_size or num_images
        out, out_labels = [], []
        for start in range(0, num_images, bs):
            n = min(bs, num_images - start)
            decode = None
            if self.cfg.space_of(generator) == "latent":  # the CPU's memory is not predicted: tiled there only when asked
                tile = self.memory(n, o.amp, tiled).tile if tiled or (tiled is None and self.device.type == "cuda") \
                    else None
                decode = decoder(self.autoencoder, self.scale_factor, tile, self.cfg.autoencoder)
            cond = None if condition is None else condition_channels(condition[start:start + n].to(self.device),
                                                                     self.cfg.data.label_values)
            with autocast(self.device, amp_dtype("auto" if o.amp else "off", self.device)):
                images, label = generate(self.cfg, generator, self.unet, n, o.seed + start, sampler=o.sampler,
                                         steps=o.steps, device=self.device, decode=decode, progress=o.progress,
                                         labels=True, controlnet=self.controlnet, condition=cond)
            out.append(images.float().cpu())
            if label is not None:
                out_labels.append(label.cpu())
        images = torch.cat(out)
        if not labels:
            return images
        return images, torch.cat(out_labels) if out_labels else None


def from_run(run_root: Path | str, checkpoint: str = "best") -> Sampler:
    """A Sampler from a training run folder (checkpoints/best.pt or last.pt, config.yaml)."""
    return resolve_sampler(ModelRef(str(run_root), checkpoint=checkpoint))


def from_uri(uri: str) -> Sampler:
    """A Sampler from an MLflow model URI (models:/NAME@alias, models:/NAME/3, runs:/ID/model)."""
    return resolve_sampler(ModelRef(uri))


def resolve_sampler(ref: ModelRef) -> Sampler:
    """The DDPM/LDM/ControlNet ``ref`` names (run folder, MLflow URI, or the dataset's ldm/ddpm/controlnet/auto run)."""
    return Sampler.of(Sampler.resolve(ref, names(samples=True)))


# ---------------------------------------------------------------------- NIfTI output
def data_crop(cfg: GenerationConfig) -> tuple[slice, ...] | None:
    """The region of an image_size sample that holds the data (``data.data_size``, centred as the loader
    centres cases: nnU-Net's loader and the validation crop put ceil(padding / 2) before the data);
    None for configs without data_size (planned by an older medimgen: no crop)."""
    size, data = tuple(cfg.data.image_size), tuple(cfg.data.data_size)
    if not data or len(data) != len(size):
        return None
    data = tuple(min(d, s) for d, s in zip(data, size))
    return tuple(slice((s - d + 1) // 2, (s - d + 1) // 2 + d) for s, d in zip(size, data))


def crop_to_data(samples: np.ndarray, cfg: GenerationConfig, crop: bool = True) -> tuple[np.ndarray, tuple[int, ...]]:
    """((N, C, *size) cropped to the data region (unchanged with crop=False or no data_size), the data's first
    voxel in the returned arrays: per axis, voxels of padding left before it (0 after cropping))."""
    box = data_crop(cfg)
    if box is None:
        return samples, (0,) * (samples.ndim - 2)
    if not crop:
        return samples, tuple(b.start for b in box)
    return samples[(slice(None), slice(None), *box)], (0,) * len(box)


def resample_to_original(volume: np.ndarray, cfg: GenerationConfig, geometry: Geometry,
                         is_seg: bool = False) -> tuple[np.ndarray, tuple]:
    """(C, *spatial) resampled with nnU-Net's resampling to the dataset's original median spacing (``is_seg``: a
    label map, resampled as nnU-Net resamples segmentations, keeping its label values)."""
    target = tuple(geometry.original_spacing[-volume.ndim + 1:])
    out = resample(volume, tuple(geometry.spacing), target, is_seg=is_seg)
    return (out.astype(np.uint8) if is_seg else out.astype(np.float32)), target


def write_nifti(volume: np.ndarray, path: Path, geometry: Geometry, spacing: Sequence[float],
                dtype=np.float32, shift: Sequence[float] | None = None) -> Path:
    """One channel (*spatial, preprocessed order) -> NIfTI the way nnU-Net's SimpleITKIO writes images.

    ``shift``: mm from the data's first voxel to the volume's first voxel per axis (negative for padding
    kept by --no-crop), so the origin stays where the data lives (medimgen.data.geometry.to_file_image)."""
    import SimpleITK as sitk

    array, sp, direction, origin = to_file_image(geometry, volume, spacing, shift)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype)))
    image.SetSpacing([float(s) for s in sp[::-1]])
    if direction is not None:
        image.SetDirection(direction)
        image.SetOrigin(origin)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as e:  # SimpleITK reports a full disk or an unwritable file as RuntimeError
            raise write_failure(e, path) from None
    return path


def _amp_used(amp: bool, device: torch.device) -> str | bool:
    """What mixed precision sampling really ran with: 'bf16'/'fp16' on a GPU, False otherwise."""
    dtype = amp_dtype("auto" if amp else "off", device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, False)


def _free_stem(folder: Path, prefix: str, index: int) -> tuple[str, int]:
    while any(folder.glob(f"{prefix}_{index:04d}*.nii.gz")):
        index += 1
    return f"{prefix}_{index:04d}", index


def save_samples(samples: np.ndarray, sampler: Sampler, out_dir: Path | str, options: SampleOptions,
                 prefix: str = "sample", channel_suffix: bool = False,
                 sidecar_dir: Path | None = None, labels: np.ndarray | None = None,
                 label_dir: Path | None = None, label_sources: list[str] | None = None) -> list[Path]:
    """Write every sample (all channels) as NIfTI + a JSON sidecar saying how it was made; never overwrite files.

    ``labels``: (N, *image_size) uint8 label maps generated with the samples, written with the same crop,
    resampling (nearest neighbour, as nnU-Net resamples segmentations) and geometry as uint8 NIfTI:
    ``<stem>_label.nii.gz`` beside the image, or ``<stem>.nii.gz`` in ``label_dir`` (nnU-Net's labelsTr); the
    sidecar names both. ``options.crop``: cut each (N, C, *image_size) sample back to the data it pads
    (``data.data_size``); without it the padded model size is written, its origin moved so that the data region
    stays in place. ``options.resample``: to the dataset's original median spacing. ``label_sources``: the label
    map each sample followed (a ControlNet's --labels), recorded in its sidecar. The sidecar records the device and
    the mixed precision really used (none on a CPU). Returns the image files."""
    crop, resample = options.crop, options.resample
    method, steps = sampler.schedule(options.sampler, options.steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar_dir = Path(sidecar_dir) if sidecar_dir else out_dir
    sidecar_dir.mkdir(parents=True, exist_ok=True)
    if label_dir is not None:
        Path(label_dir).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index = 0
    samples, pad = crop_to_data(samples, sampler.cfg, crop)
    if labels is not None:
        labels = crop_to_data(labels[:, None], sampler.cfg, crop)[0]
    shift = [-p * s for p, s in zip(pad, sampler.geometry.spacing)]  # mm from the data to the array's first voxel
    label_names = {n: int(v) for n, v in zip(sampler.cfg.data.label_names, sampler.cfg.data.label_values)}
    for i, sample in enumerate(samples):
        spacing = sampler.geometry.spacing
        label = None if labels is None else labels[i]
        if resample:
            if label is not None:
                label = resample_to_original(label, sampler.cfg, sampler.geometry, is_seg=True)[0]
            sample, spacing = resample_to_original(sample, sampler.cfg, sampler.geometry)
        stem, index = _free_stem(out_dir, prefix, index)
        files: list[Path] = []
        made: list[Path] = []  # every file of this sample: all of them, or none (a failed write removes the rest)
        try:
            for c in range(sample.shape[0]):
                name = f"{stem}_{c:04d}.nii.gz" if channel_suffix or sample.shape[0] > 1 else f"{stem}.nii.gz"
                files.append(write_nifti(sample[c], out_dir / name, sampler.geometry, spacing, shift=shift))
                made.append(files[-1])
            sidecar = {"model": sampler.source, "kind": sampler.kind, "dataset": sampler.dataset,
                       "seed": options.seed, "index": i, "sampler": method,
                       "scheduler": method,  # deprecated: the sampler's old key (readers of older sidecars)
                       "steps": steps, "device": str(sampler.device),
                       "amp_requested": options.amp, "amp": _amp_used(options.amp, sampler.device),
                       "spacing": list(spacing), "resampled_to_original_spacing": resample,
                       "cropped_to_data_size": data_crop(sampler.cfg) is not None and crop,
                       "channels": list(sampler.cfg.data.channel_names), "files": [f.name for f in files]}
            if label is not None:
                label_file = (Path(label_dir) / f"{stem}.nii.gz" if label_dir is not None
                              else out_dir / f"{stem}_label.nii.gz")
                made.append(write_nifti(label[0], label_file, sampler.geometry, spacing, dtype=np.uint8, shift=shift))
                sidecar.update({"label_file": f"{label_file.parent.name}/{label_file.name}" if label_dir is not None
                                else label_file.name, "labels": {"background": 0, **label_names}})
            if label_sources is not None and i < len(label_sources):
                sidecar["label_map_followed"] = label_sources[i]
            write_bytes_atomic(sidecar_dir / f"{stem}.json", json.dumps(sidecar, indent=2).encode())
        except BaseException:
            for f in made:
                f.unlink(missing_ok=True)
            raise
        written += files
        index += 1
    return written


# ---------------------------------------------------------------------- the library call behind the CLI
def sample_to_folder(save_path: Path | str, num_images: int, ref: ModelRef, options: SampleOptions = SampleOptions(),
                     echo: Callable[[str], None] | None = None) -> list[Path]:
    """Sample ``num_images`` from the model ``ref`` names and write them (NIfTI + JSON sidecars; a joint model's
    label maps as ``<stem>_label.nii.gz``) into ``save_path``. Returns the image files. ``echo``: gets the
    predicted GPU memory of sampling (and an LDM's tiled decoding) before sampling starts, on a GPU (or with
    ``options.tiled_decoding``)."""
    check_output_folder(save_path, "SAVE_PATH")
    sampler = resolve_sampler(ref).to(resolve_device(options.device))
    check_host_memory(2 * num_images * sampler.cfg.data.in_channels * math.prod(sampler.cfg.data.image_size) * 4,
                      f"{num_images} samples")
    sampler.schedule(options.sampler, options.steps)  # a bad request fails before the memory is predicted
    if echo is not None and (sampler.device.type == "cuda" or options.tiled_decoding):  # GPU memory: on a GPU
        echo(sampler.memory(min(num_images, options.batch_size or num_images), options.amp,
                            options.tiled_decoding).describe())
    images, labels = sampler.sample_pairs(num_images, options)
    return save_samples(images, sampler, save_path, options, labels=labels)


# ---------------------------------------------------------------------- images for given label maps (ControlNet)
def label_maps(sampler: Sampler, request: LabelRequest, ref: ModelRef):
    """The label maps ``request`` names, in the model's space (medimgen.generation.conditioning), augmented if asked."""
    from medimgen.generation import conditioning

    if request.augment < 0:
        raise MedimgenError(f"--augment-labels must be 0 or more, got {request.augment}")
    if request.source in conditioning.SPLITS:
        from medimgen.data.cases import open_cases
        from medimgen.data.splits import get_split
        from medimgen.nnunet.plans import DatasetPlans

        plans = DatasetPlans.planned(ref.dataset_id if ref.dataset_id is not None else sampler.dataset, sampler.cfg)
        identifiers = open_cases(plans.preprocessed_folder(sampler.dim)).identifiers
        split = get_split(plans.folder, identifiers, ref.splitting, ref.fold)
        ids = {"train": split.train, "val": split.val, "test": split.test}[request.source]
        if not ids:
            raise MedimgenError(f"--labels {request.source}: the {split.name} split has no {request.source} cases")
        maps = conditioning.from_split(sampler.cfg, plans, sorted(ids), request.limit)
    else:
        maps = conditioning.from_folder(request.source, sampler.cfg, sampler.geometry.transpose_backward, request.limit)
    if request.augment:
        maps = conditioning.augment(maps, request.augment, 0, sampler.cfg)
    return maps


def sample_for_labels(save_path: Path | str, request: LabelRequest, ref: ModelRef,
                      options: SampleOptions = SampleOptions(), prefix: str = "sample", label_dir: Path | None = None,
                      sidecar_dir: Path | None = None, channel_suffix: bool = False) -> list[Path]:
    """One image per label map (``request``) from the ControlNet ``ref`` names (``auto``: the dataset's
    controlnet run), written as ``sample_NNNN.nii.gz`` + the map it was conditioned on, ``sample_NNNN_label.nii.gz``
    (or into ``label_dir``), cropped, resampled and placed exactly as the image. Returns the image files."""
    check_output_folder(save_path, "SAVE_PATH")
    sampler = resolve_controlnet(ref, options)
    images, labels, followed = conditioned_triples(sampler, request, ref, options)
    return save_samples(images, sampler, save_path, options, prefix=prefix,
                        channel_suffix=channel_suffix, sidecar_dir=sidecar_dir, labels=labels, label_dir=label_dir,
                        label_sources=[f"{request.source}:{n}" for n in followed])


def resolve_controlnet(ref: ModelRef, options: SampleOptions = SampleOptions()) -> Sampler:
    """The ControlNet ``ref`` names (``auto``: the dataset's controlnet run), on the options' device."""
    if ref.model == "auto":
        ref = dataclasses.replace(ref, model=the("steers").name)
    sampler = resolve_sampler(ref).to(resolve_device(options.device))
    if not kind(sampler.kind).steers:
        raise MedimgenError(f"{sampler.source} is a {sampler.kind}: label maps need a ControlNet "
                            f"(`medimgen train controlnet`, then --model controlnet)")
    return sampler


def conditioned_pairs(sampler: Sampler, request: LabelRequest, ref: ModelRef,
                      options: SampleOptions = SampleOptions()) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, C, *image_size) in the dataset's units, the label maps they were conditioned on (N, *image_size)
    uint8) for the maps ``request`` names."""
    images, maps, _ = conditioned_triples(sampler, request, ref, options)
    return images, maps


def conditioned_triples(sampler: Sampler, request: LabelRequest, ref: ModelRef,
                        options: SampleOptions = SampleOptions()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`conditioned_pairs` and, for each, the label map it followed (a file or case name, for sidecars)."""
    maps = label_maps(sampler, request, ref)
    images = sampler.sample_conditioned(maps.maps, options)
    return images, maps.maps[:, 0].numpy().astype(np.uint8), list(maps.names)
