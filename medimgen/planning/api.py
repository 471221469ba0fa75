"""`medimgen plan`: read nnU-Net's plans, apply the heuristics, fit memory, write medimgen_config.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medimgen import __version__
from medimgen.config.io import (apply_overrides, back_up_config, config_lock, is_user_edited, load_config,
                                save_config)
from medimgen.config.kinds import kind, names
from medimgen.config.schema import DatasetInfo, MedimgenConfig, is_foundation
from medimgen.core.errors import MedimgenError
from medimgen.planning.foundation import (FOUNDATION_RANGE, choose, forced_sources, foundation_bounds,
                                         is_source_override, nnunet_clip, overridden)
from medimgen.planning.heuristics import joint_by_default, plan_generation
from medimgen.planning.latent_cache import plan_cache
from medimgen.planning.intensity_stats import case_statistics, intensity_bounds, intensity_statistics
from medimgen.planning.memory import detect_gpu_memory_gb, fit_to_memory
from medimgen.core.paths import CONFIG_NAME
from medimgen.nnunet.plans import DatasetPlans


HEADER = """medimgen generation config for {name}, planned from {plans}.json by medimgen {version}.
Edit freely: values are validated when read, and `medimgen plan` will not overwrite an
edited file without --force (it keeps a backup). Axis order is nnU-Net's preprocessed order."""


@dataclass
class PlanResult:
    path: Path
    config: MedimgenConfig
    backup: Path | None
    replaced: bool
    notes: tuple[str, ...] = ()  # one line each, for the user (e.g. pretrained weights that are absent)

    def explain(self) -> str:
        from medimgen.planning.memory import explain

        return "\n".join([*(explain(cfg, dim) for dim, cfg in self.config.configs.items()),
                          *explain_costs(self.config, self.path.parent)])


def explain_costs(config: MedimgenConfig, folder: Path) -> list[str]:
    """The disk, latent-cache and quality-check tables of `plan --explain`, every dimensionality (``folder``: the
    dataset's preprocessed folder)."""
    from medimgen.planning.disk import explain_disk
    from medimgen.planning.latent_cache import cached_cases, explain_cache
    from medimgen.planning.quality_budget import explain_quality

    cases = {dim: cached_cases(config, dim, folder) for dim in config.configs}  # read once, for both tables
    return [*(f"{dim} autoencoder: {cfg.derived.autoencoder_choice}" for dim, cfg in config.configs.items()
              if cfg.derived.autoencoder_choice),
            *(explain_disk(cfg, dim, cache=cases[dim]) for dim, cfg in config.configs.items()),
            *(explain_cache(config, dim, folder, cases[dim]) for dim in config.configs),
            *(explain_quality(cfg, dim) for dim, cfg in config.configs.items())]


def _warm_disk_table(config: MedimgenConfig) -> None:
    """Count the planned networks' tensors for the disk table now, while MONAI is imported for the simulation
    anyway (~0.4 s): they are kept with the simulations (planning/sim_cache.py), so the first `plan --explain` and
    `memory` after `plan` read them instead of importing MONAI (~4 s CPU)."""
    from medimgen.planning.disk import estimate_disk

    for cfg in config.configs.values():
        for model in names():
            estimate_disk(cfg, model)


def explain_existing(dataset_id: int | str, plans_identifier: str) -> str | None:
    """`plan --explain` alone on a planned dataset: the tables of the config as it stands, no re-planning (None:
    not planned yet, or planned from other nnU-Net plans: plan it)."""
    from medimgen.core.paths import config_path

    path = config_path(dataset_id)
    if not path.is_file() or load_config(path).dataset.plans_identifier != plans_identifier:
        return None
    report = check_memory(dataset_id, None, None, plans_identifier)
    cfg = load_config(report.path)
    return "\n".join([f"{report.path} exists: explaining it as it stands (--force, --set or --gpu-memory re-plan)",
                      report.table, *(f"does not fit: {line}" for line in report.misfits),
                      *explain_costs(cfg, report.path.parent),
                      *weights_notes({}, cfg, offline=False)])


def weights_notes(planned: dict, fitted: MedimgenConfig, offline: bool) -> list[str]:
    """One line per perceptual network whose pretrained weights are absent, with the download command.

    ``planned``: {dim: network} as the heuristics planned it; ``fitted``: the final config."""
    from medimgen.models.weights import download_command, hub_dir, weights_present

    absent: dict[tuple[str, bool], list[str]] = {}
    for dim, c in fitted.configs.items():
        net, off = c.losses.perceptual_network, False
        if offline and net == "none":
            net, off = planned[dim], True  # switched off by --offline (or by the user)
        try:
            if net != "none" and c.losses.perceptual_weight > 0 and not weights_present(net):
                absent.setdefault((net, off), []).append(dim)
        except MedimgenError:  # not a network with downloadable weights: training names the problem
            continue
    notes = []
    for (net, off), dims in absent.items():
        if off:
            notes.append(f"note: pretrained weights of perceptual network '{net}' are not in {hub_dir()}, so "
                         f"{'/'.join(dims)} plans losses.perceptual_network=none (--offline); after "
                         f"`{download_command(net)}`, re-plan without --offline to use it")
        else:
            notes.append(f"note: pretrained weights of perceptual network '{net}' ({'/'.join(dims)}) are not in "
                         f"{hub_dir()}: run `{download_command(net)}` before training the autoencoder "
                         f"(or re-plan with --offline to train without the perceptual loss)")
    return notes


def preprocessed_dims(plans: DatasetPlans) -> tuple[list[str], dict[str, str]]:
    """The dimensionalities nnU-Net planned and preprocessed, and {dim: why not} for those it only planned
    (`nnUNetv2_plan_and_preprocess -c 2d` plans 3d_fullres too but preprocesses only 2d). None preprocessed:
    the first one's line (which command preprocesses it)."""
    dims, skipped = [], {}
    for dim in plans.available_dims:
        try:
            plans.preprocessed_folder(dim)
            dims.append(dim)
        except MedimgenError as e:
            skipped[dim] = str(e)
    if not dims and skipped:
        raise MedimgenError(next(iter(skipped.values())))
    return dims, skipped


def build_config(plans: DatasetPlans, gpu_memory_gb: float | None = None, overrides: Sequence[str] = (),
                 offline: bool = False, notes: list[str] | None = None,
                 only: Sequence[str] | None = None) -> MedimgenConfig:
    """Heuristics, then the user's overrides, then the memory fitter (which sees the overridden values).

    ``offline``: plan no perceptual loss where its pretrained weights are absent (before the overrides,
    so that an explicit --set losses.perceptual_network wins). ``notes``: gets one line per perceptual
    network whose weights are absent (the download command). ``only``: plan these dimensionalities alone (of
    those nnU-Net preprocessed)."""
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
    raw_stats: dict = {}  # the raw cases are read once per normalisation setting (2d and 3d usually share it)
    dims, skipped = preprocessed_dims(plans)
    if only is not None:
        dims = [d for d in dims if d in only]
    if notes is not None:
        notes += [f"note: {dim} not planned: {why} (then re-plan)" for dim, why in skipped.items()]
    forced = forced_sources(overrides)
    if "2d" in forced and is_foundation(forced["2d"]):
        raise MedimgenError(f"autoencoder.source={forced['2d']} cannot be used for 2d: the published foundation "
                            f"autoencoders are 3D networks")
    choices = {}
    for dim in dims:
        labels = overridden(overrides, "data.generate_labels", dim)
        joint = joint_by_default(plans) if labels is None else labels is True
        force = forced.get(dim, forced.get("*") if dim == "3d" else None)
        choices[dim] = choose(plans, dim, joint, force)
    for dim in dims:
        source, why = choices[dim]
        low, high = intensity_bounds(plans, dim) if not is_foundation(source) else foundation_bounds(plans, dim)
        cm = plans.configuration(dim)
        key = (tuple(cm.normalization_schemes), tuple(cm.use_mask_for_norm))
        if key not in raw_stats:
            needs_raw = any(s != "CTNormalization" for s in cm.normalization_schemes)
            raw_stats[key] = case_statistics(plans, dim) if needs_raw else []
        stats = intensity_statistics(plans, dim, low, cases=raw_stats[key])
        configs[dim] = plan_generation(plans, dim, low, high, target, intensity_stats=stats, autoencoder_source=source,
                                       intensity_range=(-1.0, 1.0) if not is_foundation(source) else FOUNDATION_RANGE)
        configs[dim] = dataclasses.replace(configs[dim], derived=dataclasses.replace(
            configs[dim].derived, autoencoder_choice=why))
        if is_foundation(source):  # the window reaches beyond nnU-Net's CT clip: map samples back within it
            clip_low, clip_high = nnunet_clip(plans, dim, low, high)
            configs[dim] = dataclasses.replace(configs[dim], data=dataclasses.replace(
                configs[dim].data, intensity_clip_low=tuple(clip_low), intensity_clip_high=tuple(clip_high)))
    # the planner applied the source (architecture, sizes, intensities); the override itself is kept out of the
    # others so that an unprefixed one does not reach the 2d config, which stays trained
    overrides = [o for o in overrides if not is_source_override(o)]
    planned = {dim: c.losses.perceptual_network for dim, c in configs.items()}
    if offline:
        from medimgen.models.weights import weights_present

        configs = {dim: c if weights_present(c.losses.perceptual_network) else
                   dataclasses.replace(c, losses=dataclasses.replace(c.losses, perceptual_network="none"))
                   for dim, c in configs.items()}
    # the latent cache where it pays and fits (planning.latent_cache), before the overrides: --set may turn it off
    planned_cfg = plan_cache(MedimgenConfig(dataset=info, configs=configs, medimgen_version=__version__), plans.folder)
    cfg = apply_overrides(planned_cfg, list(overrides))
    fitted = {dim: fit_to_memory(c, target) for dim, c in cfg.configs.items()}
    result = MedimgenConfig(dataset=cfg.dataset, configs=fitted, medimgen_version=cfg.medimgen_version)
    if notes is not None:
        notes += weights_notes(planned, result, offline)
    return result


def _refuse_edited(path: Path, force: bool) -> bool:
    """Whether the config file at ``path`` was edited by hand; without ``force`` that is an error."""
    edited = path.exists() and is_user_edited(path)
    if edited and not force:
        raise MedimgenError(
            f"{path} was edited by hand; not overwriting it. Re-run with --force to re-plan "
            f"(your file is kept as a backup), or use --set to change single values")
    return edited


def plan_dataset(
    dataset_id: int | str,
    gpu_memory_gb: float | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    plans_identifier: str = "nnUNetPlans",
    offline: bool = False,
    noise: str | None = None,
    scheduler: str | None = None,
) -> PlanResult:
    """Plan DatasetXXX and write nnUNet_preprocessed/DatasetXXX/medimgen_config.yaml.

    An existing file that was edited by hand is never overwritten silently: without
    ``force`` this raises; with ``force`` the edited file is first copied to a
    timestamped backup beside it. ``offline``: plan losses.perceptual_network=none where the planned
    network's pretrained weights are absent (without it they are planned anyway, with a note). ``noise``:
    the noise process of the generators, the DDPM and the LDM (ddpm or rflow; None: as planned, ddpm), before
    ``overrides``; ``scheduler``: its deprecated name.
    """
    noise = noise or scheduler
    if noise is not None:
        overrides = [f"{kind(m).scheduler_section}.type={noise}" for m in names(generator=True)] + list(overrides)
    plans = DatasetPlans.from_id(dataset_id, plans_identifier)
    path = plans.folder / CONFIG_NAME
    _refuse_edited(path, force)  # before the planning: fail fast
    notes: list[str] = []
    cfg = build_config(plans, gpu_memory_gb, overrides, offline, notes)
    with config_lock(path):  # a foundation run's fallback rewriting its section writes before or after this
        edited = _refuse_edited(path, force)
        backup = back_up_config(path) if edited else None
        replaced = path.exists()
        save_config(cfg, path, HEADER.format(name=plans.name, plans=plans_identifier, version=__version__))
    _warm_disk_table(cfg)
    return PlanResult(path=path, config=cfg, backup=backup, replaced=replaced, notes=tuple(notes))


@dataclass(frozen=True)
class MemoryReport:
    path: Path
    table: str  # the `plan --explain` table per dimensionality
    misfits: list[str]  # one line per model that does not fit, naming the keys to change


def check_memory(dataset_id: int | str | None = None, config_path: str | Path | None = None,
                 gpu_memory_gb: float | None = None, plans_identifier: str | None = None) -> MemoryReport:
    """Predicted peak of every model of a config as it stands (hand edits included), without fitting.

    ``plans_identifier``: the nnU-Net plans to check the dataset for (default: those its config records)."""
    from medimgen.planning.memory import explain, misfits

    if config_path is None:
        if dataset_id is None:
            raise MedimgenError("give a DATASET_ID or --config FILE")
        plans = (DatasetPlans.from_id(dataset_id, plans_identifier) if plans_identifier
                 else DatasetPlans.planned(dataset_id))
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
