"""benchmarks/bench_defaults.py (planned defaults vs MONAI's tutorials) and benchmarks/real_anatomy.py (the real-anatomy
dataset): the hand configs as valid medimgen overrides, the identical reduction, the tissue clustering (fast); and
(slow) the whole comparison end to end at a tiny budget on the real downloaded heads (plumbing, not the verdict)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_defaults  # noqa: E402
import real_anatomy  # noqa: E402

from medimgen.config import apply_overrides, load_config  # noqa: E402

PLANNED = Path(__file__).parent / "data" / "Dataset501_config_8GB.yaml"


def test_hand_configs_are_the_tutorials_values_as_valid_overrides():
    cfg2 = load_config(PLANNED).get("2d")
    hand = apply_overrides(cfg2, bench_defaults.hand_overrides(cfg2, "ddpm"))
    # generation/2d_ddpm/2d_ddpm_tutorial.ipynb: channels (128, 256, 256), attention (F, T, T), 1 res block, heads of
    # 256, Adam lr 2.5e-5, batch 64, MONAI's DDPMScheduler defaults
    assert list(hand.ddpm_unet.channels) == [128, 256, 256] and list(hand.ddpm_unet.attention_levels) == [False, True, True]
    assert (hand.ddpm_unet.num_res_blocks, hand.ddpm_unet.num_head_channels) == (1, 256)
    assert len(hand.ddpm_unet.strides) == 2  # one per level transition, from the plan
    assert (hand.train_ddpm.learning_rate, hand.train_ddpm.batch_size, hand.train_ddpm.ema_decay) == (2.5e-5, 64, None)
    assert (hand.ddpm_scheduler.schedule, hand.ddpm_scheduler.beta_start, hand.ddpm_scheduler.beta_end) == \
        ("linear_beta", 0.0001, 0.02)
    cfg3 = load_config(PLANNED).get("3d")
    hand3 = apply_overrides(cfg3, bench_defaults.hand_overrides(cfg3, "autoencoder") + bench_defaults.hand_overrides(cfg3, "ldm"))
    # generation/3d_ldm/3d_ldm_tutorial.ipynb
    assert list(hand3.autoencoder.channels) == [32, 64, 64] and hand3.autoencoder.norm_num_groups == 16
    assert (hand3.losses.adversarial_weight, hand3.losses.perceptual_weight, hand3.losses.kl_weight) == (0.01, 0.001, 1e-6)
    assert list(hand3.ldm_unet.channels) == [32, 64, 64] and hand3.ldm_unet.num_head_channels == 64
    assert (hand3.ldm_scheduler.beta_start, hand3.ldm_scheduler.beta_end) == (0.0015, 0.0195)
    assert (hand3.train_ldm.learning_rate, hand3.train_ldm.batch_size) == (1e-4, 2)
    # the planned LDM has 3 levels here; a plan with fewer level transitions gets MONAI's 2s
    assert bench_defaults._strides([[1, 2, 2]], 2, 3) == "[[1,2,2],[2,2,2]]"


def test_reduction_is_the_same_rule_for_both_sides():
    cfg = load_config(PLANNED).get("2d")
    hand = apply_overrides(cfg, bench_defaults.hand_overrides(cfg, "ddpm"))
    sides = {}
    for name, c in (("planned", cfg), ("hand", hand)):
        sides[name] = apply_overrides(c, bench_defaults.reduction(c, "ddpm", 4, 8, None))
    assert list(sides["planned"].ddpm_unet.channels) == [c // 4 for c in cfg.ddpm_unet.channels]
    assert list(sides["hand"].ddpm_unet.channels) == [32, 64, 64]
    assert sides["hand"].ddpm_unet.num_head_channels == 64
    assert sides["planned"].ddpm_unet.num_head_channels == cfg.ddpm_unet.num_head_channels // 4
    assert (sides["planned"].train_ddpm.batch_size, sides["hand"].train_ddpm.batch_size) == \
        (math.ceil(cfg.train_ddpm.batch_size / 8), 8)
    for c in sides.values():  # group norm divides every width; nothing pretrained downloaded
        assert all(ch % c.ddpm_unet.norm_num_groups == 0 for ch in c.ddpm_unet.channels)
        assert c.losses.perceptual_network == "none"


def test_kmeans_tissue_orders_csf_grey_white():
    rng = np.random.default_rng(0)
    t1 = np.concatenate([rng.normal(30, 3, 1000), rng.normal(80, 3, 1000), rng.normal(120, 3, 1000)]).astype(np.float32)
    brain = np.ones_like(t1, bool)
    brain[:100] = False  # outside the brain: never tissue
    gm, wm = real_anatomy.kmeans_tissue(t1, brain)
    assert not gm[:1000].any() and not wm[:1000].any()
    assert gm[1000:2000].all() and wm[2000:].all() and not wm[1000:2000].any()


@pytest.mark.slow
def test_comparison_end_to_end_at_a_tiny_budget(empty_env, tmp_path, monkeypatch):
    try:
        real_anatomy.fetch_sources()
    except real_anatomy.FetchError as e:
        pytest.skip(f"the public head MRI packages cannot be fetched here: {e}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out, png = tmp_path / "results.json", tmp_path / "curves.png"
    results = bench_defaults.main([
        "--workspace", str(tmp_path / "ws"), "--dataset-id", "827", "--cases", "6", "--spacing", "8",
        "--steps", "2,4", "--ae-steps", "2", "--width-div", "8", "--batch-div", "16", "--size3d", "32,32,32",
        "--samples", "3", "--sample-steps", "3", "--out", str(out), "--png", str(png)])
    # the dataset: real heads with the four tissue classes
    raw = empty_env["nnUNet_raw"] / "Dataset827_RealHeads"
    assert json.loads((raw / "dataset.json").read_text())["labels"] == real_anatomy.LABELS
    assert {p.name.split("_")[0] for p in (raw / "labelsTr").iterdir()} == {"mni152", "colin27", "itk"}
    saved = json.loads(out.read_text())
    assert png.stat().st_size > 0 and saved["device"] == results["device"]
    for dim, models in (("2d", ("ddpm",)), ("3d", ("autoencoder", "ldm"))):
        for side in bench_defaults.CONFIGS:
            for model in models:
                rows = saved["dims"][dim][side][model]["rows"]
                assert [r["step"] for r in rows] == ([2] if model == "autoencoder" else [2, 4])
                key = "psnr" if model == "autoencoder" else "mmd_stats"
                assert all(math.isfinite(r[key]) for r in rows)
                if model != "autoencoder":
                    assert rows[-1]["train_seconds"] > 0 and "ms_ssim_generated" in rows[-1]
    # each side trained what it claims: the run folders' own configs (tutorial widths / 8, planned learning rate)
    from medimgen.config.io import load_generation_config

    runs = {p.name: p for p in (tmp_path / "ws" / "runs").iterdir()}
    hand = load_generation_config(next(p for n, p in runs.items() if n.startswith("2d_ddpm_monai_tutorial")) / "config.yaml")
    assert list(hand.ddpm_unet.channels) == [16, 32, 32] and hand.train_ddpm.learning_rate == 2.5e-5
    assert hand.train_ddpm.batch_size == 4 and hand.train_ddpm.ema_decay is None
    planned = load_generation_config(next(p for n, p in runs.items() if n.startswith("2d_ddpm_planned")) / "config.yaml")
    plan = load_config(empty_env["nnUNet_preprocessed"] / "Dataset827_RealHeads" / "medimgen_config.yaml").get("2d")
    assert planned.train_ddpm.learning_rate == plan.train_ddpm.learning_rate
    assert list(planned.ddpm_unet.channels) == [max(1, c // 8) for c in plan.ddpm_unet.channels]
    assert "equal wall time" in bench_defaults.tables(results)
    # --ldm-on: both sides' LDMs on one trained autoencoder (the planned side's), none trained again
    ae = next(p for n, p in runs.items() if n.startswith("3d_autoencoder_planned"))
    shared = bench_defaults.main([
        "--workspace", str(tmp_path / "ws"), "--dataset-id", "827", "--cases", "6", "--spacing", "8", "--dims", "3d",
        "--ldm-on", str(ae), "--steps", "2", "--width-div", "8", "--batch-div", "16", "--size3d", "32,32,32",
        "--samples", "3", "--sample-steps", "3"])["dims"]["3d"]
    from medimgen.runs.folders import read_checkpoint, upstream_of

    for side in bench_defaults.CONFIGS:
        assert list(shared[side]) == ["ldm"] and math.isfinite(shared[side]["ldm"]["rows"][-1]["heldout_loss"])
    new_runs = [p for p in (tmp_path / "ws" / "runs").iterdir() if p.name not in runs]
    assert sorted(p.name.split("_1")[0] for p in new_runs) == ["3d_ldm_monai_tutorial", "3d_ldm_planned"]
    for run in new_runs:
        assert upstream_of(run, read_checkpoint(run / "checkpoints" / "last.pt")["extra"]).root == ae.resolve()


def test_nnunet_segmenter_is_nnunets_own_argmax_in_label_values(nnunet_env, tmp_path):
    """A 2d nnU-Net checkpoint in nnU-Net's format, made here with nnU-Net's builder (random weights: this checks
    the loading, padding and label mapping, not a segmentation quality)."""
    import shutil

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medimgen.evaluation.features import NnUNetSegmenter

    pre = nnunet_env["nnUNet_preprocessed"] / "Dataset201_Aniso"
    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(pre / "nnUNetPlans.json", folder / "plans.json")
    shutil.copy(pre / "dataset.json", folder / "dataset.json")
    pm = PlansManager(str(folder / "plans.json"))
    cm = pm.get_configuration("2d")
    lm = pm.get_label_manager(json.loads((folder / "dataset.json").read_text()))
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 2, lm.num_segmentation_heads, enable_deep_supervision=False)
    torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": "2d", "fold": 0},
                "trainer_name": "nnUNetTrainer", "current_epoch": 1}, folder / "fold_0" / "checkpoint_final.pth")
    seg = NnUNetSegmenter(folder, 0)
    size = [p + 3 for p in cm.patch_size]  # not a multiple of the downsampling: padded, then cropped back
    x = torch.randn(3, 2, *size)
    out = seg.segment(x, batch_size=2)
    assert out.shape == (3, 1, *size) and out.dtype == torch.long
    assert set(out.unique().tolist()) <= {int(v) for v in lm.all_labels}
    net.eval()
    with torch.no_grad():
        div = seg.divisor
        padded = torch.nn.functional.pad(x, [0, (-size[1]) % div[1], 0, (-size[0]) % div[0]])
        expected = net(padded).argmax(1, keepdim=True)[..., : size[0], : size[1]]
    torch.testing.assert_close(out, torch.as_tensor([int(v) for v in lm.all_labels])[expected])


def test_heldout_loss_of_an_ldm_is_its_objective_on_the_held_out_cases_latents(flow_3d, nnunet_env):
    """The LDM's held-out loss: its noise prediction on the val/test cases' latents (its autoencoder, its scale
    factor); the same inputs each call; a UNet that predicts zero scores the noise's mean square (about 1)."""
    import torch

    from medimgen.runs.folders import TrainedModel
    from tests.conftest import ANISO_3D

    model = TrainedModel.from_run(flow_3d["ldm"].run_dir, "last")
    first = bench_defaults.heldout_loss(model, ANISO_3D)
    assert math.isfinite(first) and first == bench_defaults.heldout_loss(model, ANISO_3D)
    scale = model.scale_factor
    model.scale_factor = scale * 4  # the latents' scale enters the inputs
    assert bench_defaults.heldout_loss(model, ANISO_3D) != first
    model.scale_factor = scale
    with torch.no_grad():
        for p in model.unet.out.parameters():  # MONAI's DiffusionModelUNet: the last layers
            p.zero_()
    assert bench_defaults.heldout_loss(model, ANISO_3D) == pytest.approx(1.0, abs=0.15)


def test_too_small_a_crop_for_a_sides_unet_is_one_clear_line():
    cfg = load_config(PLANNED).get("3d")
    hand = apply_overrides(cfg, bench_defaults.hand_overrides(cfg, "autoencoder") + bench_defaults.hand_overrides(cfg, "ldm")
                           + ["data.image_size=[16,16,16]", "data.crop_size=[]", "data.native_spacing=[]",
                              "discriminator.num_layers=2"])  # a 16-voxel image has room for 2 (validated)
    with pytest.raises(bench_defaults.MedimgenError, match="deepest level would be \\[1, 1, 1\\]"):
        bench_defaults.check_depth(hand, "ldm", "monai_tutorial")
    bench_defaults.check_depth(apply_overrides(hand, ["data.image_size=[32,32,32]"]), "ldm", "monai_tutorial")


@pytest.mark.parametrize("argv", [["--dims", "2d", "--ldm-on", "run"], ["--dims", "3d", "--models", "bogus"]])
def test_a_selection_that_trains_nothing_is_one_clear_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_defaults.main(["--workspace", str(tmp_path / "ws"), *argv])
    assert e.value.code == 2 and "nothing to train for --dims" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
