"""A training run scores itself: at every planned ``eval_interval`` epochs and at the end, the run's current sampling
weights (last.pt: the EMA copy once it is ready) go through the one scorer (evaluation.scorer via
evaluation.api.score_model), and the results land on the run itself under ``quality/*`` names, step = optimiser step.

Generators (DDPM, LDM, ControlNet) sample ``eval_samples`` images with ``eval_steps`` steps and are compared with the
validation cases (with the training cases too when there are fewer than 2 of those): ``quality/mmd_stats``,
``quality/ms_ssim`` (diversity), ``quality/ms_ssim_gap``, ``quality/memorised_fraction`` (held out: the validation
cases; the test cases stay untouched), ``quality/fid_<extractor>`` where an extractor has weights on this machine;
a ControlNet with a segmenter (``controlnet.segmenter``: a trained nnU-Net) also ``quality/follow_mask_dice`` (and
per label ``quality/follow_mask_dice_<label>``). A named segmenter that is absent stops the run before training.
Autoencoders reconstruct the validation cases: ``quality/psnr``, ``quality/ssim``, ... (``quality/label_dice`` when
joint). The closest generated/training pairs of the last check are in the run folder's quality.json.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from medimgen.config.kinds import kind
from medimgen.config.schema import GenerationConfig, TrainConfig
from medimgen.core.errors import MedimgenError

QUALITY_JSON = "quality.json"


def optimizer_steps(train: TrainConfig, epochs: int) -> int:
    """Optimiser steps after ``epochs`` epochs (an epoch's last micro-batches make a short step)."""
    return epochs * math.ceil(train.iterations_per_epoch / max(1, train.grad_accumulation_steps))


class QualityCheck:
    """Called by the training loop after an epoch's checkpoint; returns the quality/* metrics (or {} when not due)."""

    def __init__(self, model: str, cfg: GenerationConfig, dataset: str, splitting: str, fold: int, run_root: Path,
                 device: torch.device, echo: Callable[[str], None] = print, progress: bool = False):
        self.model, self.cfg, self.dataset, self.splitting, self.fold = model, cfg, dataset, splitting, fold
        self.run_root, self.device, self.echo, self.progress = Path(run_root), device, echo, progress
        self.train = cfg.train_for(model)
        self._reference = None
        self._extractor: object = False  # not looked up yet
        self.segmenter = self._segmenter() if kind(model).steers and self.train.eval_samples else None

    def due(self, epoch: int) -> bool:
        t = self.train
        if not t.eval_samples:
            return False
        return epoch == t.epochs or bool(t.eval_interval and epoch % t.eval_interval == 0)

    def _real(self):
        from medimgen.evaluation.api import real_cases, reference

        if self._reference is None:
            try:
                images, labels, _ = real_cases(self.cfg, self.dataset, "val", self.splitting, self.fold)
            except MedimgenError:
                images = labels = None
            if images is None or len(images) < 2:  # MS-SSIM and MMD compare pairs
                extra, extra_labels, _ = real_cases(self.cfg, self.dataset, "train", self.splitting, self.fold)
                images = extra if images is None else torch.cat([images, extra])
                labels = extra_labels if labels is None else torch.cat([labels, extra_labels])
            ref = reference(self.cfg, self.dataset, images, self.splitting, self.fold, heldout="val",
                            memorise=kind(self.model).samples)
            self._reference = (ref, labels)
        return self._reference

    def _features(self):
        """A feature extractor with weights on this machine (FID), else None; looked up once."""
        if self._extractor is False:
            from medimgen.data.intensity import IntensityMap
            from medimgen.evaluation.features import build_extractor

            self._extractor = build_extractor("auto", None, self.dataset, self.cfg.data.spatial_dims,
                                              IntensityMap.from_config(self.cfg.data), self.cfg.data.plans_identifier)
        return self._extractor

    def _segmenter(self):
        """The follow-the-mask Dice's nnU-Net (``controlnet.segmenter``), or None; one line when a named one is
        absent (checked when the run is set up, not after its training)."""
        from medimgen.data.intensity import IntensityMap
        from medimgen.evaluation.features import build_segmenter

        return build_segmenter(self.cfg.controlnet.segmenter, self.dataset, self.cfg.data.spatial_dims,
                               IntensityMap.from_config(self.cfg.data), self.cfg.data.plans_identifier)

    def __call__(self, epoch: int) -> dict[str, float]:
        from medimgen.core.atomic import write_json_atomic
        from medimgen.core.requests import SampleOptions
        from medimgen.evaluation.api import score_model
        from medimgen.evaluation.scorer import quality_metrics
        from medimgen.runs.folders import TrainedModel

        if not self.due(epoch):
            return {}
        t0 = time.time()
        ref, labels = self._real()
        model = TrainedModel.from_run(self.run_root, "last")
        options = SampleOptions(seed=epoch, steps=self.train.eval_steps, device=str(self.device),
                                progress=self.progress)
        details: dict = {}
        scores = score_model(model, ref, self.train.eval_samples, self._features(), options, labels, details,
                             self.segmenter)
        metrics = quality_metrics(scores)
        metrics["quality/seconds"] = time.time() - t0
        write_json_atomic(self.run_root / QUALITY_JSON,
                          {"epoch": epoch, "step": optimizer_steps(self.train, epoch), "metrics": metrics, **details})
        return metrics
