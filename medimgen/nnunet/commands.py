"""Run nnU-Net's own command-line steps unchanged (as a user would), with clear errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from medimgen.core.errors import MedimgenError


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script, preferring the one beside this interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise MedimgenError(f"{name} not found: install nnunetv2 in this environment (pip install nnunetv2)")
    return found


def plan_and_preprocess(
    dataset_id: int,
    configurations: Sequence[str] = ("2d", "3d_fullres"),
    num_processes: int = 2,
    verify: bool = True,
    env: dict | None = None,
    quiet: bool = False,
    plans_name: str | None = None,
) -> None:
    """``nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity -c ... -np ...`` (``plans_name``: nnU-Net's
    ``-overwrite_plans_name``, plans written as <plans_name>.json instead of nnUNetPlans.json)."""
    cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-npfp", str(num_processes),
           "-c", *configurations, "-np", *[str(num_processes)] * len(configurations)]
    if plans_name:
        cmd += ["-overwrite_plans_name", plans_name]
    if verify:
        cmd.append("--verify_dataset_integrity")
    run_env = dict(os.environ if env is None else env)
    out = subprocess.run(cmd, env=run_env, stdout=subprocess.PIPE if quiet else None,
                         stderr=subprocess.STDOUT if quiet else None, text=True)
    if out.returncode != 0:
        tail = (out.stdout or "").strip().splitlines()[-1:] if quiet else []
        raise MedimgenError(f"nnUNetv2_plan_and_preprocess failed for dataset {dataset_id} (exit {out.returncode})"
                            + (f": {tail[0]}" if tail else ""))


def train_nnunet_briefly(dataset_id: int | str, configuration: str = "3d_fullres", fold: int = 0, epochs: int = 2,
                         iterations: int = 20, device: str = "cpu") -> Path:
    """A deliberately short nnU-Net training with nnU-Net's own trainer (``epochs`` x ``iterations``), for the demo:
    it gives `medimgen evaluate` / `tune` dataset-specific encoder features on a machine that cannot download
    pretrained weights. The model folder is named after the trainer, nnUNetTrainerMedimgenDemo, so the scores say
    which features they come from. Train nnU-Net fully (nnUNetv2_train) for features worth comparing."""
    import json

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from medimgen.nnunet.plans import DatasetPlans

    class nnUNetTrainerMedimgenDemo(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):  # nnU-Net records these exact argument names
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, iterations // 4)

    plans = DatasetPlans.planned(dataset_id)
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    dataset_json = json.loads((plans.folder / "dataset.json").read_text())
    plans_dict = json.loads((plans.folder / f"{plans.plans_identifier}.json").read_text())
    plans_dict["continue_training"] = False  # what nnunetv2.run.run_training adds
    trainer = nnUNetTrainerMedimgenDemo(plans_dict, configuration, fold, dataset_json, device=torch.device(device))
    trainer.run_training()
    return Path(trainer.output_folder_base)


def train_feature_nnunet(dataset_id: int | str, dim: str = "3d", fold: int = 0, epochs: int = 2,
                         iterations: int = 10, device: str | None = None) -> Path:
    """`medimgen train-feature-nnunet`: the demo's short nnU-Net training (``epochs`` x ``iterations``, trainer
    folder ``nnUNetTrainerMedimgenDemo__<plans>__<configuration>`` in nnUNet_results) for a dataset's 2d or
    3d_fullres configuration, so that `medimgen evaluate` / `tune` have encoder features for FID/rFID on a machine
    without pretrained weights. Returns the model folder."""
    import torch

    from medimgen.core.paths import nnunet_results
    from medimgen.nnunet.plans import NNUNET_CONFIGURATION, DatasetPlans

    if dim not in NNUNET_CONFIGURATION:
        raise MedimgenError(f"MODEL_TYPE must be 2d or 3d, got {dim!r}")
    plans = DatasetPlans.planned(dataset_id)
    plans.preprocessed_folder(dim)  # the configuration exists and is preprocessed (else one line)
    nnunet_results()  # nnUNet_results is set (else one line)
    return train_nnunet_briefly(plans.dataset_id, NNUNET_CONFIGURATION[dim], fold, epochs, iterations,
                                device or ("cuda" if torch.cuda.is_available() else "cpu"))


# medimgen's short nnU-Net trainers (nnUNetTrainerMedimgenTiny), given to nnUNetv2_train through nnUNet_extTrainer
TRAINERS_DIR = Path(__file__).resolve().with_name("trainers")


def _check_run(cmd: list[str], what: str, env: dict | None = None) -> None:
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        tail = (out.stdout or "").strip().splitlines()[-1:]
        raise MedimgenError(f"{what} failed (exit {out.returncode})" + (f": {tail[0][:300]}" if tail else ""))


def preprocess_with_plans(source_id: int | str, target_id: int | str, plans_identifier: str,
                          configurations: Sequence[str], num_processes: int = 2) -> None:
    """Preprocess dataset ``target_id`` with the plans of ``source_id`` (same patch size, spacing, normalisation
    and network), nnU-Net's way: ``nnUNetv2_extract_fingerprint --verify_dataset_integrity``,
    ``nnUNetv2_move_plans_between_datasets`` (with dataset.json copied as nnU-Net's planner does), ``nnUNetv2_preprocess``."""
    _check_run([nnunet_command("nnUNetv2_extract_fingerprint"), "-d", str(target_id), "-np", str(num_processes),
                "--verify_dataset_integrity"], f"nnUNetv2_extract_fingerprint -d {target_id}")
    from medimgen.core.paths import dataset_name_from_id, nnunet_preprocessed, nnunet_raw

    name = dataset_name_from_id(target_id)  # nnU-Net's planner copies dataset.json; its preprocessor reads the copy
    shutil.copy2(nnunet_raw() / name / "dataset.json", nnunet_preprocessed() / name / "dataset.json")
    _check_run([nnunet_command("nnUNetv2_move_plans_between_datasets"), "-s", str(source_id), "-t", str(target_id),
                "-sp", plans_identifier, "-tp", plans_identifier],
               f"nnUNetv2_move_plans_between_datasets -s {source_id} -t {target_id}")
    _check_run([nnunet_command("nnUNetv2_preprocess"), "-d", str(target_id), "-plans_name", plans_identifier,
                "-c", *configurations, "-np", *[str(num_processes)] * len(configurations)],
               f"nnUNetv2_preprocess -d {target_id}")


def nnunet_train(dataset_id: int | str, configuration: str, fold: int, trainer: str, plans_identifier: str,
                 device: str, log_file: Path, resume: bool = False, echo=None) -> None:
    """``nnUNetv2_train ID CONFIGURATION FOLD -tr TRAINER -p PLANS -device DEV [--c]``, nnU-Net's own command;
    its output goes to ``log_file``, its epoch lines to ``echo``. ``device`` cuda:N runs on GPU N
    (CUDA_VISIBLE_DEVICES: nnU-Net takes cuda, cpu or mps)."""
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = os.pathsep.join(p for p in (env.get("nnUNet_extTrainer"), str(TRAINERS_DIR)) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")  # epoch lines as they happen, not in pipe-sized chunks
    kind, _, index = device.partition(":")
    if kind == "cuda" and index:
        env["CUDA_VISIBLE_DEVICES"] = index
    cmd = [nnunet_command("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", trainer,
           "-p", plans_identifier, "-device", kind] + (["--c"] if resume else [])
    log_file.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    with open(log_file, "a") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1) as proc:
        log.write("$ " + " ".join(cmd) + "\n")
        for line in proc.stdout:
            log.write(line)
            if line.strip():
                last = line.strip()
            if echo and re.search(r"(^|: )(Epoch \d+$|Pseudo dice|Mean Validation Dice)", line.rstrip()):
                echo(line.rstrip())
    if proc.returncode != 0:
        raise MedimgenError(f"nnUNetv2_train {dataset_id} {configuration} {fold} -tr {trainer} failed "
                            f"(exit {proc.returncode}): {last[:300]} (full output: {log_file})")
