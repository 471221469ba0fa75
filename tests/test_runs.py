"""One process per run (OS lock naming the holder's PID), a failed -c changes nothing, atomic writes, --set prefixes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from medimgen.core.atomic import atomic_path
from medimgen.cli import main
from medimgen.config import apply_overrides
from medimgen.core.errors import MedimgenError
from medimgen.training.api import RunSetup, train
from medimgen.training.lock import RunLock
from tests.conftest import ANISO_3D
from tests.training_helpers import tiny_overrides

HOLD = ("import sys; from medimgen.training.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); sys.stdin.read()")


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    return lines[0]


def test_second_start_of_a_running_run_names_the_pid(flow_2d):
    run_dir = flow_2d["ddpm"].run_dir
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "checkpoints" / "last.pt")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["-c"], []):  # continuing it, or starting it again
            r = CliRunner().invoke(main, ["train", "ddpm", str(ANISO_3D), "train-val-test", "2d", *extra])
            assert r.exit_code == 2
            line = _one_error_line(r.output)
            assert "in use by another process" in line and f"(PID {holder.pid})" in line
        with pytest.raises(MedimgenError, match=f"PID {holder.pid}"):
            RunLock(run_dir).acquire()
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    assert {p: p.read_bytes() for p in before} == before
    lock = RunLock(run_dir)  # the holder ended: the lock is free again
    lock.acquire()
    lock.release()


def test_run_holds_its_lock_and_a_failed_continue_changes_nothing(workspace, tmp_path):
    cfg2d = workspace["config"].get("2d")
    sets = ["2d." + s for s in tiny_overrides(cfg2d)]  # the `medimgen plan` prefix, matching MODEL_TYPE
    root = tmp_path / "run"
    probes = []

    def probe(epoch, metrics):  # during training, nobody else gets the run
        with pytest.raises(MedimgenError, match=f"PID {os.getpid()}") as e:
            RunLock(root).acquire()
        probes.append(str(e.value))

    first = train("ddpm", ANISO_3D, "5-fold", "2d", fold=2, overrides=sets, stop_after_epoch=1,
                  setup=RunSetup(run_root=root, on_epoch=probe), echo=lambda *_: None)
    assert not first.completed and len(probes) == 1
    assert first.config.train_ddpm.epochs == 2 and first.config.train_ddpm.iterations_per_epoch == 2
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    lock = RunLock(root)  # released when train() returned
    lock.acquire()
    lock.release()
    before = {p: p.read_bytes() for p in (root / "config.yaml", root / "checkpoints" / "last.pt",
                                          root / "loss_dict.json")}
    wider = [f"2d.ddpm_unet.channels={[16] * len(cfg2d.ddpm_unet.channels)}".replace(" ", "")]
    with pytest.raises(MedimgenError, match="does not fit this config's ddpm networks") as e:
        train("ddpm", ANISO_3D, "5-fold", "2d", fold=2, resume=True, overrides=wider,
              setup=RunSetup(run_root=root), echo=lambda *_: None)
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in before} == before  # config.yaml byte-identical, checkpoint untouched


def test_set_prefix_must_match_the_model_type(workspace, tmp_path, monkeypatch):
    cfg2d = workspace["config"].get("2d")
    assert apply_overrides(cfg2d, ["2d.train_ddpm.epochs=5"]).train_ddpm.epochs == 5
    assert apply_overrides(cfg2d, ["train_ddpm.epochs=5"]).train_ddpm.epochs == 5
    with pytest.raises(MedimgenError, match="is for the 3d config, but this is the 2d config"):
        apply_overrides(cfg2d, ["3d.train_ddpm.epochs=5"])
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    r = CliRunner().invoke(main, ["train", "ddpm", str(ANISO_3D), "train-val-test", "2d",
                                  "--set", "3d.train_ddpm.epochs=5"])
    assert r.exit_code == 2
    assert "'3d.train_ddpm.epochs=5' is for the 3d config" in _one_error_line(r.output)
    assert not list(tmp_path.iterdir())  # nothing written


def test_atomic_writes_use_unique_temporary_files(tmp_path):
    target = tmp_path / "last.pt"
    with atomic_path(target) as a, atomic_path(target) as b:  # two writers of the same file at once
        assert a != b and a.parent == b.parent == tmp_path
        torch.save({"writer": "a"}, a)
        torch.save({"writer": "b"}, b)
    assert torch.load(target, weights_only=True) == {"writer": "a"}  # the last to finish wins, whole
    with pytest.raises(RuntimeError):
        with atomic_path(target) as c:
            c.write_bytes(b"partial")
            raise RuntimeError("killed while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.load(target, weights_only=True) == {"writer": "a"}
