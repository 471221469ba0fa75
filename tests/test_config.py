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
from medimgen.core.errors import MedimgenError


@pytest.fixture(scope="module")
def planned(nnunet_roots):
    from tests.conftest import ANISO_3D, plan_once

    return plan_once(ANISO_3D).config


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
    one = apply_overrides(planned, ["3d.autoencoder.channels=[32,64,64]"])
    assert one.get("3d").autoencoder.channels == (32, 64, 64)
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


def _odd(size) -> str:
    return str([s + 1 for s in size]).replace(" ", "")


@pytest.mark.parametrize("override,message", [
    ("3d.train_ddpm.epochs=0", r"'3d\.train_ddpm\.epochs': must be an integer >= 1, got 0"),
    ("train_ddpm.epochs=-1", r"'2d\.train_ddpm\.epochs': must be an integer >= 1, got -1"),
    ("3d.train_autoencoder.batch_size=0", r"'3d\.train_autoencoder\.batch_size': must be an integer >= 1"),
    ("3d.train_ldm.iterations_per_epoch=0", r"'3d\.train_ldm\.iterations_per_epoch': must be an integer >= 1"),
    ("3d.train_ldm.grad_accumulation_steps=-2", r"'3d\.train_ldm\.grad_accumulation_steps': must be an integer >= 1"),
    ("3d.train_ddpm.learning_rate=-1e-4", r"'3d\.train_ddpm\.learning_rate': must be a number > 0, got -0\.0001"),
    ("3d.train_autoencoder.disc_learning_rate=0", r"disc_learning_rate': must be a number > 0"),
    ("3d.train_ddpm.ema_decay=1.5", r"ema_decay': must be a number in \[0, 1\), got 1\.5"),
    ("3d.data.num_workers=-1", r"'3d\.data\.num_workers': must be an integer >= 0, got -1"),
    ("3d.data.spacing=[0,1,1]", r"'3d\.data\.spacing': must be a list of values > 0, got \[0\.0,1\.0,1\.0\]"),
    ("3d.memory.target_gb=0", r"'3d\.memory\.target_gb': must be a number > 0"),
    ("3d.autoencoder.strides=[[1,2,2],[3,2,2]]", r"'3d\.autoencoder\.strides\[1\]': must be 1 or 2 on each of 3 axes, got \[3,2,2\]"),
    ("3d.autoencoder.strides=[[1,2],[2,2]]", r"'3d\.autoencoder\.strides\[0\]': must be 1 or 2 on each of 3 axes"),
    ("3d.autoencoder.strides=[[2,2,2]]", r"'3d\.autoencoder\.strides': 3 channel levels need 2 strides, got 1"),
    ("3d.autoencoder.norm_num_groups=7", r"'3d\.autoencoder\.norm_num_groups': norm_num_groups=7 does not divide channels"),
    ("3d.ddpm_scheduler.num_inference_steps=2000", r"num_inference_steps': must be <= ddpm_scheduler\.num_train_timesteps \(1000\)"),
])
def test_impossible_values_name_key_and_allowed_values(planned, override, message):
    with pytest.raises(MedimgenError, match=message) as e:
        apply_overrides(planned, [override])
    assert "\n" not in str(e.value)
    with pytest.raises(MedimgenError, match=message.replace("'3d\\.", "'").replace("'2d\\.", "'")):
        apply_overrides(planned.get("3d" if override.startswith("3d.") else "2d"), [override.removeprefix("3d.")])


def test_image_size_and_strides_must_divide(planned):
    cfg = planned.get("3d")
    with pytest.raises(MedimgenError, match=r"'3d\.data\.image_size': must be divisible per axis by data\.size_divisor"):
        apply_overrides(planned, [f"3d.data.image_size={_odd(cfg.data.image_size)}"])
    # with the derived divisor edited away, the strides themselves must still divide the image
    with pytest.raises(MedimgenError, match=r"'3d\.autoencoder\.strides': their per-axis product \[.*\] must divide "
                                            r"data\.image_size"):
        apply_overrides(planned, ["3d.data.size_divisor=[1,1,1]", f"3d.data.image_size={_odd(cfg.data.image_size)}"])


def test_edited_yaml_with_impossible_value_names_file_and_key(planned, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(render_yaml(planned).replace(f"  train_ddpm:\n    epochs: {planned.get('3d').train_ddpm.epochs}",
                                                 "  train_ddpm:\n    epochs: 0", 1))
    assert "epochs: 0" in path.read_text()
    with pytest.raises(MedimgenError, match=rf"{path}: config key '2d\.train_ddpm\.epochs': must be an integer >= 1, got 0"):
        load_config(path)


def test_planned_configs_pass_validation(planned):
    from medimgen.config.validate import check_generation

    for dim, cfg in planned.configs.items():
        check_generation(cfg, dim)


def test_results_live_in_derived_and_old_layouts_still_load(planned):
    """Results (memory predictions, latent scale) sit in `derived:`, apart from the settings; a config written
    before that section existed (results among train_ldm / memory) loads with them moved there."""
    from medimgen.config.io import to_dict

    cfg = planned.get("3d")
    assert cfg.derived.predicted_peak_gb and "derived:" in render_yaml(planned)
    old = to_dict(cfg)
    derived = old.pop("derived")
    old["train_ldm"]["latent_scale_factor"] = 0.25
    old["memory"].update(fitted=derived["memory_fitted"], predicted_peak_gb=derived["predicted_peak_gb"])
    back = from_dict(GenerationConfig, old, "3d")
    assert back.derived.latent_scale_factor == 0.25
    assert back.derived.predicted_peak_gb == cfg.derived.predicted_peak_gb
    assert dataclasses.replace(back, derived=cfg.derived) == cfg
    assert back.train_for("ldm") is back.train_ldm and back.unet_for("ddpm") is back.ddpm_unet
    assert back.with_train("ddpm", batch_size=3).train_ddpm.batch_size == 3


def test_config_backups_within_one_second_never_overwrite_each_other(tmp_path):
    """Two rewrites of a hand-edited config in the same second keep both earlier versions (`plan --force` twice)."""
    from medimgen.config.io import back_up_config

    path = tmp_path / "medimgen_config.yaml"
    made = []
    for text in ("first: 1\n", "second: 2\n", "third: 3\n"):
        path.write_text(text)
        made.append(back_up_config(path))
    assert len(set(made)) == 3 and [p.read_text() for p in made] == ["first: 1\n", "second: 2\n", "third: 3\n"]
    assert all(p.name.startswith("medimgen_config.yaml.") and p.name.endswith(".bak") for p in made)
