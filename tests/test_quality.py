"""Quality you can see: one scorer (memorisation included), runs that score themselves, plots immune to seaborn."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ANISO_3D


@pytest.fixture(scope="module")
def real_2d(workspace):
    """The real 2D images of the planned test dataset (3 slices a case): training and held-out (val + test) cases."""
    from medimgen.evaluation.api import real_cases, reference

    cfg = workspace["config"].get("2d")
    val, _, _ = real_cases(cfg, str(ANISO_3D), "val")
    return reference(cfg, str(ANISO_3D), val)


def test_memorisation_flags_training_copies_not_heldout_cases(real_2d):
    from medimgen.evaluation.scorer import memorisation

    ref = real_2d
    assert len(ref.train) >= 4 and len(ref.heldout) >= 2
    g = torch.Generator().manual_seed(0)
    copies = ref.train[:2]
    noised = (ref.train[2:4] + 0.05 * torch.randn(ref.train[2:4].shape, generator=g)).clamp(-1, 1)
    mem = memorisation(torch.cat([copies, noised]), ref.train, ref.heldout, ref.train_ids)
    assert mem.fraction == 1.0, (mem.nearest, mem.threshold)
    assert mem.pairs[0]["train_id"] in ref.train_ids[:2] and mem.pairs[0]["ncc"] == pytest.approx(1.0)
    # held-out real cases, as if generated, are not flagged (none is nearer a training case than the held-out
    # percentile), and the noised copies are nearer their training case than any held-out case is
    held = memorisation(ref.heldout, ref.train, ref.heldout, ref.train_ids)
    assert held.fraction == 0.0 and max(held.nearest) < 0.99
    assert min(mem.nearest) > max(held.nearest)
    # unrelated images (noise) are not either
    assert memorisation(torch.rand(ref.train[:4].shape, generator=g) * 2 - 1, ref.train, ref.heldout,
                        ref.train_ids).fraction == 0.0


def test_scorer_names_and_quality_metrics(real_2d):
    from medimgen.evaluation.scorer import Reference, quality_metrics, score

    ref = real_2d
    ref = Reference(ref.heldout, ref.train, ref.train_ids, ref.heldout, ref.heldout_ids)
    scores, mem = score(ref.train[:4], ref)
    assert mem.pairs[0]["ncc"] == pytest.approx(1.0)
    assert {"mmd_stats", "ms_ssim_generated", "ms_ssim_gap", "memorised_fraction"} <= set(scores)
    assert not any(k.startswith("fid") for k in scores)  # no extractor: no FID
    q = quality_metrics(scores)
    assert q["quality/memorised_fraction"] == 1.0 and "quality/ms_ssim" in q and "quality/mmd_stats" in q


def test_scores_do_not_depend_on_the_model_range(real_2d):
    """A config working in [0, 1] (a foundation autoencoder's) scores the same images as a [-1, 1] one: the scorer
    maps both onto [-1, 1] before the statistics MMD, MS-SSIM and feature extractors."""
    import dataclasses

    from medimgen.evaluation.scorer import Reference, score

    ref = real_2d
    g = torch.Generator().manual_seed(1)
    generated = (ref.train[:4] + 0.2 * torch.randn(ref.train[:4].shape, generator=g)).clamp(-1, 1)
    unit, _ = score(generated, Reference(ref.heldout))
    half = Reference((ref.heldout + 1) / 2, value_range=(0.0, 1.0))
    shifted, _ = score((generated + 1) / 2, half)
    for key in ("mmd_stats", "ms_ssim_generated", "ms_ssim_real"):
        assert shifted[key] == pytest.approx(unit[key], rel=1e-4, abs=1e-5), key
    # read as if they were [-1, 1] images, the same [0, 1] images score differently: the range matters
    wrong, _ = score((generated + 1) / 2, dataclasses.replace(half, value_range=(-1.0, 1.0)))
    assert wrong["mmd_stats"] != pytest.approx(unit["mmd_stats"], rel=1e-2)


def _quality_keys(run) -> set[str]:
    return {k for k in run.data.metrics if k.startswith("quality/")}


def _store(workspace) -> str:
    return f"sqlite:///{workspace['base'] / 'mlflow.db'}"


def test_ddpm_and_ldm_runs_score_themselves_under_the_same_names(flow_2d, workspace):
    """Tiny DDPM and LDM runs (CPU): the same quality/* keys read back with MlflowClient, at the optimiser step;
    params only of the sections the model uses; the registered version carries quality and a description."""
    from mlflow import MlflowClient

    from medimgen.training.quality import optimizer_steps

    client = MlflowClient(_store(workspace))  # the runs' own store (an earlier test may have set another one)
    runs = {m: client.get_run(flow_2d[m].mlflow_run_id) for m in ("ddpm", "ldm", "autoencoder")}
    keys = {m: _quality_keys(r) for m, r in runs.items()}
    assert keys["ddpm"] == keys["ldm"]
    assert {"quality/mmd_stats", "quality/ms_ssim", "quality/memorised_fraction"} <= keys["ldm"]
    assert not any(k.startswith("quality/fid") for k in keys["ldm"])  # no extractor weights here: no FID
    assert {"quality/psnr", "quality/ssim"} <= keys["autoencoder"]
    train = flow_2d["ldm"].config.train_ldm
    steps = [m.step for m in client.get_metric_history(runs["ldm"].info.run_id, "quality/mmd_stats")]
    assert steps == [optimizer_steps(train, train.epochs)]
    ldm_params = runs["ldm"].data.params
    assert "ldm_unet.channels" in ldm_params and "autoencoder.channels" in ldm_params
    assert not any(k.startswith(("train_ddpm.", "ddpm_unet.", "train_controlnet.", "discriminator.")) for k in ldm_params)
    assert not any(k.startswith(("ldm_unet.", "autoencoder.")) for k in runs["ddpm"].data.params)
    name = f"{runs['ldm'].data.tags['medimgen.dataset']}_ldm_2d"
    version = client.search_model_versions(f"name='{name}'")[0]
    assert "quality/mmd_stats" in version.tags and "quality:" in version.description
    assert "split train-val-test" in version.description


def test_other_split_does_not_become_a_version_of_the_default_name(flow_2d, workspace):
    from mlflow import MlflowClient

    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    client = MlflowClient(_store(workspace))  # the runs' own store (an earlier test may have set another one)
    dataset = client.get_run(flow_2d["ddpm"].mlflow_run_id).data.tags["medimgen.dataset"]
    default = f"{dataset}_ddpm_2d"
    before = len(client.search_model_versions(f"name='{default}'"))
    # an earlier test of the session may have trained fold 0 into this store already: only the new versions count
    had = {v.version for v in client.search_model_versions(f"name='{default}_fold_0'")}
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1)
    result = train("ddpm", ANISO_3D, "5-fold", "2d", fold=0, overrides=sets, echo=lambda *_: None)
    assert len(client.search_model_versions(f"name='{default}'")) == before
    versions = [v for v in client.search_model_versions(f"name='{default}_fold_0'") if v.version not in had]
    assert [v.run_id for v in versions] == [result.mlflow_run_id]


def test_plots_keep_normal_fonts_after_seaborn(tmp_path):
    """nnU-Net's `sns.set(font_scale=2.5)` in the same process does not reach medimgen's plots."""
    import matplotlib
    import matplotlib.pyplot as plt

    from medimgen.training.outputs import plot_losses, plot_style

    sns = pytest.importorskip("seaborn")
    sns.set(font_scale=2.5)
    try:
        plot_losses({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.0], "val_loss": [3.5, 2.5, 1.5]},
                    tmp_path / "loss.png")
        assert (tmp_path / "loss.png").is_file()
        with plot_style():
            fig, ax = plt.subplots()
            assert ax.title.get_fontsize() < 20 and ax.xaxis.label.get_fontsize() < 15
            plt.close(fig)
    finally:
        matplotlib.rcdefaults()


@pytest.mark.parametrize("epochs, iterations, batch", [(100, 1000, 2), (2000, 10, 4), (50, 40, 2)])
def test_planned_quality_checks_cost_a_bounded_share(epochs, iterations, batch):
    import dataclasses

    from medimgen.config.schema import TrainConfig
    from medimgen.planning import quality_budget as qb

    run = TrainConfig(epochs=epochs, batch_size=batch, iterations_per_epoch=iterations)
    planned = dataclasses.replace(run, **qb.plan(run))
    assert qb.MIN_SAMPLES <= planned.eval_samples <= qb.MAX_SAMPLES
    assert 1 <= qb.checks(planned) <= qb.MAX_CHECKS
    assert qb.share(planned) <= qb.SHARE + 1e-9
    # a trial (one check) of a tiny run: the floor (4 samples x 10 steps), not 16 x 50
    tiny = qb.plan(TrainConfig(epochs=1, batch_size=2, iterations_per_epoch=2), max_checks=1)
    assert (tiny["eval_samples"], tiny["eval_steps"], tiny["eval_interval"]) == (qb.MIN_SAMPLES, qb.MIN_STEPS, 0)


def test_tune_without_a_dataset_takes_the_one_planned(empty_env):
    from medimgen.core.errors import MedimgenError
    from medimgen.core.paths import the_planned_dataset

    with pytest.raises(MedimgenError, match="no dataset is planned"):
        the_planned_dataset()
    pre = empty_env["nnUNet_preprocessed"]
    (pre / "Dataset001_A").mkdir()
    (pre / "Dataset001_A" / "medimgen_config.yaml").write_text("x: 1\n")
    assert the_planned_dataset() == "Dataset001_A"
    (pre / "Dataset002_B").mkdir()
    (pre / "Dataset002_B" / "medimgen_config.yaml").write_text("x: 1\n")
    with pytest.raises(MedimgenError, match=r"2 datasets are planned: choose one with -d \(Dataset001_A, Dataset002_B\)"):
        the_planned_dataset()
