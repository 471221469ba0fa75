"""`medimgen evaluate`: sample K images from a trained model and score them against real images.

Generative models (DDPM, LDM): Fréchet distance and MMD on a named feature extractor, MS-SSIM
among generated pairs (diversity) and among real pairs, and their gap. Autoencoders: PSNR,
SSIM, MS-SSIM and L1 of reconstructions of the real images (LPIPS when its AlexNet weights are
on disk), and the Fréchet distance of reconstructions to the originals (rFID).
Joint image+label models (``data.generate_labels``): the autoencoder's label reconstruction Dice
(``label_dice``, per label and mean), and sanity checks of generated pairs (``labels_valid``, per-label volume
fractions generated vs real, fraction of each label inside the generated image's foreground).
ControlNets: the same scores of images generated for the real label maps, and with a segmenter (``--segmenter``,
a trained nnU-Net) the follow-the-mask Dice (``follow_mask_dice``, evaluation.scorer).

Real images are the un-augmented, centre-cropped preprocessed cases of a split subset
(``val``, ``test``, ``train`` or ``all``), exactly as the validation loop sees them; 2D
models use three slices per case. Both sets are compared in the model's intensity range.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from medimgen.config.kinds import kind as model_kind
from medimgen.config.schema import GenerationConfig
from medimgen.core.devices import resolve_device
from medimgen.core.errors import MedimgenError
from medimgen.evaluation.features import FeatureExtractor, build_extractor, build_segmenter
from medimgen.evaluation.metrics import reconstruction_metrics
from medimgen.evaluation.scorer import MaskFollowing, Reference, feature_scores, quality_metrics, score
from medimgen.core.requests import ModelRef, SampleOptions
from medimgen.models.labels import dice_per_label, join, label_channels, split
from medimgen.runs.folders import TrainedModel
from medimgen.generation.sampler import Sampler

SUBSETS = ("val", "test", "train", "all")


def real_images(cfg: GenerationConfig, dataset: str, subset: str = "test", splitting: str = "train-val-test",
                fold: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(N, C, *image_size) model-range images of a split subset, and their case identifiers."""
    images, _, ids = real_cases(cfg, dataset, subset, splitting, fold)
    return images, ids


def real_cases(cfg: GenerationConfig, dataset: str, subset: str = "test", splitting: str = "train-val-test",
               fold: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """As :func:`real_images`, with the (N, 1, *image_size) label maps (nnU-Net values, -1 padding)."""
    images, labels, _, ids = _real_samples(cfg, dataset, subset, splitting, fold)
    return images, labels, ids


def _real_samples(cfg: GenerationConfig, dataset: str, subset: str, splitting: str, fold: int):
    """(images, labels, one key per image (2D: case_zN), case ids) of a split subset ('heldout': val and test)."""
    from medimgen.data.cases import open_cases
    from medimgen.data.loader import validation_samples
    from medimgen.data.splits import get_split
    from medimgen.nnunet.plans import DatasetPlans

    if subset not in (*SUBSETS, "heldout"):
        raise MedimgenError(f"real images must come from one of {', '.join(SUBSETS)}, got {subset!r}")
    plans = DatasetPlans.planned(dataset, cfg)
    identifiers = open_cases(plans.preprocessed_folder(f"{cfg.data.spatial_dims}d")).identifiers
    split = get_split(plans.folder, identifiers, splitting, fold)
    ids = {"val": split.val, "test": split.test, "train": split.train, "all": identifiers,
           "heldout": [*split.val, *split.test]}[subset]
    if not ids:
        raise MedimgenError(f"the {split.name} split of {dataset} has no {subset} cases: choose --real val, train or all")
    samples = list(validation_samples(cfg, plans, ids))
    return (torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples]),
            [s["key"] for s in samples], ids)


def reference(cfg: GenerationConfig, dataset: str, real: torch.Tensor, splitting: str = "train-val-test",
              fold: int = 0, memorise: bool = True, heldout: str = "heldout") -> Reference:
    """What generated images are scored against: ``real``, and (``memorise``) the split's training cases and its
    ``heldout`` cases ('heldout': val and test; training runs use 'val' alone) for the memorisation score; a split
    without such cases scores no memorisation."""
    ref = Reference(real, value_range=tuple(cfg.data.intensity_range))
    if not memorise:
        return ref
    try:
        ref.train, _, ref.train_ids, _ = _real_samples(cfg, dataset, "train", splitting, fold)
        ref.heldout, _, ref.heldout_ids, _ = _real_samples(cfg, dataset, heldout, splitting, fold)
    except MedimgenError:
        ref.train = ref.heldout = None
    return ref


def generation_scores(generated: torch.Tensor, real: "torch.Tensor | Reference", extractor: FeatureExtractor | None,
                      device: torch.device | str = "cpu", batch_size: int = 8) -> dict[str, float]:
    """Scores of generated images against real ones (both model range, same size): the scorer's (see
    evaluation.scorer), with memorisation when ``real`` is a :class:`Reference` with training and held-out cases."""
    reference = real if isinstance(real, Reference) else Reference(real)
    return score(generated, reference, extractor, device, batch_size)[0]


@torch.no_grad()
def reconstruct(autoencoder: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 4,
                cfg: GenerationConfig | None = None, labels: torch.Tensor | None = None):
    """Reconstructions of ``images``; for a joint autoencoder (``cfg`` with data.generate_labels) the images are
    encoded with their ``labels`` and (reconstructed images, reconstructed label maps) are returned."""
    autoencoder.to(device).eval()
    joint = cfg is not None and label_channels(cfg) > 0
    if joint and labels is None:
        raise MedimgenError("this autoencoder generates labels: reconstructing needs the real label maps")
    out, out_labels = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        if joint:
            x = join(x, labels[i:i + batch_size], cfg)
        z_mu, _ = autoencoder.encode(x)
        image, label = split(autoencoder.decode(z_mu), cfg, logits=True) if joint else (autoencoder.decode(z_mu), None)
        out.append(image.float().clamp(*(cfg.data.intensity_range if cfg is not None else (-1.0, 1.0))).cpu())
        if label is not None:
            out_labels.append(label.cpu())
    return (torch.cat(out), torch.cat(out_labels)) if joint else torch.cat(out)


def label_dice_scores(recon: torch.Tensor, real: torch.Tensor, cfg: GenerationConfig) -> dict[str, float]:
    """Dice of reconstructed vs real label maps per label (over all images together) and their mean."""
    ref = real.long().clamp(min=0)
    names = cfg.data.label_names or tuple(str(v) for v in cfg.data.label_values)
    per = dice_per_label(recon, ref, cfg.data.label_values)
    scores = {f"label_dice.{n}": per[v] for n, v in zip(names, cfg.data.label_values)}
    valid = [d for d in per.values() if d == d]
    scores["label_dice"] = sum(valid) / len(valid) if valid else math.nan
    return scores


def _lpips(recon: torch.Tensor, real: torch.Tensor, device: torch.device) -> float | None:
    """LPIPS (AlexNet, through MONAI's PerceptualLoss) when its weights are on disk, else None."""
    from medimgen.models.perceptual import build_perceptual_loss, check_weights_available

    try:
        check_weights_available("alex")
        loss = build_perceptual_loss("alex", real.ndim - 2, True, 0.5, tuple(real.shape[2:])).to(device)
    except MedimgenError:
        return None
    with torch.no_grad():
        return float(loss(recon[:, :1].to(device), real[:, :1].to(device)))


def reconstruction_scores(recon: torch.Tensor, real: torch.Tensor, extractor: FeatureExtractor | None,
                          device: torch.device | str = "cpu", batch_size: int = 8,
                          data_range: float = 2.0) -> dict[str, float]:
    """PSNR/SSIM/MS-SSIM over ``data_range`` (the model's intensity range: [-1, 1], a foundation autoencoder's
    [0, 1]), LPIPS where its weights are on disk, r-features with an extractor."""
    device = torch.device(device)
    scores = reconstruction_metrics(recon, real, data_range)
    scores["ms_ssim_loss"] = 1 - scores["ms_ssim"]
    lp = _lpips(recon, real, device)
    if lp is not None:
        scores["lpips.alex"] = lp
    if extractor is not None:
        scores.update(feature_scores("r", recon, real, extractor, device, batch_size))
    return scores


def label_sanity_scores(images: torch.Tensor, labels: torch.Tensor, real_labels: torch.Tensor | None,
                        cfg: GenerationConfig) -> dict[str, float]:
    """Sanity checks of generated image+label pairs: ``labels_valid`` (1 when every generated value is background or
    one of data.label_values), per label the volume fraction of generated and real label maps (mean, std over
    images; padding of real cases counts as background), and the fraction of the label's voxels inside the
    generated image's foreground (body mask of the first channel, as `medimgen import` makes: near 1 expected)."""
    import numpy as np

    from medimgen.nnunet.importer import foreground_mask

    gen = labels[:, 0].numpy()
    allowed = {0, *(int(v) for v in cfg.data.label_values)}
    scores = {"labels_valid": float(set(np.unique(gen).tolist()) <= allowed)}
    names = cfg.data.label_names or tuple(str(v) for v in cfg.data.label_values)
    bodies = np.stack([foreground_mask(im[0].numpy()) for im in images])
    for name, v in zip(names, cfg.data.label_values):
        frac = (gen == int(v)).reshape(len(gen), -1).mean(1)
        scores[f"label_fraction.{name}.generated_mean"] = float(frac.mean())
        scores[f"label_fraction.{name}.generated_std"] = float(frac.std())
        if real_labels is not None and len(real_labels):
            real = (real_labels[:, 0].numpy() == int(v)).reshape(len(real_labels), -1).mean(1)
            scores[f"label_fraction.{name}.real_mean"] = float(real.mean())
            scores[f"label_fraction.{name}.real_std"] = float(real.std())
        inside = (gen == int(v)) & bodies
        total = int((gen == int(v)).sum())
        scores[f"label_inside_foreground.{name}"] = float(inside.sum() / total) if total else math.nan
    return scores


def score_model(model: TrainedModel, real: "torch.Tensor | Reference", num_samples: int,
                extractor: FeatureExtractor | None, options: SampleOptions = SampleOptions(),
                real_labels: torch.Tensor | None = None, details: dict | None = None,
                segmenter=None) -> dict[str, float]:
    """Reconstruction scores of an autoencoder (with label Dice for a joint one: needs ``real_labels``), or the
    scorer's scores of ``num_samples`` images of a DDPM/LDM/ControlNet (a ControlNet generates them for the real
    label maps, in turn, and with a ``segmenter`` (features.build_segmenter) adds the follow-the-mask Dice);
    ``real`` a :class:`Reference` adds the memorisation score (its closest pairs go into
    ``details['memorisation']``)."""
    dev = resolve_device(options.device)
    ref = real if isinstance(real, Reference) else Reference(real)
    images = ref.real
    if model_kind(model.kind).encoder:
        lo, hi = model.cfg.data.intensity_range
        if label_channels(model.cfg):
            recon, recon_labels = reconstruct(model.autoencoder, images, dev, cfg=model.cfg, labels=real_labels)
            return {**reconstruction_scores(recon, images, extractor, dev, data_range=hi - lo),
                    **label_dice_scores(recon_labels, real_labels, model.cfg)}
        return reconstruction_scores(reconstruct(model.autoencoder, images, dev, cfg=model.cfg), images, extractor, dev,
                                     data_range=hi - lo)
    sampler = Sampler.of(model).to(dev)
    condition = None
    if model_kind(model.kind).steers:
        if real_labels is None or not len(real_labels):
            raise MedimgenError("scoring a ControlNet needs the real label maps it generates images for")
        condition = real_labels[torch.arange(num_samples) % len(real_labels)].clamp(min=0)
    generated, labels = sampler.sample_model_range(num_samples, options, labels=True, condition=condition)
    masks = None
    if condition is not None and segmenter is not None:
        values = [int(v) for v in model.cfg.data.label_values]
        masks = MaskFollowing(segmenter, condition, values, model.cfg.data.label_names or [str(v) for v in values])
    scores, mem = score(generated, ref, extractor, dev, masks=masks)
    if mem is not None and details is not None:
        details["memorisation"] = {"threshold": mem.threshold, "fraction": mem.fraction, "closest_pairs": mem.pairs}
    if labels is not None:
        scores.update(label_sanity_scores(generated, labels, real_labels, model.cfg))
    return scores


def objective_values(scores: dict[str, float], kind: str) -> dict[str, float]:
    """The two tuning objectives, both minimised. DDPM/LDM: 'fid' and 'ms_ssim_gap' (diversity gap to real data);
    autoencoder: 'rfid' (reconstructions vs originals) and 'ms_ssim_loss' (1 - MS-SSIM of reconstructions)."""
    if model_kind(kind).encoder:
        rfid = next((v for k, v in scores.items() if k.startswith("rfid.")), math.nan)
        return {"rfid": rfid, "ms_ssim_loss": scores["ms_ssim_loss"]}
    fid = next((v for k, v in scores.items() if k.startswith("fid.")), math.nan)
    return {"fid": fid, "ms_ssim_gap": scores["ms_ssim_gap"]}


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _log_to_mlflow(report: dict, json_path: Path, parent_run_id: str | None) -> str | None:
    """A new evaluation run, nested under the model's own run when that run is known."""
    from medimgen.runs.tracking import log_side_run

    params = {"num_samples": report["num_generated"], "real_subset": report["real"]["subset"],
              "real_images": report["real"]["images"], "seed": report["seed"],
              "feature_extractor": report["feature_extractor"] or "none"}
    tags = {"medimgen.evaluates": report["model"], "medimgen.model": report["kind"], "medimgen.dim": report["dim"],
            "feature_extractor": report["feature_extractor"] or "none"}
    return log_side_run(f"evaluate_{report['kind']}_{report['dim']}", report["dataset"], parent_run_id, tags, params,
                        {**report["scores"], **quality_metrics(report["scores"])}, json_path, what="the evaluation")


def evaluate(ref: ModelRef, real: str = "test", num_samples: int = 16, extractor: str = "auto",
             weights: str | Path | None = None, options: SampleOptions = SampleOptions(),
             output: str | Path | None = None, track: bool = True, segmenter: str | None = None) -> dict:
    """Evaluate the trained model ``ref`` names; returns the report (also written as JSON and logged to MLflow).
    ``segmenter`` (a ControlNet's follow-the-mask Dice; None: the model's ``controlnet.segmenter``): auto, none,
    nnunet or nnunet:/path/to/model_folder."""
    from medimgen.data.intensity import IntensityMap

    from medimgen.core.atomic import check_output_folder
    from medimgen.core.devices import check_host_memory

    model = TrainedModel.resolve(ref)
    if output:
        check_output_folder(Path(output).parent, "-o")
    check_host_memory(3 * num_samples * model.cfg.data.in_channels * math.prod(model.cfg.data.image_size) * 4,
                      f"evaluating {num_samples} generated images (-k)")
    images, labels, ids = real_cases(model.cfg, model.dataset, real, ref.splitting, ref.fold)
    feats = build_extractor(extractor, weights, model.dataset, model.cfg.data.spatial_dims,
                            IntensityMap.from_config(model.cfg.data), model.cfg.data.plans_identifier)
    seg = None
    if model_kind(model.kind).steers:
        seg = build_segmenter(segmenter or model.cfg.controlnet.segmenter, model.dataset, model.cfg.data.spatial_dims,
                              IntensityMap.from_config(model.cfg.data), model.cfg.data.plans_identifier)
    against = reference(model.cfg, model.dataset, images, ref.splitting, ref.fold,
                        memorise=not model_kind(model.kind).encoder)
    details: dict = {}
    scores = score_model(model, against, num_samples, feats, options, labels, details, seg)
    num_generated = 0 if model_kind(model.kind).encoder else num_samples
    report = {
        "model": model.source, "kind": model.kind, "dataset": model.dataset, "dim": model.dim,
        "mlflow_model_run_id": model.mlflow_run_id, "seed": options.seed, "num_generated": num_generated,
        "real": {"subset": real, "splitting": ref.splitting, "fold": ref.fold, "cases": len(ids), "images": len(images)},
        "feature_extractor": feats.name if feats is not None else None,
        "segmenter": seg.name if seg is not None else None,
        "scores": scores, "objectives": objective_values(scores, model.kind), **details,
        "notes": _notes(scores, model.kind, extractor, feats, len(images), num_samples),
    }
    default = (model.run_root or Path.cwd()) / f"evaluation_{model.kind}_{model.dim}_{real}.json"
    report["json"] = str(_write_report(report, Path(output) if output else default))
    report["mlflow_run_id"] = _log_to_mlflow(report, Path(report["json"]), model.mlflow_run_id) if track else None
    return report


def _notes(scores: dict, kind: str, extractor: str, feats, num_real: int, num_samples: int) -> list[str]:
    """What the report's numbers do not say by themselves."""
    notes = []
    if feats is None and extractor == "none":
        notes.append("no Fréchet distance / MMD: --extractor none")
    elif feats is None:
        notes.append("no Fréchet distance / MMD: no feature extractor has weights on this machine "
                     "(train nnU-Net on the dataset, or put RadImageNet/MedicalNet/InceptionV3 weights in the torch hub cache)")
    else:
        notes.append(f"Fréchet distances are biased by the number of images (here {num_real} real vs "
                     f"{num_real if model_kind(kind).encoder else num_samples} generated/reconstructed): "
                     f"compare scores only at the same K, real subset and extractor")
    for key, n, fix in (("ms_ssim_real", num_real, "use --real train or all"),
                        ("ms_ssim_generated", num_samples, "raise -k")):
        if key in scores and n < 2:
            notes.append(f"{key} and ms_ssim_gap are nan: MS-SSIM diversity compares pairs, so it needs at least "
                         f"2 images (here {n}; {fix})")
    if model_kind(kind).encoder and "lpips.alex" not in scores:
        notes.append("no LPIPS: AlexNet weights are not in the torch hub cache")
    return notes


def _write_report(report: dict, path: Path) -> Path:
    from medimgen.core.atomic import write_bytes_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, json.dumps(_json_safe(report), indent=2, default=float).encode())
