"""Environment folders and dataset lookup: one clear line for each kind of bad input."""

from __future__ import annotations

import pytest

from medimgen.core import paths
from medimgen.core.errors import MedimgenError


@pytest.mark.parametrize("var", paths.ENV_VARS)
def test_unset_env_var_names_it(var, monkeypatch):
    monkeypatch.delenv(var, raising=False)
    getter = {"nnUNet_raw": paths.nnunet_raw, "nnUNet_preprocessed": paths.nnunet_preprocessed,
              "nnUNet_results": paths.nnunet_results, "medimgen_results": paths.medimgen_results}[var]
    with pytest.raises(MedimgenError, match=rf"environment variable {var} is not set: run `export {var}="):
        getter()


def test_env_read_lazily(monkeypatch, tmp_path):
    monkeypatch.setenv("medimgen_results", str(tmp_path))
    assert paths.medimgen_results() == tmp_path
    monkeypatch.setenv("medimgen_results", str(tmp_path / "other"))
    assert paths.medimgen_results() == tmp_path / "other"


def test_unknown_dataset_id(empty_env):
    with pytest.raises(MedimgenError, match="dataset 042 not found"):
        paths.preprocessed_dataset_dir(42)


def test_bad_dataset_id_text(empty_env):
    with pytest.raises(MedimgenError, match="dataset id must be a number"):
        paths.dataset_name_from_id("abc")


def test_not_preprocessed(empty_env):
    (empty_env["nnUNet_raw"] / "Dataset007_Raw").mkdir()
    with pytest.raises(MedimgenError, match=r"Dataset007_Raw is not preprocessed yet .*nnUNetv2_plan_and_preprocess -d 7"):
        paths.preprocessed_dataset_dir(7)


def test_lookup_by_id_and_name(empty_env):
    (empty_env["nnUNet_preprocessed"] / "Dataset012_Knee").mkdir()
    assert paths.dataset_name_from_id(12) == "Dataset012_Knee"
    assert paths.dataset_name_from_id("012") == "Dataset012_Knee"
    assert paths.dataset_name_from_id("Dataset012_Knee") == "Dataset012_Knee"
