"""Several processes training one model (torchrun / DistributedDataParallel); nothing changes for one process.

``torchrun --nproc_per_node N -m medimgen train ...`` (or ``medimgen train ... --gpus N``, which calls
torch.distributed.run) starts N processes with ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` in their environment.
``joined`` puts a process into that group (nccl on CUDA, gloo on the CPU) and gives it its device. The trainer
then wraps the modules it trains in DistributedDataParallel (``wrap_task``): gradients are averaged across ranks
once per optimiser step (``no_sync`` on gradient-accumulation micro-steps). Rank 0 alone writes files and talks
to MLflow; ``broadcast`` / ``mean`` / ``gather`` keep the others in step.

Batch size: the planned micro-batch is per GPU; ``split_batch`` keeps the planned effective batch
(micro-batch x accumulation x ranks) by lowering the accumulation (and, where it must, the micro-batch).
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from medimgen.core.errors import MedimgenError

RANK_SEED_STRIDE = 1_000  # rank r draws batches, augmentation and noise from seed + r * this
TIMEOUT = timedelta(hours=2)  # how long ranks wait for rank 0 (validation, sampled plots, checkpoints)


def active() -> bool:
    """Whether this process is one of several ranks of a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files, plots, checkpoints and MLflow runs."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """This rank's seed for batches, augmentation and noise (rank 0: ``seed`` itself)."""
    return seed + RANK_SEED_STRIDE * rank()


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MedimgenError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


@contextmanager
def joined(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the block (when ``WORLD_SIZE`` > 1) and yield this rank's device:
    ``cuda:LOCAL_RANK`` on CUDA (backend nccl), else ``device`` (backend gloo). One process: ``device``, no group."""
    if _env_world() <= 1 or dist.is_initialized():
        yield device
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise MedimgenError(f"WORLD_SIZE={_env_world()} without {', '.join(missing)}: start several ranks with "
                            f"torchrun or --gpus N (or unset WORLD_SIZE)")
    if device.type == "cuda":
        local = os.environ.get("LOCAL_RANK", "0")
        if not local.isdigit():
            raise MedimgenError(f"LOCAL_RANK={local!r} is not a GPU index")
        local = int(local)
        if local >= torch.cuda.device_count():
            raise MedimgenError(f"rank with LOCAL_RANK={local} has no GPU: this machine has "
                                f"{torch.cuda.device_count()} (use --gpus {torch.cuda.device_count()} or fewer)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value):
    """Rank 0's ``value`` on every rank (plain Python values: numbers, strings, dicts of them)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def gather(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------------------------------------- batch split
@dataclass(frozen=True)
class RankBatch:
    """What each rank runs so that the planned effective batch stays the same."""

    micro_batch_size: int
    grad_accumulation_steps: int
    iterations_per_epoch: int  # micro-batches per epoch on each rank: the planned samples per epoch over all ranks
    effective_batch_size: int  # micro_batch_size x grad_accumulation_steps x ranks


def split_batch(batch_size: int, accumulation: int, iterations: int, ranks: int) -> RankBatch:
    """Keep ``batch_size x accumulation`` samples per optimiser step on ``ranks`` ranks: the accumulation is divided
    by the ranks; where it does not divide, the largest smaller micro-batch that makes it divide; where none does
    (e.g. a planned batch of 1 on 2 ranks), the micro-batch and accumulation nearest to it (the larger micro-batch
    of equals)."""
    target = batch_size * accumulation
    options = [(b, max(1, round(target / (b * ranks)))) for b in range(batch_size, 0, -1)]
    exact = [(b, target // (b * ranks)) for b in range(batch_size, 0, -1) if target % (b * ranks) == 0]
    micro, accum = exact[0] if exact else min(options, key=lambda o: (abs(o[0] * o[1] * ranks - target), -o[0]))
    rank_iterations = max(1, math.ceil(iterations * batch_size / (micro * ranks)))
    return RankBatch(micro, accum, rank_iterations, micro * accum * ranks)


# ---------------------------------------------------------------------------------------------- DDP modules
def wrap_task(task, device: torch.device) -> list:
    """Wrap every module the task trains (``task.phase_modules``) in DistributedDataParallel and put the wrapper
    in place of the module on each attribute of the task that held it, so the task's own ``loss`` runs its forward
    passes through DDP; ``task.modules`` keeps the bare modules (checkpoints, EMA, validation, plots). DDP copies
    rank 0's weights to every rank here. Returns the wrappers (none for a single process)."""
    if not active():
        return []
    from torch.nn.parallel import DistributedDataParallel

    names = list(dict.fromkeys(n for names in task.phase_modules.values() for n in names))
    wrappers = []
    for name in names:
        module = task.modules[name]
        ddp = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
        for attr, value in list(vars(task).items()):
            if value is module:
                setattr(task, attr, ddp)
        wrappers.append(ddp)
    return wrappers


@contextmanager
def no_sync(wrappers: Sequence, skip: bool):
    """While ``skip`` (a gradient-accumulation micro-step), gradients stay on this rank; the forward pass must run
    inside (DDP decides at forward time)."""
    with ExitStack() as stack:
        if skip:
            for w in wrappers:
                stack.enter_context(w.no_sync())
        yield


# ---------------------------------------------------------------------------------------------- launching
def launch(nproc: int, args: Sequence[str], device: str | None = None) -> None:
    """``torchrun --standalone --nproc_per_node nproc -m medimgen ARGS`` on this machine (torch.distributed.run);
    a failed rank becomes one line (its own error is printed above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if _env_world() > 1:
        raise MedimgenError("--gpus starts torchrun itself: under torchrun, leave it out")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus and device != "cpu":
        raise MedimgenError(f"--gpus {nproc}: this machine has {gpus} GPU(s)")
    ns = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "medimgen", *args])
    try:
        run(ns)
    except ChildFailedError as e:
        first = min(e.failures.values(), key=lambda f: f.local_rank) if e.failures else None
        where = f"rank {first.local_rank} exited with code {first.exitcode}" if first else "a rank failed"
        raise MedimgenError(f"distributed training failed: {where} (its error is above)") from None
    except SignalException as e:  # Ctrl+C / SIGTERM: torchrun has stopped every rank; the last checkpoint stays
        raise MedimgenError(f"distributed training stopped by {e.sigval.name}: -c continues it from its last "
                            f"checkpoint") from None


def launch_training(nproc: int, model: str, dataset_id: str, splitting: str, dim: str, fold: int = 0,
                    progress: bool = False, resume: bool = False, overrides: Sequence[str] = (),
                    config_path: str | None = None, device: str | None = None) -> None:
    """``medimgen train MODEL ...`` on ``nproc`` ranks of this machine (``--gpus N``; without a GPU: N CPU
    processes, gloo)."""
    args = ["train", model, str(dataset_id), splitting, dim, "-f", str(fold)]
    args += ["-p"] * progress + ["-c"] * resume + [a for o in overrides for a in ("--set", o)]
    args += ["--config", str(config_path)] if config_path else []
    args += ["--device", device] if device else []
    launch(nproc, args, device)
