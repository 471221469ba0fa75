"""The torch device a command runs on: the one asked for, else CUDA when available, else the CPU.

A device that does not exist on this machine (a typo, ``cuda`` without a GPU, ``cuda:3`` on a
one-GPU machine) stops with one line before anything is loaded or written.
"""

from __future__ import annotations

import contextlib
import re

import torch

from medimgen.core.errors import MedimgenError

_NAMES = re.compile(r"cpu|cuda(?::\d+)?|mps")
ALLOWED = "cpu, cuda, cuda:N (N: a GPU index) or mps"


def check_device(name: str) -> str:
    """``name`` if this machine has that device, else a MedimgenError saying what is allowed."""
    if not _NAMES.fullmatch(name):
        raise MedimgenError(f"device {name!r} is not one of {ALLOWED}")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MedimgenError(f"device {name!r}: no CUDA GPU is available on this machine (use cpu)")
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise MedimgenError(f"device {name!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MedimgenError("device 'mps': Apple's MPS is not available on this machine (use cpu)")
    return name


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for an AMP mode (auto, bf16, fp16, off) on ``device``: None off a GPU or when off;
    auto is bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on ``device``, or a context that changes nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device (checked), else CUDA when available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    return torch.device(check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu"))


def available_memory_bytes() -> int | None:
    """Host memory available to a new allocation (Linux MemAvailable; None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(need_bytes: float, what: str) -> None:
    """One line before an allocation of ``need_bytes`` that host memory cannot hold (instead of the allocator's
    error, or the machine swapping)."""
    from medimgen.core.errors import MedimgenError

    have = available_memory_bytes()
    if have is not None and need_bytes > have:
        raise MedimgenError(f"{what} needs about {need_bytes / 2**30:.1f} GiB of memory, {have / 2**30:.1f} GiB is "
                            f"available: make it smaller")
