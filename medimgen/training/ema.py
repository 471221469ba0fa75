"""Exponential moving average of a network's weights, with the warm-up of diffusers' ``EMAModel``.

After update ``n`` (counting from 0) the copy is ``ema = d * ema + (1 - d) * weights`` with the effective decay

    d(n) = min(decay, (1 + n) / (10 + n))        (0.1, 0.55 at n = 10, 0.991 at n = 1000, ...)

so the copy follows the trained weights closely at first and averages over longer and longer spans later;
without the warm-up a decay of 0.999 keeps most of the random initial weights for thousands of steps.
The copy counts as *ready* (worth plotting, sampling and selecting best.pt by) once it has averaged
``warmup_steps(decay) = ceil(1 / (1 - decay))`` updates (1,000 at 0.999, where d = 1001/1010 ≈ 0.991):
about the time constant of the target decay.

The state dict holds the copy's tensors under ``module.<name>`` (as torch's ``AveragedModel`` did, so readers of
older checkpoints are unchanged) and the update count under ``step``; an ``AveragedModel`` state dict (its
``n_averaged`` buffer, the number of updates it made) loads with ``step = n_averaged``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from medimgen.runs.folders import unwrap_ema

WARMUP_OFFSET = 10  # d(n) = (1 + n) / (WARMUP_OFFSET + n): diffusers' EMAModel (use_ema_warmup=False)


def effective_decay(decay: float, step: int) -> float:
    """The decay of update ``step`` (0 for the first one): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (WARMUP_OFFSET + step))


def warmup_steps(decay: float) -> int:
    """Updates after which the EMA copy is used for plots, sampling and best.pt: ``ceil(1 / (1 - decay))``."""
    return max(1, math.ceil(1 / (1 - decay) - 1e-9))


class WeightEMA:
    """An EMA copy of ``model`` (same device, no gradients, eval mode). Buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.step = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @property
    def ready(self) -> bool:
        return self.step >= warmup_steps(self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = effective_decay(self.decay, self.step)
        ema = list(self.module.parameters())
        new = [p.detach() for p in model.parameters()]
        floats = [(e, n) for e, n in zip(ema, new) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [n.to(e.dtype) for e, n in floats], 1.0 - d)
        for e, n in zip(ema, new):
            if not e.is_floating_point():
                e.copy_(n)
        for e, n in zip(self.module.buffers(), model.buffers()):
            e.copy_(n)
        self.step += 1

    def state_dict(self) -> dict:
        state = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        state["step"] = torch.tensor(self.step, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict) -> None:
        """A WeightEMA state dict, or an ``AveragedModel`` one (``n_averaged`` updates -> ``step``)."""
        step = state["step"] if "step" in state else state["n_averaged"]
        self.module.load_state_dict(unwrap_ema(state))
        self.step = int(step)
