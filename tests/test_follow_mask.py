"""The ControlNet follow-the-mask Dice in the one scorer (#27): an nnU-Net (trained here for a few iterations by
nnU-Net's own trainer) segments the generated images; the Dice against the maps they were made for is logged under
quality/* by ControlNet runs and reported by `medimgen evaluate`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medimgen.core.errors import MedimgenError
from tests.conftest import ANISO_3D, FLAT_2D


def _brief_nnunet(dataset_id: int, tmp_path, monkeypatch):
    from medimgen.nnunet.commands import train_nnunet_briefly

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    monkeypatch.setenv("nnUNet_compile", "false")
    return train_nnunet_briefly(dataset_id, "2d", 0, epochs=1, iterations=2)


def test_follow_mask_dice_with_a_trained_nnunet(nnunet_env, tmp_path, monkeypatch):
    from medimgen.evaluation.features import NnUNetSegmenter, build_segmenter
    from medimgen.evaluation.scorer import MaskFollowing, follow_mask, quality_metrics

    assert build_segmenter("auto", "Dataset202_Flat", 2) is None  # nothing trained yet: no Dice, no error
    folder = _brief_nnunet(FLAT_2D, tmp_path, monkeypatch)
    seg = build_segmenter("auto", "Dataset202_Flat", 2)  # now the dataset's own
    assert isinstance(seg, NnUNetSegmenter) and folder.name in seg.name
    assert build_segmenter("none", "Dataset202_Flat", 2) is None
    values = [int(v) for v in seg.values.tolist() if v != 0]
    names = [f"l{v}" for v in values]
    torch.manual_seed(0)
    images = torch.rand(4, 1, 40, 36) * 2 - 1
    own = seg.segment(images)
    # the images' own segmentation as their maps: Dice 1 for every label the segmenter finds
    same = follow_mask(images, MaskFollowing(seg, own, values, names))
    found = [v for v in values if (own == v).any()]
    assert found, "the segmenter labels nothing but background: the test would prove nothing"
    for v, n in zip(values, names):
        assert same[f"follow_mask_dice.{n}"] == pytest.approx(1.0) if v in found else math.isnan(same[f"follow_mask_dice.{n}"])
    assert same["follow_mask_dice"] == pytest.approx(1.0)
    # maps that keep only the right half of each label: Dice 2|M| / (|P| + |M|) per image, averaged
    half = own.clone()
    half[..., : own.shape[-1] // 2] = 0
    scores = follow_mask(images, MaskFollowing(seg, half, values, names))
    for v, n in zip(values, names):
        per = [2 * (m == v).sum() / ((p == v).sum() + (m == v).sum()) for p, m in zip(own, half) if (p == v).any()]
        if per:
            assert scores[f"follow_mask_dice.{n}"] == pytest.approx(float(torch.stack(per).mean()))
    assert scores["follow_mask_dice"] < 1
    assert quality_metrics(scores)[f"quality/follow_mask_dice_{names[0]}"] == scores[f"follow_mask_dice.{names[0]}"]
    with pytest.raises(MedimgenError, match="3 generated images for 4 conditioning maps"):
        follow_mask(images[:3], MaskFollowing(seg, own, values, names))
    with pytest.raises(MedimgenError, match="nnU-Net model file .* is missing"):
        build_segmenter(f"nnunet:{tmp_path / 'nowhere'}", "Dataset202_Flat", 2)


def test_controlnet_run_and_evaluate_report_the_follow_mask_dice(flow_2d, workspace, nnunet_env, tmp_path, monkeypatch):
    """A ControlNet run with a named segmenter logs quality/follow_mask_dice (MLflow and quality.json); `medimgen
    evaluate` reports it (and not with --segmenter none); a named segmenter that is absent stops the run before it
    trains."""
    from mlflow import MlflowClient

    from medimgen.core.requests import ModelRef
    from medimgen.evaluation.api import evaluate
    from medimgen.training.api import RunSetup, train
    from tests.training_helpers import tiny_overrides

    folder = _brief_nnunet(ANISO_3D, tmp_path, monkeypatch)
    sets = tiny_overrides(workspace["config"].get("2d"), epochs=1) + ["controlnet.base=ddpm"]
    missing = tmp_path / "no_such_nnunet"
    with pytest.raises(MedimgenError, match="no_such_nnunet.*missing"):
        train("controlnet", ANISO_3D, "train-val-test", "2d", overrides=sets + [f"controlnet.segmenter=nnunet:{missing}"],
              echo=lambda *_: None, setup=RunSetup(run_root=tmp_path / "refused"))
    assert not (tmp_path / "refused" / "checkpoints" / "last.pt").exists()
    result = train("controlnet", ANISO_3D, "train-val-test", "2d", overrides=sets + [f"controlnet.segmenter=nnunet:{folder}"],
                   echo=lambda *_: None, setup=RunSetup(run_root=tmp_path / "cn"))
    saved = json.loads((tmp_path / "cn" / "quality.json").read_text())["metrics"]
    logged = MlflowClient().get_run(result.mlflow_run_id).data.metrics
    labels = workspace["config"].get("2d").data.label_names
    for key in ["quality/follow_mask_dice"] + [f"quality/follow_mask_dice_{n}" for n in labels]:
        if key in saved:  # a label neither the maps nor the segmentations show has no Dice
            assert 0 <= saved[key] <= 1 and logged[key] == pytest.approx(saved[key])
    assert "quality/follow_mask_dice" in saved
    report = evaluate(ModelRef(str(tmp_path / "cn"), dim="2d", checkpoint="last"), real="val", num_samples=2,
                      extractor="none", output=tmp_path / "eval.json", track=False)
    assert report["segmenter"] == f"nnunet:{folder.name}/fold_0" and 0 <= report["scores"]["follow_mask_dice"] <= 1
    none = evaluate(ModelRef(str(tmp_path / "cn"), dim="2d", checkpoint="last"), real="val", num_samples=2,
                    extractor="none", output=tmp_path / "eval2.json", track=False, segmenter="none")
    assert none["segmenter"] is None and not any(k.startswith("follow_mask") for k in none["scores"])
