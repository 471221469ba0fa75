"""How good are the planned defaults? medimgen's plan against the hand configs of MONAI's tutorials, on real anatomy.

    python benchmarks/bench_defaults.py [--workspace DIR] [--dims 2d,3d] [--steps 50,100,200] [--ae-steps 100]
        [--width-div 4] [--batch-div 8] [--size3d 32,32,32] [--samples 16] [--sample-steps 50]
        [--cases 24] [--spacing 3.5] [--fid-epochs 0] [--controlnet-steps 0] [--configs planned,monai_tutorial]
        [--out results.json] [--png curves.png]

1. Builds the real-anatomy dataset (benchmarks/real_anatomy.py: public head MRI, tissue labels) as an nnU-Net raw
   dataset, runs nnUNetv2_plan_and_preprocess and `medimgen plan` on it.
2. Trains, on the same data, seed and device, two configs per dimensionality:
   - ``planned``: medimgen_config.yaml as planned;
   - ``monai_tutorial``: the same file with the hand-written values of MONAI's tutorials as config overrides
     (``HAND``, cited from Project-MONAI/tutorials generation/2d_ddpm/2d_ddpm_tutorial.ipynb for the 2D DDPM and
     generation/3d_ldm/3d_ldm_tutorial.ipynb for the 3D autoencoder + LDM).
   Both sides are then reduced identically for the device (``reduction``): every channel count and head width
   divided by ``--width-div``, every batch by ``--batch-div``, the 3D image size cropped to ``--size3d``, the
   perceptual loss off (its pretrained weights cannot be downloaded here), no loader workers.
3. Scores the model after each of ``--steps`` optimiser steps (the LDM after its autoencoder's ``--ae-steps``) with
   medimgen's evaluation functions (``score``): image-statistics MMD (evaluation/statistics.py) and MS-SSIM
   diversity (evaluation/api.generation_scores) of ``--samples`` samples (the config's sampler, DDIM, at
   ``--sample-steps`` steps, fixed seed, the weights medimgen samples with) against the dataset's real images; FID
   and feature MMD with the dataset's own nnU-Net encoder when ``--fid-epochs`` > 0 (trained first by nnU-Net's
   trainer through `medimgen train-feature-nnunet`).
4. Compares (a) at equal optimiser steps (the last of ``--steps``) and (b) at equal wall time: each curve read at
   the training seconds the faster config needed for all its steps (the slower config's last scored point within
   that time; training seconds exclude scoring). Prints Markdown tables, writes ``--out`` (JSON) and ``--png``
   (metric vs steps and vs seconds).
5. With ``--controlnet-steps`` (and ``--fid-epochs``): the ControlNet follow-the-mask Dice (``follow_mask``).
Results, the hand configs' sources and the dataset's limits: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402
from real_anatomy import FetchError, build_dataset  # noqa: E402

from medimgen.config import apply_overrides, load_config  # noqa: E402
from medimgen.config.kinds import kind  # noqa: E402
from medimgen.core.errors import MedimgenError  # noqa: E402
from medimgen.core.requests import SampleOptions  # noqa: E402
from medimgen.evaluation.api import real_cases, score_model  # noqa: E402
from medimgen.evaluation.scorer import Reference  # noqa: E402
from medimgen.evaluation.statistics import statistics_mmd  # noqa: E402
from medimgen.generation.sampler import Sampler  # noqa: E402
from medimgen.runs.folders import TrainedModel  # noqa: E402
from medimgen.training.api import RunSetup, train  # noqa: E402

TUTORIALS = "Project-MONAI/tutorials@b3c6c998c931d78b61c4d32b37f962a987400f8a"
CONFIGS = ("planned", "monai_tutorial")
MODELS = {"2d": ("ddpm",), "3d": ("autoencoder", "ldm")}  # what each dimensionality compares (in training order)
SAMPLE_SEED = 100


def _l(values) -> str:
    return "[" + ",".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values) + "]"


def _strides(planned, n: int, dims: int) -> str:
    """``n`` level transitions: the plan's first ones, then 2 per axis (MONAI's default) where the plan has fewer."""
    return _l([_l(s) for s in (list(planned[:n]) + [[2] * dims] * n)[:n]])


def _plain_adam(section: str, lr: float, batch: int) -> list[str]:
    """The tutorials' optimisation: Adam at ``lr``, batch ``batch``, no accumulation, weight decay, EMA, clipping or
    schedule."""
    return [f"{section}.learning_rate={lr:g}", f"{section}.batch_size={batch}", f"{section}.grad_accumulation_steps=1",
            f"{section}.weight_decay=0.0", f"{section}.ema_decay=null", f"{section}.grad_clip=null",
            f"{section}.lr_schedule=constant"]


def hand_overrides(cfg, model: str) -> list[str]:
    """The MONAI tutorial's values for ``model`` as medimgen config overrides (strides: the plan's first ones, since
    the tutorials' data differ; their own are 2 per level transition)."""
    if model == "ddpm":  # generation/2d_ddpm/2d_ddpm_tutorial.ipynb, cells 9 and 16
        return [f"ddpm_unet.channels={_l([128, 256, 256])}", f"ddpm_unet.strides={_strides(cfg.ddpm_unet.strides, 2, cfg.data.spatial_dims)}",
                f"ddpm_unet.attention_levels={_l([False, True, True])}", "ddpm_unet.num_res_blocks=1",
                "ddpm_unet.num_head_channels=256", "ddpm_unet.norm_num_groups=32",
                # DDPMScheduler(num_train_timesteps=1000): MONAI's defaults linear_beta 1e-4..2e-2, epsilon
                "ddpm_scheduler.num_train_timesteps=1000", "ddpm_scheduler.schedule=linear_beta",
                "ddpm_scheduler.beta_start=0.0001", "ddpm_scheduler.beta_end=0.02", "ddpm_scheduler.prediction_type=epsilon",
                # Adam(lr=2.5e-5), batch_size=64, no EMA, no clipping
                *_plain_adam("train_ddpm", 2.5e-5, 64)]
    if model == "autoencoder":  # generation/3d_ldm/3d_ldm_tutorial.ipynb, cells 9, 14, 16, 17, 19
        return [f"autoencoder.channels={_l([32, 64, 64])}", f"autoencoder.strides={_strides(cfg.autoencoder.strides, 2, cfg.data.spatial_dims)}",
                "autoencoder.latent_channels=3", "autoencoder.num_res_blocks=1", "autoencoder.norm_num_groups=16",
                f"autoencoder.attention_levels={_l([False, False, True])}",
                "discriminator.channels=32", "discriminator.num_layers=3",
                "losses.reconstruction=l1", "losses.kl_weight=1e-6", "losses.perceptual_weight=0.001",
                "losses.adversarial_weight=0.01", "losses.perceptual_network=squeeze", "losses.perceptual_fake_3d=true",
                "losses.perceptual_fake_3d_ratio=0.2",
                "train_autoencoder.disc_learning_rate=1e-4", *_plain_adam("train_autoencoder", 1e-4, 2)]
    if model == "ldm":  # generation/3d_ldm/3d_ldm_tutorial.ipynb, cells 25 and 30
        return [f"ldm_unet.channels={_l([32, 64, 64])}", f"ldm_unet.strides={_strides(cfg.ldm_unet.strides, 2, cfg.data.spatial_dims)}",
                f"ldm_unet.attention_levels={_l([False, True, True])}", "ldm_unet.num_res_blocks=1",
                "ldm_unet.num_head_channels=64", "ldm_unet.norm_num_groups=32",
                "ldm_scheduler.num_train_timesteps=1000", "ldm_scheduler.schedule=scaled_linear_beta",
                "ldm_scheduler.beta_start=0.0015", "ldm_scheduler.beta_end=0.0195", "ldm_scheduler.prediction_type=epsilon",
                *_plain_adam("train_ldm", 1e-4, 2)]
    raise ValueError(model)


# the tutorial's adversarial warm-up: 5 of 100 epochs (3d_ldm_tutorial cell 19), a fraction of the budget here
HAND_WARMUP_FRACTION = 0.05


def reduction(cfg, model: str, width_div: int, batch_div: int, size3d: list[int] | None) -> list[str]:
    """The same reduction for both sides: widths / width_div, batch / batch_div, 3D image size, no perceptual
    network, no workers (``cfg`` already carries the side's own values)."""
    net = kind(model).network_section
    section = getattr(cfg, net)
    channels = [max(1, c // width_div) for c in section.channels]
    groups = math.gcd(section.norm_num_groups, *channels)
    sets = [f"{net}.channels={_l(channels)}", f"{net}.norm_num_groups={groups}", "data.num_workers=0",
            "losses.perceptual_network=none", "tracking.log_models=false", "tracking.register_models=false"]
    if model == "autoencoder":
        sets.append(f"discriminator.channels={max(1, cfg.discriminator.channels // width_div)}")
    else:
        sets.append(f"{net}.num_head_channels={max(1, section.num_head_channels // width_div)}")
    train_cfg = cfg.train_for(model)
    sets.append(f"train_{model}.batch_size={max(1, math.ceil(train_cfg.batch_size / batch_div))}")
    return sets + size_overrides(cfg, size3d)


def size_overrides(cfg, size3d: list[int] | None) -> list[str]:
    """The 3D image size of both sides (a centred crop of the cases at the plan's spacing)."""
    if size3d and cfg.data.spatial_dims == 3:
        return [f"data.image_size={_l(size3d)}", "data.crop_size=[]", "data.native_spacing=[]"]
    return []


def budget(cfg, model: str, steps: int, chunk: int, warmup_fraction: float | None) -> list[str]:
    """``steps`` optimiser steps in epochs of ``chunk``; validation only at the end; the adversarial warm-up the
    same fraction of the run as the side's own plan (planned: warm-up epochs / epochs; tutorial: 5 %)."""
    epochs = steps // chunk
    sets = [f"train_{model}.iterations_per_epoch={chunk}", f"train_{model}.epochs={epochs}",
            f"train_{model}.val_interval={epochs}", f"train_{model}.val_plot_interval={epochs}"]
    if model == "autoencoder":
        sets.append(f"losses.adversarial_warmup_epochs={round(warmup_fraction * epochs)}")
    return sets


def score(model: TrainedModel, real: torch.Tensor, real_labels: torch.Tensor, num_samples: int, sample_steps: int,
          extractor=None) -> dict:
    """THE scoring call of this benchmark: medimgen's one scorer (evaluation.api.score_model -> evaluation.scorer),
    i.e. what a training run and `medimgen evaluate` report. A generator: ``num_samples`` samples of the weights
    medimgen samples with (EMA once ready), seed ``SAMPLE_SEED``, the config's sampler at ``sample_steps`` steps;
    image-statistics MMD, MS-SSIM diversity (+ FID / feature MMD with ``extractor``) against ``real``, and for a
    joint image+label model the label checks plus ``label_fraction_error`` (mean over labels of |generated - real|
    volume fraction). An autoencoder: the scorer's reconstruction scores (+ label Dice)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    options = SampleOptions(seed=SAMPLE_SEED, steps=sample_steps, device=dev)
    ref = Reference(real, value_range=tuple(model.cfg.data.intensity_range))
    out = score_model(model, ref, num_samples, extractor, options, real_labels)
    names = [k.split(".")[1] for k in out if k.startswith("label_fraction.") and k.endswith(".generated_mean")]
    if names:
        out["label_fraction_error"] = sum(abs(out[f"label_fraction.{n}.generated_mean"]
                                              - out[f"label_fraction.{n}.real_mean"]) for n in names) / len(names)
    return out


HELDOUT_SEED, HELDOUT_DRAWS = 7, 8


def heldout_loss(model: TrainedModel, dataset: int | str, draws: int = HELDOUT_DRAWS) -> float:
    """The diffusion objective on the held-out cases (val + test split, three slices per 2D case): MSE of the
    sampling weights' prediction, ``draws`` draws of noise and timesteps from a fixed seed, so every model of the
    dataset sees the same noisy inputs. An LDM's inputs are the cases' latents under its autoencoder (mu + sigma *
    a fixed draw, times the run's scale factor, as training draws them). Comparable between configs with the same
    schedule and prediction type (the 2D DDPM tutorial and the plan share linear_beta 1e-4..0.02, epsilon; the 3D
    LDM tutorial and the plan scaled_linear_beta 0.0015..0.0195, epsilon) and, for LDMs, the same autoencoder
    (``--ldm-on``); a learning signal that needs no sampling and moves long before the samples leave noise."""
    import torch.nn.functional as F

    from medimgen.models.diffusion import noised, training_scheduler
    from medimgen.models.labels import join
    from medimgen.training.latents import sample_latents

    cfg = model.cfg
    parts = []
    for subset in ("val", "test"):
        try:
            parts.append(real_cases(cfg, str(dataset), subset=subset))
        except MedimgenError:  # a tiny split without such cases
            continue
    if not parts:
        return float("nan")
    x = join(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), cfg)
    sched = training_scheduler(cfg.scheduler_for(model.kind), cfg.data.spatial_dims)
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    unet = model.unet.eval()
    with torch.no_grad():
        if kind(model.kind).space == "latent":
            mu, sigma = model.autoencoder.encode(x)
            x = sample_latents({"mu": mu, "sigma": sigma}, gen) * model.scale_factor
        losses = []
        for _ in range(draws):
            noisy, t, target = noised(sched, cfg.scheduler_for(model.kind).prediction_type, x, gen)
            losses.append(F.mse_loss(unet(noisy, timesteps=t).float(), target.float()).item())
    return float(np.mean(losses))


def train_curve(model: str, dataset: int, dim: str, cfg, sets: list[str], steps: list[int], chunk: int,
                run_root: Path, real, real_labels, args, extractor, log, autoencoder_run: Path | None = None) -> list[dict]:
    """Train ``model`` with ``sets`` up to max(steps); score at each of ``steps``; rows with train seconds."""
    rows: list[dict] = []
    clock = {"scoring": 0.0, "ends": []}  # wall time at the end of each epoch, scoring excluded
    now = time.process_time if args.cpu_clock else time.time  # CPU seconds: fair on a shared, loaded machine

    def on_epoch(epoch: int, metrics: dict):
        ends = clock["ends"]
        ends.append(now() - clock["scoring"])
        step = epoch * chunk
        if step not in steps:
            return
        # training seconds: from the first epoch's end, plus that epoch counted as long as the mean of the others
        # (run set-up, MLflow and the loader's start are not training)
        per_epoch = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None
        s0 = now()
        torch.manual_seed(0)
        m = TrainedModel.from_run(run_root, "last")
        row = {"step": step, "train_seconds": None if per_epoch is None else round(ends[-1] - ends[0] + per_epoch, 2),
               **score(m, real, real_labels, args.samples, args.sample_steps, extractor)}
        if kind(model).generator:
            row["heldout_loss"] = heldout_loss(m, dataset)
        clock["scoring"] += now() - s0
        rows.append(row)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    train(model, dataset, "train-val-test", dim, overrides=sets, echo=lambda *_: None,
          setup=RunSetup(run_root=run_root, on_epoch=on_epoch, run_name=f"bench_defaults_{run_root.name}",
                         upstream_run=autoencoder_run, score=False))
    ends = clock["ends"]
    per_epoch = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
    for r in rows:  # a row scored after the first epoch: one mean epoch
        if r["train_seconds"] is None:
            r["train_seconds"] = round(per_epoch * r["step"] / chunk, 2)
    return rows


def prepare(args) -> int:
    """Dataset, nnU-Net plans and preprocessing, medimgen plan (each once per workspace); the dataset id."""
    from medimgen.demo import ensure_env
    from medimgen.nnunet.commands import plan_and_preprocess
    from medimgen.planning.api import plan_dataset
    from medimgen.core import paths

    ensure_env(Path(args.workspace))
    folder = build_dataset(paths.nnunet_raw(), args.dataset_id, args.cases, args.spacing, cache=args.cache)
    if not (paths.nnunet_preprocessed() / folder.name / "nnUNetPlans_3d_fullres").is_dir():
        print("nnUNetv2_plan_and_preprocess ...", flush=True)
        plan_and_preprocess(args.dataset_id, quiet=True)
    if not (paths.nnunet_preprocessed() / folder.name / "medimgen_config.yaml").is_file():
        plan_dataset(args.dataset_id, force=True, offline=True)
    return args.dataset_id


def feature_extractor(args, dataset: int, dim: str, cfg):
    """The dataset's own nnU-Net encoder (trained here, briefly, with nnU-Net's trainer), or None."""
    if args.fid_epochs <= 0:
        return None
    from medimgen.data.intensity import IntensityMap
    from medimgen.evaluation.features import build_extractor, find_nnunet_model
    from medimgen.nnunet.commands import train_feature_nnunet

    from medimgen.nnunet.plans import DatasetPlans

    name = DatasetPlans.from_id(dataset).name
    if find_nnunet_model(name, cfg.data.spatial_dims) is None:
        print(f"training the {dim} nnU-Net feature encoder ({args.fid_epochs} epochs) ...", flush=True)
        train_feature_nnunet(dataset, dim, epochs=args.fid_epochs, iterations=args.fid_iterations)
    return build_extractor("nnunet", None, name, cfg.data.spatial_dims, IntensityMap.from_config(cfg.data))


def check_depth(cfg, model: str, side: str) -> None:
    """One clear line when the image (or latent) is too small for a side's UNet: its deepest level needs >= 2
    voxels per axis (group norm of a batch of 1 fails on a single voxel)."""
    size = list(cfg.data.image_size)
    nets = ([cfg.autoencoder] if kind(model).space == "latent" else []) + [getattr(cfg, kind(model).network_section)]
    for net in nets:
        for stride in net.strides:
            size = [n // s for n, s in zip(size, stride)]
    if min(size) < 2:
        raise MedimgenError(f"the {side} {model}'s deepest level would be {size} voxels for images of "
                            f"{list(cfg.data.image_size)}: give a larger --size3d / --spacing")


def follow_mask(args, dataset: int, dim: str, base, base_run: Path, log) -> dict:
    """The ControlNet check MAISI reports, by medimgen's scorer (evaluation.scorer.follow_mask, what ControlNet runs
    and `medimgen evaluate` log as quality/follow_mask_dice): a ControlNet (planned settings, reduced like the rest)
    trained ``--controlnet-steps`` on top of the planned side's trained DDPM generates one image per real label map
    of the test split; the dataset's nnU-Net (the FID encoder's model) segments them; mean Dice per label against
    the maps they were conditioned on. References: the same nnU-Net on the real test images (its ceiling here) and
    the generated images against another case's map (what ignoring the mask scores)."""
    from medimgen.data.intensity import IntensityMap
    from medimgen.evaluation.features import build_segmenter, find_nnunet_model
    from medimgen.evaluation.scorer import MaskFollowing, follow_mask as dice
    from medimgen.nnunet.plans import DatasetPlans

    name = DatasetPlans.from_id(dataset).name
    if find_nnunet_model(name, base.data.spatial_dims) is None:
        return {"skipped": "no trained nnU-Net of the dataset (give --fid-epochs > 0)"}
    steps = args.controlnet_steps
    chunk = max(1, steps // 4) if steps % 4 == 0 else 1
    cn = base.controlnet
    sets = reduction(base, "ddpm", args.width_div, args.batch_div, args.size3d) + budget(base, "controlnet", steps, chunk, None) \
        + [f"controlnet.conditioning_channels={_l(max(1, c // args.width_div) for c in cn.conditioning_channels)}",
           f"train_controlnet.batch_size={max(1, math.ceil(base.train_controlnet.batch_size / args.batch_div))}",
           "controlnet.base=ddpm"] + list(args.set)
    run_cfg = apply_overrides(base, sets)
    real, real_labels, _ = real_cases(run_cfg, str(dataset), subset="test")
    maps = real_labels[: args.samples].long().clamp(min=0)
    run_root = Path(args.workspace) / "runs" / f"{dim}_controlnet_planned_{int(time.time())}_{os.getpid()}"
    t0 = time.time()
    train("controlnet", dataset, "train-val-test", dim, overrides=sets, echo=lambda *_: None,
          setup=RunSetup(run_root=run_root, upstream_run=base_run, score=False, run_name=f"bench_defaults_{run_root.name}"))
    seconds = time.time() - t0
    sampler = Sampler.of(TrainedModel.from_run(run_root, "last"))
    generated = sampler.sample_model_range(len(maps), SampleOptions(seed=SAMPLE_SEED, steps=args.sample_steps),
                                           condition=maps)
    seg = build_segmenter("nnunet", name, run_cfg.data.spatial_dims, IntensityMap.from_config(run_cfg.data),
                          run_cfg.data.plans_identifier)
    values = [int(v) for v in run_cfg.data.label_values]
    names = list(run_cfg.data.label_names or [str(v) for v in values])

    def per_label(images, against) -> dict:
        scores = dice(images, MaskFollowing(seg, against, values, names))
        return {n: scores[f"follow_mask_dice.{n}"] for n in names} | {"mean": scores["follow_mask_dice"]}

    out = {"steps": steps, "train_seconds": round(seconds, 1), "num_maps": len(maps), "segmenter": seg.name,
           "base_run": str(base_run),
           "dice_generated_vs_condition": per_label(generated, maps),
           "dice_generated_vs_other_map": per_label(generated, maps.roll(1, 0)),
           "dice_real_vs_label": per_label(real[: len(maps)], real_labels[: len(maps)].long().clamp(min=0))}
    log(json.dumps(out))
    return out


def compare(args, dataset: int, dim: str) -> dict:
    """Both configs of one dimensionality: {config: {model: rows}}."""
    from medimgen.nnunet.plans import DatasetPlans

    plans = DatasetPlans.from_id(dataset)
    base = load_config(plans.folder / "medimgen_config.yaml").get(dim)
    steps, chunk = _points(args.steps)
    ae_steps, ae_chunk = _points(args.ae_steps, epochs=20)
    out: dict = {}
    for side in args.configs:
        out[side] = {}
        ae_run = args.ldm_on  # None: each side's LDM on its own autoencoder, trained first
        for model in MODELS[dim]:
            if args.models and model not in args.models:
                continue
            own = hand_overrides(base, model) if side == "monai_tutorial" else []
            if kind(model).upstream == "autoencoder" and side == "monai_tutorial" and not args.ldm_on:
                own += hand_overrides(base, "autoencoder")  # the LDM's config names its autoencoder's
            cfg = apply_overrides(base, size_overrides(base, args.size3d) + own)  # the size first: it is validated
            n_steps, c = (steps, chunk) if kind(model).generator else (ae_steps, ae_chunk)
            warm = (HAND_WARMUP_FRACTION if side == "monai_tutorial"
                    else base.losses.adversarial_warmup_epochs / max(1, base.train_autoencoder.epochs))
            sets = own + reduction(cfg, model, args.width_div, args.batch_div, args.size3d) \
                + budget(cfg, model, max(n_steps), c, warm) + list(args.set)
            if kind(model).upstream == "autoencoder":
                sets += reduction(cfg, "autoencoder", args.width_div, args.batch_div, args.size3d)
            run_cfg = apply_overrides(base, sets)
            check_depth(run_cfg, model, side)
            real, real_labels, _ = real_cases(run_cfg, str(dataset), subset="all")
            extractor = feature_extractor(args, dataset, dim, run_cfg) if kind(model).generator else None
            run_root = Path(args.workspace) / "runs" / f"{dim}_{model}_{side}_{int(time.time())}_{os.getpid()}"
            print(f"{dim} {model} {side}: image {list(run_cfg.data.image_size)}, "
                  f"{_net_summary(run_cfg, model)}, batch {run_cfg.train_for(model).batch_size}, "
                  f"lr {run_cfg.train_for(model).learning_rate}", flush=True)
            rows = train_curve(model, dataset, dim, run_cfg, sets, n_steps, c, run_root, real, real_labels, args, extractor,
                               log=lambda m, s=side, mo=model: print(f"  {dim} {mo} {s}: {m}", flush=True),
                               autoencoder_run=ae_run)
            if kind(model).upstream is None and not args.ldm_on:
                ae_run = run_root  # what a next model builds on (the LDM: this autoencoder)
            if side == "planned" and model == "ddpm" and args.controlnet_steps > 0:
                out["follow_mask"] = follow_mask(args, dataset, dim, base, run_root,
                                                 lambda m: print(f"  {dim} controlnet: {m}", flush=True))
            out[side][model] = {"rows": rows, "overrides": sets, "summary": _net_summary(run_cfg, model),
                                "batch": run_cfg.train_for(model).batch_size,
                                "learning_rate": run_cfg.train_for(model).learning_rate}
    lo, hi = base.data.intensity_range
    noise = torch.randn((args.samples, *real.shape[1:]), generator=torch.Generator().manual_seed(0)).clamp(lo, hi)
    out["reference"] = {"mmd_stats_of_gaussian_noise": statistics_mmd(noise, real, (lo, hi)), "num_real": len(real)}
    return out


def _points(spec: str, epochs: int = 4) -> tuple[list[int], int]:
    """(the scored steps of a comma-separated list, the epoch length): their gcd, made a divisor of the last point
    over ``epochs`` where it can (so the seconds per epoch are known, and an autoencoder's adversarial warm-up, a
    whole number of epochs, comes close to its fraction of the run)."""
    steps = sorted({int(s) for s in str(spec).split(",") if int(s) > 0})
    chunk = math.gcd(*steps)
    if steps[-1] // chunk < epochs:
        chunk = math.gcd(chunk, max(1, steps[-1] // epochs))
    return steps, chunk


def _net_summary(cfg, model: str) -> str:
    net = getattr(cfg, kind(model).network_section)
    att = "".join("A" if a else "-" for a in net.attention_levels)
    extra = f", heads of {net.num_head_channels}" if model != "autoencoder" else f", latent {net.latent_channels}"
    return f"channels {list(net.channels)} attention {att} res blocks {net.num_res_blocks}{extra}"


def _sides(curves: dict) -> list[str]:
    return [s for s in CONFIGS if s in curves]


def _models(curves: dict, dim: str) -> list[str]:
    """The dimensionality's models the first side trained (``--models`` may leave some out)."""
    return [m for m in MODELS[dim] if m in curves[_sides(curves)[0]]]


def equal_time(curves: dict, model: str) -> tuple[float, dict]:
    """(T, {side: row}): T the training seconds the faster side needed for all its steps; each side's last row
    within T."""
    finals = {s: curves[s][model]["rows"][-1]["train_seconds"] for s in _sides(curves)}
    t = min(finals.values())
    picked = {}
    for s in _sides(curves):
        within = [r for r in curves[s][model]["rows"] if r["train_seconds"] <= t + 1e-6]
        picked[s] = within[-1] if within else None
    return t, picked


KEYS = ("heldout_loss", "mmd_stats", "ms_ssim_generated", "ms_ssim_gap", "label_fraction_error", "psnr", "ssim", "label_dice")


def tables(results: dict) -> str:
    lines = []
    for dim, curves in results["dims"].items():
        ref = curves["reference"]
        lines.append(f"\n{dim}: {ref['num_real']} real images; image-statistics MMD of Gaussian noise "
                     f"{ref['mmd_stats_of_gaussian_noise']:.3f} (learned nothing), about 0 for real images")
        sides = _sides(curves)
        for model in _models(curves, dim):
            last = curves[sides[0]][model]["rows"]
            keys = [k for k in KEYS if k in last[-1]]
            keys += [k for k in last[-1] if k.startswith(("fid.", "mmd.")) and k not in keys]
            lines.append(f"\n{dim} {model}: curves (step: train s, " + ", ".join(keys) + ")\n")
            lines.append("| config | network | batch | lr | " + " | ".join(
                f"step {r['step']}" for r in last) + " |")
            lines.append("|---" * (4 + len(last)) + "|")
            for s in sides:
                c = curves[s][model]
                cells = [f"{r['train_seconds']:.0f} s: " + " / ".join(f"{r[k]:.3f}" for k in keys) for r in c["rows"]]
                lines.append(f"| {s} | {c['summary']} | {c['batch']} | {c['learning_rate']:g} | " + " | ".join(cells) + " |")
            if model == "autoencoder":
                continue
            t, picked = equal_time(curves, model)
            lines.append(f"\nequal wall time ({t:.0f} s of training):\n")
            lines.append("| config | step reached | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
            for s in sides:
                r = picked[s]
                lines.append(f"| {s} | " + (f"{r['step']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) if r
                                           else "none scored within T | " + " | ".join("-" for _ in keys)) + " |")
        fm = curves.get("follow_mask")
        if fm and "skipped" not in fm:
            names = list(fm["dice_generated_vs_condition"])
            lines.append(f"\n{dim} ControlNet follow-the-mask Dice ({fm['steps']} ControlNet steps on the planned DDPM, "
                         f"{fm['num_maps']} test-split maps, segmenter {fm['segmenter']}):\n")
            lines.append("| pair | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
            for key, what in (("dice_generated_vs_condition", "generated vs its conditioning map"),
                              ("dice_generated_vs_other_map", "generated vs another case's map (ignoring the mask)"),
                              ("dice_real_vs_label", "real image vs its label (the segmenter's ceiling)")):
                lines.append(f"| {what} | " + " | ".join(f"{fm[key][n]:.3f}" for n in names) + " |")
        elif fm:
            lines.append(f"\n{dim} ControlNet follow-the-mask Dice: skipped ({fm['skipped']})")
    return "\n".join(lines)


def plot(results: dict, path: Path, repeats: list[tuple[str, dict]] = ()) -> None:
    """MMD against steps and against training seconds; ``repeats``: (label, results) of other seeds, drawn fainter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(dim, m) for dim, curves in results["dims"].items() for m in _models(curves, dim) if m != "autoencoder"]
    if not panels:  # autoencoders only: no curves to draw
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for (dim, model), row in zip(panels, axes):
        for (label, res), alpha in zip([("", results), *repeats], [1.0] + [0.45] * len(repeats)):
            for side, style, color in zip(CONFIGS, ("o-", "s--"), ("C0", "C1")):
                if side not in res["dims"].get(dim, {}):
                    continue
                rows = res["dims"][dim][side][model]["rows"]
                for ax, x in zip(row, ("step", "train_seconds")):
                    ax.plot([r[x] for r in rows], [r["mmd_stats"] for r in rows], style, color=color, alpha=alpha,
                            label=f"{side} {label}".strip())
        for ax, x in zip(row, ("step", "train_seconds")):
            ax.set_xlabel("optimiser steps" if x == "step" else "training seconds")
            ax.set_ylabel("image-statistics MMD (lower is better)")
            ax.set_title(f"{dim} {model}")
            ax.legend(fontsize=7)
    fig.suptitle(f"planned vs MONAI tutorial, {results['device']}, {results['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=None, help="nnU-Net folders, runs, MLflow (default: a temp folder)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "medimgen-bench")
    ap.add_argument("--dataset-id", type=int, default=801)
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--spacing", type=float, default=3.5)
    ap.add_argument("--dims", default="2d,3d")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which sides to train (both for a comparison)")
    ap.add_argument("--steps", default="50,100,200", help="optimiser steps after which the DDPM/LDM is scored")
    ap.add_argument("--ae-steps", default="100", help="3D: autoencoder steps after which it is scored (the LDM "
                    "trains on the last)")
    ap.add_argument("--models", default="", help="only these of a dimensionality's models (e.g. 'autoencoder')")
    ap.add_argument("--ldm-on", type=Path, default=None, help="3D: every side's LDM trains on this trained "
                    "autoencoder run folder (no autoencoder trained): the LDMs compared on one latent space")
    ap.add_argument("--width-div", type=int, default=4)
    ap.add_argument("--batch-div", type=int, default=8)
    ap.add_argument("--size3d", default="32,32,32", help="3D image size for both sides ('' keeps the plan's)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--fid-epochs", type=int, default=0, help="> 0: train the dataset's nnU-Net encoder for FID")
    ap.add_argument("--fid-iterations", type=int, default=10)
    ap.add_argument("--controlnet-steps", type=int, default=0, help="> 0: the ControlNet follow-the-mask Dice (2D DDPM "
                    "base, needs --fid-epochs > 0: the same nnU-Net segments)")
    ap.add_argument("--set", action="append", default=[], help="extra override for both sides (repeatable)")
    ap.add_argument("--cpu-clock", action="store_true", help="training seconds as this process's CPU seconds (with "
                    "OMP_NUM_THREADS=1: what a step costs, whatever else loads a shared machine) instead of wall time")
    ap.add_argument("--controlnet-on", type=Path, default=None, help="only the follow-the-mask Dice: train the "
                    "ControlNet (--controlnet-steps) on this trained 2D DDPM run folder (needs the dataset's nnU-Net)")
    ap.add_argument("--merge", default=None, help="no training: merge result JSONs of separately run sides "
                    "(comma-separated; the same seed) into --out / --png and print the tables")
    ap.add_argument("--repeat", default=None, help="with --merge: merged JSONs of other seeds, drawn fainter in --png")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if not args.configs or set(args.configs) - set(CONFIGS):
        ap.error(f"--configs takes {', '.join(CONFIGS)}")
    args.size3d = [int(v) for v in args.size3d.split(",")] if args.size3d else None
    args.models = [m for m in args.models.split(",") if m]
    if args.ldm_on:
        args.models = [m for m in args.models or MODELS["3d"] if m != "autoencoder"]
    for dim in args.dims.split(","):
        if dim not in MODELS or not [m for m in MODELS[dim] if not args.models or m in args.models]:
            ap.error(f"nothing to train for --dims {dim}: it trains {', '.join(MODELS.get(dim, ())) or 'nothing'}"
                     f"{' (--ldm-on: the LDM only)' if args.ldm_on else ''}")
    args.workspace = args.workspace or tempfile.mkdtemp(prefix="bench_defaults_")
    ws = Path(args.workspace)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    torch.manual_seed(0)
    try:
        return _run(args)
    except (MedimgenError, FetchError) as e:
        sys.exit(f"error: {e}")


def merge(files: list[Path]) -> dict:
    """One result of several JSONs of the same comparison run side by side (``--configs`` one side each)."""
    merged: dict = {}
    for f in files:
        res = json.loads(Path(f).read_text())
        if not merged:
            merged = {**res, "dims": {}, "merged_from": []}
        merged["merged_from"].append(str(f))
        for dim, curves in res["dims"].items():
            into = merged["dims"].setdefault(dim, {})
            for key, value in curves.items():
                if key in CONFIGS and key in into:
                    raise MedimgenError(f"{f}: {dim} {key} is already in an earlier file")
                into.setdefault(key, value)
    return merged


def _run(args) -> dict:
    if args.merge:
        results = merge([Path(f) for f in args.merge.split(",")])
        print(tables(results))
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        if args.png:
            repeats = [(f"(seed file {i + 2})", json.loads(Path(f).read_text()))
                       for i, f in enumerate((args.repeat or "").split(",")) if f]
            plot(results, args.png, repeats)
        return results
    dataset = prepare(args)
    if args.controlnet_on:
        from medimgen.nnunet.plans import DatasetPlans

        base = load_config(DatasetPlans.from_id(dataset).folder / "medimgen_config.yaml").get("2d")
        out = {"device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "args": {k: str(v) for k, v in vars(args).items()},
               "follow_mask": follow_mask(args, dataset, "2d", base, args.controlnet_on, print)}
        if args.out:
            args.out.write_text(json.dumps(out, indent=1))
        return out
    results = {"device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "tutorials": TUTORIALS, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "dims": {}}
    t0 = time.time()
    for dim in args.dims.split(","):
        results["dims"][dim] = compare(args, dataset, dim)
        if args.out:  # after each dimensionality: a run stopped by a time limit keeps what it finished
            args.out.write_text(json.dumps(results, indent=1))
    results["total_seconds"] = round(time.time() - t0, 1)
    print(f"\ndevice: {results['device']}; {results['date']}; {results['total_seconds']} s\n{tables(results)}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.png:
        plot(results, args.png)
    return results


if __name__ == "__main__":
    main()
