"""Shared set-up for benchmarks: the demo dataset (synthetic, planned and preprocessed)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def demo_dataset(workspace: str = "demo_workspace") -> int:
    from medimgen.demo import DEMO_ID, run_demo

    run_demo(Path(workspace), echo=lambda *_: None, train_models=False)
    return DEMO_ID


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"
