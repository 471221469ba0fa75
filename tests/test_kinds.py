"""Model kinds as objects (medimgen.config.kinds): no code outside the kinds module (and the CLI's choices) compares
a model name, and a kind added from outside trains and samples through medimgen's own paths.

The toy kind below is registered at medimgen's registration points only, with no edit of medimgen/:
``kinds.register`` (the kind: its sections, image space, a generator), ``ModelKind.build`` (its tiny network) and
``training.tasks.register_task`` (its Task). It reuses the DDPM's config sections (``train_ddpm``,
``ddpm_unet`` for the section name only, ``ddpm_scheduler``): a kind with sections of its own would also need them
in config/schema.py's GenerationConfig (a typed, frozen config) and in planning/heuristics.py (their planned values).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medimgen
from tests.conftest import ANISO_3D

MODEL_NAMES = {"ddpm", "autoencoder", "ldm", "controlnet"}
ALLOWED = {"config/kinds.py", "cli.py"}  # the kinds themselves; the CLI's entry points per kind


def _strings(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for e in node.elts:
            yield from _strings(e)


def name_branches(source: str) -> list[int]:
    """Lines of ``source`` that branch on a model name: a comparison (==, !=, in, not in, ...) with a model name
    literal or a tuple/list/set holding one, or an inline lookup ``{"ddpm": ..., ...}[model]``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if any(MODEL_NAMES & set(_strings(side)) for side in (node.left, *node.comparators)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
            if MODEL_NAMES & {k.value for k in node.value.keys if isinstance(k, ast.Constant)}:
                lines.append(node.lineno)
    return sorted(lines)


def test_scanner_catches_name_branches():
    """The scan can fail: every way of branching on a model name is found, other strings are not."""
    caught = ['if model == "ldm":\n    pass', 'x = a if "controlnet" != kind else b', 'ok = m in ("ddpm", "x")',
              'ok = m not in ["autoencoder"]', 'section = {"ddpm": 1, "ldm": 2}[model]',
              'if cfg.controlnet.base == "ddpm" and y:\n    pass']
    for src in caught:
        assert name_branches(src), src
    for src in ['if sampler == "ddim":\n    pass', 'x = "ldm"', 'f(model="ddpm")', 'TABLE = {"ddpm": 1}',
                'if k.space == "latent":\n    pass']:
        assert not name_branches(src), src


def test_no_model_name_is_compared_outside_the_kinds_module():
    root = Path(medimgen.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in ALLOWED:
            continue
        source = path.read_text()
        found += [f"medimgen/{rel}:{n}: {source.splitlines()[n - 1].strip()}" for n in name_branches(source)]
    assert not found, "model names compared outside medimgen/config/kinds.py (ask the kind):\n" + "\n".join(found)


def test_kinds_answer_what_the_names_did():
    from medimgen.config.kinds import auto_generators, kind, names, the

    assert names() == ("ddpm", "autoencoder", "ldm", "controlnet")
    assert names(generator=True) == ("ddpm", "ldm") and names(samples=True) == ("ddpm", "ldm", "controlnet")
    assert auto_generators() == ("ldm", "ddpm")
    assert the("encoder").name == "autoencoder" and the("steers").name == "controlnet"
    assert kind("ldm").space == "latent" and kind("ldm").upstream == "encoder" and kind("controlnet").steers
    with pytest.raises(medimgen.core.errors.MedimgenError, match="unknown model kind 'vqvae'"):
        kind("vqvae")


def test_config_sections_follow_the_kind(workspace):
    """ControlNet: its own train/network section, its base's UNet, noise process and space."""
    import dataclasses

    cfg = workspace["config"].get("2d")
    assert cfg.train_for("ldm") is cfg.train_ldm and cfg.unet_for("ddpm") is cfg.ddpm_unet
    for base in ("ldm", "ddpm"):
        c = dataclasses.replace(cfg, controlnet=dataclasses.replace(cfg.controlnet, base=base))
        assert c.unet_for("controlnet") is c.unet_for(base) and c.scheduler_for("controlnet") is c.scheduler_for(base)
        assert c.space_of("controlnet") == c.space_of(base) and c.network_for("controlnet") is c.controlnet
    assert dataclasses.replace(cfg, controlnet=dataclasses.replace(cfg.controlnet, base="auto")).controlnet_base() == "ldm"
    old = dataclasses.replace(cfg, train_controlnet=None)  # planned before the ControlNet: trains like its base
    assert old.train_for("controlnet") is old.train_ldm


# ---------------------------------------------------------------------------------------------- a toy kind
class ToyNet(nn.Module):
    """A tiny image-space denoiser: two convolutions around a timestep shift (called like MONAI's UNet)."""

    def __init__(self, channels: int):
        super().__init__()
        self.inp, self.out = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, timesteps, context=None):
        t = (timesteps.float() / 1000.0).view(-1, *([1] * (x.dim() - 1)))
        return self.out(F.silu(self.inp(x) + t))


def _toy_net(cfg):
    from medimgen.models.labels import network_channels

    return ToyNet(network_channels(cfg))


class ToyTask:
    """The loop's Task protocol for the toy kind: noise prediction with ToyNet."""

    name = "toy"
    ema_module = None
    sampling_modules = ("unet",)

    def __init__(self, cfg, device, upstream, run_root):
        from medimgen.models.diffusion import training_scheduler

        self.cfg, self.device = cfg, device
        self.net = _toy_net(cfg).to(device)
        self.modules = {"unet": self.net}
        self.phase_modules = {"diffusion": ["unet"]}
        self.scheduler = training_scheduler(cfg.scheduler_for(self.name), cfg.data.spatial_dims)

    def active_phases(self, epoch):
        return ["diffusion"]

    def _loss(self, net, batch, generator=None):
        from medimgen.models.diffusion import noised
        from medimgen.models.labels import join

        x = join(batch["image"].to(self.device), batch["label"], self.cfg)
        noisy, t, target = noised(self.scheduler, self.cfg.scheduler_for(self.name).prediction_type, x, generator)
        return F.mse_loss(net(noisy, timesteps=t), target)

    def loss(self, phase, batch, state):
        loss = self._loss(self.net, batch)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, batches, model):
        gen = torch.Generator().manual_seed(0)
        losses = [self._loss(model("unet"), b, gen).item() for b in batches]
        return {"loss": float(np.mean(losses))}

    def plot(self, stem, batch, model):
        return None

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass


@pytest.fixture
def toy_kind():
    from medimgen.config.kinds import ModelKind, register, unregister
    from medimgen.training.tasks import TASKS, register_task

    register(ModelKind("toy", "train_ddpm", "ddpm_unet", "ddpm_scheduler", "image", generator=True, samples=True,
                       sampling_modules=("unet",), build=_toy_net))
    register_task("toy", ToyTask)
    yield "toy"
    TASKS.pop("toy", None)
    unregister("toy")


def test_a_kind_registered_in_a_test_trains_and_samples(workspace, toy_kind, tmp_path):
    """Registered from outside, a toy generator trains (2 epochs of 2 steps), resumes, samples NIfTI from its
    standard run and round-trips as a packaged model, all through medimgen's own paths."""
    from medimgen.core.requests import ModelRef, SampleOptions
    from medimgen.generation.sampler import Sampler, resolve_sampler, sample_to_folder
    from medimgen.runs.folders import RunDir, TrainedModel, read_checkpoint
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    sets = tiny_overrides(workspace["config"].get("2d")) + ["tracking.log_models=false"]
    first = train(toy_kind, ANISO_3D, "train-val-test", "2d", overrides=sets, stop_after_epoch=1, echo=lambda *_: None)
    assert first.run_dir.parts[-3:] == ("toy", "2d", "train-val-test") and not first.completed
    done = train(toy_kind, ANISO_3D, "train-val-test", "2d", resume=True, echo=lambda *_: None)
    assert done.completed and done.epoch == 2
    state = read_checkpoint(RunDir(done.run_dir).last)
    assert state["model"] == "toy" and set(state["modules"]) == {"unet"} and state["epoch"] == 2

    sampler = resolve_sampler(ModelRef("toy", ANISO_3D, "2d"))
    assert sampler.kind == "toy" and isinstance(sampler.unet, ToyNet) and sampler.autoencoder is None
    a = sampler.sample(2, SampleOptions(seed=1, steps=2))
    assert a.shape[:2] == (2, sampler.cfg.data.in_channels) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, sampler.sample(2, seed=1, steps=2))
    files = sample_to_folder(tmp_path / "out", 2, ModelRef("toy", ANISO_3D, "2d"), SampleOptions(seed=1, steps=2))
    assert len(files) == 2 * sampler.cfg.data.in_channels or len(files) == 2
    side = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert side["kind"] == "toy" and side["sampler"] == "ddim" and side["steps"] == 2

    packaged = Sampler.of(TrainedModel.load(sampler.save(tmp_path / "pkg")))
    np.testing.assert_array_equal(a, packaged.sample(2, seed=1, steps=2))


# ---------------------------------------------------------------------------------------------- the upstream link
def test_upstream_link_is_one_relative_path_and_old_links_still_resolve(tmp_path):
    from medimgen.core.errors import MedimgenError
    from medimgen.runs.folders import UPSTREAM, link_upstream, upstream_of

    run, up = tmp_path / "results" / "ldm" / "2d" / "s", tmp_path / "results" / "autoencoder" / "2d" / "s"
    extra = link_upstream(run, up)
    assert list(extra) == [UPSTREAM] and not Path(extra[UPSTREAM]).is_absolute()
    assert upstream_of(run, extra).root == up.resolve()
    for old in ("autoencoder_run", "base_run"):  # LDM and ControlNet checkpoints of older versions
        assert upstream_of(run, {old: extra[UPSTREAM]}).root == up.resolve()
    assert upstream_of(run, {"autoencoder_checkpoint": str(up / "checkpoints" / "best.pt")}).root == up
    with pytest.raises(MedimgenError, match="names no upstream run"):
        upstream_of(run, {})


def test_latent_scale_lives_in_the_config_and_older_copies_are_read(workspace):
    import dataclasses

    from medimgen.runs.folders import scale_factor_of

    cfg = workspace["config"].get("2d")
    old = dataclasses.replace(cfg, derived=dataclasses.replace(cfg.derived, latent_scale_factor=None))
    new = dataclasses.replace(cfg, derived=dataclasses.replace(cfg.derived, latent_scale_factor=0.5))
    assert scale_factor_of(new, {"scale_factor": 9.0}) == 0.5  # the config wins
    assert scale_factor_of(old, None, {"scale_factor": 0.25}) == 0.25  # an older run's checkpoint / meta.json
    assert scale_factor_of(old, {}) is None
