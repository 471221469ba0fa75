"""Run nnU-Net's own command-line steps unchanged (as a user would), with clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from medimgen.errors import MedimgenError


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
) -> None:
    """``nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity -c ... -np ...``."""
    cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-npfp", str(num_processes),
           "-c", *configurations, "-np", *[str(num_processes)] * len(configurations)]
    if verify:
        cmd.append("--verify_dataset_integrity")
    run_env = dict(os.environ if env is None else env)
    out = subprocess.run(cmd, env=run_env, stdout=subprocess.PIPE if quiet else None,
                         stderr=subprocess.STDOUT if quiet else None, text=True)
    if out.returncode != 0:
        tail = (out.stdout or "").strip().splitlines()[-1:] if quiet else []
        raise MedimgenError(f"nnUNetv2_plan_and_preprocess failed for dataset {dataset_id} (exit {out.returncode})"
                            + (f": {tail[0]}" if tail else ""))
