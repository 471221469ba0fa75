"""How much scoring a training run does: samples, sampling steps and interval of its quality checks.

Cost is counted in network evaluations of one image: a training step costs about 3 per image of the batch (forward and
backward), a quality check ``samples x steps`` (forward only, the LDM's decoding left out). The plan keeps all checks of a
run together at about SHARE of its training (at least one check at the end), with at least MIN_SAMPLES samples (MS-SSIM
and MMD compare pairs) and MIN_STEPS steps; between those bounds it prefers more checks, then more samples.
"""

from __future__ import annotations

import math

from medimgen.config.schema import GenerationConfig, TrainConfig

SHARE = 0.05  # of a run's training compute
MAX_SAMPLES, MIN_SAMPLES = 16, 4
MIN_STEPS, MAX_STEPS = 10, 50
MAX_CHECKS = 10  # per run, the one at the end included
TRAIN_COST = 3.0  # network evaluations per image of a training step (forward + backward)


def training_cost(train: TrainConfig) -> float:
    return train.epochs * train.iterations_per_epoch * train.batch_size * TRAIN_COST


def checks(train: TrainConfig) -> int:
    """Quality checks of a run: one every eval_interval epochs, and one at the end."""
    if not train.eval_samples:
        return 0
    if not train.eval_interval:
        return 1
    return train.epochs // train.eval_interval + (train.epochs % train.eval_interval != 0)


def plan(train: TrainConfig, inference_steps: int = MAX_STEPS, max_checks: int = MAX_CHECKS) -> dict:
    """eval_interval, eval_samples and eval_steps for a run of ``train`` (see the module); a tuning trial, scored
    once, asks with ``max_checks=1``."""
    budget = SHARE * training_cost(train)
    steps = max(MIN_STEPS, min(MAX_STEPS, inference_steps))
    for n in range(max_checks, 0, -1):
        samples = int(budget / n / steps)
        if samples >= MIN_SAMPLES or n == 1:
            break
    if samples < MIN_SAMPLES:  # a short run: fewer steps before fewer samples
        steps = max(MIN_STEPS, min(steps, int(budget / MIN_SAMPLES)))
    samples = max(MIN_SAMPLES, min(MAX_SAMPLES, samples))
    interval = 0 if n == 1 else max(1, math.ceil(train.epochs / n))
    return {"eval_interval": interval, "eval_samples": samples, "eval_steps": steps}


def share(train: TrainConfig, inference_steps: int | None = None) -> float:
    """Scoring's share of a run's compute as configured."""
    steps = train.eval_steps or inference_steps or MAX_STEPS
    return checks(train) * train.eval_samples * steps / max(1.0, training_cost(train))


def explain_quality(cfg: GenerationConfig, dim: str) -> str:
    """The quality-check lines of ``medimgen plan --explain``."""
    from medimgen.config.kinds import kind, names

    lines = [f"{dim}: quality checks per run (quality/* metrics; cost as a share of the run's training compute)"]
    for name in names(samples=True):
        train = cfg.train_for(name)
        steps = train.eval_steps or cfg.scheduler_for(name).num_inference_steps
        every = f"every {train.eval_interval} epochs and at the end" if train.eval_interval else "at the end"
        lines.append(f"  {name:<12}{train.eval_samples} samples x {steps} steps, {every} "
                     f"({checks(train)} checks): ~{100 * share(train, steps):.1f}% of training")
    for name in (k.name for k in map(kind, names()) if k.encoder):
        lines.append(f"  {name}: reconstructions of the validation cases (PSNR, SSIM) at each check")
    return "\n".join(lines)
