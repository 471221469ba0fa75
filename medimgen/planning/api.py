"""`medimgen plan`: read nnU-Net's plans, apply the heuristics, fit memory, write medimgen_config.yaml."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medimgen import __version__
from medimgen.config.io import apply_overrides, is_user_edited, load_config, save_config
from medimgen.config.schema import DatasetInfo, MedimgenConfig
from medimgen.errors import MedimgenError
from medimgen.planning.heuristics import plan_generation
from medimgen.planning.intensity import intensity_bounds
from medimgen.planning.memory import detect_gpu_memory_gb, fit_to_memory
from medimgen.plans import DatasetPlans

CONFIG_NAME = "medimgen_config.yaml"

HEADER = """medimgen generation config for {name}, planned from {plans}.json by medimgen {version}.
Edit freely: values are validated when read, and `medimgen plan` will not overwrite an
edited file without --force (it keeps a backup). Axis order is nnU-Net's preprocessed order."""


@dataclass
class PlanResult:
    path: Path
    config: MedimgenConfig
    backup: Path | None
    replaced: bool

    def explain(self) -> str:
        from medimgen.planning.memory import explain

        return "\n".join(explain(cfg, dim) for dim, cfg in self.config.configs.items())


def config_path(dataset_id: int | str) -> Path:
    return DatasetPlans.from_id(dataset_id).folder / CONFIG_NAME


def build_config(plans: DatasetPlans, gpu_memory_gb: float | None = None, overrides: Sequence[str] = ()) -> MedimgenConfig:
    """Heuristics, then the user's overrides, then the memory fitter (which sees the overridden values)."""
    target = float(gpu_memory_gb) if gpu_memory_gb else detect_gpu_memory_gb()
    pm = plans.manager
    info = DatasetInfo(
        id=plans.dataset_id,
        name=plans.name,
        num_training=plans.num_training,
        labels=plans.labels,
        file_ending=plans.file_ending,
        transpose_forward=tuple(pm.transpose_forward),
        transpose_backward=tuple(pm.transpose_backward),
        original_median_spacing=tuple(float(s) for s in pm.original_median_spacing_after_transp),
        plans_identifier=plans.plans_identifier,
    )
    configs = {}
    for dim in plans.available_dims:
        low, high = intensity_bounds(plans, dim)
        configs[dim] = plan_generation(plans, dim, low, high, target)
    cfg = apply_overrides(MedimgenConfig(dataset=info, configs=configs, medimgen_version=__version__), list(overrides))
    fitted = {dim: fit_to_memory(c, target) for dim, c in cfg.configs.items()}
    return MedimgenConfig(dataset=cfg.dataset, configs=fitted, medimgen_version=cfg.medimgen_version)


def plan_dataset(
    dataset_id: int | str,
    gpu_memory_gb: float | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    plans_identifier: str = "nnUNetPlans",
) -> PlanResult:
    """Plan DatasetXXX and write nnUNet_preprocessed/DatasetXXX/medimgen_config.yaml.

    An existing file that was edited by hand is never overwritten silently: without
    ``force`` this raises; with ``force`` the edited file is first copied to a
    timestamped backup beside it.
    """
    plans = DatasetPlans.from_id(dataset_id, plans_identifier)
    path = plans.folder / CONFIG_NAME
    edited = path.exists() and is_user_edited(path)
    if edited and not force:
        raise MedimgenError(
            f"{path} was edited by hand; not overwriting it. Re-run with --force to re-plan "
            f"(your file is kept as a backup), or use --set to change single values")
    cfg = build_config(plans, gpu_memory_gb, overrides)
    backup = None
    if edited:
        backup = path.with_name(f"{CONFIG_NAME}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        shutil.copy2(path, backup)
    replaced = path.exists()
    save_config(cfg, path, HEADER.format(name=plans.name, plans=plans_identifier, version=__version__))
    return PlanResult(path=path, config=cfg, backup=backup, replaced=replaced)


@dataclass(frozen=True)
class MemoryReport:
    path: Path
    table: str  # the `plan --explain` table per dimensionality
    misfits: list[str]  # one line per model that does not fit, naming the keys to change


def check_memory(dataset_id: int | str | None = None, config_path: str | Path | None = None,
                 gpu_memory_gb: float | None = None, plans_identifier: str = "nnUNetPlans") -> MemoryReport:
    """Predicted peak of every model of a config as it stands (hand edits included), without fitting."""
    from medimgen.planning.memory import explain, misfits

    if config_path is None:
        if dataset_id is None:
            raise MedimgenError("give a DATASET_ID or --config FILE")
        plans = DatasetPlans.from_id(dataset_id, plans_identifier)
        config_path = plans.folder / CONFIG_NAME
        if not config_path.is_file():
            raise MedimgenError(f"no {CONFIG_NAME} in {plans.folder}: run `medimgen plan -d {dataset_id}` first")
    config_path = Path(config_path)
    if not config_path.is_file():
        raise MedimgenError(f"config file {config_path} does not exist")
    cfg = load_config(config_path)
    tables, bad = [], []
    for dim, c in cfg.configs.items():
        tables.append(explain(c, dim, gpu_memory_gb))
        bad += misfits(c, dim, gpu_memory_gb)
    return MemoryReport(config_path, "\n".join(tables), bad)
