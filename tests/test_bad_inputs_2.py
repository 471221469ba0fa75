"""Issue 24's cases: names, paths, numbers, geometry, YAML and faults, each through the real CLI.

Every row asserts one line on stderr (``Error: ...`` holding the expected text), exit 1 or 2, no traceback, and
that nothing changed in the watched folders (the nnU-Net roots, medimgen_results, the working folder and the
row's own files). The environments and the snapshot are those of tests/test_bad_inputs.py; ``trained`` rows
also get a copy of a tiny trained DDPM run of the 2D dataset (``{run}`` and edited copies of it).
Legitimate inputs next to them give a correct result (tests at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.core.errors import MedimgenError
from tests.conftest import ANISO_3D, FLAT_2D
from tests.test_bad_inputs import _assert_one_line_error, _snapshot, place, planned  # noqa: F401 - fixtures

DEEP = "[" * 3000 + "]" * 3000


# ----------------------------------------------------------------------------- a trained run to misuse
@pytest.fixture(scope="module")
def trained(planned, tmp_path_factory):  # noqa: F811 - the imported fixture
    """A 1-epoch tiny DDPM of the 2D dataset (its own results folder and MLflow database)."""
    from medimgen.config import load_config
    from medimgen.core.paths import config_path
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    base = tmp_path_factory.mktemp("bad2_train")
    mp = pytest.MonkeyPatch()
    mp.setenv("medimgen_results", str(base / "results"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
    mp.chdir(base)
    try:
        cfg = load_config(config_path(FLAT_2D)).get("2d")
        sets = [*tiny_overrides(cfg, epochs=1), "tracking.log_models=false"]
        result = train("ddpm", FLAT_2D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None)
    finally:
        mp.undo()
    return Path(result.run_dir)


def _run_copy(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _nifti(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _images(folder: Path, n: int = 3, shape=(24, 24, 8)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        _nifti(folder / f"scan{i}.nii.gz", rng.normal(100, 10, shape).astype(np.float32))
    return folder


def _labels(folder: Path, values, n: int = 3, shape=(24, 24, 8)) -> Path:
    folder.mkdir()
    for i in range(n):
        seg = np.zeros(shape, np.float32)
        seg[4:12, 4:12, 2:6] = values[i % len(values)]
        _nifti(folder / f"scan{i}.nii.gz", seg)
    return folder


def _make(name: str, tmp: Path, roots, request) -> Path:
    """The file or folder a row's ``{name}`` stands for (made before the 'before' snapshot)."""
    path = tmp / name
    if name == "victim":  # an existing raw dataset that must not be touched (Dataset560_Victim, id 560)
        victim = roots["nnUNet_raw"] / "Dataset560_Victim"
        _images(victim / "imagesTr", n=1)
        (victim / "dataset.json").write_text("{}")
        return victim
    if name == "existing":  # demo-data's own target exists already
        existing = roots["nnUNet_raw"] / "Dataset563_Phantom"
        existing.mkdir()
        (existing / "dataset.json").write_text("{}")
        return existing
    if name == "images":
        return _images(path)
    if name == "nan_images":
        _images(path)
        data = np.full((24, 24, 8), 5.0, np.float32)
        data[3, 3, 3] = np.nan
        _nifti(path / "scan1.nii.gz", data)
    elif name == "four_d_among_3d":
        _images(path)
        _nifti(path / "scan9.nii.gz", np.ones((24, 24, 8, 2), np.float32))
    elif name in ("labels_7", "labels_neg", "labels_half"):
        return _labels(path, {"labels_7": [1, 7], "labels_neg": [1, -3], "labels_half": [0.5]}[name])
    elif name == "labels_small":
        return _labels(path, [1], shape=(20, 20, 8))
    elif name == "dup_yaml":
        path = path.with_suffix(".yaml")
        path.write_text("medimgen_version: x\ndataset: {}\n2d:\n  train_ddpm:\n    epochs: 1\n    epochs: 2000\n")
    elif name == "bomb_yaml":
        path = path.with_suffix(".yaml")
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
        path.write_text("\n".join(lines) + "\n")
    elif name == "random_yaml":
        path = path.with_suffix(".yaml")
        path.write_bytes(np.random.default_rng(0).integers(128, 256, 4096, dtype=np.uint8).tobytes())
    elif name == "deep_yaml":
        path = path.with_suffix(".yaml")
        path.write_text("a: " + DEEP + "\n")
    elif name == "empty_dir":
        path.mkdir()
    elif name == "run":
        return _run_copy(request.getfixturevalue("trained"), path)
    elif name == "run_edited_cfg":  # config.yaml edited after training: another image size
        run = _run_copy(request.getfixturevalue("trained"), path)
        text = (run / "config.yaml").read_text()
        size = [int(v) for v in text.split("image_size: [", 1)[1].split("]", 1)[0].split(",")]
        (run / "config.yaml").write_text(text.replace(f"image_size: [{size[0]}, {size[1]}]",
                                                      f"image_size: [{size[0] // 2}, {size[1] // 2}]", 1))
    elif name in ("run_nan_spacing", "run_zero_spacing", "run_zero_direction", "run_bad_transpose", "run_inf_origin"):
        run = _run_copy(request.getfixturevalue("trained"), path)
        g = json.loads((run / "geometry.json").read_text())
        n = len(g["spacing"])
        change = {"run_nan_spacing": {"spacing": [float("nan")] * n},
                  "run_zero_spacing": {"spacing": [0.0] * n},
                  "run_zero_direction": {"direction": [0.0] * 9, "origin": [0.0, 0.0, 0.0]},
                  "run_bad_transpose": {"transpose_backward": [7, 7, 7]},
                  "run_inf_origin": {"direction": [1.0, 0, 0, 0, 1, 0, 0, 0, 1], "origin": [1e308 * 10, 0, 0]}}[name]
        g.update(change)
        (run / "geometry.json").write_text(json.dumps(g))
    else:  # pragma: no cover - a typo in the table
        raise KeyError(name)
    return path


def _fill(args: list[str], files: Path, roots, request) -> list[str]:
    out = []
    for a in args:
        if a.startswith("{+") and a.endswith("}"):  # made (part of the 'before' state), not an argument
            _make(a[2:-1], files, roots, request)
            continue
        if a.startswith("{") and a.endswith("}"):
            a = str(_make(a[1:-1], files, roots, request))
        elif "{files}" in a:
            a = a.replace("{files}", str(files))
        out.append(a)
    return out


def row(env, args, expect, *marks, id=None):
    return pytest.param(env, args, expect, marks=list(marks), id=id or " ".join(args)[:80])


TRAIN_2D = ["train", "ddpm", str(FLAT_2D), "train-val-test", "2d"]
TRAIN_3D = ["train", "ddpm", str(ANISO_3D), "train-val-test", "3d"]
PLAN = ["plan", "-d", str(ANISO_3D)]

ROWS = [
    # --- names are names; nothing escapes its root; an existing dataset is never overwritten or merged into
    row("empty", ["demo-data", "-d", "562", "--shape", "16,16", "--name", "../../Dataset560_Victim", "{+victim}"],
        "--name '../../Dataset560_Victim': use letters, digits, '_' and '-' only"),
    row("empty", ["demo-data", "-d", "562", "--shape", "16,16", "--name", "../../evil"], "--name '../../evil'"),
    row("empty", ["demo-data", "-d", "562", "--shape", "16,16", "--name", "a b"], "--name 'a b'"),
    row("empty", ["demo-data", "-d", "562", "--shape", "16,16", "--name", "x" * 101], "1 to 100 characters"),
    row("empty", ["demo-data", "-d", "563", "--shape", "16,16", "--cases", "2", "{+existing}"], "already exists"),
    row("session", ["export-dataset", str(FLAT_2D), "2d", "1", "-t", "561", "--name", "../../Dataset560_Victim"],
        "--name '../../Dataset560_Victim'"),
    row("empty", ["import", "{images}", "-d", "564", "--name", "../../evil"], "--name '../../evil'"),
    row("session", ["register", "{run}", "--alias", "../bad alias"], "--alias '../bad alias'"),
    row("session", ["register", "{run}", "--alias", "v2"], "MLflow reserves"),
    row("session", [*TRAIN_2D, "--set", "tracking.experiment_name=" + "e" * 5000], "tracking.experiment_name"),
    row("session", [*TRAIN_2D, "--set", "tracking.experiment_name=../x"], "tracking.experiment_name"),
    # --- numbers: finite, in range, consistent
    row("session", [*PLAN, "--set", "data.intensity_range=[1,1]"], "data.intensity_range': must be [low, high]"),
    row("session", [*PLAN, "--set", "data.intensity_case_std=[.inf,.inf]"], "must be a finite number, got inf"),
    row("session", [*PLAN, "--set", "data.intensity_case_mean=[.nan,0]"], "must be a finite number, got nan"),
    row("session", [*PLAN, "--set", "3d.data.intensity_low=[5,5]", "--set", "3d.data.intensity_high=[-5,-5]"],
        "data.intensity_low': must be below data.intensity_high"),
    row("session", [*PLAN, "--set", "ddpm_scheduler.beta_start=0.5", "--set", "ddpm_scheduler.beta_end=0.001"],
        "ddpm_scheduler.beta_start': must be < ddpm_scheduler.beta_end"),
    row("session", [*PLAN, "--set", "3d.data.label_values=[1,99]"], "[99] not among the label values"),
    row("session", [*PLAN, "--set", "dataset.transpose_backward=[7,7,7]"], "dataset.transpose_backward': must be a "
        "permutation"),
    row("session", [*PLAN, "--set", "dataset.transpose_backward=[0,0,0]"], "dataset.transpose_backward'"),
    row("session", [*PLAN, "--set", "3d.data.spacing=[.inf,1,1]"], "must be a finite number"),
    row("session", [*PLAN, "--set", "discriminator.num_layers=10"], "discriminator.num_layers': must be <="),
    row("session", [*PLAN, "--set", "ddpm_unet.num_head_channels=7"], "ddpm_unet.num_head_channels': 7 does not "
        "divide"),
    row("session", [*PLAN, "--set", "train_ddpm.seed=99999999999999999999"], "train_ddpm.seed'"),
    row("session", [*PLAN, "--gpu-memory", "nan"], "--gpu-memory"),
    row("session", [*PLAN, "--gpu-memory", "inf"], "--gpu-memory"),
    row("session", [*PLAN, "--gpu-memory", "1e309"], "--gpu-memory"),
    row("session", ["memory", str(ANISO_3D), "--gpu-memory", "nan"], "--gpu-memory"),
    row("session", [*TRAIN_2D, "--set", "data.in_channels=3"], "data.in_channels"),
    row("session", [*TRAIN_2D, "--set", "data.image_size=[8192,8192]"], "on the CPU needs about"),
    row("empty", ["demo-data", "-d", "565", "--spacing", "inf,1", "--shape", "16,16"], "spacing > 0 mm (finite)"),
    row("empty", ["demo-data", "-d", "565", "--spacing", "nan,1", "--shape", "16,16"], "spacing > 0 mm (finite)"),
    row("empty", ["demo-data", "-d", "565", "--shape", "100000,100000"], "needs about"),
    row("empty", ["demo-data", "-d", "565", "--shape", "64,64,64", "--cases", "100000000"], "use fewer --cases"),
    row("empty", ["demo-data", "-d", "565", "--seed", "99999999999999999999"], "--seed"),
    row("session", ["sample", str(FLAT_2D), "2d", "1", "{empty_dir}", "--seed", "99999999999999999999"], "--seed"),
    # --- YAML read defensively
    row("session", [*TRAIN_2D, "--config", "{dup_yaml}"], "duplicate key 'epochs'"),
    row("session", [*TRAIN_2D, "--config", "{bomb_yaml}"], "aliases (*name) are not allowed"),
    row("session", [*TRAIN_2D, "--config", "{random_yaml}"], "not a YAML text file"),
    row("session", [*TRAIN_2D, "--config", "{deep_yaml}"], "nested deeper than"),
    row("session", [*TRAIN_2D, "--set", "train_ddpm.epochs=" + DEEP], "nested deeper than"),
    row("session", ["tune", "-d", str(ANISO_3D), "--model", "autoencoder", "--space", "{bomb_yaml}"], "aliases"),
    # --- imports
    row("empty", ["import", "{images}", "-d", "566", "--name", "L", "--labels", "{labels_7}"], "value(s) [7]"),
    row("empty", ["import", "{images}", "-d", "566", "--name", "L", "--labels", "{labels_neg}"], "value(s) [-3"),
    row("empty", ["import", "{images}", "-d", "566", "--name", "L", "--labels", "{labels_half}"], "value(s) [0.5]"),
    row("empty", ["import", "{images}", "-d", "566", "--name", "L", "--labels", "{labels_small}"],
        "has shape (20, 20, 8) but its image has (24, 24, 8)"),
    row("empty", ["import", "{nan_images}", "-d", "566", "--name", "N"], "NaN or infinite voxel"),
    row("empty", ["import", "{four_d_among_3d}", "-d", "566", "--name", "F"], "scan9.nii.gz"),
    # --- requests that contradict the model; a trained run that does not match its files
    row("session", ["sample", str(ANISO_3D), "2d", "1", "{empty_dir}", "--model", "{run}"],
        f"DATASET_ID {ANISO_3D} contradicts the model"),
    row("session", ["sample", str(FLAT_2D), "3d", "1", "{empty_dir}", "--model", "{run}"],
        "MODEL_TYPE 3d contradicts the model"),
    row("session", ["sample", str(FLAT_2D), "2d", "1", "{empty_dir}", "--model", "{run_edited_cfg}"],
        "was edited after training: 'data.image_size'"),
    row("session", ["sample", str(FLAT_2D), "2d", "1", "{empty_dir}", "--model", "{run_nan_spacing}"],
        "'spacing' must hold finite numbers"),
    row("session", ["sample", str(FLAT_2D), "2d", "1", "{empty_dir}", "--model", "{run_zero_spacing}"],
        "'spacing' must be 1 to 3 spacings > 0"),
    row("session", ["sample", str(FLAT_2D), "2d", "1", "{empty_dir}", "--model", "{run_zero_direction}"],
        "is singular"),
    row("session", ["sample", str(FLAT_2D), "2d", "1", "{empty_dir}", "--model", "{run_bad_transpose}"],
        "'transpose_backward' must be a permutation"),
    row("session", ["sample", str(FLAT_2D), "2d", "1", "{empty_dir}", "--model", "{run_inf_origin}"],
        "'origin' must hold finite numbers"),
    # --- outputs that cannot be made
    row("session", ["sample", str(FLAT_2D), "2d", "1", "/proc/medimgen/out", "--model", "{run}"],
        "SAVE_PATH /proc/medimgen/out cannot be created"),
    row("session", ["evaluate", str(FLAT_2D), "-t", "2d", "--model", "{run}", "--no-mlflow", "-o",
                    "/proc/medimgen/e.json"], "-o /proc/medimgen cannot be created"),
]


@pytest.mark.parametrize("place,args,expect", ROWS, indirect=["place"])
def test_bad_input_is_one_line_and_changes_nothing(place, args, expect, request):
    roots, files, watch = place
    argv = _fill(args, files, roots, request)
    before = _snapshot(*watch)
    r = CliRunner().invoke(main, argv)
    assert not (r.exception and not isinstance(r.exception, SystemExit)), repr(r.exception)
    _assert_one_line_error(r.exit_code, r.stderr, r.output, expect)
    assert _snapshot(*watch) == before, "something was written or touched"


# ----------------------------------------------------------------------------- rows that need more than a snapshot
def test_plans_dataset_name_cannot_send_a_run_outside_medimgen_results(planned, tmp_path, monkeypatch):  # noqa: F811
    """nnU-Net's dataset_name in the plans names the run folder: `Dataset574_../../../ESCAPED_RUN` is refused."""
    pre = tmp_path / "pre"
    shutil.copytree(planned["nnUNet_preprocessed"] / "Dataset202_Flat", pre / "Dataset574_Flat")
    plans_file = pre / "Dataset574_Flat" / "nnUNetPlans.json"
    _edit_json(plans_file, dataset_name="Dataset574_../../../ESCAPED_RUN")
    for k, v in {"nnUNet_preprocessed": pre, "nnUNet_raw": tmp_path / "raw", "nnUNet_results": tmp_path / "res",
                 "medimgen_results": tmp_path / "results" / "inner"}.items():
        v.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(k, str(v))
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(main, ["train", "ddpm", "574", "train-val-test", "2d"])
    _assert_one_line_error(r.exit_code, r.stderr, r.output, "not a dataset folder name")
    assert not (tmp_path / "ESCAPED_RUN").exists() and not (tmp_path / "results" / "ESCAPED_RUN").exists()
    assert _snapshot(tmp_path) == before


def test_register_bad_alias_creates_no_version(trained, tmp_path, monkeypatch):
    """`register --alias '../bad alias'` and `--alias v2`: refused before MLflow is touched (no version, no db)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    for alias in ("../bad alias", "v2", "latest"):
        r = CliRunner().invoke(main, ["register", str(trained), "--alias", alias])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_plots_symlink_outside_the_run_is_refused(tmp_path):
    from medimgen.runs.folders import RunDir

    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "plots").symlink_to(outside)
    with pytest.raises(MedimgenError, match="outside"):
        RunDir(run).make()
    assert list(outside.iterdir()) == []


def test_mix_real_2d_model_of_3d_data_is_refused(trained, planned, monkeypatch, tmp_path):  # noqa: F811
    """A 2D model of 3D data with --mix-real: refused before anything is sampled or written."""
    from medimgen.core.requests import ModelRef
    from medimgen.generation import export

    class Fake2d:  # what the check reads of a sampler: its config's dimensionality
        cfg = type("C", (), {"data": type("D", (), {"spatial_dims": 2})()})()

        def to(self, device):
            return self

    monkeypatch.setattr(export, "resolve_sampler", lambda ref: Fake2d())
    raw_before = _snapshot(planned["nnUNet_raw"], planned["nnUNet_preprocessed"])
    with pytest.raises(MedimgenError, match="--mix-real with a 2D model of Dataset201_Aniso, whose cases are 3D"):
        export.export_dataset(ANISO_3D, 1, 567, ModelRef("ddpm", ANISO_3D, "2d"), mix_real=True)
    assert _snapshot(planned["nnUNet_raw"], planned["nnUNet_preprocessed"]) == raw_before


def test_edited_safetensors_header_is_one_line(trained, tmp_path):
    from medimgen.runs.folders import WEIGHTS, TrainedModel

    folder = TrainedModel.from_run(trained).save(tmp_path / "pkg")
    blob = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(blob[:8] + b"{not json" + blob[17:])
    with pytest.raises(MedimgenError, match="cannot read the weights"):
        TrainedModel.load(folder)
    (folder / WEIGHTS).write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(MedimgenError, match="cannot read the weights"):
        TrainedModel.load(folder)


# ----------------------------------------------------------------------------- faults: a write that fails
_FSIZE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from medimgen.cli import main
main(sys.argv[2:])
"""


def _limited(args, limit, env, cwd):
    """The CLI in a process whose files cannot grow past ``limit`` bytes (writes then fail with EFBIG, as they
    fail with ENOSPC on a full disk: a real failing write, not a double)."""
    return subprocess.run([sys.executable, "-c", _FSIZE, str(limit), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_failed_sample_write_leaves_no_partial_files(trained, planned, tmp_path):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **{k: str(v) for k, v in planned.items()}, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    out = tmp_path / "out"
    p = _limited(["sample", str(FLAT_2D), "2d", "2", str(out), "--model", str(trained)], 200, env, tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write") and str(out) in lines[0], p.stderr
    left = [f for f in out.rglob("*") if f.is_file()]
    assert not [f for f in left if f.name.startswith(".") or f.stat().st_size == 0]  # no temporary, no 0-byte file
    for image in (f for f in left if f.name.endswith(".nii.gz") and "_label" not in f.name):  # whole samples only
        assert image.with_name(image.name.replace(".nii.gz", ".json")).is_file()
        assert image.with_name(image.name.replace(".nii.gz", "_label.nii.gz")).is_file()
    assert len(left) < 6  # the write really failed part-way


def test_failed_checkpoint_write_keeps_last_good_last_pt(trained, planned, tmp_path):  # noqa: F811
    """Training whose checkpoint cannot be written: one line, and the previous last.pt is intact (resumable)."""
    run = _run_copy(trained, tmp_path / "results" / "Dataset202_Flat" / "ddpm" / "2d" / "train-val-test")
    last = run / "checkpoints" / "last.pt"
    good = last.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in planned.items()},
           "medimgen_results": str(tmp_path / "results"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    limit = len(good) // 2  # plots and small files fit; the checkpoint does not
    p = _limited([*TRAIN_2D, "-c", "--set", "train_ddpm.epochs=2"], limit, env, tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith(("WARNING", "warn"))]
    assert lines[-1].startswith("Error: cannot write") and ("last.pt" in lines[-1] or "best.pt" in lines[-1]), p.stderr
    assert last.read_bytes() == good
    assert not [f for f in (run / "checkpoints").iterdir() if f.name.startswith(".")]  # no temporary left


# ----------------------------------------------------------------------------- legitimate inputs: a correct result
def test_force_keeps_a_backup_and_never_merges(empty_env):
    raw = empty_env["nnUNet_raw"]
    r = CliRunner().invoke(main, ["demo-data", "-d", "570", "--shape", "16,16", "--cases", "2", "--name", "Ph"])
    assert r.exit_code == 0, r.output
    target = raw / "Dataset570_Ph"
    (target / "imagesTr" / "mine_0000.nii.gz").write_bytes(b"user data")
    r = CliRunner().invoke(main, ["demo-data", "-d", "570", "--shape", "16,16", "--cases", "3", "--name", "Ph"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, ["demo-data", "-d", "570", "--shape", "16,16", "--cases", "3", "--name", "Ph",
                                  "--force"])
    assert r.exit_code == 0, r.output
    assert not (target / "imagesTr" / "mine_0000.nii.gz").exists()  # replaced, not merged into
    assert len(list((target / "imagesTr").iterdir())) == 3
    backups = [p for p in raw.iterdir() if p.name.startswith(".Dataset570_Ph.backup-")]
    assert len(backups) == 1 and (backups[0] / "imagesTr" / "mine_0000.nii.gz").read_bytes() == b"user data"
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == ["Dataset570_Ph"]


def test_import_with_valid_labels_and_msd_names(empty_env, tmp_path):
    src = _images(tmp_path / "src")
    _labels(src / "labelsTr", [1, 2])
    (src / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ", "2": "lesion"},
                                                  "modality": {"0": "MRI"}}))
    r = CliRunner().invoke(main, ["import", str(src), "-d", "571", "--name", "Good"])
    assert r.exit_code == 0, r.output
    out = empty_env["nnUNet_raw"] / "Dataset571_Good"
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert set(np.unique(nib.load(str(out / "labelsTr" / "scan1.nii.gz")).get_fdata())) == {0, 2}


def test_outputs_follow_the_umask(tmp_path):
    from medimgen.core.atomic import write_bytes_atomic

    old = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "a.json", b"{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        write_bytes_atomic(tmp_path / "a.json", b"{}")  # replacing takes the new file's mode
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_sample_sidecar_records_what_really_ran(trained, tmp_path):
    from medimgen.core.requests import ModelRef, SampleOptions
    from medimgen.generation.sampler import sample_to_folder

    old = os.umask(0o022)
    try:
        files = sample_to_folder(tmp_path / "s", 1, ModelRef(str(trained)), SampleOptions(amp=True))
    finally:
        os.umask(old)
    sidecar = json.loads((tmp_path / "s" / "sample_0000.json").read_text())
    assert sidecar["device"] == "cpu" and sidecar["amp"] is False and sidecar["amp_requested"] is True
    assert files[0].stat().st_mode & 0o777 == 0o644  # readable by the group and others, as the umask says


def test_inverse_intensity_map_is_continuous_and_floored():
    """MRI with a 0 background: the lower bound maps to 0 and values just above it never fall below 0."""
    from medimgen.data.intensity import IntensityMap

    imap = IntensityMap(low=(-0.6,), high=(3.0,), mean=(120.0,), std=(200.0,), raw_background=(0.0,))
    x = torch.linspace(-1.2, 1.2, 2401)[None]
    back = imap.to_original(x).numpy()[0]
    assert back.min() == 0.0 and np.all(np.diff(back) >= 0)  # monotone, nothing below the floor
    assert np.max(np.abs(np.diff(back))) < 1.0  # no jump anywhere (the step between values is ~0.36)
    top = imap.normalized_to_original(imap.to_normalized(torch.tensor([[1.0]])))[0, 0].item()
    assert back[-1] == pytest.approx(top)  # clamped to what the model range maps to


def test_yaml_without_aliases_still_reads(tmp_path):
    from medimgen.config.io import load_yaml

    p = tmp_path / "ok.yaml"
    p.write_text("a:\n  b: [1, 2, {c: 3}]\n  d: 1e-5\n")
    assert load_yaml(p) == {"a": {"b": [1, 2, {"c": 3}], "d": "1e-5"}}


def test_kill_during_plots_keeps_the_epoch_and_resume_is_exact(planned, tmp_path, monkeypatch):  # noqa: F811
    """last.pt is written before an epoch's plots: a kill while plotting loses nothing, and a run continued with -c
    equals an uninterrupted one although both plotted (plots leave the random state as it was saved)."""
    from medimgen.config import load_config
    from medimgen.core.paths import config_path
    from medimgen.training import ddpm
    from medimgen.training.api import train
    from tests.training_helpers import tiny_overrides

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    sets = [*tiny_overrides(load_config(config_path(FLAT_2D)).get("2d"), epochs=2), "tracking.log_models=false"]
    monkeypatch.setenv("medimgen_results", str(tmp_path / "full"))
    full = train("ddpm", FLAT_2D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None)

    monkeypatch.setenv("medimgen_results", str(tmp_path / "killed"))
    plot = ddpm.DiffusionTask.plot

    def killed(*a, **k):
        raise KeyboardInterrupt  # the kill arrives while the first epoch's samples are drawn

    monkeypatch.setattr(ddpm.DiffusionTask, "plot", killed)
    with pytest.raises(KeyboardInterrupt):
        train("ddpm", FLAT_2D, "train-val-test", "2d", overrides=sets, echo=lambda *_: None)
    run = tmp_path / "killed" / "Dataset202_Flat" / "ddpm" / "2d" / "train-val-test"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(ddpm.DiffusionTask, "plot", plot)
    resumed = train("ddpm", FLAT_2D, "train-val-test", "2d", resume=True, echo=lambda *_: None)
    a = torch.load(Path(full.run_dir) / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(Path(resumed.run_dir) / "checkpoints" / "last.pt", weights_only=True)
    for name in a["modules"]:
        for k, v in a["modules"][name].items():
            torch.testing.assert_close(b["modules"][name][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
