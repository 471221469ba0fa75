"""`medimgen train autoencoder` with a foundation ``autoencoder.source``: adopt the published autoencoder instead of
training one, after a reconstruction check on the validation cases; fall back to training when it does not suit.

Adopting writes a normal autoencoder run folder: config.yaml (the source, and ``derived.foundation_check``),
checkpoints/best.pt and last.pt holding the published weights (so the LDM, ControlNet, sampler, registry, pyfunc and
resume read it like any autoencoder run; a resumed adopted run is complete), loss_dict.json with the validation loss,
a reconstruction plot, quality.json, and the MLflow run with ``quality/psnr``, ``quality/ssim``, ... logged as an
autoencoder run's quality check logs them.

The check: PSNR and SSIM of the validation cases' reconstructions (posterior mean, the model's intensity range as
data range), by the one scorer (training.quality). At least ``autoencoder.foundation_min_psnr`` dB (25) and
``foundation_min_ssim`` (0.8): adopted. These defaults are medimgen's choice, not published figures: below 25 dB
a [0, 1] image loses fine structure visibly, below SSIM 0.8 local contrast. Below either: the
run says so, records the check in ``derived.foundation_check`` (adopted false) and an MLflow tag, re-plans the
config for the fallback (planning.fallback: the LDM/ControlNet for its latent, its intensity mapping; the config file
the run came from is rewritten, one line says so) and trains the planned fallback autoencoder
(``derived.fallback_autoencoder``) in the same run folder.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from medimgen.core.atomic import write_json_atomic
from medimgen.models.foundation import foundation, load_foundation_weights
from medimgen.models.networks import latent_size
from medimgen.runs.folders import write_checkpoint
from medimgen.training.outputs import plot_losses
from medimgen.training.quality import QUALITY_JSON, QualityCheck

if TYPE_CHECKING:  # pragma: no cover
    from medimgen.training.api import _Job



def reconstruction_check(job: "_Job", epochs: int, progress: bool) -> dict:
    """The quality/* metrics of the run's last.pt on the validation cases (an autoencoder's quality check)."""
    cfg = job.cfg.with_train(job.model, eval_samples=max(1, job.cfg.train_for(job.model).eval_samples))
    check = QualityCheck(job.model, cfg, job.plans.name, *job.splitting_and_fold(), job.run.root, job.device,
                         lambda msg: None, progress)
    return check(epochs)


def replan_for_fallback(job: "_Job", record: dict, echo) -> None:
    """The run's config (and the config file it came from) re-planned for the trained fallback autoencoder: the
    LDM and ControlNet sized for its latent, its intensity mapping (planning.fallback)."""
    from medimgen.planning.fallback import save_trained_plan, trained_plan, with_trained_plan

    cfg, dim = job.cfg, job.cfg.dim
    why = (f"trained (the {foundation(cfg.autoencoder.source).title} failed the reconstruction check: PSNR "
           f"{record['psnr']:.2f} dB, SSIM {record['ssim']:.3f}; re-planned for the trained autoencoder)")
    fresh = trained_plan(job.plans, cfg)
    replanned = with_trained_plan(cfg, fresh, why)
    job.cfg = dataclasses.replace(replanned, derived=dataclasses.replace(replanned.derived, foundation_check=record))
    ae, ldm = fresh.autoencoder, fresh.ldm_unet
    what = (f"re-planned {dim} for the trained autoencoder (latent {ae.latent_channels} channels, "
            f"{'x'.join(str(s) for s in fresh.data.image_size)} -> {'x'.join(str(s) for s in latent_size(fresh))}; "
            f"ldm_unet.attention_levels {list(ldm.attention_levels)}, intensity_range {list(fresh.data.intensity_range)})")
    if job.config_file is not None and job.config_file.is_file():
        backup = save_trained_plan(job.config_file, job.plans, dim, fresh, why)
        what += f": wrote {job.config_file}" + (f" (your edited file kept as {backup.name})" if backup else "")
    echo(what)


def adopt(job: "_Job", progress: bool) -> bool:
    """Adopt the foundation autoencoder of ``job`` (True), or prepare ``job`` to train its fallback (False)."""
    cfg, run, task = job.cfg, job.run, job.task
    source = cfg.autoencoder.source
    min_psnr, min_ssim = cfg.autoencoder.foundation_min_psnr, cfg.autoencoder.foundation_min_ssim
    f = foundation(source)
    echo = job.run_echo()
    echo(f"autoencoder.source={source}: adopting the {f.title} instead of training; checking its reconstructions of "
         f"the validation cases (needs PSNR >= {min_psnr:g} dB and SSIM >= {min_ssim:g})")
    load_foundation_weights(task.autoencoder, source)
    epochs = cfg.train_for(job.model).epochs  # the run is complete: a resumed one has nothing left to do
    trainer = job.make_trainer(progress, None)
    run.make()
    job.write_run_files()
    task.autoencoder.eval()
    with torch.no_grad():
        val = task.validate(trainer.val_batches(), trainer.raw_model)
    trainer.history["epoch"].append(epochs)
    for k, v in val.items():
        trainer.history[f"val_{k}"].append(v)
    trainer.best_val = val["loss"]
    try:  # the check reads last.pt; an interrupted check leaves no checkpoint that would pass for an adopted run
        write_checkpoint(trainer.state(epochs), run.last)
        write_checkpoint(trainer.sampling_state(epochs), run.best)
        quality = reconstruction_check(job, epochs, progress)
    except BaseException:
        for path in (run.best, run.last, run.root / QUALITY_JSON):
            path.unlink(missing_ok=True)
        raise
    psnr, ssim = quality.get("quality/psnr", float("nan")), quality.get("quality/ssim", float("nan"))
    adopted = psnr >= min_psnr and ssim >= min_ssim
    record = {"source": source, "psnr": round(psnr, 4), "ssim": round(ssim, 4), "min_psnr": min_psnr,
              "min_ssim": min_ssim, "adopted": bool(adopted)}
    job.foundation_metrics = {f"foundation/{k}": v for k, v in quality.items()}
    job.foundation_tags = {"medimgen.autoencoder_source": source,
                           "medimgen.foundation_check": "adopted" if adopted else "failed: trained instead"}
    if not adopted:
        echo(f"the {f.title} reconstructs the validation cases at PSNR {psnr:.2f} dB, SSIM {ssim:.3f} (needs "
             f">= {min_psnr:g} dB and >= {min_ssim:g}): training an autoencoder instead (autoencoder.source=trained; "
             f"the check is recorded in derived.foundation_check)")
        for path in (run.best, run.last, run.root / QUALITY_JSON):
            path.unlink(missing_ok=True)
        replan_for_fallback(job, record, echo)
        return False
    echo(f"adopted the {f.title}: PSNR {psnr:.2f} dB, SSIM {ssim:.3f} on the validation cases")
    job.cfg = dataclasses.replace(cfg, derived=dataclasses.replace(cfg.derived, foundation_check=record))
    from medimgen.config import render_generation_config, save_generation_config

    save_generation_config(job.cfg, run.config)
    trainer.config_yaml = render_generation_config(job.cfg)
    write_checkpoint(trainer.state(epochs), run.last)
    write_checkpoint(trainer.sampling_state(epochs), run.best)
    write_json_atomic(run.loss_dict, dict(trainer.history))
    plot_losses(trainer.history, run.plots / "loss.png")
    with torch.no_grad():
        task.plot(run.plots / f"epoch_{epochs:04d}", trainer.plot_batch(), trainer.raw_model)
    job.trainer = trainer
    return True
