"""`medimgen plan` plans the configurations nnU-Net preprocessed: a 3D dataset preprocessed for 2d only
(`nnUNetv2_plan_and_preprocess -d N -c 2d`) gets a 2d config and a note naming the skipped 3d and the command that
preprocesses it; only a later `train ... 3d` is refused, with that line."""

from __future__ import annotations

from click.testing import CliRunner

from medimgen.cli import main
from medimgen.config import load_config
from medimgen.nnunet.commands import plan_and_preprocess
from medimgen.nnunet.synthetic import make_synthetic_dataset

ONLY_2D = 207  # not 204: test_intensity uses it in the same nnUNet_raw


def test_a_3d_dataset_preprocessed_for_2d_only_plans_2d_and_refuses_3d_training(nnunet_env):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], ONLY_2D, "Only2d", num_cases=4, shape=(32, 32, 8),
                           spacing=(1.0, 1.0, 2.0), seed=4)
    plan_and_preprocess(ONLY_2D, configurations=("2d",), quiet=True)
    folder = nnunet_env["nnUNet_preprocessed"] / "Dataset207_Only2d"
    assert not (folder / "nnUNetPlans_3d_fullres").exists()  # nnU-Net planned 3d_fullres, did not preprocess it
    preprocess = "run `nnUNetv2_preprocess -d 207 -c 3d_fullres`"

    r = CliRunner().invoke(main, ["plan", "-d", str(ONLY_2D), "--gpu-memory", "8"])
    assert r.exit_code == 0, r.output
    assert list(load_config(folder / "medimgen_config.yaml").configs) == ["2d"]
    note = [line for line in r.output.splitlines() if "3d not planned" in line]
    assert len(note) == 1 and preprocess in note[0] and "nnUNetPlans_3d_fullres is missing" in note[0], r.output
    # the latent cache of the 2d config holds one latent per slice of every training case (3D is not planned), at
    # the in-plane shape nnU-Net's 2d preprocessing gives it
    from medimgen.data.cases import load_case, open_cases
    from medimgen.planning.latent_cache import cached_cases

    pre = folder / "nnUNetPlans_2d"
    shapes = [load_case(open_cases(pre, [i]), i)[0].shape[1:] for i in open_cases(pre).identifiers]
    cases = cached_cases(load_config(folder / "medimgen_config.yaml"), "2d", folder)
    assert sum(s[0] for s in shapes) > 4 and cases.samples == sum(s[0] for s in shapes)
    assert sorted(cases.cases) == sorted((s[0], tuple(s[1:])) for s in shapes)

    r = CliRunner().invoke(main, ["train", "ddpm", str(ONLY_2D), "train-val-test", "3d"])
    assert r.exit_code != 0 and preprocess in r.output and "Traceback" not in r.output, r.output
    assert not (nnunet_env["medimgen_results"] / "Dataset207_Only2d").exists()  # nothing written
