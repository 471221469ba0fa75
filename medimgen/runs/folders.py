"""Trained runs: the one place that knows a run folder, its checkpoints, and how to load a trained model.

medimgen_results/DatasetXXX_Name/<model>/<2d|3d>/<train-val-test|fold_N>/
    checkpoints/last.pt                         (full resume state: all networks, optimisers, EMA, RNG, ...)
    checkpoints/best.pt                         (sampling weights only, EMA where used; training/loop.py)
                                                (both atomic: a uniquely named temporary file, then renamed)
    plots/loss.png, plots/epoch_NNNN.(gif|png)
    loss_dict.json                              (dict of per-epoch lists)
    config.yaml                                 (the resolved config of this run)
    geometry.json                               (spacing, axis order, orientation of a training case)
    <plans identifier>.json, dataset.json       (copied from nnU-Net)
    log.txt                                     (when tracking.output_mode is 'log')
    .lock                                       (held by the training process; holds its PID)

A trained model (:class:`TrainedModel`) comes from a run folder, from an MLflow model URI or from a
dataset's standard run (:class:`~medimgen.core.requests.ModelRef`), always the same way: networks built
from the run's own config, weights read with ``torch.load(weights_only=True)`` or safetensors. An
LDM run refers to its autoencoder run by a path relative to itself, so a moved results folder keeps
working. Nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medimgen.core.atomic import atomic_path
from medimgen.config import load_generation_config, save_generation_config
from medimgen.config.schema import DIFFUSION_MODELS, MODELS, SAMPLING_MODELS, GenerationConfig
from medimgen.core.errors import MedimgenError
from medimgen.data.geometry import Geometry, load_geometry
from medimgen.models.networks import autoencoder_for, build_controlnet, unet_for
from medimgen.core.requests import ModelRef

# files of a packaged model (the MLflow model's artifact, or any folder): safetensors + YAML + JSON
WEIGHTS = "weights.safetensors"
CONFIG = "config.yaml"
META = "meta.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def standard(cls, dataset: str, model: str, dim: str, split: str) -> "RunDir":
        """The dataset's run of ``model`` for ``dim`` and ``split`` under $medimgen_results."""
        from medimgen.core.paths import medimgen_results

        return cls(medimgen_results() / dataset / model / dim / split)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def loss_dict(self) -> Path:
        return self.root / "loss_dict.json"

    @property
    def geometry(self) -> Path:
        from medimgen.data.geometry import FILE

        return self.root / FILE

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    def is_trained(self) -> bool:
        return self.last.is_file() or self.best.is_file()

    def checkpoint(self, which: str = "best") -> Path:
        """checkpoints/<which>.pt, else last.pt (a run that has not validated yet has no best), else best.pt."""
        for path in (self.checkpoints / f"{which}.pt", self.last, self.best):
            if path.is_file():
                return path
        raise MedimgenError(f"no checkpoint in {self.checkpoints}: train the model first")

    def checkpoint_meta(self) -> dict:
        """``model`` kind and ``mlflow_run_id`` of the last checkpoint, read memory-mapped (no weights loaded)."""
        state = read_checkpoint(self.checkpoint("last"), mmap=True)
        return {"model": state.get("model"), "mlflow_run_id": state.get("mlflow_run_id")}

    def dataset(self, plans_identifier: str) -> str:
        """The dataset's name, from the run's copy of the nnU-Net plans it was trained on (else the standard
        layout's folder name)."""
        try:
            return str(json.loads((self.root / f"{plans_identifier}.json").read_text())["dataset_name"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.root.parents[2].name

    def make(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.plots.mkdir(parents=True, exist_ok=True)

    def copy_nnunet_files(self, dataset_folder: Path, plans_identifier: str) -> None:
        for name in (f"{plans_identifier}.json", "dataset.json"):
            src = Path(dataset_folder) / name
            if src.is_file():
                shutil.copy2(src, self.root / name)


def find_run(ref: ModelRef) -> RunDir:
    """The dataset's standard run of ``ref.model`` (ldm, ddpm, autoencoder; auto: the LDM if trained, else the DDPM)."""
    if ref.dataset_id is None:
        raise MedimgenError("DATASET_ID is needed to find a trained model")
    from medimgen.data.splits import split_name
    from medimgen.core.paths import dataset_name_from_id

    dataset = dataset_name_from_id(ref.dataset_id)
    split = split_name(ref.splitting, ref.fold)
    kinds = ["ldm", "ddpm"] if ref.model == "auto" else [ref.model]
    for kind in kinds:
        run = RunDir.standard(dataset, kind, ref.dim, split)
        if run.is_trained():
            return run
    base = run.root.parents[2]
    raise MedimgenError(f"no trained {' or '.join(kinds)} for {dataset} {ref.dim} {split} in {base}: "
                        f"train one first (medimgen train {'ldm|ddpm' if ref.model == 'auto' else ref.model} ...)")


# ---------------------------------------------------------------------------------------------- checkpoints
def write_checkpoint(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint's tensors and plain values (``weights_only``: nothing is unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise MedimgenError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("model") not in MODELS:
        raise MedimgenError(f"{path} is not a medimgen checkpoint")
    return state


def unwrap_ema(ema: dict) -> dict:
    """The network weights in a checkpoint's ``ema`` entry (training.ema.WeightEMA's state: ``module.``-prefixed
    weights and a step count), whether or not the EMA was past its warm-up."""
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}


def sampling_weights(state: dict, network: str) -> dict:
    """The weights of ``network`` to sample/evaluate with: from last.pt the EMA copy when the run kept one and it
    was past its warm-up (``sampling_ema``; checkpoints from before the warm-up: always), else the raw ones; best.pt
    holds just these."""
    ema = state.get("ema")
    if ema and state.get("sampling_ema", True) and network == state.get("ema_module", "unet"):
        return unwrap_ema(ema)
    return state["modules"][network]


def autoencoder_reference(ldm_run: Path, autoencoder_run: Path) -> str:
    """How an LDM run refers to its autoencoder run: a path relative to the LDM run."""
    return os.path.relpath(Path(autoencoder_run).resolve(), Path(ldm_run).resolve())


def _autoencoder_run_of(run: RunDir, extra: dict) -> RunDir:
    if "autoencoder_run" in extra:
        return RunDir((run.root / extra["autoencoder_run"]).resolve())
    return RunDir(Path(extra["autoencoder_checkpoint"]).parents[1])  # runs from before the relative reference


def load_autoencoder(run: RunDir, device: torch.device | str = "cpu"):
    """(the trained autoencoder of ``run`` in eval mode with frozen weights, its run config, checkpoint path)."""
    if not run.is_trained() or not run.config.is_file():
        raise MedimgenError(
            f"no trained autoencoder at {run.root}: train it first with "
            f"`medimgen train autoencoder` (same dataset, splitting and model type)")
    path = run.checkpoint("best")
    cfg = load_generation_config(run.config)
    ae = autoencoder_for(cfg)
    try:
        ae.load_state_dict(sampling_weights(read_checkpoint(path), "autoencoder"))
    except (KeyError, RuntimeError) as e:
        raise MedimgenError(f"cannot load the autoencoder from {path} ({type(e).__name__}: {e})") from None
    ae.to(device).eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae, cfg, path


# ---------------------------------------------------------------------------------------------- trained models
def _networks(kind: str, cfg: GenerationConfig):
    """(UNet or None, autoencoder or None) of a trained ``kind``, built from its config (a ControlNet's: those of
    its base)."""
    if kind == "controlnet":
        kind = cfg.controlnet_base()
    unet = unet_for(cfg, kind) if kind in DIFFUSION_MODELS else None
    ae = autoencoder_for(cfg) if kind in ("ldm", "autoencoder") else None
    return unet, ae


@dataclass
class TrainedModel:
    """A trained DDPM, LDM (UNet + its autoencoder + latent scale), autoencoder, or ControlNet (its own network + the
    DDPM/LDM it steers: ``base_kind``, whose networks fill the other fields), ready to use (eval mode)."""

    kind: str  # ddpm | ldm | autoencoder
    cfg: GenerationConfig
    unet: torch.nn.Module | None
    autoencoder: torch.nn.Module | None
    scale_factor: float | None
    geometry: Geometry
    dataset: str
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mlflow_run_id: str | None = None
    run_root: Path | None = None
    controlnet: torch.nn.Module | None = None
    base_kind: str | None = None  # controlnet: ddpm | ldm

    @property
    def dim(self) -> str:
        return self.cfg.dim

    def to(self, device: str | torch.device):
        self.device = torch.device(device)
        for net in (self.unet, self.autoencoder, self.controlnet):
            if net is not None:
                net.to(self.device)
        return self

    # ------------------------------------------------------------------ from a run folder
    @classmethod
    def from_run(cls, run_root: Path | str, checkpoint: str = "best"):
        """The model of a training run folder (best.pt, else last.pt; networks from its config.yaml)."""
        run = RunDir(Path(run_root))
        path = run.checkpoint(checkpoint)
        state = read_checkpoint(path)
        kind = state["model"]
        cfg = load_generation_config(run.config)
        if kind == "controlnet":
            return cls._controlnet_from_run(run, path, state, cfg)
        unet, ae = _networks(kind, cfg)
        scale = None
        try:
            if unet is not None:
                unet.load_state_dict(sampling_weights(state, "unet"))
            if kind == "autoencoder":
                ae.load_state_dict(sampling_weights(state, "autoencoder"))
        except (KeyError, RuntimeError) as e:
            raise MedimgenError(f"{path} does not fit the networks of {run.config} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from None
        if kind == "ldm":
            ae, _, _ = load_autoencoder(_autoencoder_run_of(run, state["extra"]))
            scale = float(state["extra"]["scale_factor"])
        geometry = load_geometry(run.root, cfg.data.spacing, cfg.data.plans_identifier)
        return cls(kind, cfg, _eval(unet), _eval(ae), scale, geometry, run.dataset(cfg.data.plans_identifier),
                   str(path), mlflow_run_id=state.get("mlflow_run_id"), run_root=run.root)

    @classmethod
    def _controlnet_from_run(cls, run: RunDir, path: Path, state: dict, cfg: GenerationConfig):
        """A ControlNet run: its network from its checkpoint, the base from the run ``extra["base_run"]`` names (a
        path relative to the ControlNet run, like an LDM's autoencoder)."""
        base_root = (run.root / state["extra"]["base_run"]).resolve()
        if not RunDir(base_root).is_trained():
            raise MedimgenError(f"the base model of the ControlNet {run.root} is gone ({base_root} has no checkpoint)")
        base = cls.from_run(base_root)
        net = build_controlnet(cfg)
        try:
            net.load_state_dict(sampling_weights(state, "controlnet"))
        except (KeyError, RuntimeError) as e:
            raise MedimgenError(f"{path} does not fit the ControlNet of {run.config} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from None
        geometry = load_geometry(run.root, cfg.data.spacing, cfg.data.plans_identifier)
        return cls("controlnet", cfg, base.unet, base.autoencoder, base.scale_factor, geometry,
                   run.dataset(cfg.data.plans_identifier), str(path), mlflow_run_id=state.get("mlflow_run_id"),
                   run_root=run.root, controlnet=_eval(net), base_kind=base.kind)

    # ------------------------------------------------------------------ packaged (MLflow model artifact)
    def save(self, folder: Path | str) -> Path:
        """Weights as safetensors + config YAML + meta JSON: everything a fresh process needs (no pickle)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for prefix, net in (("unet", self.unet), ("autoencoder", self.autoencoder), ("controlnet", self.controlnet)):
            if net is not None:
                tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
        save_file(tensors, str(folder / WEIGHTS))
        save_generation_config(self.cfg, folder / CONFIG)
        meta = {"kind": self.kind, "scale_factor": self.scale_factor, "dataset": self.dataset,
                "geometry": self.geometry.to_dict(), "source": self.source, "base_kind": self.base_kind}
        (folder / META).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: Path | str, source: str | None = None):
        """A model saved by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (WEIGHTS, CONFIG, META):
            if not (folder / name).is_file():
                raise MedimgenError(f"{folder} is not a medimgen model: {name} is missing")
        try:
            meta = json.loads((folder / META).read_text())
            kind, scale = meta["kind"], meta["scale_factor"]
            geometry = Geometry.from_dict(meta["geometry"], str(folder / META))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise MedimgenError(f"{folder / META} is not a medimgen model description ({type(e).__name__}: {e})") from None
        if kind not in MODELS:
            raise MedimgenError(f"{folder / META}: unknown model kind {kind!r}")
        cfg = load_generation_config(folder / CONFIG)
        tensors = load_file(str(folder / WEIGHTS))
        unet, ae = _networks(kind, cfg)
        controlnet = build_controlnet(cfg) if kind == "controlnet" else None
        for prefix, net in (("unet", unet), ("autoencoder", ae), ("controlnet", controlnet)):
            if net is not None:
                net.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        return cls(kind, cfg, _eval(unet), _eval(ae), scale, geometry, str(meta.get("dataset", "")),
                   source or meta.get("source", str(folder)), controlnet=_eval(controlnet),
                   base_kind=meta.get("base_kind") or (cfg.controlnet_base() if kind == "controlnet" else None))

    @classmethod
    def from_uri(cls, uri: str):
        """A model logged to MLflow (models:/NAME@alias, models:/NAME/3, runs:/ID/model): its packaged weights are
        downloaded and loaded like a folder (the pyfunc code is not executed)."""
        from medimgen.runs.tracking import download_model, model_run_id

        with tempfile.TemporaryDirectory() as tmp:
            model = cls.load(download_model(uri, Path(tmp), META), source=uri)
        model.mlflow_run_id = model_run_id(uri)
        return model

    @classmethod
    def resolve(cls, ref: ModelRef, kinds: tuple[str, ...] = MODELS):
        """The model ``ref`` names (run folder, MLflow URI or the dataset's standard run), of one of ``kinds``."""
        if ref.is_uri:
            model = cls.from_uri(ref.model)
        elif Path(ref.model).is_dir():
            model = cls.from_run(ref.model, ref.checkpoint)
        elif ref.model in (*kinds, "auto"):
            model = cls.from_run(find_run(ref).root, ref.checkpoint)
        else:
            raise MedimgenError(f"--model must be {', '.join(kinds)}, auto, a run folder or an MLflow model URI; "
                                f"got {ref.model!r}")
        if model.kind not in kinds:
            raise MedimgenError(f"{model.source} is a {model.kind} model; this needs {' or '.join(kinds)}")
        return model


def _eval(net: torch.nn.Module | None):
    return net.eval() if net is not None else None


def log_run_model(run_root: Path | str, run_id: str | None, register: bool = True, alias: str | None = None,
                  tracking_uri: str | None = None, checkpoint: str = "best"):
    """Log the trained DDPM/LDM/ControlNet of a run folder as an MLflow pyfunc model in ``run_id`` (registered, when
    ``register``, as DatasetXXX_<model>_<dim>, with the split's name appended for a split other than the default; a
    tuning trial is never registered), with the run's quality/* metrics and a description; see
    :func:`medimgen.runs.tracking.log_model`."""
    from medimgen.runs.tracking import connect, log_model, registered_name, run_facts, version_description

    model = TrainedModel.resolve(ModelRef(str(run_root), checkpoint=checkpoint), SAMPLING_MODELS)
    connect(tracking_uri)
    tags, metrics = run_facts(run_id)
    split = tags.get("medimgen.split") or Path(run_root).name
    if tags.get("medimgen.tuning_trial") == "true":
        register = False
    epochs = model.cfg.train_for(model.kind).epochs
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save(Path(tmp) / "sampler")
        name = registered_name(model.dataset, model.kind, model.dim, split) if register else None
        return log_model(folder, run_id=run_id, registered_name=name, alias=alias, experiment=model.dataset,
                         run_name=f"register_{model.kind}_{model.dim}", tags={"medimgen.source": model.source},
                         tracking_uri=tracking_uri, metrics=metrics,
                         description=version_description(model.kind, model.dim, run_id, tags, epochs, metrics))
