"""A dataset planned by nnU-Net under another plans identifier (not nnUNetPlans) is planned, trained, sampled and
evaluated with those plans: the identifier travels in the config (`medimgen plan --plans`)."""

from __future__ import annotations

import nibabel as nib
import pytest
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.config import load_config, load_generation_config
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.nnunet.synthetic import make_synthetic_dataset
from tests.training_helpers import tiny_overrides

DATASET = 231
NAME = "Dataset231_OtherPlans"
PLANS = "MyPlans"  # nnU-Net's -overwrite_plans_name: MyPlans.json and MyPlans_2d/, no nnUNetPlans anywhere


def test_non_default_plans_identifier_trains_and_samples(tmp_path, monkeypatch):
    roots = {v: tmp_path / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results")}
    for var, folder in roots.items():
        folder.mkdir()
        monkeypatch.setenv(var, str(folder))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    make_synthetic_dataset(roots["nnUNet_raw"], DATASET, "OtherPlans", num_cases=6, shape=(48, 48),
                           spacing=(0.7, 0.9), channels=1, modality="CT", seed=3)
    plan_and_preprocess(DATASET, configurations=("2d",), quiet=True, plans_name=PLANS)
    pre = roots["nnUNet_preprocessed"] / NAME
    assert (pre / f"{PLANS}.json").is_file() and (pre / f"{PLANS}_2d").is_dir()
    assert not list(pre.glob("nnUNetPlans*"))

    runner = CliRunner()
    for plans in ("nnUNetPlans", "Absent"):  # plans nnU-Net did not write: one line naming the ones it did
        r = runner.invoke(main, ["plan", "-d", str(DATASET), "--plans", plans])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert f"no nnU-Net plans '{plans}'" in r.output and f"plans there: {PLANS}" in r.output
    r = runner.invoke(main, ["plan", "-d", str(DATASET), "--plans", "../x"])
    assert r.exit_code == 2 and "plans identifier must be" in r.output

    r = runner.invoke(main, ["plan", "-d", str(DATASET), "--plans", PLANS, "--offline"])
    assert r.exit_code == 0, r.output
    planned = load_config(pre / "medimgen_config.yaml")
    assert planned.dataset.plans_identifier == PLANS and planned.get("2d").data.plans_identifier == PLANS
    assert runner.invoke(main, ["memory", str(DATASET)]).exit_code in (0, 1)  # found the config without --plans

    sets = [*tiny_overrides(planned.get("2d"), epochs=1), "tracking.log_models=false"]
    r = runner.invoke(main, ["train", "ddpm", str(DATASET), "train-val-test", "2d", *sum([["--set", s] for s in sets], [])])
    assert r.exit_code == 0, r.output
    run = roots["medimgen_results"] / NAME / "ddpm" / "2d" / "train-val-test"
    cfg = load_generation_config(run / "config.yaml")
    assert cfg.data.plans_identifier == PLANS  # the run's own config is self-sufficient
    assert (run / f"{PLANS}.json").is_file() and not (run / "nnUNetPlans.json").exists()

    out = tmp_path / "samples"
    r = runner.invoke(main, ["sample", str(DATASET), "2d", "1", str(out), "--model", "ddpm", "--steps", "2"])
    assert r.exit_code == 0, r.output
    img = nib.load(str(out / "sample_0000.nii.gz"))  # one channel: no channel suffix
    assert img.shape == tuple(cfg.data.image_size[::-1])
    assert img.header.get_zooms()[:2] == pytest.approx(tuple(cfg.data.spacing[::-1]), rel=1e-5)

    from medimgen.evaluation.api import real_images
    from medimgen.runs.folders import TrainedModel

    target = TrainedModel.from_run(run)
    assert target.dataset == NAME
    images, ids = real_images(target.cfg, target.dataset, "all")
    assert tuple(images.shape) == (6, 1, *cfg.data.image_size) and len(ids) == 6
