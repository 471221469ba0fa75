"""Check the planned memory against the GPU in the first optimiser steps, and re-fit instead of crashing.

After ``CHECK_STEPS`` optimiser steps (AdamW's moments exist by then, so the peak is the steady
one) the guard reads ``torch.cuda.max_memory_allocated``, logs predicted, measured and their
ratio, and warns when they differ by more than 10 %. When the measured peak does not fit the
config's ``memory.target_gb``, or CUDA runs out of memory before that check, it re-fits the
model with the estimate scaled by the measured ratio (activation checkpointing, then
micro-batch + accumulation keeping the effective batch, then EMA off: planning.memory.fit_model)
and raises ``Refit``; the trainer applies it and repeats the epoch from its current weights
and optimiser state. An out-of-memory error after the check stops with one line naming the
keys to change.
"""

from __future__ import annotations

from typing import Callable

import torch

from medimgen.config.kinds import kind
from medimgen.config.schema import GenerationConfig
from medimgen.core.errors import MedimgenError

CHECK_STEPS = 2
WARN_RATIO = 0.10


class Refit(Exception):
    """The run must continue with ``config`` (raised inside an epoch, applied by the trainer)."""

    def __init__(self, config: GenerationConfig, changes: list[str], reason: str):
        super().__init__(reason)
        self.config, self.changes, self.reason = config, changes, reason


def measured_peak_bytes(device: torch.device) -> int | None:
    """Peak bytes the CUDA allocator handed out since the epoch began (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


def _changes(old: GenerationConfig, new: GenerationConfig) -> list[str]:
    from medimgen.config import flatten

    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)} -> {v}" for k, v in b.items() if a.get(k) != v]


class MemoryGuard:
    def __init__(self, cfg: GenerationConfig, model: str, device: torch.device,
                 echo: Callable[[str], None], log_metrics: Callable[[dict], None]):
        self.cfg, self.model, self.device = cfg, model, device
        self.echo, self.log_metrics = echo, log_metrics
        self.steps = 0
        self.checked = False
        self.ratio = 1.0

    @property
    def target_bytes(self) -> float:
        from medimgen.planning.memory import GIB

        return self.cfg.memory.target_gb * GIB

    def predicted_bytes(self) -> float:
        from medimgen.planning.memory import estimate

        return estimate(self.cfg, self.model).peak_bytes

    def after_step(self) -> None:
        """Call after every optimiser step; raises Refit when the measured peak does not fit."""
        if self.checked:
            return
        self.steps += 1
        if self.steps < CHECK_STEPS:
            return
        self.checked = True
        measured = measured_peak_bytes(self.device)
        if measured is None:
            return
        from medimgen.planning.memory import GIB, usable_bytes

        predicted = self.predicted_bytes()
        self.ratio = measured / predicted
        self.log_metrics({"memory.predicted_peak_gb": predicted / GIB, "memory.measured_peak_gb": measured / GIB,
                          "memory.measured_over_predicted": self.ratio})
        self.echo(f"memory: measured peak {measured / GIB:.2f} GB, predicted {predicted / GIB:.2f} GB "
                  f"(ratio {self.ratio:.2f})")
        if abs(self.ratio - 1) > WARN_RATIO:
            self.echo(f"warning: the measured peak differs from the prediction by {100 * (self.ratio - 1):+.0f} %")
        if measured > usable_bytes(self.target_bytes):
            self._refit(f"the measured peak {measured / GIB:.2f} GB does not fit the "
                              f"{self.cfg.memory.target_gb:g} GB target (usable {usable_bytes(self.target_bytes) / GIB:.2f})")

    def on_out_of_memory(self, where: str) -> None:
        """Raises what torch.cuda.OutOfMemoryError becomes: a Refit in the first steps, else a one-line error."""
        from medimgen.planning.memory import remedies, usable_bytes

        if self.checked or where != "training":
            raise MedimgenError(f"CUDA out of memory during {where} of {self.model}: change "
                                f"{'; '.join(remedies(self.cfg, self.model))}") from None
        # the step needed more than it got: at least what was allocated or usable, plus the failed request
        needed = 1.1 * max(measured_peak_bytes(self.device) or 0, usable_bytes(self.target_bytes))
        self.ratio = max(self.ratio, needed / self.predicted_bytes())
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._refit(f"CUDA ran out of memory in the first steps of {self.model}")

    def _refit(self, reason: str) -> None:
        """Raises the Refit to cheaper settings, or the one-line error when none are left."""
        from medimgen.planning.memory import fit_model, remedies

        new, _ = fit_model(self.cfg, self.model, self.target_bytes, self.ratio)
        changes = _changes(self.cfg, new)
        if not changes:
            raise MedimgenError(f"{reason}, and no cheaper settings are left: change "
                                f"{'; '.join(remedies(self.cfg, self.model))}") from None
        self.cfg = new
        self.steps, self.checked = 0, False  # check the new settings again
        raise Refit(new, changes, reason) from None


def apply_checkpointing(modules: dict, cfg: GenerationConfig, model: str) -> None:
    """Switch on activation checkpointing in live networks when the re-fitted config asks for it."""
    from medimgen.models.networks import (enable_autoencoder_checkpointing, enable_controlnet_checkpointing,
                                   enable_unet_checkpointing)

    k = kind(model)
    enable = (enable_controlnet_checkpointing if k.steers else enable_autoencoder_checkpointing if k.encoder else
              enable_unet_checkpointing)
    if cfg.network_for(model).activation_checkpointing and not getattr(modules[k.module], "_checkpointed", False):
        enable(modules[k.module])

