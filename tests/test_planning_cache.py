"""The memory simulation pays once: results kept on disk (planning/sim_cache.py) are read back by the next command,
a change of any part of the key re-simulates (only the model it touches), and cached predictions equal fresh ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medimgen.config import apply_overrides, load_config
from medimgen.planning import cuda_sim, sim_cache
from medimgen.planning import memory as mem

DATA = Path(__file__).parent / "data"
# a small 2D config: GPU.md's 8 GB plan shrunk to 32x32 images and narrow networks (seconds per simulation)
TINY = ["data.image_size=[32, 32]", "ddpm_unet.channels=[32, 32, 32, 32]", "ddpm_unet.attention_levels=[false, false, false, true]",
        "train_ddpm.batch_size=2", "train_ddpm.amp=auto", "train_autoencoder.batch_size=2", "autoencoder.channels=[32, 32, 32, 32]"]


@pytest.fixture(scope="module")
def tiny():
    return apply_overrides(load_config(DATA / "Dataset501_config_8GB.yaml").get("2d"), TINY)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A fresh disk cache and process cache; the list of (model, micro-batch) each real simulation ran."""
    monkeypatch.setenv(sim_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(mem, "_profiles", {})
    ran: list = []
    real = cuda_sim.simulate

    def counting(cfg, model):
        ran.append((model, cfg.train_for(model).batch_size))
        return real(cfg, model)

    monkeypatch.setattr(cuda_sim, "simulate", counting)
    return ran


def _fresh(cfg, model, monkeypatch):
    """The estimate with no cache at all (disk cache off, nothing in the process)."""
    with monkeypatch.context() as m:
        m.setenv(sim_cache.CACHE_ENV, "off")
        m.setattr(mem, "_profiles", {})
        return mem.estimate(cfg, model)


def _next_command(monkeypatch):
    monkeypatch.setattr(mem, "_profiles", {})  # a new process: only the disk cache is left


@pytest.mark.parametrize("change", ["ddpm_unet.channels=[32, 32, 32, 64]", "data.image_size=[32, 64]",
                                    "train_ddpm.batch_size=1", "train_ddpm.amp=off"])
def test_a_change_of_each_key_part_re_simulates_and_cached_equals_fresh(tiny, runs, change, monkeypatch):
    first = mem.estimate(tiny, "ddpm")
    assert runs == [("ddpm", 2)] and len(list(sim_cache.cache_dir().glob("*.json"))) == 1
    _next_command(monkeypatch)
    assert mem.estimate(tiny, "ddpm") == first and len(runs) == 1  # read back, not simulated
    edited = apply_overrides(tiny, [change])
    _next_command(monkeypatch)
    again = mem.estimate(edited, "ddpm")
    assert len(runs) == 2, runs  # the edit is a new key
    assert again.peak_bytes != first.peak_bytes
    assert again == _fresh(edited, "ddpm", monkeypatch)
    _next_command(monkeypatch)
    assert mem.estimate(edited, "ddpm") == again and len(runs) == 3  # (the fresh estimate simulated once)


def test_an_edit_re_simulates_only_the_models_it_touches(tiny, runs, monkeypatch):
    for m in ("ddpm", "autoencoder"):
        mem.estimate(tiny, m)
    assert sorted(runs) == [("autoencoder", 2), ("ddpm", 2)]
    _next_command(monkeypatch)
    edited = apply_overrides(tiny, ["autoencoder.channels=[32, 32, 32, 64]"])
    mem.estimate(edited, "ddpm")
    mem.estimate(edited, "autoencoder")
    assert sorted(runs) == [("autoencoder", 2), ("autoencoder", 2), ("ddpm", 2)]


def test_larger_micro_batches_share_the_pair_and_match_a_direct_simulation(tiny, runs, monkeypatch):
    """The first micro-batch asked for is simulated as it is (the planned one: if it fits, nothing else is); a
    second one gives, with the first, every micro-batch >= 2 (the fitter's further candidates cost nothing), within
    0.5 % of simulating that micro-batch itself; the next command reads them back."""
    peaks = {b: mem.estimate(tiny.with_train("ddpm", batch_size=b), "ddpm").peak_bytes for b in (12, 6, 3, 2)}
    assert runs == [("ddpm", 12), ("ddpm", 6)]
    for b in (2, 3):
        direct = cuda_sim.simulate(tiny.with_train("ddpm", batch_size=b), "ddpm").peak_bytes * mem.CUDA_OVERHEAD
        assert abs(peaks[b] - direct) / direct < 0.005, (b, peaks[b], direct)
    assert peaks[2] < peaks[3] < peaks[6] < peaks[12]
    _next_command(monkeypatch)
    assert mem.estimate(tiny.with_train("ddpm", batch_size=4), "ddpm").peak_bytes > peaks[3]
    assert len(runs) == 4  # (the two direct simulations above)


def test_corrupt_or_foreign_entries_are_ignored_and_rewritten(tiny, runs, monkeypatch):
    first = mem.estimate(tiny, "ddpm")
    (path,) = sim_cache.cache_dir().glob("*.json")
    for damaged in ("{not json", json.dumps({"key": "another key", "result": {}}),
                    json.dumps({"key": json.loads(path.read_text())["key"], "result": {"lines": "x"}})):
        path.write_text(damaged)
        _next_command(monkeypatch)
        assert mem.estimate(tiny, "ddpm") == first
        assert json.loads(path.read_text())["result"]["lines"]  # rewritten whole
    assert len(runs) == 4


def test_envelope_keeps_the_maximum_at_every_batch():
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        one = [rng.randint(0, 10**9) for _ in range(n)]
        two = [a + rng.randint(0, 10**8) for a in one]
        lines = mem.envelope(one, two)
        for x in range(0, 60):
            assert max(a + x * d for a, d in lines) == max(a + x * (b - a) for a, b in zip(one, two))


def test_the_key_covers_the_foundation_network_code(monkeypatch):
    """The simulation builds a foundation autoencoder through medimgen.models.foundation: an edit there re-simulates."""
    import importlib.util

    origin = Path(importlib.util.find_spec("medimgen.models.foundation").origin)
    real = Path.read_bytes
    sim_cache._versions.cache_clear()
    try:
        before = sim_cache._versions()
        monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + b"\n# edited" if self == origin else real(self))
        sim_cache._versions.cache_clear()
        assert sim_cache._versions() != before
    finally:
        sim_cache._versions.cache_clear()
