"""`medimgen evaluate`: sample K images from a trained model and score them against real images.

Generative models (DDPM, LDM): Fréchet distance and MMD on a named feature extractor, MS-SSIM
among generated pairs (diversity) and among real pairs, and their gap. Autoencoders: PSNR,
SSIM, MS-SSIM and L1 of reconstructions of the real images (LPIPS when its AlexNet weights are
on disk), and the Fréchet distance of reconstructions to the originals (rFID).

Real images are the un-augmented, centre-cropped preprocessed cases of a split subset
(``val``, ``test``, ``train`` or ``all``), exactly as the validation loop sees them; 2D
models use three slices per case. Both sets are compared in the model's intensity range.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medimgen.config.schema import GenerationConfig
from medimgen.errors import MedimgenError
from medimgen.evaluation.features import FeatureExtractor, build_extractor
from medimgen.evaluation.metrics import frechet_distance, mean_pairwise_ms_ssim, mmd, reconstruction_metrics

SUBSETS = ("val", "test", "train", "all")


@dataclass
class Target:
    """A trained model to evaluate."""

    kind: str  # ddpm | ldm | autoencoder
    cfg: GenerationConfig
    dataset: str
    source: str
    sampler: object | None = None  # medimgen.sampling.Sampler for ddpm/ldm
    autoencoder: torch.nn.Module | None = None
    run_root: Path | None = None
    mlflow_run_id: str | None = None

    @property
    def dim(self) -> str:
        return f"{self.cfg.data.spatial_dims}d"


def _dataset_of(run_root: Path, cfg: GenerationConfig) -> str:
    plans = run_root / f"{cfg.data.plans_identifier}.json"  # the run's copy of the plans it was trained on
    if plans.is_file():
        return json.loads(plans.read_text())["dataset_name"]
    return run_root.parents[2].name


def target_from_run(run_root: Path | str, checkpoint: str = "best") -> Target:
    from medimgen.config import load_generation_config
    from medimgen.sampling import from_run
    from medimgen.training.ldm import load_autoencoder
    from medimgen.training.outputs import RunDir

    run_root = Path(run_root)
    info = RunDir(run_root).checkpoint_meta()
    if info["model"] == "autoencoder":
        ae, cfg, ckpt = load_autoencoder(RunDir(run_root), torch.device("cpu"))
        return Target("autoencoder", cfg, _dataset_of(run_root, cfg), str(ckpt), autoencoder=ae, run_root=run_root,
                      mlflow_run_id=info["mlflow_run_id"])
    sampler = from_run(run_root, checkpoint)
    cfg = load_generation_config(run_root / "config.yaml")
    return Target(sampler.kind, cfg, _dataset_of(run_root, cfg), sampler.source, sampler=sampler, run_root=run_root,
                  mlflow_run_id=info["mlflow_run_id"])


def _run_id_of_uri(uri: str) -> str | None:
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0]
    try:
        import mlflow

        return mlflow.models.get_model_info(uri).run_id
    except Exception:
        return None


def resolve_target(model: str, dataset_id: int | str | None = None, model_type: str = "3d",
                   splitting: str = "train-val-test", fold: int = 0, checkpoint: str = "best") -> Target:
    """``model``: a run folder, an MLflow model URI, or ddpm / ldm / autoencoder / auto (the dataset's run)."""
    from medimgen.sampling import dataset_run_folder, from_uri

    if ":/" in model:
        sampler = from_uri(model)
        return Target(sampler.kind, sampler.cfg, sampler.dataset, model, sampler=sampler,
                      mlflow_run_id=_run_id_of_uri(model))
    if Path(model).is_dir():
        return target_from_run(model, checkpoint)
    if model not in ("ddpm", "ldm", "autoencoder", "auto"):
        raise MedimgenError(f"--model must be ddpm, ldm, autoencoder, auto, a run folder or an MLflow model URI; "
                            f"got {model!r}")
    return target_from_run(dataset_run_folder(model, dataset_id, model_type, splitting, fold), checkpoint)


def real_images(cfg: GenerationConfig, dataset: str, subset: str = "test", splitting: str = "train-val-test",
                fold: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(N, C, *image_size) model-range images of a split subset, and their case identifiers."""
    from medimgen.data.cases import open_cases
    from medimgen.data.loader import validation_samples
    from medimgen.data.splits import get_split
    from medimgen.plans import DatasetPlans

    if subset not in SUBSETS:
        raise MedimgenError(f"real images must come from one of {', '.join(SUBSETS)}, got {subset!r}")
    plans = DatasetPlans.planned(dataset, cfg)
    identifiers = open_cases(plans.preprocessed_folder(f"{cfg.data.spatial_dims}d")).identifiers
    split = get_split(plans.folder, identifiers, splitting, fold)
    ids = {"val": split.val, "test": split.test, "train": split.train, "all": identifiers}[subset]
    if not ids:
        raise MedimgenError(f"the {split.name} split of {dataset} has no {subset} cases: choose --real val, train or all")
    images = torch.stack([s["image"] for s in validation_samples(cfg, plans, ids)])
    return images, ids


def _extractor_scores(prefix: str, generated: torch.Tensor, real: torch.Tensor, extractor: FeatureExtractor,
                      device: torch.device, batch_size: int) -> dict[str, float]:
    if len(generated) < 2 or len(real) < 2:
        raise MedimgenError(f"a Fréchet distance needs at least 2 generated and 2 real images "
                            f"(have {len(generated)} and {len(real)}): sample more, or choose --real train/all")
    fr = extractor.extract(real, batch_size, device)
    fg = extractor.extract(generated, batch_size, device)
    return {f"{prefix}fid.{extractor.key}": frechet_distance(fg, fr), f"{prefix}mmd.{extractor.key}": mmd(fg, fr)}


def generation_scores(generated: torch.Tensor, real: torch.Tensor, extractor: FeatureExtractor | None,
                      device: torch.device | str = "cpu", batch_size: int = 8) -> dict[str, float]:
    """Scores of generated images against real ones (both model range, same size)."""
    if tuple(generated.shape[1:]) != tuple(real.shape[1:]):
        raise MedimgenError(f"generated images {tuple(generated.shape[1:])} and real images {tuple(real.shape[1:])} differ in shape")
    g, r = mean_pairwise_ms_ssim(generated), mean_pairwise_ms_ssim(real)
    scores = {"ms_ssim_generated": g, "ms_ssim_real": r, "ms_ssim_gap": abs(g - r)}
    if extractor is not None:
        scores.update(_extractor_scores("", generated, real, extractor, torch.device(device), batch_size))
    return scores


@torch.no_grad()
def reconstruct(autoencoder: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 4) -> torch.Tensor:
    autoencoder.to(device).eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        z_mu, _ = autoencoder.encode(x)
        out.append(autoencoder.decode(z_mu).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _lpips(recon: torch.Tensor, real: torch.Tensor, device: torch.device) -> float | None:
    """LPIPS (AlexNet, through MONAI's PerceptualLoss) when its weights are on disk, else None."""
    from medimgen.training.perceptual import build_perceptual_loss, check_weights_available

    try:
        check_weights_available("alex")
        loss = build_perceptual_loss("alex", real.ndim - 2, True, 0.5, tuple(real.shape[2:])).to(device)
    except MedimgenError:
        return None
    with torch.no_grad():
        return float(loss(recon[:, :1].to(device), real[:, :1].to(device)))


def reconstruction_scores(recon: torch.Tensor, real: torch.Tensor, extractor: FeatureExtractor | None,
                          device: torch.device | str = "cpu", batch_size: int = 8) -> dict[str, float]:
    device = torch.device(device)
    scores = reconstruction_metrics(recon, real)
    scores["ms_ssim_loss"] = 1 - scores["ms_ssim"]
    lp = _lpips(recon, real, device)
    if lp is not None:
        scores["lpips.alex"] = lp
    if extractor is not None:
        scores.update(_extractor_scores("r", recon, real, extractor, device, batch_size))
    return scores


def score_target(target: Target, real: torch.Tensor, num_samples: int, extractor: FeatureExtractor | None,
                 seed: int = 0, scheduler: str | None = None, steps: int | None = None, batch_size: int | None = None,
                 device: str | torch.device | None = None, progress: bool = False) -> dict[str, float]:
    from medimgen.sampling import resolve_device

    dev = resolve_device(device)
    if target.kind == "autoencoder":
        return reconstruction_scores(reconstruct(target.autoencoder, real, dev), real, extractor, dev)
    target.sampler.to(dev)
    name, n_steps = target.sampler.schedule(scheduler, steps)
    generated = target.sampler.sample_model_range(num_samples, seed, name, n_steps, batch_size, progress=progress)
    return generation_scores(generated, real, extractor, dev)


def objective_names(kind: str) -> tuple[str, str]:
    return ("rfid", "ms_ssim_loss") if kind == "autoencoder" else ("fid", "ms_ssim_gap")


def objective_values(scores: dict[str, float], kind: str) -> dict[str, float]:
    """The two tuning objectives, both minimised. DDPM/LDM: 'fid' and 'ms_ssim_gap' (diversity gap to real data);
    autoencoder: 'rfid' (reconstructions vs originals) and 'ms_ssim_loss' (1 - MS-SSIM of reconstructions)."""
    if kind == "autoencoder":
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
    import warnings

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from medimgen.tracking import attach_project_run, brief, connect, ensure_experiment, mark_experiment

    try:
        connect()  # bounded HTTP calls; fails at once when the server is down
        client = MlflowClient()
        if parent_run_id:
            experiment_id = client.get_run(parent_run_id).info.experiment_id
            mark_experiment(experiment_id, client)
        elif not os.environ.get("MLFLOW_RUN_ID"):  # (under `mlflow run`, the run MLflow made has its experiment)
            experiment_id = ensure_experiment(report["dataset"], client)
        tags = {"medimgen.evaluates": report["model"], "medimgen.model": report["kind"], "medimgen.dim": report["dim"],
                "feature_extractor": report["feature_extractor"] or "none"}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        attached = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run -e evaluate`: use the run MLflow made
        run_name = f"evaluate_{report['kind']}_{report['dim']}"
        if attached:
            name = attach_project_run(attached, run_name, report["dataset"], client)
            if name:
                client.update_run(attached, name=name)
            run = client.get_run(attached)
            client.log_batch(attached, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        else:
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        now = int(time.time() * 1000)
        params = {"num_samples": report["num_generated"], "real_subset": report["real"]["subset"],
                  "real_images": report["real"]["images"], "seed": report["seed"],
                  "feature_extractor": report["feature_extractor"] or "none"}
        client.log_batch(run.info.run_id,
                         metrics=[Metric(k, float(v), now, 0) for k, v in report["scores"].items() if v == v],
                         params=[Param(k, str(v)) for k, v in params.items()])
        client.log_artifact(run.info.run_id, str(json_path))
        if not attached:  # `mlflow run` ends its own run
            client.set_terminated(run.info.run_id)
        return run.info.run_id
    except Exception as e:
        warnings.warn(f"could not log the evaluation to MLflow ({brief(e)}); "
                      f"the results are in {json_path}", stacklevel=2)
        return None


def evaluate(
    model: str = "auto",
    dataset_id: int | str | None = None,
    model_type: str = "3d",
    splitting: str = "train-val-test",
    fold: int = 0,
    checkpoint: str = "best",
    real: str = "test",
    num_samples: int = 16,
    extractor: str = "auto",
    weights: str | Path | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    output: str | Path | None = None,
    track: bool = True,
    progress: bool = False,
) -> dict:
    """Evaluate a trained model; returns the report (also written as JSON and logged to MLflow)."""
    target = resolve_target(model, dataset_id, model_type, splitting, fold, checkpoint)
    from medimgen.data.intensity import IntensityMap

    images, ids = real_images(target.cfg, target.dataset, real, splitting, fold)
    feats = build_extractor(extractor, weights, target.dataset, target.cfg.data.spatial_dims,
                            IntensityMap.from_config(target.cfg.data), target.cfg.data.plans_identifier)
    scores = score_target(target, images, num_samples, feats, seed, scheduler, steps, batch_size, device, progress)
    notes = []
    if feats is None and extractor == "none":
        notes.append("no Fréchet distance / MMD: --extractor none")
    elif feats is None:
        notes.append("no Fréchet distance / MMD: no feature extractor has weights on this machine "
                     "(train nnU-Net on the dataset, or put RadImageNet/MedicalNet/InceptionV3 weights in the torch hub cache)")
    else:
        notes.append(f"Fréchet distances are biased by the number of images (here {len(images)} real vs "
                     f"{len(images) if target.kind == 'autoencoder' else num_samples} generated/reconstructed): "
                     f"compare scores only at the same K, real subset and extractor")
    for key, n, fix in (("ms_ssim_real", len(images), "use --real train or all"),
                        ("ms_ssim_generated", num_samples, "raise -k")):
        if key in scores and n < 2:
            notes.append(f"{key} and ms_ssim_gap are nan: MS-SSIM diversity compares pairs, so it needs at least "
                         f"2 images (here {n}; {fix})")
    if target.kind == "autoencoder" and "lpips.alex" not in scores:
        notes.append("no LPIPS: AlexNet weights are not in the torch hub cache")
    report = {
        "model": target.source, "kind": target.kind, "dataset": target.dataset, "dim": target.dim,
        "mlflow_model_run_id": target.mlflow_run_id, "seed": seed,
        "num_generated": 0 if target.kind == "autoencoder" else num_samples,
        "real": {"subset": real, "splitting": splitting, "fold": fold, "cases": len(ids), "images": len(images)},
        "feature_extractor": feats.name if feats is not None else None,
        "scores": scores, "objectives": objective_values(scores, target.kind), "notes": notes,
    }
    if output is None:
        base = target.run_root if target.run_root is not None else Path.cwd()
        output = base / f"evaluation_{target.kind}_{target.dim}_{real}.json"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(report), indent=2, default=float))
    tmp.replace(output)
    report["json"] = str(output)
    report["mlflow_run_id"] = _log_to_mlflow(report, output, target.mlflow_run_id) if track else None
    return report
