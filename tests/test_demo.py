"""The README's demo, end to end (slow: about 7 minutes on a 2-core CPU; run with `make test-all`)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    from medimgen.demo import run_demo

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    out = run_demo(tmp_path / "ws", echo=lambda *_: None, progress=False)
    assert len(out["samples"]) == 4 and all(p.is_file() for p in out["samples"])
    report = json.loads(open(out["evaluation"]["json"]).read())
    assert report["feature_extractor"].startswith("nnunet-encoder:nnUNetTrainerMedimgenDemo")
    assert report["scores"]["fid.nnunet_encoder"] >= 0
    assert out["tuning"].trials == 2
    assert (tmp_path / "mlflow.db").is_file()
    mixed = out["mixed_dataset"]  # the demo ends with a real + synthetic nnU-Net dataset
    assert len(list((mixed / "labelsTr").glob("synth_*.nii.gz"))) == 4
    assert json.loads((mixed / "dataset.json").read_text())["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    conditioned = out["conditioned"]  # and with images made for given label maps (the ControlNet)
    assert len(conditioned) == 2
    assert all(f.with_name(f.name.replace(".nii.gz", "_label.nii.gz")).is_file() for f in conditioned)
