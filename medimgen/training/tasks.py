"""The training task of each model kind: the one `{kind: Task factory}` table training dispatches on.

A factory gets (config, device, the run it builds on or None, the run folder) and returns a loop Task
(medimgen.training.loop.Task) whose ``name`` is the kind's and whose ``cfg`` is the config the run records. Adding a
kind (medimgen.config.kinds.register) means adding its factory here (:func:`register_task`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from medimgen.config.kinds import kind
from medimgen.config.schema import GenerationConfig
from medimgen.core.errors import MedimgenError
from medimgen.runs.folders import RunDir

TaskFactory = Callable[[GenerationConfig, torch.device, Optional[RunDir], Optional[Path]], object]


def _ddpm(cfg, device, upstream, run_root):
    from medimgen.training.ddpm import DiffusionTask

    return DiffusionTask(cfg, device)


def _autoencoder(cfg, device, upstream, run_root):
    from medimgen.training.autoencoder import AutoencoderTask

    return AutoencoderTask(cfg, device)


def _ldm(cfg, device, upstream, run_root):
    from medimgen.training.ldm import LatentDiffusionTask

    return LatentDiffusionTask(cfg, device, upstream, run_root)


def _controlnet(cfg, device, upstream, run_root):
    from medimgen.training.controlnet import ControlNetTask

    return ControlNetTask(cfg, device, upstream, run_root)


TASKS: dict[str, TaskFactory] = {"ddpm": _ddpm, "autoencoder": _autoencoder, "ldm": _ldm, "controlnet": _controlnet}


def register_task(name: str, factory: TaskFactory) -> None:
    """Train the registered kind ``name`` with ``factory`` (a test or a plug-in adding a kind)."""
    TASKS[kind(name).name] = factory


def build_task(model: str, cfg: GenerationConfig, device: torch.device, upstream: RunDir | None = None,
               run_root: Path | None = None):
    """The training task of ``model`` (writes nothing; a kind with an upstream loads that run's networks)."""
    k = kind(model)
    if k.name not in TASKS:
        raise MedimgenError(f"model kind '{k.name}' has no training task")
    if k.upstream is not None and upstream is None:
        raise MedimgenError(f"a {k.name} builds on a trained {k.upstream} run: none was given")
    return TASKS[k.name](cfg, device, upstream, Path(run_root) if run_root is not None else None)
