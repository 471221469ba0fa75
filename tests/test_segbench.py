"""`medimgen benchmark-segmentation`: the leakage checks and the table on nnU-Net summary files (fast), and the whole
benchmark on a tiny 2D dataset with nnU-Net's own nnUNetv2_train and a 2 x 10-iteration trainer (slow)."""

from __future__ import annotations

import json
import math

import pytest

from medimgen.core.errors import MedimgenError
from medimgen.benchmark.segmentation import MEAN, check_splits, compare, label_names, markdown_table, read_summary

REAL = [f"case_{i:03d}" for i in range(6)]
SYNTH = ["synth_0000", "synth_0001"]
REAL_FOLD = {"train": REAL[2:], "val": REAL[:2]}


def test_splits_check_passes_a_mixed_fold_and_returns_its_real_validation_cases():
    mixed = {"train": [*REAL[2:], *SYNTH], "val": list(reversed(REAL[:2]))}
    assert check_splits(REAL_FOLD, mixed, set(REAL), 0) == REAL[:2]


def test_leakage_check_refuses_a_synthetic_case_in_validation():
    mixed = {"train": [*REAL[2:], SYNTH[1]], "val": [*REAL[:2], SYNTH[0]]}
    with pytest.raises(MedimgenError, match="synth_0000.*synthetic case would be scored") as e:
        check_splits(REAL_FOLD, mixed, set(REAL), 0)
    assert "\n" not in str(e.value)
    swapped = {"train": [*REAL[:1], *REAL[3:], *SYNTH], "val": [REAL[1], REAL[2]]}  # real only, other cases
    with pytest.raises(MedimgenError, match="validates on different real cases"):
        check_splits(REAL_FOLD, swapped, set(REAL), 0)
    fewer = {"train": [*REAL[3:], *SYNTH], "val": REAL[:2]}  # a real training case missing from the mixed arm
    with pytest.raises(MedimgenError, match="trains on different real cases"):
        check_splits(REAL_FOLD, fewer, set(REAL), 0)


def _summary(folder, dice: dict[str, dict[str, float]]):
    """nnU-Net's validation/summary.json for per-case Dice (written by nnU-Net's own writer)."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json

    per_case = [{"reference_file": f"/pre/gt_segmentations/{case}.nii.gz",
                 "prediction_file": f"{folder}/{case}.nii.gz",
                 "metrics": {int(k): {"Dice": v, "IoU": v} for k, v in labels.items()}}
                for case, labels in dice.items()]
    mean = {int(k): {"Dice": float("nan")} for k in next(iter(dice.values()))}
    folder.mkdir(parents=True, exist_ok=True)
    save_summary_json({"metric_per_case": per_case, "mean": mean, "foreground_mean": {"Dice": 0.0}},
                      str(folder / "summary.json"))
    return folder / "summary.json"


def test_table_from_nnunet_summaries(tmp_path):
    names = label_names({"labels": {"background": 0, "organ": 1, "lesion": 2}})
    assert names == {"1": "organ", "2": "lesion"}
    real = {"case_000": {"1": 0.80, "2": 0.40}, "case_001": {"1": 0.70, "2": float("nan")}, "case_002": {"1": 0.90, "2": 0.20}}
    gain = {"case_000": 0.05, "case_001": -0.02, "case_002": 0.03}
    mixed = {c: {"1": d["1"] + gain[c], "2": d["2"]} for c, d in real.items()}
    a = read_summary(_summary(tmp_path / "a", real), names)
    b = read_summary(_summary(tmp_path / "b", mixed), names)
    assert sorted(a) == sorted(real) and math.isnan(a["case_001"]["lesion"])
    rows = compare(a, b, ["organ", "lesion"])
    assert list(rows) == ["organ", "lesion", MEAN]
    organ = rows["organ"]
    assert organ["real"] == pytest.approx(0.8) and organ["real+synthetic"] == pytest.approx(0.82)
    assert organ["difference"] == pytest.approx(0.02)
    s = organ["per_case_difference"]
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.02) and s["min"] == pytest.approx(-0.02)
    assert s["max"] == pytest.approx(0.05) and s["std"] == pytest.approx(0.0360555, rel=1e-4)
    assert -0.02 - 1e-9 <= s["ci95"][0] < 0.02 < s["ci95"][1] <= 0.05 + 1e-9  # within the per-case range
    lesion = rows["lesion"]  # NaN (label absent) left out, as nnU-Net's mean does
    assert lesion["real"] == pytest.approx(0.3) and lesion["difference"] == pytest.approx(0.0)
    assert lesion["per_case_difference"]["n"] == 2
    result = {"dataset": "Dataset240_Seg", "mixed_dataset": "Dataset241_SegMixed", "configuration": "2d", "fold": 0,
              "trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "real_training_cases": 4, "synthetic_cases": 2,
              "validation_cases": sorted(real), "labels": rows}
    table = markdown_table(result)
    lines = table.splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:4] == ["label", "Dice real", "Dice real+synthetic", "difference"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:7]]
    assert [r[0] for r in body] == ["organ", "lesion", MEAN] and all(len(r) == len(header) for r in body)
    assert body[0][1:4] == ["80.00", "82.00", "+2.00"]
    with pytest.raises(MedimgenError, match="different cases"):
        compare(a, {c: v for c, v in b.items() if c != "case_002"}, ["organ"])
    assert label_names({"labels": {"background": 0, "organ": 1, "ignore": 2}}) == {"1": "organ"}  # never scored


def test_broken_nnunet_files_are_one_line(tmp_path):
    from medimgen.benchmark.segmentation import _fold_of

    bad = tmp_path / "summary.json"
    bad.write_text("{not json")
    with pytest.raises(MedimgenError, match="cannot read .*summary.json"):
        read_summary(bad, {})
    bad.write_text(json.dumps({"metric_per_case": [{"metrics": {}}]}))
    with pytest.raises(MedimgenError, match="not nnU-Net's validation summary"):
        read_summary(bad, {})
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["a"]}]))
    with pytest.raises(MedimgenError, match="not nnU-Net's splits file"):
        _fold_of(splits, 0)


def _splits(dataset_folder):
    return json.loads((dataset_folder / "splits_final.json").read_text())


@pytest.mark.slow
def test_benchmark_end_to_end_on_a_tiny_2d_dataset(tmp_path, monkeypatch):
    """A joint DDPM trained on fold 0 exports 2 image+label pairs; nnU-Net (nnUNetv2_train, 2 x 10 iterations,
    CPU) trains both arms; both are validated on fold 0's real cases; the table has both arms and every label;
    MLflow has the parent run and one child per arm. A second call reuses everything."""
    from click.testing import CliRunner

    from medimgen.cli import main
    from medimgen.nnunet.commands import plan_and_preprocess
    from medimgen.planning import plan_dataset
    from medimgen.nnunet.synthetic import make_synthetic_dataset
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    for var, value in (("nnUNet_n_proc_DA", "1"), ("nnUNet_def_n_proc", "1"), ("nnUNet_compile", "false"),
                       ("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")):
        monkeypatch.setenv(var, value)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    make_synthetic_dataset(tmp_path / "nnUNet_raw", 240, "Seg", num_cases=6, shape=(48, 48), spacing=(1.0, 1.0), seed=3)
    plan_and_preprocess(240, configurations=("2d",), quiet=True)
    cfg = plan_dataset(240, force=True).config.get("2d")
    assert cfg.data.generate_labels
    ddpm = train("ddpm", 240, "5-fold", "2d", fold=0, overrides=tiny_overrides(cfg, epochs=1), echo=lambda *_: None)

    args = ["benchmark-segmentation", "-d", "240", "-t", "241", "-c", "2d", "--trainer", "nnUNetTrainerMedimgenTiny",
            "--steps", "2", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--synthetic", "2"])
    assert r.exit_code == 0, r.output
    pre = tmp_path / "nnUNet_preprocessed"
    real_val = sorted(_splits(pre / "Dataset240_Seg")[0]["val"])
    mixed_fold = _splits(pre / "Dataset241_SegMixed")[0]
    assert sorted(mixed_fold["val"]) == real_val and {"synth_0000", "synth_0001"} <= set(mixed_fold["train"])
    out = next((tmp_path / "medimgen_results" / "Dataset240_Seg" / "segbench").iterdir())
    result = json.loads((out / "segbench.json").read_text())
    assert result["validation_cases"] == real_val and result["synthetic_cases"] == 2
    for arm in ("real", "real+synthetic"):  # nnU-Net's own validation scored the same real cases in both arms
        summary = json.loads(open(result["arms"][arm]["summary"]).read())
        scored = sorted(e["reference_file"].rsplit("/", 1)[1][:-len(".nii.gz")] for e in summary["metric_per_case"])
        assert scored == real_val
        assert sorted(result["arms"][arm]["per_case_dice"]) == real_val
    assert result["arms"]["real+synthetic"]["dataset"] == "Dataset241_SegMixed"
    assert list(result["labels"]) == ["organ", "lesion", MEAN]
    for row in result["labels"].values():
        for arm in ("real", "real+synthetic"):
            assert row[arm] is None or 0 <= row[arm] <= 1
        if row["real"] is not None and row["real+synthetic"] is not None:
            assert row["difference"] == pytest.approx(row["real+synthetic"] - row["real"])
    table = (out / "segbench.md").read_text()
    assert "| label | Dice real | Dice real+synthetic | difference" in table and table in r.output
    assert all(f"| {label} |" in table for label in ("organ", "lesion", MEAN))

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = mlflow.get_run(result_run := r.output.rsplit("MLflow run ", 1)[1].split()[0])
    assert parent.data.params["trainer"] == "nnUNetTrainerMedimgenTiny" and result_run
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")
    assert sorted(c.info.run_name for c in children) == ["real", "real_synthetic"]

    again = CliRunner().invoke(main, [*args, "--no-mlflow"])  # reuses the dataset and both trained arms
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 3
    assert json.loads((out / "segbench.json").read_text())["labels"] == result["labels"]
    bad = CliRunner().invoke(main, [*args, "--synthetic", "3", "--no-mlflow"])
    assert bad.exit_code == 2 and "holds 2 synthetic cases" in bad.output and "Traceback" not in bad.output
    # the mixed dataset removed, its nnU-Net trainings left: a new export would be scored by the old trainings
    import shutil

    for root in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.rmtree(tmp_path / root / "Dataset241_SegMixed")
    stale = CliRunner().invoke(main, [*args, "--synthetic", "3", "--no-mlflow"])
    assert stale.exit_code == 2 and "earlier dataset 241" in stale.output, stale.output
    assert not (tmp_path / "nnUNet_raw" / "Dataset241_SegMixed").exists()

    # a generator trained on fold 1 saw fold 0's validation cases: refused before anything is sampled

    shutil.copytree(ddpm.run_dir, tmp_path / "elsewhere" / "fold_1")
    leak = CliRunner().invoke(main, ["benchmark-segmentation", "-d", "240", "-t", "242", "--synthetic", "2", "-c", "2d",
                                     "--model", str(tmp_path / "elsewhere" / "fold_1"), "--no-mlflow"])
    assert leak.exit_code == 2 and "trained on 2 of the 2 validation cases of fold 0" in leak.output, leak.output
    assert not list((tmp_path / "nnUNet_raw").glob("Dataset242_*"))


def test_benchmark_bad_input_is_one_line(empty_env):
    from click.testing import CliRunner

    from medimgen.cli import main

    r = CliRunner().invoke(main, ["benchmark-segmentation", "-d", "77", "-t", "78", "--synthetic", "2"])
    assert r.exit_code == 2 and "dataset 077 not found" in r.output and "Traceback" not in r.output
