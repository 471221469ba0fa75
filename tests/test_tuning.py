"""`medimgen tune`: search-space files, a 3-trial CPU study with resume and --apply-best, failed trials,
two worker processes on one journal file, a first study offline (no weights, no nnU-Net) on the shipped space.

Trials are scored with features of an nnU-Net stand-in whose weights are RANDOM (made here with
nnU-Net's own network builder, tests/nnunet_helpers.py): the numbers exercise the tuning
machinery; they are not FIDs of any meaning.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from medimgen.cli import main
from medimgen.config import is_user_edited, load_config
from medimgen.core.errors import MedimgenError
from medimgen.tuning.space import default_space_path, load_space
from tests.training_helpers import tiny_overrides

TUNE_2D = 211  # ids in use by other test modules: 201, 202, 203 (test_memory)

SPACE = """
budget: {epochs: 2, num_samples: 4, real: val, sampling_steps: 2}
pruner: {n_startup_trials: 1, n_warmup_steps: 0}
autoencoder:
  losses.kl_weight: {type: float, low: 1.0e-8, high: 1.0e-4, log: true}
  autoencoder.latent_channels: {type: categorical, choices: [3, 4]}
  autoencoder.depth: {type: int, low: 1, high: 2}
  train_autoencoder.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
"""


@pytest.fixture(scope="module")
def tune_env(nnunet_roots, tmp_path_factory):
    """A small 2D CT dataset of its own (planned and preprocessed by nnU-Net), own results, MLflow DB and cwd."""
    from medimgen.nnunet.commands import plan_and_preprocess
    from medimgen.planning import plan_dataset
    from medimgen.nnunet.synthetic import make_synthetic_dataset
    from tests.nnunet_helpers import make_nnunet_model

    base = tmp_path_factory.mktemp("tune")
    mp = pytest.MonkeyPatch()
    for k, v in nnunet_roots.items():
        mp.setenv(k, str(v))
    mp.setenv("medimgen_results", str(base / "results"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.chdir(base)
    make_synthetic_dataset(nnunet_roots["nnUNet_raw"], TUNE_2D, "Tune", num_cases=20, shape=(48, 48),
                           spacing=(0.7, 0.7), channels=1, modality="CT", seed=3)
    plan_and_preprocess(TUNE_2D, configurations=("2d",), quiet=True)
    cfg = plan_dataset(TUNE_2D, force=True).config.get("2d")
    pre = nnunet_roots["nnUNet_preprocessed"] / "Dataset211_Tune"
    extractor = make_nnunet_model(base / "nnunet_model", pre, "2d")
    space = base / "space.yaml"
    space.write_text(SPACE)
    # tiny networks; the trials' length is the space's budget (2 epochs) with the tiny 2 iterations per epoch
    tiny = [o for o in tiny_overrides(cfg, epochs=3) if not o.startswith("train_autoencoder.epochs=")]
    yield {"base": base, "pre": pre, "cfg": cfg, "space": space, "tiny": tiny,
           "args": ["-d", str(TUNE_2D), "--model", "autoencoder", "-t", "2d", "--space", str(space),
                    "--extractor", f"nnunet:{extractor}", "--overrides", " ".join(tiny)]}
    mp.undo()


def _runs(filter_string: str):
    import mlflow

    return mlflow.search_runs(experiment_names=["Dataset211_Tune"], filter_string=filter_string)


# ---------------------------------------------------------------------- search-space files
@pytest.mark.parametrize("text, message", [
    ("autoencoder:\n  losses.kl_weight: {type: float, low: 1.0e-8, hihg: 1.0}\n", "unknown key 'hihg'.*did you mean 'high'"),
    ("autoencodr:\n  losses.kl_weight: {type: float, low: 0.1, high: 1.0}\n", "unknown section 'autoencodr'.*'autoencoder'"),
    ("autoencoder:\n  losses.kl_weight: {type: float, low: 0.0, high: 1.0, log: true}\n", "log-scale range needs low > 0"),
    ("autoencoder:\n  losses.kl_weight: {type: float, low: 1e-8, high: 1.0}\n", "'low' must be a number.*1.0e-5"),
    ("autoencoder:\n  autoencoder.channels: {type: categorical, choices: [[8, 16], [16, 32]]}\n", "channel_multiplier"),
    ("ldm:\n  train_ldm.learning_rate: {type: float, low: 0.1, high: 1.0}\n", "no search space for 'autoencoder'"),
    ("budget: {real: test}\nautoencoder:\n  losses.kl_weight: {type: float, low: 0.1, high: 1.0}\n", "would leak"),
])
def test_space_file_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(MedimgenError, match=message):
        load_space(path, "autoencoder")


def test_space_keys_are_checked_against_the_config_and_derived_values_apply(tune_env, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("autoencoder:\n  losses.kl_wieght: {type: float, low: 0.1, high: 1.0}\n")
    with pytest.raises(MedimgenError, match="did you mean 'kl_weight'"):
        load_space(path, "autoencoder").validate(tune_env["cfg"])
    from medimgen.tuning.api import tune

    with pytest.raises(MedimgenError, match="tuning the LDM needs a trained autoencoder"):
        tune(TUNE_2D, "ldm", "2d", 1, space_path=None, track=False)
    default = load_space(None, "autoencoder")  # the shipped tuning/default.yaml
    assert default.path.name == "default.yaml" and default.budget["real"] == "val"
    for model in ("ldm", "ddpm"):
        load_space(None, model).validate(tune_env["cfg"])
    default.validate(tune_env["cfg"])
    from medimgen.config import apply_overrides

    cfg = tune_env["cfg"]
    sets = default.overrides(cfg, {"autoencoder.depth": 1, "autoencoder.channel_multiplier": 2.0,
                                   "losses.kl_weight": 1e-5})
    tuned = apply_overrides(cfg, sets)
    assert tuned.autoencoder.strides == cfg.autoencoder.strides[:1]
    assert tuned.autoencoder.channels == tuple(2 * c for c in cfg.autoencoder.channels[:2])
    assert tuned.losses.kl_weight == 1e-5
    # the ControlNet's embedding follows the shallower autoencoder to the same latent size (it builds)
    assert tuned.controlnet.conditioning_strides == cfg.autoencoder.strides[:1]
    from medimgen.models.networks import build_controlnet

    build_controlnet(tuned)


# ---------------------------------------------------------------------- a real study
def test_tune_three_trials_resume_and_apply_best(tune_env):
    runner = CliRunner()
    first = runner.invoke(main, ["tune", *tune_env["args"], "--trials", "3"])
    assert first.exit_code == 0, first.output
    db = tune_env["base"] / "results" / "Dataset211_Tune" / "tuning" / "optuna.db"
    assert db.is_file()
    name = "Dataset211_Tune/autoencoder/2d/pareto"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(len(t.values) == 2 for t in study.trials)

    parents = _runs("tags.`medimgen.tuning_parent` = 'true'")
    assert len(parents) == 1
    parent = parents.run_id[0]
    children = _runs(f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(children["tags.optuna.trial_number"].astype(int)) == [0, 1, 2]
    by_number = {int(r["tags.optuna.trial_number"]): r for _, r in children.iterrows()}
    for t in study.trials:
        row = by_number[t.number]
        assert row["metrics.objective.rfid"] == pytest.approx(t.values[0])
        assert row["metrics.objective.ms_ssim_loss"] == pytest.approx(t.values[1])
        assert float(row["params.losses.kl_weight"]) == pytest.approx(t.params["losses.kl_weight"])
        assert int(row["params.autoencoder.depth"]) == t.params["autoencoder.depth"]  # Optuna's values as params
        assert row["metrics.quality/ms_ssim"] == pytest.approx(1 - t.values[1])  # the scorer's names, as training's
        assert not (Path(t.user_attrs["run_dir"]) / "checkpoints" / "last.pt").exists()  # sampling weights only
    assert "metrics.train_loss" in children.columns  # the trial's own training curves
    assert "metrics.trials_complete" in parents.columns

    config_path = tune_env["pre"] / "medimgen_config.yaml"
    second = runner.invoke(main, ["tune", *tune_env["args"], "--trials", "2", "--apply-best"])
    assert second.exit_code == 0, second.output
    assert "3 trial(s) so far" in second.output
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert len(_runs("tags.`medimgen.tuning_parent` = 'true'")) == 1  # the same parent goes on
    assert len(_runs(f"tags.mlflow.parentRunId = '{parent}'")) == 5

    best = min(study.best_trials, key=lambda t: tuple(t.values))
    applied = load_config(config_path).get("2d")  # valid: it reads back through the typed config
    assert applied.losses.kl_weight == pytest.approx(best.params["losses.kl_weight"])
    assert applied.autoencoder.latent_channels == best.params["autoencoder.latent_channels"]
    assert len(applied.autoencoder.strides) == min(best.params["autoencoder.depth"], len(tune_env["cfg"].autoencoder.strides))
    # the user's --overrides are part of the tuned config (tiny networks), the per-trial budget (2 epochs from the
    # space, 2 iterations from --overrides) is not: the planned run length stays
    assert applied.autoencoder.norm_num_groups == 8
    assert applied.train_autoencoder.epochs == tune_env["cfg"].train_autoencoder.epochs
    from medimgen.config import load_generation_config

    trial_cfg = load_generation_config(Path(best.user_attrs["run_dir"]) / "config.yaml")
    assert trial_cfg.train_autoencoder.epochs == 2 and trial_cfg.train_autoencoder.iterations_per_epoch == 2
    assert f"trial {best.number}" in config_path.read_text()
    assert is_user_edited(config_path) and list(config_path.parent.glob("medimgen_config.yaml.*.bak"))
    replan = runner.invoke(main, ["plan", "-d", str(TUNE_2D)])
    assert replan.exit_code == 2 and "edited by hand" in replan.output  # tuned values are not overwritten silently
    backup = next(config_path.parent.glob("medimgen_config.yaml.*.bak"))
    backup.replace(config_path)  # the other tests of this module use the planned config (the tiny channels fit it)
    i = tune_env["args"].index("--space")
    other_space = tune_env["args"][:i] + tune_env["args"][i + 2:]  # the default space: other parameters
    changed = runner.invoke(main, ["tune", *other_space, "--trials", "1"])
    assert changed.exit_code == 2 and "another search space" in changed.output


def test_failed_trials_are_recorded_and_the_study_goes_on(tune_env, tmp_path, monkeypatch):
    space = tmp_path / "bad.yaml"
    # a fault injected into training where the discriminator joins (epoch 2, after the tiny 1-epoch warm-up): a
    # config the validation lets through cannot fail on purpose any more (a too-deep discriminator, which this test
    # used, is now refused before the study starts)
    from medimgen.training.autoencoder import AutoencoderTask

    phases = AutoencoderTask.active_phases

    def failing(self, epoch):
        if epoch >= 1:
            raise RuntimeError("injected fault: the discriminator step failed")
        return phases(self, epoch)

    monkeypatch.setattr(AutoencoderTask, "active_phases", failing)
    space.write_text("budget: {epochs: 2, real: val, sampling_steps: 1}\n"
                     "autoencoder:\n  discriminator.num_layers: {type: categorical, choices: [2]}\n")
    args = [a if a != str(tune_env["space"]) else str(space) for a in tune_env["args"]]
    res = CliRunner().invoke(main, ["tune", *args, "--trials", "2", "--objective", "scalar", "--study-name", "broken"])
    assert res.exit_code == 0, res.output
    assert res.output.count("failed:") == 2
    db = tune_env["base"] / "results" / "Dataset211_Tune" / "tuning" / "optuna.db"
    study = optuna.load_study(study_name="broken", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all(t.user_attrs["failure"].startswith(("ValueError", "RuntimeError")) for t in study.trials)
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    failed = _runs("tags.`optuna.study` = 'broken' and tags.`optuna.state` = 'FAIL'")
    assert len(failed) == 2 and set(failed.status) == {"FAILED"}
    nothing = CliRunner().invoke(main, ["tune", *args, "--trials", "0", "--objective", "scalar", "--study-name", "broken",
                                        "--apply-best"])
    assert nothing.exit_code == 2 and "no completed trial" in nothing.output


def test_two_workers_share_one_journal_study(tune_env, tmp_path):
    journal = tmp_path / "study.journal"
    exe = Path(sys.executable).parent / "medimgen"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    cmd = [str(exe), "tune", *tune_env["args"], "--trials", "2", "--storage", str(journal), "--study-name", "shared"]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal))))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # no duplicates, none lost
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    run_dirs = {t.user_attrs["run_dir"] for t in study.trials}
    assert len(run_dirs) == 4 and all(Path(d).is_dir() for d in run_dirs)
    for out in outputs:  # each worker ran two of them
        assert out.count("trial ") >= 2


def test_scalar_objective_reports_every_epoch_to_the_pruner(tune_env):
    """--objective scalar: one value (fid + w * gap) per trial, and each epoch's validation loss reported for pruning."""
    from medimgen.tuning.api import tune

    overrides = tune_env["tiny"]  # no train_autoencoder.epochs: the space's budget (2 epochs) is the trials' length
    result = tune(TUNE_2D, "autoencoder", "2d", 2, tune_env["space"], objective="scalar", study_name="scalar",
                  extractor=tune_env["args"][tune_env["args"].index("--extractor") + 1], overrides=overrides,
                  track=False, echo=lambda *_: None)
    assert result.trials == 2 and result.parent_run_id is None
    db = tune_env["base"] / "results" / "Dataset211_Tune" / "tuning" / "optuna.db"
    study = optuna.load_study(study_name="scalar", storage=f"sqlite:///{db}")
    for t in study.trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert sorted(t.intermediate_values) in ([1], [1, 2])  # budget: 2 epochs (pruned trials stop after 1)
        if t.state == optuna.trial.TrialState.COMPLETE:
            scores = t.user_attrs["scores"]
            fid = scores["rfid.nnunet_encoder"]
            assert t.value == pytest.approx(fid + 100.0 * scores["ms_ssim_loss"])


def test_mlflow_run_tune_entry_point_is_the_parent(tune_env):
    """`mlflow run . -e tune --env-manager local`: the run MLflow creates is the study's parent run."""
    from mlflow import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{exe}{os.pathsep}{env.get('PATH', '')}"
    args = tune_env["args"]
    overrides = args[args.index("--overrides") + 1]
    extractor = args[args.index("--extractor") + 1]
    out = subprocess.run([str(exe / "mlflow"), "run", str(repo), "-e", "tune", "-P", f"dataset={TUNE_2D}",
                          "-P", "model=autoencoder", "-P", "model_type=2d", "-P", "trials=1",
                          "-P", f"extractor={extractor}", "-P", f"overrides={overrides}", "-P", f"space={tune_env['space']}",
                          "--env-manager", "local", "--experiment-name", "tune-mlproject"],
                         env=env, capture_output=True, text=True, cwd=tune_env["base"])
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("tune-mlproject")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # MLflow's own run, no second parent
    assert parent.data.tags["medimgen.tuning_parent"] == "true" and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 1 and children[0].data.tags["optuna.state"] == "COMPLETE"  # in the parent's experiment


@pytest.mark.parametrize("extra, message", [
    (["--storage", "study.txt"], "--storage must be a journal file"),
    (["--space", "missing.yaml"], "missing.yaml does not exist"),
    (["--extractor", "none", "--metrics", "rfid,ms_ssim_loss"], "rfid, which needs a feature extractor"),
    (["--metrics", "fid,l1"], "'fid' is not an objective of the autoencoder"),
    (["--metrics", "l1"], "pareto needs at least 2 --metrics"),
    (["--trials", "-1"], "--trials must be 0 or more"),
])
def test_tune_bad_input_is_one_line(tune_env, extra, message):
    args = list(tune_env["args"])
    if "--space" in extra:
        i = args.index("--space")
        del args[i:i + 2]
    if "--extractor" in extra:
        i = args.index("--extractor")
        del args[i:i + 2]
    res = CliRunner().invoke(main, ["tune", *args, "--trials", "1", *extra, "--study-name", "bad-input"])
    assert res.exit_code == 2 and message in res.output
    assert len(res.output.strip().splitlines()[-1]) > 0 and "Traceback" not in res.output


# ---------------------------------------------------------------------- first time, offline
def test_tune_autoencoder_first_time_offline(tune_env, tmp_path, monkeypatch):
    """No pretrained weights on disk (empty TORCH_HOME), no trained nnU-Net, the shipped space: the trials are
    scored by reconstruction 1 - MS-SSIM and L1, `--set train_autoencoder.epochs=1` is each trial's length (not the
    space's 30), the perceptual weight is not searched (perceptual_network none), objective names come with values."""
    from medimgen.config import load_generation_config
    from medimgen.evaluation.features import find_nnunet_model

    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert find_nnunet_model("Dataset211_Tune", 2) is None
    args = ["-d", str(TUNE_2D), "--model", "autoencoder", "-t", "2d", "--trials", "2", "--study-name", "first-time",
            "--set", "train_autoencoder.epochs=1", "--overrides", " ".join(tune_env["tiny"])]
    res = CliRunner().invoke(main, ["tune", *args])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "note: no feature extractor has weights here" in out
    assert "note: losses.perceptual_weight is not searched: losses.perceptual_network is none" in out
    assert "objectives: ms_ssim_loss (1 - MS-SSIM of reconstructions" in out
    assert "train_autoencoder.epochs=1 (from --set, instead of budget.epochs=30 in default.yaml)" in out
    # each trial's result line (its progress lines, "trial N: epoch ..." and "trial N: scoring ...", aside)
    trial_lines = [ln for ln in out.splitlines() if re.match(r"trial \d+: (?!epoch |scoring )", ln)]
    assert len(trial_lines) == 2, out
    assert all("ms_ssim_loss=" in ln and "l1=" in ln and "[1 epoch(s) x 2 iteration(s)" in ln for ln in trial_lines)
    best = [ln for ln in out.splitlines() if ln.strip().startswith("best trial")]
    assert best and all("ms_ssim_loss=" in ln and "l1=" in ln for ln in best)

    db = tune_env["base"] / "results" / "Dataset211_Tune" / "tuning" / "optuna.db"
    study = optuna.load_study(study_name="first-time", storage=f"sqlite:///{db}")
    assert study.user_attrs["objectives"] == ["ms_ssim_loss", "l1"]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in study.trials:
        assert "losses.perceptual_weight" not in t.params and "losses.adversarial_weight" in t.params
        run_cfg = load_generation_config(Path(t.user_attrs["run_dir"]) / "config.yaml")
        assert run_cfg.train_autoencoder.epochs == 1 and run_cfg.train_autoencoder.iterations_per_epoch == 2
        assert "train_autoencoder.epochs=1" not in t.user_attrs["config_overrides"]  # a budget, never applied
        assert t.values[0] == pytest.approx(t.user_attrs["scores"]["ms_ssim_loss"])
        assert t.values[1] == pytest.approx(t.user_attrs["scores"]["l1"])
    assert not torch_home.exists() or not any(torch_home.rglob("*.pt*"))  # nothing was downloaded

    again = CliRunner().invoke(main, ["tune", *args[:-4], "--trials", "0", "--metrics", "rfid,ms_ssim_loss"])
    assert again.exit_code == 2 and "a study keeps its objectives" in again.output
    # a config that plans a perceptual network without weights stops before the first trial, in one line
    alex = " ".join(o.replace("perceptual_network=none", "perceptual_network=alex") for o in tune_env["tiny"])
    planned = CliRunner().invoke(main, ["tune", *args[:-1], alex, "--study-name", "first-time-alex"])
    assert planned.exit_code == 2 and "perceptual network 'alex' needs pretrained weights" in planned.output
    assert "losses.perceptual_network=none" in planned.output and "trial 0" not in planned.output


SWITCHES = """
autoencoder:
  losses.kl_weight: {type: float, low: 1.0e-8, high: 1.0e-4, log: true}
  losses.perceptual_weight: {type: float, low: 0.1, high: 2.0, log: true}
  losses.adversarial_weight: {type: float, low: 0.01, high: 0.5, log: true}
  discriminator.num_layers: {type: int, low: 2, high: 3}
  train_autoencoder.disc_learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
"""


def test_switched_off_losses_and_set_values_are_not_searched(tune_env, tmp_path):
    from medimgen.config import apply_overrides

    path = tmp_path / "space.yaml"
    path.write_text(SWITCHES)
    space = load_space(path, "autoencoder")
    cfg = apply_overrides(tune_env["cfg"], ["losses.perceptual_network=alex", "losses.adversarial_weight=0.1"])
    kept, notes = space.restrict(cfg)
    assert kept.params == space.params and notes == []

    off = apply_overrides(cfg, ["losses.perceptual_network=none"])
    kept, notes = space.restrict(off)
    assert [p.name for p in kept.params] == ["losses.kl_weight", "losses.adversarial_weight",
                                             "discriminator.num_layers", "train_autoencoder.disc_learning_rate"]
    assert notes == ["losses.perceptual_weight is not searched: losses.perceptual_network is none "
                     "(that loss is switched off)"]
    assert kept.signature() != space.signature()  # a study keeps the space it was made with

    # --set losses.adversarial_weight=0: the explicit value wins, and the adversarial settings go with it
    no_adv = apply_overrides(cfg, ["losses.adversarial_weight=0"])
    kept, notes = space.restrict(no_adv, ["losses.adversarial_weight"])
    assert [p.name for p in kept.params] == ["losses.kl_weight", "losses.perceptual_weight"]
    assert "losses.adversarial_weight is not searched: fixed by --set" in notes
    assert any(n.startswith("discriminator.num_layers is not searched: losses.adversarial_weight is 0") for n in notes)

    # a searched perceptual network keeps its weight in the space
    path.write_text(SWITCHES + "  losses.perceptual_network: {type: categorical, choices: [none, alex]}\n")
    kept, _ = load_space(path, "autoencoder").restrict(off)
    assert "losses.perceptual_weight" in [p.name for p in kept.params]

    path.write_text("autoencoder:\n  losses.perceptual_weight: {type: float, low: 0.1, high: 2.0}\n")
    with pytest.raises(MedimgenError, match="nothing left to search"):
        load_space(path, "autoencoder").restrict(off)

    # the label loss weights (default space) are searched for joint image+label models only
    defaults = load_space(default_space_path(), "autoencoder")
    joint = apply_overrides(cfg, ["data.generate_labels=true", "data.label_values=[1]", "data.label_names=[a]"])
    image_only = apply_overrides(cfg, ["data.generate_labels=false"])
    assert {"losses.label_ce_weight", "losses.label_dice_weight"} <= {p.name for p in defaults.restrict(joint)[0].params}
    kept, notes = defaults.restrict(image_only)
    assert not {"losses.label_ce_weight", "losses.label_dice_weight"} & {p.name for p in kept.params}
    assert any(n.startswith("losses.label_ce_weight is not searched: data.generate_labels is false") for n in notes)


def test_objectives_and_the_real_images_they_need(tune_env, monkeypatch):
    """Objective choice (a study keeps its own; weight-free autoencoder default), the scalar sum, and the
    fall-back from too few val images to val + train (never test)."""
    import torch

    from medimgen.tuning import objectives as metrics
    from medimgen.tuning.objective import TrialObjective
    from medimgen.tuning.study_runs import StudyRuns

    assert metrics.choose_metrics(None, "autoencoder", "pareto", None, lambda: False)[0] == ("ms_ssim_loss", "l1")
    assert metrics.choose_metrics(None, "autoencoder", "pareto", None, lambda: True) == (("rfid", "ms_ssim_loss"), None)
    assert metrics.choose_metrics(None, "ldm", "pareto", None, lambda: False)[0] == ("fid", "ms_ssim_gap")
    assert metrics.choose_metrics(None, "autoencoder", "pareto", ("l1", "psnr"), lambda: True)[0] == ("l1", "psnr")
    with pytest.raises(MedimgenError, match="keeps its objectives"):
        metrics.choose_metrics("rfid,ms_ssim_loss", "autoencoder", "pareto", ("ms_ssim_loss", "l1"), lambda: True)
    assert metrics.directions(("l1", "psnr")) == ["minimize", "maximize"]
    assert metrics.scalar({"rfid": 3.0, "ms_ssim_loss": 0.1}, 100.0) == pytest.approx(13.0)
    assert metrics.scalar({"l1": 0.2, "psnr": 30.0}, 100.0) == pytest.approx(-29.8)

    counts = {"val": 1, "train": 5, "test": 2}

    def fake_real_cases(cfg, dataset, subset, *args):
        if not counts[subset]:
            raise MedimgenError(f"the train-val-test split of {dataset} has no {subset} cases: choose ...")
        return torch.zeros(counts[subset], 1, 4, 4), torch.zeros(counts[subset], 1, 4, 4), [subset] * counts[subset]

    monkeypatch.setattr("medimgen.evaluation.api.real_cases", fake_real_cases)
    notes = []
    space = load_space(tune_env["space"], "autoencoder")

    def objective(names, real="val"):
        sp = space if real == "val" else type(space)(space.path, space.model, space.params,
                                                     {**space.budget, "real": real})
        return TrialObjective("s", "Dataset211_Tune", "autoencoder", "2d", "pareto", sp, tune_env["cfg"], [],
                              tune_env["base"], None, StudyRuns(False, "x"), None, echo=notes.append, metrics=names)

    fid = objective(("rfid", "ms_ssim_loss"))
    fid.check()
    assert fid.subsets == ("val", "train") and len(fid.real_images(tune_env["cfg"])) == 6
    assert "scored against the val and train cases (6 images)" in notes[-1]
    recon = objective(("ms_ssim_loss", "l1"))
    recon.check()  # reconstruction metrics need no pairs: the one val image is enough
    assert recon.subsets == ("val",)
    counts.update(val=0, train=3)  # no val case at all: the train cases
    empty_val = objective(("ms_ssim_loss", "l1"))
    empty_val.check()
    assert empty_val.subsets == ("val", "train") and len(empty_val.real_images(tune_env["cfg"])) == 3
    counts["train"] = 1
    with pytest.raises(MedimgenError, match="only 1 real image"):
        objective(("rfid", "ms_ssim_loss"), real="train").check()


def test_train_feature_nnunet_command(tune_env, monkeypatch):
    """`medimgen train-feature-nnunet`: a thin CLI over medimgen.nnunet.commands.train_feature_nnunet (the demo's short
    nnU-Net trainer, run for real in test_security)."""
    calls = []

    def fake(dataset_id, configuration, fold, epochs, iterations, device):
        calls.append((dataset_id, configuration, fold, epochs, iterations, device))
        return Path("/results/Dataset211_Tune/nnUNetTrainerMedimgenDemo__nnUNetPlans__2d")

    monkeypatch.setattr("medimgen.nnunet.commands.train_nnunet_briefly", fake)
    res = CliRunner().invoke(main, ["train-feature-nnunet", "-d", str(TUNE_2D), "-t", "2d", "--iterations", "3",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert calls == [(TUNE_2D, "2d", 0, 2, 3, "cpu")]
    assert "nnUNetTrainerMedimgenDemo__nnUNetPlans__2d" in res.output
    bad = CliRunner().invoke(main, ["train-feature-nnunet", "-d", str(TUNE_2D)])  # 3d: a 2D dataset has none
    assert bad.exit_code == 2 and "3d_fullres" in bad.output and len(calls) == 1
