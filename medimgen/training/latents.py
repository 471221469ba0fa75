"""The latent cache: every training case encoded once by the frozen autoencoder, for latent-space training.

What is stored: the posterior's mean ``mu`` and standard deviation ``sigma`` of each case (float32, one
``cNNNN.npz`` per case, read with allow_pickle=False; 2D: every slice of the case), never a sampled latent: a
stored sample would bake one draw of the posterior's noise into the targets for the whole run. Each training step
draws ``z = (mu + sigma * eps) * scale`` (medimgen.training.ldm / controlnet) from the training RNG, so a resumed
run draws what an uninterrupted one would. A ControlNet's cache also keeps the case's label map (it conditions on
it at image size).

Where: ``$nnUNet_preprocessed/DatasetXXX/medimgen_latents/<data identifier>/<key>/`` (``manifest.json`` + the
case files). The key is a hash of everything that decides the latents: the autoencoder's architecture and weights
(their content, however the autoencoder was made), the nnU-Net plans of the configuration and the identity (name,
size, modification time) of each preprocessed case file, the training cases, image/crop size, the intensity
mapping, the label handling (joint models) and whether labels are kept. Anything changing gives a new key: the
cache is rebuilt, the old one is left (delete ``medimgen_latents/`` to reclaim it). A cache is built in a unique
hidden scratch folder and renamed into place when complete, under a file lock: a second process waits for the
first and reads its result; a killed build leaves no cache behind. Several ranks: rank 0 builds, the others wait.

Geometry (medimgen.data.cache_region, which the planner's size estimate reads too): the cached region of a case
depends on its shape and the config alone (never on the run's micro-batch,
so a run whose micro-batch changes, by hand on resume or by the memory guard's re-fit, keeps its cache and its crop
positions): the case's centre, padded to at least ``data.image_size`` and, where the case is larger, up to
``MAX_EXTENT`` x image_size per axis (rounded up to the autoencoder's total stride). What bounds the build's memory
is the encoder pass, not the region: a region larger than image_size is encoded in overlapping image_size tiles
(MONAI's sliding-window inference; tile starts at multiples of the total stride, so each tile's latents land on
whole latent voxels; Gaussian blending of the overlaps), 3D one tile per pass, 2D up to the micro-batch of slices
(or tiles) per pass: no pass is larger than the one the LDM's training step makes without the cache at that
micro-batch, which the memory plan counts for the cached path too (planning.cuda_sim); a CUDA out-of-memory error in
the build is one line naming the keys. A tiled latent is close to, not identical with, the latent of the whole
region encoded at once: a tile's border voxels see zero padding where the whole region has image, the encoder's
group normalisation takes a tile's statistics, and its attention (where it has any) sees one tile; the Gaussian
weights favour each voxel's most central tile, and training without the cache encodes image_size crops as well.
Batches take random crops of the latent size at whole latent voxels (= stride multiples in the image) from the
cached region. When the memory fitter planned a crop resampled to the image size (``data.crop_size``), the centred
crop is resampled and cached as is (one tile).

What the cached path gives up against the image-space loader (data.loader): nnU-Net's per-step spatial and
intensity augmentation (rotation, scaling, elastic deformation, gamma, noise, blur, contrast), its foreground
oversampling, and crops at arbitrary voxel offsets; it keeps mirroring (as latent flips, where
``data.augmentation`` is 'nnunet', which mirrors in image space; a flipped latent is close to, not exactly, the
latent of the flipped image) and, for cases larger than image_size, random crops at latent-voxel offsets.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medimgen.config.io import to_dict
from medimgen.config.schema import GenerationConfig
from medimgen.core import distributed
from medimgen.core.atomic import disk_error, file_lock
from medimgen.core.errors import MedimgenError
from medimgen.data.cases import load_case, open_cases
from medimgen.data.intensity import IntensityMap
from medimgen.data.cache_region import MAX_EXTENT, label_dtype, region
from medimgen.data.loader import centred_sample, check_cases
from medimgen.models.labels import join
from medimgen.models.networks import latent_size, total_stride
from medimgen.nnunet.plans import DatasetPlans

FORMAT = 2  # 2: regions independent of the micro-batch, encoded in image_size tiles
ROOT = "medimgen_latents"
MANIFEST = "manifest.json"


def uses_cache(cfg: GenerationConfig, model: str) -> bool:
    """Whether a run of ``model`` trains on the latent cache: a latent-space kind with cache_latents on."""
    return cfg.space_of(model) == "latent" and cfg.train_for(model).cache_latents


def tiles_per_pass(cfg: GenerationConfig, batch_size: int) -> int:
    """Image_size inputs one encoder pass of the build takes: 3D one (the pass the LDM's uncached training step makes
    at micro-batch 1), 2D the micro-batch (slices are small: a pass per slice would be slow). Only the grouping
    depends on it, never the region or the stored values' meaning (the encoder treats each input alone in eval)."""
    return max(1, int(batch_size)) if cfg.data.spatial_dims == 2 else 1


def _overlap(tile: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """Per-axis overlap for MONAI's sliding window whose scan interval, ``int(tile * (1 - overlap))``, is half the
    tile rounded down to a whole stride (at least one stride): every tile starts at a stride multiple (MONAI places
    its outputs at ``int(start * latent / tile)``, exact for a stride multiple: strides are 1 or 2 per level). The
    half-voxel margin keeps the float product clear of the integer below."""
    out = []
    for t, k in zip(tile, stride):
        interval = max(k, (t // 2) // k * k)
        overlap = 1 - (interval + 0.5) / t
        out.append(max(0.0, overlap))
    return tuple(out)


def encode_region(cfg: GenerationConfig, encode: Callable, x: torch.Tensor, device: torch.device,
                  per_pass: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) on the CPU of the (N, C, *region) inputs ``x`` (on the CPU): in passes of ``per_pass`` inputs
    when the region is image_size, else in image_size tiles, ``per_pass`` tiles a pass, blended (MONAI's
    sliding_window_inference: windows moved to ``device``, the outputs stitched on the CPU at the latent's
    coarser resolution). Tile starts are stride multiples (the region is a stride multiple, so is the last one)."""
    size = tuple(cfg.data.image_size)
    if tuple(x.shape[2:]) == size:
        out = [tuple(t.float().cpu() for t in encode(x[i:i + per_pass].to(device)))
               for i in range(0, x.shape[0], per_pass)]
        return torch.cat([m for m, _ in out]), torch.cat([s for _, s in out])
    from monai.inferers import sliding_window_inference

    stride = total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)
    mu, sigma = sliding_window_inference(x, roi_size=size, sw_batch_size=per_pass,
                                         predictor=lambda w: tuple(t.float() for t in encode(w)),
                                         overlap=_overlap(size, stride), mode="gaussian", sw_device=device,
                                         device=torch.device("cpu"))
    return mu, sigma


# ---------------------------------------------------------------------------------------------- the key
def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a network's architecture (its repr) and of every tensor of its state_dict (name, dtype, shape,
    bytes): the same for the same weights however they were made."""
    h = hashlib.sha256(repr(module).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_identity(folder: Path, identifiers: Sequence[str]) -> list:
    """[name, size, mtime_ns] of every preprocessed file of the cases (image, segmentation, properties)."""
    out = []
    for ident in sorted(identifiers):
        e = glob.escape(ident)
        for p in sorted({*folder.glob(f"{e}.*"), *folder.glob(f"{e}_seg.*")}):
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def cache_key(cfg: GenerationConfig, autoencoder: torch.nn.Module, plans: DatasetPlans, identifiers: Sequence[str],
              with_labels: bool) -> tuple[str, dict]:
    """(the cache's folder name, what it was derived from) for these cases encoded by ``autoencoder``."""
    dim = cfg.dim
    data = cfg.data
    ingredients = {
        "format": FORMAT, "max_extent": MAX_EXTENT,
        "autoencoder": weights_digest(autoencoder),
        "plans_identifier": plans.plans_identifier,
        "configuration": plans.plans_dict.get("configurations", {}).get(data.nnunet_configuration),
        "files": files_identity(plans.preprocessed_folder(dim), identifiers),
        "cases": sorted(identifiers),
        "data": {k: v for k, v in to_dict(data).items()
                 if k in ("spatial_dims", "in_channels", "image_size", "crop_size", "intensity_range", "intensity_low",
                          "intensity_high", "intensity_background", "normalization_schemes", "generate_labels",
                          "label_values")},
        "with_labels": with_labels,
    }
    digest = hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20], ingredients


def cache_root(plans: DatasetPlans, dim: str) -> Path:
    return plans.folder / ROOT / plans.configuration(dim).data_identifier


# ---------------------------------------------------------------------------------------------- building
@torch.no_grad()
def _encode_case(cfg: GenerationConfig, autoencoder, data: np.ndarray, seg: np.ndarray, imap: IntensityMap,
                 device: torch.device, batch_size: int = 1) -> dict[str, np.ndarray]:
    """{'mu', 'sigma', 'label'} of one case (2D: of every slice, stacked first), in encoder passes of
    :func:`tiles_per_pass` image_size inputs (:func:`encode_region`)."""
    two_d = cfg.data.spatial_dims == 2
    items = [(data[:, z], seg[:, z]) for z in range(data.shape[1])] if two_d else [(data, seg)]
    native, resize = region(cfg, items[0][0].shape[1:])
    per_pass = tiles_per_pass(cfg, batch_size)
    mus, sigmas, labels = [], [], []
    for i in range(0, len(items), per_pass):
        pairs = [centred_sample(d, s, native, imap, resize) for d, s in items[i:i + per_pass]]
        image = torch.stack([p[0] for p in pairs])
        label = torch.stack([p[1] for p in pairs])
        mu, sigma = encode_region(cfg, autoencoder.encode, join(image, label, cfg), device, per_pass)
        mus.append(mu)
        sigmas.append(sigma)
        labels.append(label)
    out = {"mu": torch.cat(mus).numpy(), "sigma": torch.cat(sigmas).numpy(), "label": torch.cat(labels).numpy()}
    if not two_d:
        out = {k: v[0] for k, v in out.items()}
    return out


def build(cfg: GenerationConfig, plans: DatasetPlans, identifiers: Sequence[str], autoencoder: torch.nn.Module,
          device: torch.device, with_labels: bool = False, progress: bool = False,
          echo: Callable[[str], None] = print, batch_size: int = 1) -> Path:
    """The cache folder of these training cases, encoded now unless a complete one with the same key exists
    (``batch_size``: the run's micro-batch, which only groups the 2D build's passes: :func:`tiles_per_pass`)."""
    dim = cfg.dim
    folder_pre = plans.preprocessed_folder(dim)
    check_cases(folder_pre, list(identifiers))
    key, ingredients = cache_key(cfg, autoencoder, plans, identifiers, with_labels)
    root = cache_root(plans, dim)
    folder = root / key
    if (folder / MANIFEST).is_file():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / f".{key}.lock"):
            if (folder / MANIFEST).is_file():  # another process built it meanwhile
                return folder
            if folder.exists():  # no manifest: not a cache (a hand-made or damaged folder)
                shutil.rmtree(folder)
            scratch = root / f".{key}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            scratch.mkdir()
            try:
                _write(cfg, plans, identifiers, autoencoder, device, with_labels, scratch, ingredients,
                       progress, echo, folder, batch_size)
                os.rename(scratch, folder)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except OSError as e:
        raise disk_error(e, folder) from None
    return folder


def _write(cfg, plans, identifiers, autoencoder, device, with_labels, scratch: Path, ingredients: dict, progress,
           echo, final: Path, batch_size: int = 1) -> None:
    from tqdm import tqdm

    ds = open_cases(plans.preprocessed_folder(cfg.dim), list(identifiers))
    imap = IntensityMap.from_config(cfg.data)
    was_training = autoencoder.training
    autoencoder.eval()
    echo(f"encoding {len(identifiers)} training cases into the latent cache {final}")
    t0, cases, total = time.time(), [], 0
    try:
        for n, ident in enumerate(tqdm(identifiers, desc="latent cache", disable=not progress, leave=False)):
            data, seg, _ = load_case(ds, ident)
            try:
                arrays = _encode_case(cfg, autoencoder, data, seg, imap, device, batch_size)
            except torch.cuda.OutOfMemoryError:
                per_pass = tiles_per_pass(cfg, batch_size)
                lower = ", or lower train_*.batch_size (2D: the slices of a pass)" if per_pass > 1 else ""
                raise MedimgenError(f"out of GPU memory encoding case {ident} into the latent cache ({per_pass} "
                                    f"input(s) of image_size {tuple(cfg.data.image_size)} a pass, which the memory "
                                    f"plan counts): free the GPU, or plan with a lower memory.target_gb{lower}") \
                    from None
            if with_labels:
                arrays["label"] = arrays["label"].astype(label_dtype(cfg))
            else:
                del arrays["label"]
            name = f"c{n:05d}.npz"
            np.savez(scratch / name, **arrays)
            size = (scratch / name).stat().st_size
            total += size
            cases.append({"case": ident, "file": name, "shape": list(arrays["mu"].shape), "bytes": size})
    finally:
        autoencoder.train(was_training)
    manifest = {"format": FORMAT, "key": final.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.time() - t0, 3), "bytes": total, "cases": cases, "ingredients": ingredients}
    (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))
    echo(f"latent cache: {len(cases)} cases, {total / 1e6:.2f} MB in {time.time() - t0:.1f} s")


def load(folder: Path) -> list[dict]:
    """The cases of a complete cache in memory: [{'key', 'mu', 'sigma'[, 'label']}] as torch tensors."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise MedimgenError(f"{folder} is a latent cache of another medimgen version: delete it")
        out = []
        for c in manifest["cases"]:
            with np.load(folder / c["file"], allow_pickle=False) as z:
                out.append({"key": c["case"], **{k: torch.from_numpy(z[k].copy()) for k in z.files}})
        return out
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise MedimgenError(f"the latent cache {folder} is unreadable ({type(e).__name__}: {e}): delete it and "
                            f"train again (it is rebuilt)") from None


def prepare(cfg: GenerationConfig, plans: DatasetPlans, identifiers: Sequence[str], autoencoder: torch.nn.Module,
            device: torch.device, with_labels: bool = False, progress: bool = False,
            echo: Callable[[str], None] = print, batch_size: int = 1) -> list[dict]:
    """The training cases' cached latents on every rank: rank 0 builds (or finds) the cache, the others wait for
    it and read the folder rank 0 names."""
    folder = build(cfg, plans, identifiers, autoencoder, device, with_labels, progress, echo, batch_size) \
        if distributed.is_main() else None
    distributed.barrier()
    folder = Path(distributed.broadcast(str(folder) if folder is not None else None))
    return load(folder)


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class _Draw:
    case: int
    index: tuple  # slices of mu/sigma (2D: the slice first)
    label_index: tuple
    flips: tuple[int, ...]
    key: str


class CachedBatches:
    """Endless training batches from the cache (``next(batches)``), drawn in this process from torch's global RNG
    (a resumed run that restores it draws the same): random case (2D: random slice), random crop of the latent size
    at whole latent voxels, flips where ``data.augmentation`` is 'nnunet'. A batch is {'mu', 'sigma' (B, C_lat,
    *latent), 'keys'} (+ 'label' (B, 1, *image_size) where the cache keeps labels)."""

    def __init__(self, cases: list[dict], cfg: GenerationConfig, batch_size: int):
        if not cases:
            raise MedimgenError("the latent cache holds no training cases")
        self.cases, self.batch_size = cases, batch_size
        self.two_d = cfg.data.spatial_dims == 2
        self.latent = latent_size(cfg)
        self.stride = total_stride(cfg.autoencoder.strides, cfg.data.spatial_dims)
        self.flip = cfg.data.augmentation == "nnunet"

    def __iter__(self):
        return self

    def _draw(self) -> _Draw:
        ci = int(torch.randint(len(self.cases), ()))
        case = self.cases[ci]
        lead, key = (), case["key"]
        spatial = tuple(case["mu"].shape[-len(self.latent):])
        if self.two_d:
            z = int(torch.randint(case["mu"].shape[0], ()))
            lead, key = (z,), f"{key}_z{z}"
        idx, lidx = [], []
        for n, size, k in zip(spatial, self.latent, self.stride):
            o = int(torch.randint(n - size + 1, ())) if n > size else 0
            idx.append(slice(o, o + size))
            lidx.append(slice(o * k, (o + size) * k))
        flips = tuple(a for a in range(len(self.latent)) if self.flip and bool(torch.rand(()) < 0.5))
        return _Draw(ci, (*lead, slice(None), *idx), (*lead, slice(None), *lidx), flips, key)

    def _take(self, t: torch.Tensor, index: tuple, flips: tuple[int, ...]) -> torch.Tensor:
        t = t[index]
        return t.flip([1 + a for a in flips]) if flips else t

    def __next__(self) -> dict:
        draws = [self._draw() for _ in range(self.batch_size)]
        batch = {name: torch.stack([self._take(self.cases[d.case][name], d.index, d.flips) for d in draws])
                 for name in ("mu", "sigma")}
        if "label" in self.cases[0]:
            batch["label"] = torch.stack([self._take(self.cases[d.case]["label"], d.label_index, d.flips)
                                          for d in draws]).to(torch.int16)
        batch["keys"] = [d.key for d in draws]
        return batch

    def close(self) -> None:
        pass


def sample_latents(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps of a cached batch (unscaled), eps from the training RNG (or ``generator``)."""
    mu, sigma = batch["mu"], batch["sigma"]
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device) if generator is not None \
        else torch.randn_like(mu)
    return mu + sigma * eps
