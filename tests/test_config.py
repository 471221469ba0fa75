"""Config dataclasses: YAML round trip, validation with clear messages, overrides."""

from __future__ import annotations

import dataclasses

import pytest

from medimgen.config import (
    GenerationConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    load_generation_config,
    save_generation_config,
    to_dict,
)
from medimgen.config.io import flatten, medimgen_config_from_dict, render_yaml
from medimgen.errors import MedimgenError


@pytest.fixture(scope="module")
def planned(nnunet_roots):
    from medimgen.planning import plan_dataset
    from tests.conftest import ANISO_3D

    return plan_dataset(ANISO_3D, force=True).config


def test_yaml_round_trip_is_exact(planned, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(render_yaml(planned))
    again = load_config(path)
    assert again == planned
    assert to_dict(again) == to_dict(planned)


def test_generation_config_round_trip(planned, tmp_path):
    g = planned.get("3d")
    save_generation_config(g, tmp_path / "g.yaml")
    assert load_generation_config(tmp_path / "g.yaml") == g


def test_unknown_key_names_key_and_suggests(planned):
    data = to_dict(planned)
    data["3d"]["autoencoder"]["chanels"] = [8, 16]
    with pytest.raises(MedimgenError, match=r"unknown config key '3d\.autoencoder\.chanels' \(did you mean 'channels'\?\)"):
        medimgen_config_from_dict(data)


def test_mistyped_value_names_key(planned):
    data = to_dict(planned)
    data["2d"]["train_ddpm"]["epochs"] = "many"
    with pytest.raises(MedimgenError, match=r"2d\.train_ddpm\.epochs': expected int"):
        medimgen_config_from_dict(data)
    data["2d"]["train_ddpm"]["epochs"] = 3
    data["2d"]["train_ddpm"]["amp"] = "fp8"
    with pytest.raises(MedimgenError, match=r"amp': expected 'auto' \| 'bf16'"):
        medimgen_config_from_dict(data)


def test_missing_key_is_reported():
    with pytest.raises(MedimgenError, match="config key 'epochs' is missing"):
        from_dict(TrainConfig, {"batch_size": 2})


def test_malformed_yaml_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dataset: [unclosed\n  foo: 1\n")
    with pytest.raises(MedimgenError) as e:
        load_config(p)
    assert "not valid YAML" in str(e.value) and "\n" not in str(e.value)


def test_overrides_apply_to_all_dims_or_one(planned):
    both = apply_overrides(planned, ["train_ddpm.epochs=3", "losses.kl_weight=1e-5"])
    assert both.get("2d").train_ddpm.epochs == 3 and both.get("3d").train_ddpm.epochs == 3
    assert both.get("3d").losses.kl_weight == pytest.approx(1e-5)
    one = apply_overrides(planned, ["3d.autoencoder.channels=[8,16,16]"])
    assert one.get("3d").autoencoder.channels == (8, 16, 16)
    assert one.get("2d").autoencoder.channels == planned.get("2d").autoencoder.channels
    g = apply_overrides(planned.get("3d"), ["train_ldm.ema_decay=null"])
    assert isinstance(g, GenerationConfig) and g.train_ldm.ema_decay is None


@pytest.mark.parametrize("bad", ["train_ddpm.epoch=3", "nosection.x=1", "train_ddpm.epochs", "train_ddpm.epochs=x"])
def test_bad_overrides_are_rejected(planned, bad):
    with pytest.raises(MedimgenError):
        apply_overrides(planned, [bad])


def test_configs_are_frozen(planned):
    with pytest.raises(dataclasses.FrozenInstanceError):
        planned.get("3d").train_ddpm.epochs = 1  # type: ignore[misc]


def test_flatten_gives_dotted_params(planned):
    flat = flatten(planned.get("3d"))
    assert flat["train_ddpm.epochs"] == planned.get("3d").train_ddpm.epochs
    assert "autoencoder.channels" in flat


def test_unquoted_off_in_yaml_means_off(planned):
    assert apply_overrides(planned, ["train_ddpm.amp=off"]).get("3d").train_ddpm.amp == "off"
