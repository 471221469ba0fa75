"""Bad inputs of every kind through the real CLI: exit 2 (or 1), one line on stderr naming the key or file,
no traceback, and nothing written or overwritten.

Each case is one row: the command line (``{name}`` placeholders are files made by ``_make``), the text the
one line must contain, and the environment: ``session`` (the planned session datasets 201/202), ``empty``
(empty nnU-Net folders) or ``bare`` (no nnU-Net/medimgen variable set at all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medimgen.cli import main
from tests.conftest import ANISO_3D, FLAT_2D, plan_once

_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "medimgen_results")
NO_GPU = not torch.cuda.is_available()


# ----------------------------------------------------------------------------- files the rows refer to
def _nifti(path: Path, shape=(16, 16, 8)) -> None:
    data = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        _nifti(folder / f"scan{i}.nii.gz")
    return folder


def _edited(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _dataset_config(roots) -> str:
    return (roots["nnUNet_preprocessed"] / "Dataset201_Aniso" / "medimgen_config.yaml").read_text()


def _make(name: str, tmp: Path, roots) -> Path:
    """The file or folder a row's ``{name}`` stands for (made before the 'before' snapshot)."""
    path = tmp / name
    if name == "missing_yaml":
        return path.with_suffix(".yaml")
    if name == "malformed_yaml":
        path.write_text("3d: [unclosed\n  train_ddpm: 1\n")
    elif name == "epochs0_yaml":  # an edited copy of the dataset's config: 3d.train_ddpm.epochs: 0
        text = _dataset_config(roots)
        head, _, tail = text.partition("\n3d:\n")
        path.write_text(head + "\n3d:\n" + _edited(tail, "  train_ddpm:\n    epochs: ", "  train_ddpm:\n    epochs: 0  #"))
    elif name == "lr_yaml":  # 3d.train_autoencoder.learning_rate: -0.001
        text = _dataset_config(roots)
        head, _, tail = text.partition("\n3d:\n")
        i = tail.index("  train_autoencoder:\n")
        j = tail.index("    learning_rate: ", i)
        path.write_text(head + "\n3d:\n" + tail[:j] + "    learning_rate: -0.001  #" + tail[j + len("    learning_rate: "):])
    elif name == "strides_yaml":  # 3d.ddpm_unet.strides with a 3
        text = _dataset_config(roots)
        head, _, tail = text.partition("\n3d:\n")
        i = tail.index("  ddpm_unet:\n")
        j = tail.index("    strides: [[", i)
        path.write_text(head + "\n3d:\n" + tail[:j] + "    strides: [[3, " + tail[j + len("    strides: [["):])
    elif name == "images":
        _images(path)
    elif name == "mixed_2d":  # a 2D image among 3D ones
        _images(path)
        _nifti(path / "scan9.nii.gz", (16, 16))
    elif name == "corrupt":
        _images(path)
        (path / "scan1.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    elif name in ("empty_dir", "not_a_run"):
        path.mkdir()
    elif name == "space_typo":
        path.write_text("autoencoder:\n  losses.kl_wieght: {type: float, low: 1.0e-8, high: 1.0e-4}\n")
    else:  # pragma: no cover - a typo in the table
        raise KeyError(name)
    return path


# ----------------------------------------------------------------------------- the table
def row(env, args, expect, *marks, id=None):
    return pytest.param(env, args, expect, marks=list(marks), id=id or " ".join(args)[:80])


ROWS = [
    # --- missing environment variables
    row("bare", ["plan", "-d", "201"], "environment variable nnUNet_preprocessed is not set"),
    row("bare", ["demo-data", "-d", "300"], "environment variable nnUNet_raw is not set"),
    row("bare", ["import", "{images}", "-d", "300", "--name", "X"], "environment variable nnUNet_raw is not set"),
    row("bare", ["train", "ddpm", "201", "train-val-test", "3d"], "environment variable nnUNet_preprocessed is not set"),
    row("bare", ["sample", "201", "3d", "2", "{empty_dir}"], "environment variable"),
    row("bare", ["tune", "-d", "201", "--model", "autoencoder"], "environment variable nnUNet_preprocessed is not set"),
    # --- wrong dataset ids
    row("empty", ["plan", "-d", "999"], "dataset 999 not found"),
    row("empty", ["plan", "-d", "abc"], "dataset id must be a number"),
    row("empty", ["train", "autoencoder", "998", "train-val-test", "3d"], "dataset 998 not found"),
    row("empty", ["sample", "997", "3d", "2", "{empty_dir}"], "997"),
    row("empty", ["evaluate", "996", "--model", "ldm", "--no-mlflow"], "996"),
    row("empty", ["tune", "-d", "995", "--model", "autoencoder"], "dataset 995 not found"),
    row("session", ["train", "ldm", "201", "train-val-test", "3d"], "no trained autoencoder"),
    # --- corrupt and missing files
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--config", "{missing_yaml}"], "missing_yaml.yaml"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--config", "{malformed_yaml}"], "not valid YAML"),
    row("session", ["tune", "-d", "201", "--model", "autoencoder", "--space", "{missing_yaml}"], "missing_yaml.yaml"),
    row("session", ["tune", "-d", "201", "--model", "autoencoder", "--space", "{space_typo}"], "kl_wieght"),
    row("empty", ["import", "{corrupt}", "-d", "301", "--name", "Corrupt"], "scan1.nii.gz"),
    row("empty", ["import", "{mixed_2d}", "-d", "302", "--name", "Mixed"], "scan9.nii.gz is 2D"),
    row("empty", ["import", "{empty_dir}", "-d", "303", "--name", "Nothing"], "no NIfTI images"),
    row("empty", ["import", "{images}", "-d", "304", "--name", "X", "--labels", "{missing_yaml}"], "missing_yaml.yaml"),
    row("session", ["sample", "201", "3d", "2", "{empty_dir}", "--model", "{not_a_run}"], "not_a_run"),
    row("session", ["evaluate", "201", "--model", "ldm", "--weights", "{missing_yaml}"], "missing_yaml.yaml"),
    row("session", ["register", "{missing_yaml}"], "missing_yaml.yaml"),
    # --- impossible config values: --set ...
    row("session", ["plan", "-d", "201", "--set", "train_ddpm.epochs=0"], "train_ddpm.epochs': must be an integer >= 1"),
    row("session", ["plan", "-d", "201", "--set", "3d.train_ddpm.batch_size=0"], "'3d.train_ddpm.batch_size': must be an integer >= 1"),
    row("session", ["plan", "-d", "201", "--set", "3d.autoencoder.strides=[[1,2,2],[3,2,2]]"], "'3d.autoencoder.strides[1]': must be 1 or 2"),
    row("session", ["plan", "-d", "201", "--set", "data.num_workers=-2"], "data.num_workers': must be an integer >= 0"),
    row("session", ["plan", "-d", "201", "--set", "3d.data.image_size=[17,49,49]"], "'3d.data.image_size': must be divisible"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--set", "train_ddpm.epochs=0"],
        "'train_ddpm.epochs': must be an integer >= 1, got 0"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--overrides", "train_ddpm.epochs=-1"],
        "'train_ddpm.epochs': must be an integer >= 1, got -1"),
    row("session", ["train", "autoencoder", "201", "train-val-test", "3d", "--set", "train_autoencoder.iterations_per_epoch=0"],
        "'train_autoencoder.iterations_per_epoch': must be an integer >= 1"),
    row("session", ["train", "autoencoder", "201", "train-val-test", "3d", "--overrides",
                    "train_autoencoder.grad_accumulation_steps=0"], "grad_accumulation_steps': must be an integer >= 1"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--set", "train_ddpm.learning_rate=-1e-4"],
        "'train_ddpm.learning_rate': must be a number > 0"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--set", "data.num_workers=-1"], "'data.num_workers': must be"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--set", "ddpm_unet.strides=[[1,2,2]]"],
        "'ddpm_unet.strides': "),
    row("session", ["train", "ddpm", "202", "train-val-test", "2d", "--set", "data.image_size=[63,63]"],
        "'data.image_size': must be divisible per axis by data.size_divisor"),
    row("session", ["tune", "-d", "201", "--model", "autoencoder", "--set", "train_autoencoder.batch_size=0"],
        "'train_autoencoder.batch_size': must be an integer >= 1"),
    # --- ... and in an edited YAML
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--config", "{epochs0_yaml}"],
        "config key '3d.train_ddpm.epochs': must be an integer >= 1, got 0"),
    row("session", ["train", "autoencoder", "201", "train-val-test", "3d", "--config", "{lr_yaml}"],
        "config key '3d.train_autoencoder.learning_rate': must be a number > 0"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--config", "{strides_yaml}"],
        "config key '3d.ddpm_unet.strides[0]': must be 1 or 2"),
    # --- bad command-line options
    row("session", ["plan", "-d", "201", "--gpu-memory", "0"], "--gpu-memory"),
    row("session", ["plan", "-d", "201", "--gpu-memory", "-4"], "--gpu-memory"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--device", "gpu"], "device 'gpu' is not one of"),
    row("session", ["train", "ddpm", "201", "train-val-test", "3d", "--device", "cuda"], "no CUDA GPU",
        pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    row("session", ["train", "ddpm", "201", "5-fold", "3d", "--fold", "7"], "--fold"),
    row("session", ["train", "ddpm", "201", "train-val-test", "4d"], "MODEL_TYPE"),
    row("session", ["sample", "201", "3d", "2", "{empty_dir}", "--steps", "0"], "--steps"),
    row("session", ["sample", "201", "3d", "2", "{empty_dir}", "--batch-size", "0"], "--batch-size"),
    row("session", ["sample", "201", "3d", "0", "{empty_dir}"], "NUM_IMAGES"),
    row("session", ["sample", "201", "3d", "2", "{empty_dir}", "--device", "cuda:x"], "device 'cuda:x'"),
    row("session", ["sample", "201", "3d", "2", "{empty_dir}", "--scheduler", "euler"], "--scheduler"),
    row("session", ["evaluate", "201", "--model", "ldm", "-k", "0"], "--num-samples"),
    row("session", ["evaluate", "201", "--model", "ldm", "--device", "tpu"], "device 'tpu'"),
    row("session", ["evaluate", "201", "--model", "ldm", "--real", "everything"], "--real"),
    row("session", ["tune", "-d", "201", "--model", "autoencoder", "--trials", "-1"], "--trials must be 0 or more"),
    row("session", ["tune", "-d", "201", "--model", "autoencoder", "--timeout", "0"], "--timeout"),
    row("session", ["tune", "-d", "201", "--model", "gan"], "--model"),
    row("session", ["tune", "-d", "201", "--model", "autoencoder", "--device", "gpu"], "device 'gpu'"),
    row("empty", ["import", "{images}", "-d", "0", "--name", "X"], "1..999"),
    row("empty", ["import", "{images}", "-d", "305", "--name", "a/b"], "--name 'a/b'"),
    row("empty", ["import", "{images}", "-d", "306", "--name", "X", "--channel-names", "T1,T2"], "2 channel names given for 1"),
    row("empty", ["demo-data", "-d", "307", "--shape", "0,0"], "shape must be >= 1 voxel"),
    row("empty", ["demo-data", "-d", "308", "--shape", "a,b"], "--shape must be comma-separated integers"),
    row("empty", ["demo-data", "-d", "309", "--shape", "16,16,16,16"], "2 or 3 values"),
    row("empty", ["demo-data", "-d", "310", "--spacing", "0,1,1"], "spacing > 0"),
    row("empty", ["demo-data", "-d", "311", "--cases", "1"], "--cases"),
    row("empty", ["demo-data", "-d", "312", "--channels", "0"], "--channels"),
    row("empty", ["demo-data", "-d", "0"], "--dataset"),
]


# ----------------------------------------------------------------------------- running a row
@pytest.fixture(scope="module")
def planned(nnunet_roots):
    """The session datasets with a medimgen_config.yaml and their train-val-test split (made once if no
    other test has: the split file is written by the first training of a dataset, which is not a bad input)."""
    from medimgen.data.cases import open_cases
    from medimgen.data.splits import get_split
    from medimgen.nnunet.plans import DatasetPlans

    for ds, dim in ((ANISO_3D, "3d"), (FLAT_2D, "2d")):
        plans = DatasetPlans.from_id(ds)
        plan_once(ds)
        get_split(plans.folder, open_cases(plans.preprocessed_folder(dim)).identifiers, "train-val-test")
    return nnunet_roots


def _snapshot(*folders: Path) -> dict[str, int]:
    """Every file and folder under ``folders`` with its modification time (what 'nothing written' compares)."""
    return {str(p): p.stat().st_mtime_ns for f in folders if f.exists() for p in [f, *f.rglob("*")]}


@pytest.fixture
def place(request, tmp_path, monkeypatch):
    """(environment roots, folder of the row's files, folders to watch) for the row's environment."""
    env = request.param
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # an accidental ./mlflow.db or ./mlruns would show up here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    if env == "session":
        roots = dict(request.getfixturevalue("planned"))
        roots["medimgen_results"] = tmp_path / "medimgen_results"
        roots["medimgen_results"].mkdir()
        for k, v in roots.items():
            monkeypatch.setenv(k, str(v))
        watch = [roots["nnUNet_raw"], roots["nnUNet_preprocessed"], roots["nnUNet_results"], roots["medimgen_results"]]
    elif env == "empty":
        roots = request.getfixturevalue("empty_env")
        watch = list(roots.values())
    else:
        roots = {}
        for k in _VARS:
            monkeypatch.delenv(k, raising=False)
        watch = []
    files = tmp_path / "files"
    files.mkdir()
    return roots, files, [*watch, work, files]


def _fill(args: list[str], files: Path, roots) -> list[str]:
    out = []
    for a in args:
        if a.startswith("{") and a.endswith("}"):
            a = str(_make(a[1:-1], files, roots))
        out.append(a)
    return out


def _assert_one_line_error(exit_code: int, stderr: str, output: str, expect: str) -> None:
    assert exit_code in (1, 2), output
    assert "Traceback" not in output, output
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and expect in lines[0], lines[0]


@pytest.mark.parametrize("place,args,expect", ROWS, indirect=["place"])
def test_bad_input_is_one_line_and_writes_nothing(place, args, expect):
    roots, files, watch = place
    argv = _fill(args, files, roots)
    before = _snapshot(*watch)
    r = CliRunner().invoke(main, argv)
    assert not (r.exception and not isinstance(r.exception, SystemExit)), repr(r.exception)
    _assert_one_line_error(r.exit_code, r.stderr, r.output, expect)
    assert _snapshot(*watch) == before, "something was written or touched"


# ----------------------------------------------------------------------------- a few as real processes
@pytest.mark.parametrize("args,expect", [
    (["demo-data", "-d", "320", "--shape", "0,0"], "shape must be >= 1 voxel"),
    (["sample", "201", "3d", "2", "out", "--steps", "0"], "--steps"),
    (["train", "ddpm", "201", "train-val-test", "3d", "--set", "train_ddpm.epochs=0"], "'train_ddpm.epochs': must be"),
])
def test_bad_input_in_a_real_process(planned, tmp_path, args, expect):
    env = {**os.environ, **{k: str(v) for k, v in planned.items()}, "medimgen_results": str(tmp_path / "results"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (tmp_path / "results").mkdir()
    before = _snapshot(tmp_path, planned["nnUNet_raw"], planned["nnUNet_preprocessed"])
    exe = Path(sys.executable).parent / "medimgen"
    p = subprocess.run([str(exe), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    _assert_one_line_error(p.returncode, p.stderr, p.stdout + p.stderr, expect)
    assert _snapshot(tmp_path, planned["nnUNet_raw"], planned["nnUNet_preprocessed"]) == before


def test_device_index_must_exist(monkeypatch):
    """cuda:N beyond this machine's GPUs is named (faked GPU count: the rule, not the hardware, is tested)."""
    from medimgen.core.devices import check_device, resolve_device
    from medimgen.core.errors import MedimgenError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1" and check_device("cuda") == "cuda"
    with pytest.raises(MedimgenError, match=r"device 'cuda:2': this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MedimgenError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    assert resolve_device(None) == torch.device("cpu")
