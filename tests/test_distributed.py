"""Several ranks (torchrun / DistributedDataParallel, gloo on the CPU): the same training as one process with
gradient accumulation, rank 0 alone writing, one MLflow run, and a run continued with -c on another rank count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medimgen.core import distributed
from medimgen.config import apply_overrides, load_generation_config
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("batch,accum,iters,ranks,expected", [
    (2, 4, 10, 1, (2, 4, 10, 8)),  # one process: the plan as it is
    (2, 4, 10, 2, (2, 2, 5, 8)),  # the accumulation divided
    (4, 1, 10, 2, (2, 1, 10, 4)),  # no accumulation to divide: a smaller micro-batch
    (3, 2, 6, 4, (2, 1, 3, 8)),  # 6 samples per step do not divide over 4 ranks: the nearest (8), said
    (2, 1, 10, 4, (1, 1, 5, 4)),  # 2 on 4 ranks: micro-batch 1 (4), not the planned 2 (8)
    (1, 1, 4, 2, (1, 1, 2, 2)),
])
def test_split_batch_keeps_the_effective_batch(batch, accum, iters, ranks, expected):
    share = distributed.split_batch(batch, accum, iters, ranks)
    assert (share.micro_batch_size, share.grad_accumulation_steps, share.iterations_per_epoch,
            share.effective_batch_size) == expected
    assert share.effective_batch_size == share.micro_batch_size * share.grad_accumulation_steps * ranks


def test_one_process_is_not_distributed():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.mean({"x": 2.0}) == {"x": 2.0}
    assert distributed.rank_seed(7) == 7
    with distributed.joined(torch.device("cpu")) as dev:  # no WORLD_SIZE: no process group
        assert dev == torch.device("cpu") and not distributed.active()


def test_world_size_without_torchrun_is_one_line(monkeypatch):
    from medimgen.core.errors import MedimgenError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(MedimgenError, match="WORLD_SIZE=2 without RANK, MASTER_ADDR, MASTER_PORT"):
        with distributed.joined(torch.device("cpu")):
            pass
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MedimgenError, match="is not a number"):
        with distributed.joined(torch.device("cpu")):
            pass


# ------------------------------------------------------------------ 2 ranks x 1 == 1 process x accumulation 2
class _FixedBatches:
    """Test double for the loader only: fixed batches by global index; the global torch seed is set per batch so
    the diffusion noise / latent sampling of batch i is the same whichever rank draws it."""

    def __init__(self, cfg, indices):
        self.cfg, self.indices = cfg, iter(indices)

    def __next__(self):
        i = next(self.indices)
        g = torch.Generator().manual_seed(i)
        size = tuple(self.cfg.data.image_size)
        torch.manual_seed(10_000 + i)
        return {"image": torch.rand((1, self.cfg.data.in_channels, *size), generator=g) * 2 - 1,
                "label": torch.zeros((1, 1, *size), dtype=torch.int16), "keys": [f"case{i}"]}


def _task(model, cfg):
    from medimgen.training.api import build_task

    return build_task(model, cfg, torch.device("cpu"))


def _train_one_epoch(model, cfg, indices, tmp: Path) -> dict:
    """The real task, Trainer (optimisers, clipping, accumulation, DDP) for one epoch; returns the weights."""
    from medimgen.runs.folders import RunDir
    from medimgen.runs.tracking import Tracker
    from medimgen.training.loop import LoopOptions, Trainer, seed_everything

    seed_everything(0)
    task = _task(model, cfg)
    trainer = Trainer(task, cfg.train_for(model), RunDir(tmp), Tracker(enabled=False), torch.device("cpu"),
                      _FixedBatches(cfg, indices), val_batches=lambda: iter(()), plot_batch=lambda: {},
                      options=LoopOptions(echo=lambda *_: None), config_yaml="")
    metrics = trainer.train_epoch(0)
    return {"metrics": metrics, "modules": {k: m.state_dict() for k, m in task.modules.items()},
            "phases": task.active_phases(0)}


def _rank_worker(rank: int, world: int, port: int, model: str, cfg, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    with distributed.joined(torch.device("cpu")):
        assert distributed.active() and distributed.rank() == rank
        # the collectives the run uses: the LDM's latent scale is rank 0's on every rank (training.api._derive),
        # logged training losses the mean of all ranks', last.pt every rank's RNG
        assert distributed.broadcast(0.25 if rank == 0 else None) == 0.25
        assert distributed.mean({"train_loss": float(rank)}) == {"train_loss": 0.5}
        assert distributed.gather(rank) == [0, 1]
        iters = cfg.train_for(model).iterations_per_epoch
        result = _train_one_epoch(model, cfg, range(rank, iters * world, world), Path(out) / f"run{rank}")
        torch.save(result, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("model", ["ddpm", "autoencoder"])
def test_two_ranks_equal_one_process_with_accumulation(model, workspace, tmp_path):
    """DDP over 2 ranks x micro-batch 1 makes the same optimiser steps as 1 process x micro-batch 1 x
    accumulation 2 on the same batches (the autoencoder with its discriminator: two phases, two DDP modules)."""
    import torch.multiprocessing as mp

    base = apply_overrides(workspace["config"].get("2d"), tiny_overrides(workspace["config"].get("2d")) + [
        f"train_{model}.batch_size=1", "losses.adversarial_warmup_epochs=0", "losses.adversarial_weight=0.5",
        f"train_{model}.grad_clip=1.0", f"train_{model}.amp=off"])
    single = apply_overrides(base, [f"train_{model}.grad_accumulation_steps=2", f"train_{model}.iterations_per_epoch=4"])
    ranked = apply_overrides(base, [f"train_{model}.grad_accumulation_steps=1", f"train_{model}.iterations_per_epoch=2"])
    torch.set_num_threads(1)
    one = _train_one_epoch(model, single, range(4), tmp_path / "single")
    mp.spawn(_rank_worker, args=(2, _free_port(), model, ranked, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    if model == "autoencoder":
        assert one["phases"] == ["generator", "discriminator"]
    from medimgen.training.loop import seed_everything

    seed_everything(0)
    start = {k: m.state_dict() for k, m in _task(model, single).modules.items()}
    for name, weights in one["modules"].items():
        assert any(not torch.equal(v, start[name][k]) for k, v in weights.items()), f"{name} did not train"
        for k, v in weights.items():
            if "running_" in k or k.endswith("num_batches_tracked"):
                continue  # the discriminator's BatchNorm statistics: rank 0's (DDP), used in eval mode only (never)
            for r in ranks:  # every rank holds the same weights, equal to the single process's
                torch.testing.assert_close(r["modules"][name][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")
    # the logged training losses are the mean over both ranks' micro-batches
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"] == pytest.approx(one["metrics"], rel=1e-4)


# ------------------------------------------------------------------ torchrun end to end: outputs, MLflow, resume
def test_torchrun_run_writes_once_and_continues_on_one_rank(workspace, tmp_path, monkeypatch):
    """`medimgen train ... --gpus 2` (torchrun, 2 CPU ranks) stops after its 1-epoch budget: one MLflow run, the
    files of one writer, the effective batch recorded; `-c` with 2 epochs continues it on a single process,
    accumulating 2 micro-batches instead, in the same MLflow run."""
    from mlflow import MlflowClient

    from medimgen.training.api import train

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1) + [
        "train_ddpm.batch_size=1", "train_ddpm.grad_accumulation_steps=2", "train_ddpm.iterations_per_epoch=4",
        "tracking.log_models=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "medimgen", "train", "ddpm", str(ANISO_3D), "train-val-test", "2d",
                          "--gpus", "2", "--device", "cpu", "--overrides", " ".join(sets)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ddpm epoch 1/1") == 1  # rank 1 says nothing
    assert out.stdout.count("ddpm finished") == 1
    root = tmp_path / "results" / "Dataset201_Aniso" / "ddpm" / "2d" / "train-val-test"
    cfg = load_generation_config(root / "config.yaml")
    d = cfg.derived
    assert (d.world_size, d.micro_batch_size, d.grad_accumulation_steps, d.effective_batch_size) == (2, 1, 1, 2)
    assert (cfg.train_ddpm.batch_size, cfg.train_ddpm.grad_accumulation_steps) == (1, 2)  # the plan stays
    last = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["rng_ranks"]) == 2
    assert json.loads((root / "loss_dict.json").read_text())["epoch"] == [1]
    assert not list(root.rglob("*.tmp")) and (root / ".lock").read_text() == ""  # released by rank 0
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # not a URI an earlier test set
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["world_size"] == "2" and run.data.params["derived.effective_batch_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]

    resumed = train("ddpm", ANISO_3D, "train-val-test", "2d", resume=True, overrides=["train_ddpm.epochs=2"],
                    echo=lambda *_: None)
    assert resumed.completed and resumed.mlflow_run_id == run.info.run_id
    d = resumed.config.derived
    assert (d.world_size, d.micro_batch_size, d.grad_accumulation_steps, d.effective_batch_size) == (1, 1, 2, 2)
    assert json.loads((root / "loss_dict.json").read_text())["epoch"] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert client.get_run(run.info.run_id).data.tags["medimgen.world_size"] == "1"


def test_killed_torchrun_run_continues_with_c(workspace, tmp_path, monkeypatch):
    """A `--gpus 2` run killed (SIGKILL to the whole process group: torchrun and both ranks) after an epoch
    continues with `-c --gpus 2` from its last checkpoint, in the same MLflow run, with no epoch lost or repeated."""
    import signal
    import time

    from mlflow import MlflowClient

    monkeypatch.setenv("medimgen_results", str(tmp_path / "results"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1000) + [
        "train_ddpm.batch_size=1", "train_ddpm.grad_accumulation_steps=2", "train_ddpm.iterations_per_epoch=2",
        "train_ddpm.val_plot_interval=1000", "tracking.log_models=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medimgen", "train", "ddpm", str(ANISO_3D), "train-val-test", "2d", "--gpus", "2",
           "--device", "cpu"]
    root = tmp_path / "results" / "Dataset201_Aniso" / "ddpm" / "2d" / "train-val-test"
    proc = subprocess.Popen(cmd + ["--overrides", " ".join(sets)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        history = root / "loss_dict.json"
        if history.is_file() and len(json.loads(history.read_text())["epoch"]) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()[-3000:]  # still training when killed
    # torchrun starts each rank in a session of its own, so killing torchrun's group would leave the ranks training
    # (and rightly holding the run's lock); a scheduler's kill (SLURM's cgroup, docker stop, a node's OOM) takes the
    # whole tree: torchrun's group and every rank's
    groups = {os.getpgid(pid) for pid in [proc.pid, *_descendants(proc.pid)]}
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    proc.wait(timeout=60)
    gone = time.time() + 30  # a killed process lets go of its files as it exits (a zombie holds none)
    while time.time() < gone and any(_alive_in(group) for group in groups):
        time.sleep(0.1)
    done = torch.load(root / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert done >= 1

    out = subprocess.run(cmd + ["-c", "--overrides", f"train_ddpm.epochs={done + 1}"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(f"ddpm epoch {done + 1}/{done + 1}") == 1
    history = json.loads((root / "loss_dict.json").read_text())
    assert history["epoch"][-1] == done + 1 and history["epoch"][-2] == done
    last = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == done + 1 and len(last["rng_ranks"]) == 2
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # not a URI an earlier test set
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, done + 2))  # every epoch, none missing (a kill between MLflow and
    # last.pt can log the interrupted epoch twice, which MLflow shows as two points at one step)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: Linux)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _alive_in(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
