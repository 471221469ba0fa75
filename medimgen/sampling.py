"""Load a trained DDPM/LDM (run folder or MLflow URI), sample, write NIfTI in the dataset's geometry.

Samples are generated in nnU-Net's preprocessed space (target spacing, transposed axes,
normalised intensities mapped into the model range) and written back the way nnU-Net writes
images: axes transposed back (``transpose_backward``), spacing of the configuration,
origin/direction of a training case, intensities in the dataset's units (exactly HU for CT).
The geometry comes from the run folder's geometry.json or the model's meta.json (written at
training time); nothing from a run folder, a model or nnU-Net's folders is ever unpickled.
Optionally they are resampled to the dataset's original median spacing with nnU-Net's own
resampling function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medimgen.atomic import atomic_path
from medimgen.config import load_generation_config, save_generation_config
from medimgen.config.schema import GenerationConfig
from medimgen.data.intensity import IntensityMap
from medimgen.devices import resolve_device
from medimgen.errors import MedimgenError
from medimgen.geometry import Geometry, load_geometry
from medimgen.networks import build_autoencoder, build_unet

WEIGHTS = "weights.safetensors"
CONFIG = "config.yaml"
META = "meta.json"


@dataclass
class Sampler:
    """A trained diffusion model ready to sample (EMA weights when the run had EMA)."""

    kind: str  # "ddpm" | "ldm"
    cfg: GenerationConfig
    unet: torch.nn.Module
    autoencoder: torch.nn.Module | None
    scale_factor: float | None
    geometry: Geometry
    dataset: str
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to(self, device: str | torch.device) -> "Sampler":
        self.device = torch.device(device)
        self.unet.to(self.device)
        if self.autoencoder is not None:
            self.autoencoder.to(self.device)
        return self

    def _task(self):
        from medimgen.training.ddpm import DiffusionTask

        sampler = self

        class _Decode(DiffusionTask):  # reuse the training code's sampling loop, without building a new UNet
            def __init__(self):
                self.cfg = sampler.cfg
                self.device = sampler.device
                self.is_ldm = sampler.kind == "ldm"

            @property
            def scheduler_config(self):
                return sampler.cfg.ldm_scheduler if self.is_ldm else sampler.cfg.ddpm_scheduler

            def sample_shape(self, n):
                if not self.is_ldm:
                    return (n, sampler.cfg.data.in_channels, *sampler.cfg.data.image_size)
                from medimgen.planning.memory import latent_size

                return (n, sampler.cfg.autoencoder.latent_channels, *latent_size(sampler.cfg))

            def decode(self, x):
                if not self.is_ldm:
                    return x
                return sampler.autoencoder.decode_stage_2_outputs(x / sampler.scale_factor)

        return _Decode()

    def schedule(self, scheduler: str | None, steps: int | None) -> tuple[str, int]:
        """(sampler name, number of steps) after defaults: the config's sampler; DDPM uses every timestep."""
        cfg = self.cfg.ldm_scheduler if self.kind == "ldm" else self.cfg.ddpm_scheduler
        name = scheduler or cfg.sampler
        return name, cfg.num_train_timesteps if name == "ddpm" else int(steps or cfg.num_inference_steps)

    @torch.no_grad()
    def sample(self, num_images: int, seed: int = 0, sampler: str | None = None, steps: int | None = None,
               batch_size: int | None = None, amp: bool = False, progress: bool = False) -> np.ndarray:
        """(N, C, *image_size) float32 in the dataset's intensity units; same seed -> same images."""
        model_range = self.sample_model_range(num_images, seed, sampler, steps, batch_size, amp, progress)
        imap = IntensityMap.from_config(self.cfg.data)
        return imap.to_original(model_range, channel_axis=1).numpy().astype(np.float32)

    @torch.no_grad()
    def sample_model_range(self, num_images: int, seed: int = 0, sampler: str | None = None, steps: int | None = None,
                           batch_size: int | None = None, amp: bool = False, progress: bool = False) -> torch.Tensor:
        """(N, C, *image_size) float32 CPU tensor in the model's range (what the evaluation compares)."""
        if num_images < 1:
            raise MedimgenError("NUM_IMAGES must be at least 1")
        task = self._task()
        bs = batch_size or num_images
        out = []
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        for start in range(0, num_images, bs):
            n = min(bs, num_images - start)
            ctx = torch.autocast("cuda", dtype=dtype) if amp and self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
            with ctx:
                images = task.sample(self.unet, n, seed + start, sampler, steps, progress)
            out.append(images.float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ packaging (registry)
    def save(self, folder: Path | str) -> Path:
        """Weights as safetensors + config YAML + meta JSON: everything a fresh process needs (no pickle)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}
        if self.autoencoder is not None:
            tensors.update({f"autoencoder.{k}": v.detach().cpu().contiguous()
                            for k, v in self.autoencoder.state_dict().items()})
        save_file(tensors, str(folder / WEIGHTS))
        save_generation_config(self.cfg, folder / CONFIG)
        meta = {"kind": self.kind, "scale_factor": self.scale_factor, "dataset": self.dataset,
                "geometry": self.geometry.to_dict(), "source": self.source}
        (folder / META).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: Path | str, source: str | None = None) -> "Sampler":
        folder = Path(folder)
        for name in (WEIGHTS, CONFIG, META):
            if not (folder / name).is_file():
                raise MedimgenError(f"{folder} is not a medimgen model: {name} is missing")
        try:
            meta = json.loads((folder / META).read_text())
            kind, scale = meta["kind"], meta["scale_factor"]
            geometry = Geometry.from_dict(meta["geometry"], str(folder / META))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise MedimgenError(f"{folder / META} is not a medimgen model description ({type(e).__name__}: {e})") from None
        cfg = load_generation_config(folder / CONFIG)
        tensors = load_file(str(folder / WEIGHTS))
        unet, ae = _networks(kind, cfg)
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        if ae is not None:
            ae.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("autoencoder.")})
        return cls(kind, cfg, unet.eval(), ae.eval() if ae is not None else None, scale, geometry,
                   str(meta.get("dataset", "")), source or meta.get("source", str(folder)))


def _networks(kind: str, cfg: GenerationConfig):
    nd = cfg.data.spatial_dims
    if kind == "ldm":
        return (build_unet(cfg.ldm_unet, nd, cfg.autoencoder.latent_channels),
                build_autoencoder(cfg.autoencoder, nd, cfg.data.in_channels))
    return build_unet(cfg.ddpm_unet, nd, cfg.data.in_channels), None


def from_run(run_root: Path | str, checkpoint: str = "best") -> Sampler:
    """A Sampler from a training run folder (config.yaml and checkpoints/best.pt, else last.pt: a run that has
    not validated yet). best.pt holds the sampling weights (EMA where used); from last.pt the EMA copy is taken."""
    from medimgen.training.outputs import RunDir

    run_root = Path(run_root)
    path = RunDir(run_root).sampling_checkpoint(checkpoint)
    cfg = load_generation_config(run_root / "config.yaml")
    state = torch.load(path, map_location="cpu", weights_only=True)
    kind = state["model"]
    if kind not in ("ddpm", "ldm"):
        raise MedimgenError(f"{path} is a {kind} checkpoint; sampling needs a ddpm or ldm run")
    unet, ae = _networks(kind, cfg)
    if state.get("ema"):  # last.pt: the full resume state with its AveragedModel
        ema = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
        unet.load_state_dict(ema)
    else:  # best.pt (already the EMA weights when the run had EMA), or a run without EMA
        unet.load_state_dict(state["modules"]["unet"])
    scale = None
    if kind == "ldm":
        ae_ckpt = Path(state["extra"]["autoencoder_checkpoint"])
        if not ae_ckpt.is_file():
            raise MedimgenError(f"the LDM's autoencoder checkpoint {ae_ckpt} is missing")
        ae.load_state_dict(torch.load(ae_ckpt, map_location="cpu", weights_only=True)["modules"]["autoencoder"])
        scale = float(state["extra"]["scale_factor"])
    dataset = run_root.parents[2].name
    return Sampler(kind, cfg, unet.eval(), ae.eval() if ae is not None else None, scale,
                   load_geometry(run_root, cfg.data.spacing), dataset, str(path))


def from_uri(uri: str) -> Sampler:
    """A Sampler from an MLflow model URI (models:/NAME@alias, models:/NAME/3, runs:/ID/model)."""
    import mlflow

    from medimgen.tracking import connect

    connect()  # bounded HTTP calls; one line if the server is down
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as e:
        raise MedimgenError(f"cannot load MLflow model {uri} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    sampler = model.unwrap_python_model().sampler
    sampler.source = uri
    return sampler


# ---------------------------------------------------------------------- NIfTI output
def _to_file_order(volume: np.ndarray, geometry: Geometry, spacing: Sequence[float]):
    """(array in SimpleITK numpy order, spacing in that order) from a preprocessed-order volume."""
    if volume.ndim == 3:
        tb = list(geometry.transpose_backward)
        return volume.transpose(tb), [spacing[i] for i in tb]
    # 2D slice of (possibly transposed) 3D data: keep the two in-plane axes in original order
    tf = np.argsort(geometry.transpose_backward)
    if tf[1] > tf[2]:
        return volume.T, list(spacing)[::-1]
    return volume, list(spacing)


def resample_to_original(volume: np.ndarray, cfg: GenerationConfig, geometry: Geometry) -> tuple[np.ndarray, tuple]:
    """(C, *spatial) resampled with nnU-Net's resampling to the dataset's original median spacing."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    target = tuple(geometry.original_spacing[-volume.ndim + 1:])
    current = tuple(geometry.spacing)
    new_shape = [int(round(s * c / t)) for s, c, t in zip(volume.shape[1:], current, target)]
    out = resample_data_or_seg_to_shape(volume, new_shape, current, target, is_seg=False, order=3, order_z=0)
    return out.astype(np.float32), target


def write_nifti(volume: np.ndarray, path: Path, geometry: Geometry, spacing: Sequence[float],
                dtype=np.float32) -> Path:
    """One channel (*spatial, preprocessed order) -> NIfTI the way nnU-Net's SimpleITKIO writes images."""
    import SimpleITK as sitk

    array, sp = _to_file_order(volume, geometry, spacing)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype)))
    image.SetSpacing([float(s) for s in sp[::-1]])
    if geometry.direction is not None and len(geometry.direction) == array.ndim ** 2:
        image.SetDirection(geometry.direction)
        image.SetOrigin(geometry.origin)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def _free_stem(folder: Path, prefix: str, index: int) -> tuple[str, int]:
    while any(folder.glob(f"{prefix}_{index:04d}*.nii.gz")):
        index += 1
    return f"{prefix}_{index:04d}", index


def save_samples(samples: np.ndarray, sampler: Sampler, out_dir: Path | str, seed: int, scheduler: str, steps: int,
                 resample: bool = False, prefix: str = "sample", channel_suffix: bool = False,
                 sidecar_dir: Path | None = None) -> list[Path]:
    """Write every sample (all channels) as NIfTI + a JSON sidecar; never overwrite existing files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar_dir = Path(sidecar_dir) if sidecar_dir else out_dir
    sidecar_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index = 0
    for i, sample in enumerate(samples):
        spacing = sampler.geometry.spacing
        if resample:
            sample, spacing = resample_to_original(sample, sampler.cfg, sampler.geometry)
        stem, index = _free_stem(out_dir, prefix, index)
        files = []
        for c in range(sample.shape[0]):
            name = f"{stem}_{c:04d}.nii.gz" if channel_suffix or sample.shape[0] > 1 else f"{stem}.nii.gz"
            files.append(write_nifti(sample[c], out_dir / name, sampler.geometry, spacing))
        sidecar = {"model": sampler.source, "kind": sampler.kind, "dataset": sampler.dataset, "seed": seed,
                   "index": i, "scheduler": scheduler, "steps": steps,
                   "spacing": list(spacing), "resampled_to_original_spacing": resample,
                   "channels": list(sampler.cfg.data.channel_names), "files": [f.name for f in files]}
        (sidecar_dir / f"{stem}.json").write_text(json.dumps(sidecar, indent=2))
        written += files
        index += 1
    return written


# ---------------------------------------------------------------------- the library call behind the CLI
def resolve_sampler(model: str, dataset_id: int | str | None = None, model_type: str = "3d",
                    splitting: str = "train-val-test", fold: int = 0, checkpoint: str = "best") -> Sampler:
    """``model``: an MLflow URI (models:/..., runs:/...), a run folder, or 'ldm' / 'ddpm' / 'auto' for the
    dataset's run with this model type and split ('auto': the LDM if trained, else the DDPM)."""
    if ":/" in model:
        return from_uri(model)
    if Path(model).is_dir():
        return from_run(model, checkpoint)
    if model not in ("ldm", "ddpm", "auto"):
        raise MedimgenError(f"--model must be ldm, ddpm, auto, a run folder or an MLflow model URI; got {model!r}")
    return from_run(dataset_run_folder(model, dataset_id, model_type, splitting, fold), checkpoint)


def dataset_run_folder(model: str, dataset_id: int | str | None, model_type: str = "3d",
                       splitting: str = "train-val-test", fold: int = 0) -> Path:
    """The dataset's standard run folder of ``model`` (ldm, ddpm, autoencoder; auto: the LDM if trained, else the DDPM)."""
    if dataset_id is None:
        raise MedimgenError("DATASET_ID is needed to find a trained model")
    from medimgen.paths import dataset_name_from_id, medimgen_results

    split = "train-val-test" if splitting == "train-val-test" else f"fold_{fold}"
    base = medimgen_results() / dataset_name_from_id(dataset_id)
    kinds = ["ldm", "ddpm"] if model == "auto" else [model]
    for kind in kinds:
        root = base / kind / model_type / split
        if (root / "checkpoints" / "last.pt").is_file() or (root / "checkpoints" / "best.pt").is_file():
            return root
    raise MedimgenError(f"no trained {' or '.join(kinds)} for {base.name} {model_type} {split} in {base}: "
                        f"train one first (medimgen train {'ldm|ddpm' if model == 'auto' else model} ...)")


def sample_to_folder(
    save_path: Path | str,
    num_images: int,
    model: str = "auto",
    dataset_id: int | str | None = None,
    model_type: str = "3d",
    splitting: str = "train-val-test",
    fold: int = 0,
    checkpoint: str = "best",
    scheduler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    amp: bool = False,
    resample: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Sample ``num_images`` and write them (NIfTI + JSON sidecars) into ``save_path``."""
    sampler = resolve_sampler(model, dataset_id, model_type, splitting, fold, checkpoint).to(resolve_device(device))
    name, n_steps = sampler.schedule(scheduler, steps)
    images = sampler.sample(num_images, seed, name, n_steps, batch_size, amp, progress)
    return save_samples(images, sampler, save_path, seed, name, n_steps, resample)
