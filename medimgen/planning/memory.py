"""GPU-memory target and the fitting hook of the planner.

``fit_to_memory`` is where the planner makes a config fit the target GPU. Until the
memory estimator lands (issue: predict peak memory and fit every planned config) it
leaves the plan as planned and records ``memory.fitted: false``; the planner already
calls it for every dimensionality, so the estimator only has to fill this function.
"""

from __future__ import annotations

import dataclasses

from medimgen.config.schema import GenerationConfig

DEFAULT_TARGET_GB = 8.0  # nnU-Net plans for an 8 GB reference GPU too


def detect_gpu_memory_gb() -> float:
    """Total memory of CUDA device 0, else nnU-Net's 8 GB reference."""
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception:  # pragma: no cover - broken CUDA installs
        pass
    return DEFAULT_TARGET_GB


def fit_to_memory(cfg: GenerationConfig, target_gb: float) -> GenerationConfig:
    """Return ``cfg`` adjusted so its predicted training peak fits ``target_gb`` (see module doc)."""
    return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, target_gb=float(target_gb), fitted=False))
