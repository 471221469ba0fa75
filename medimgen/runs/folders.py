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

The upstream link: a run of a kind that builds on another run (an LDM on its autoencoder, a ControlNet on the
generator it steers; ``ModelKind.upstream``) records that run as one path relative to itself, ``upstream_run`` in its
checkpoints' ``extra``, written by :func:`link_upstream` and read by :func:`upstream_of` (train, resume, sample,
register); :func:`upstream_for` picks it for a new run, :func:`find_trained` is the one 'auto' resolution. The latent
scale factor lives in one place: the run config's ``derived.latent_scale_factor`` (checkpoints and meta.json of
older versions held copies; they are read when the config has none).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medimgen.core.atomic import atomic_path, write_failure
from medimgen.config import load_generation_config, save_generation_config
from medimgen.config.kinds import auto_generators, kind, names, the
from medimgen.config.schema import GenerationConfig
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
        from medimgen.core.names import inside
        from medimgen.core.paths import medimgen_results

        root = medimgen_results()
        return cls(inside(root / dataset / model / dim / split, root, f"the run folder of {dataset}"))

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
        from medimgen.core.names import check_dataset_name

        try:
            name = str(json.loads((self.root / f"{plans_identifier}.json").read_text())["dataset_name"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.root.parents[2].name
        return check_dataset_name(name, f"dataset_name in {self.root / f'{plans_identifier}.json'}")

    def make(self) -> None:
        """The run's folders; a checkpoints/ or plots/ that leads outside the run (a symlink) is refused."""
        from medimgen.core.names import inside

        for sub in (self.checkpoints, self.plots):
            inside(sub, self.root, "run folder")
            sub.mkdir(parents=True, exist_ok=True)

    def copy_nnunet_files(self, dataset_folder: Path, plans_identifier: str) -> None:
        for name in (f"{plans_identifier}.json", "dataset.json"):
            src = Path(dataset_folder) / name
            if src.is_file():
                shutil.copy2(src, self.root / name)


def find_trained(dataset: str, model: str, dim: str, split: str, needed_by: str = "") -> RunDir:
    """The dataset's trained standard run of ``model`` for ``dim`` and ``split``; 'auto': the first trained of
    kinds.auto_generators() (the LDM if trained, else the DDPM). The one 'auto' resolution."""
    candidates = list(auto_generators()) if model == "auto" else [kind(model).name]
    for name in candidates:
        run = RunDir.standard(dataset, name, dim, split)
        if run.is_trained():
            return run
    raise MedimgenError(f"no trained {' or '.join(candidates)} for {dataset} {dim} {split} in "
                        f"{RunDir.standard(dataset, candidates[0], dim, split).root.parents[2]}{needed_by}: train one "
                        f"first (medimgen train {'|'.join(candidates)} ...)")


def find_run(ref: ModelRef) -> RunDir:
    """The dataset's standard run of ``ref.model`` (a kind, or auto: the LDM if trained, else the DDPM)."""
    if ref.dataset_id is None:
        raise MedimgenError("DATASET_ID is needed to find a trained model")
    from medimgen.data.splits import split_name
    from medimgen.core.paths import dataset_name_from_id

    return find_trained(dataset_name_from_id(ref.dataset_id), ref.model, ref.dim, split_name(ref.splitting, ref.fold))


# ---------------------------------------------------------------------------------------------- the upstream link
UPSTREAM = "upstream_run"  # key of checkpoint["extra"]: the upstream run, relative to the run
_OLD_UPSTREAM = ("autoencoder_run", "base_run")  # the same link as older versions wrote it


def link_upstream(run_root: Path, upstream_root: Path) -> dict:
    """The checkpoint ``extra`` entry linking a run to the run it builds on: a path relative to the run, so a moved
    results folder keeps working."""
    return {UPSTREAM: os.path.relpath(Path(upstream_root).resolve(), Path(run_root).resolve())}


def upstream_of(run_root: Path, extra: dict) -> RunDir:
    """The run a run builds on, from its checkpoint's ``extra`` (written by :func:`link_upstream`; older versions'
    ``autoencoder_run``/``base_run`` and absolute ``autoencoder_checkpoint`` too)."""
    for key in (UPSTREAM, *_OLD_UPSTREAM):
        if key in extra:
            return RunDir((Path(run_root) / extra[key]).resolve())
    if "autoencoder_checkpoint" in extra:
        return RunDir(Path(extra["autoencoder_checkpoint"]).parents[1])
    raise MedimgenError(f"the checkpoint of {run_root} names no upstream run")


def upstream_for(model: str, run: RunDir, cfg: GenerationConfig, dataset: str, split: str,
                 given: Path | None = None) -> RunDir | None:
    """The run ``model`` builds on (None for a kind that builds on none): a continued run's own link (its last
    checkpoint), else ``given``, else the dataset's standard run (an autoencoder, or the generator
    ``controlnet.base`` names: 'auto' is :func:`find_trained`'s)."""
    k = kind(model)
    if k.upstream is None:
        return None
    if run.last.is_file():
        return upstream_of(run.root, read_checkpoint(run.last, mmap=True)["extra"])
    if given:
        return RunDir(Path(given))
    if k.upstream == "encoder":
        return RunDir.standard(dataset, the("encoder").name, cfg.dim, split)
    return find_trained(dataset, cfg.controlnet.base, cfg.dim, split,
                        needed_by=f" (a {k.name} steers a trained generator)")


def scale_factor_of(cfg: GenerationConfig, *old: dict | None) -> float | None:
    """A latent model's scale factor: its config's ``derived.latent_scale_factor`` (the one place), else (runs and
    packages of older versions) the ``scale_factor`` of one of ``old`` (checkpoint extra, meta.json)."""
    if cfg.derived.latent_scale_factor is not None:
        return float(cfg.derived.latent_scale_factor)
    for d in old:
        if d and d.get("scale_factor") is not None:
            return float(d["scale_factor"])
    return None


# ---------------------------------------------------------------------------------------------- checkpoints
def check_config_unchanged(state: dict, cfg: GenerationConfig, config_file: Path, checkpoint: Path) -> None:
    """Refuse a run whose config.yaml was edited after training where the weights depend on it (the checkpoint
    keeps the config it trained with), naming the first key that changed."""
    from medimgen.config.io import from_dict, model_keys_changed, parse_yaml

    text = state.get("config")
    if not isinstance(text, str):
        return  # a checkpoint from before configs were kept in it
    try:
        trained = from_dict(GenerationConfig, parse_yaml(text, str(checkpoint)))
    except MedimgenError:
        return  # an older schema: nothing to compare with
    changed = model_keys_changed(trained, cfg, state["model"])
    if changed:
        from medimgen.config.io import flatten
        from medimgen.core.names import short_repr

        key = changed[0]
        raise MedimgenError(f"{config_file} was edited after training: '{key}' is "
                            f"{short_repr(flatten(cfg).get(key))}, the weights in {checkpoint.name} were trained "
                            f"with {short_repr(flatten(trained).get(key))}"
                            + (f" (and {len(changed) - 1} more key(s))" if len(changed) > 1 else "")
                            + ": restore the value, or train again")


def write_checkpoint(state: dict, path: Path) -> None:
    """Atomic: a failed write (a full disk: torch's C++ writer raises RuntimeError) keeps the previous file."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's writer reports ENOSPC as 'basic_ios::clear' or 'file write failed'
            raise write_failure(e, path) from None


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint's tensors and plain values (``weights_only``: nothing is unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise MedimgenError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("model") not in names():
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
        ae.load_state_dict(sampling_weights(read_checkpoint(path), the("encoder").module))
    except (KeyError, RuntimeError) as e:
        raise MedimgenError(f"cannot load the autoencoder from {path} ({type(e).__name__}: {e})") from None
    ae.to(device).eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae, cfg, path


# ---------------------------------------------------------------------------------------------- trained models
def _networks(model: str, cfg: GenerationConfig):
    """(UNet or None, autoencoder or None) of a trained ``model``, built from its config (one steering a generator:
    those of its base)."""
    k = kind(cfg.generator_for(model))
    unet = unet_for(cfg, k.name) if k.generator else None
    ae = autoencoder_for(cfg) if k.encoder or k.space == "latent" else None
    return unet, ae


def _load(net: torch.nn.Module, weights: dict, path, what) -> None:
    try:
        net.load_state_dict(weights)
    except (KeyError, RuntimeError) as e:
        raise MedimgenError(f"{path} does not fit the {what} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None


@dataclass
class TrainedModel:
    """A trained generator (DDPM; LDM: UNet + its autoencoder + latent scale), autoencoder, or a kind steering a
    generator (a ControlNet: its own network + the DDPM/LDM it steers, ``base_kind``, whose networks fill the other
    fields), ready to use (eval mode)."""

    kind: str  # a registered kind's name (medimgen.config.kinds)
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
    base_kind: str | None = None  # a steering kind: the generator it steers

    @property
    def dim(self) -> str:
        return self.cfg.dim

    @property
    def generator(self) -> str:
        """The generator that samples: this model's kind, or the base it steers."""
        return self.base_kind or self.kind

    def to(self, device: str | torch.device):
        self.device = torch.device(device)
        for net in (self.unet, self.autoencoder, self.controlnet):
            if net is not None:
                net.to(self.device)
        return self

    # ------------------------------------------------------------------ from a run folder
    @classmethod
    def from_run(cls, run_root: Path | str, checkpoint: str = "best"):
        """The model of a training run folder (best.pt, else last.pt; networks from its config.yaml; the networks
        of the run it builds on from that run, :func:`upstream_of`)."""
        run = RunDir(Path(run_root))
        path = run.checkpoint(checkpoint)
        state = read_checkpoint(path)
        k = kind(state["model"])
        cfg = load_generation_config(run.config)
        check_config_unchanged(state, cfg, run.config, path)
        base, own = None, None
        if k.steers:
            base_run = upstream_of(run.root, state["extra"])
            if not base_run.is_trained():
                raise MedimgenError(f"the base model of the {k.name} {run.root} is gone ({base_run.root} has no "
                                    f"checkpoint)")
            base = cls.from_run(base_run.root)
            unet, ae, scale = base.unet, base.autoencoder, base.scale_factor
            own = build_controlnet(cfg)
            _load(own, sampling_weights(state, k.module), path, f"{k.name} of {run.config}")
        else:
            unet, ae = _networks(k.name, cfg)
            for net in (unet, ae if k.encoder else None):
                if net is not None:
                    _load(net, sampling_weights(state, "unet" if net is unet else k.module), path,
                          f"networks of {run.config}")
            scale = None
            if k.upstream == "encoder":
                ae, _, _ = load_autoencoder(upstream_of(run.root, state["extra"]))
                scale = scale_factor_of(cfg, state["extra"])
        geometry = load_geometry(run.root, cfg.data.spacing, cfg.data.plans_identifier)
        return cls(k.name, cfg, _eval(unet), _eval(ae), scale, geometry, run.dataset(cfg.data.plans_identifier),
                   str(path), mlflow_run_id=state.get("mlflow_run_id"), run_root=run.root, controlnet=_eval(own),
                   base_kind=base.kind if base else None)

    # ------------------------------------------------------------------ packaged (MLflow model artifact)
    def save(self, folder: Path | str) -> Path:
        """Weights as safetensors + config YAML + meta JSON: everything a fresh process needs (no pickle; the latent
        scale is the config's ``derived.latent_scale_factor``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for prefix, net in (("unet", self.unet), ("autoencoder", self.autoencoder), ("controlnet", self.controlnet)):
            if net is not None:
                tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
        save_file(tensors, str(folder / WEIGHTS))
        cfg = self.cfg
        if self.scale_factor is not None and cfg.derived.latent_scale_factor is None:  # a run of an older version
            cfg = dataclasses.replace(cfg, derived=dataclasses.replace(cfg.derived,
                                                                       latent_scale_factor=self.scale_factor))
        save_generation_config(cfg, folder / CONFIG)
        meta = {"kind": self.kind, "dataset": self.dataset, "geometry": self.geometry.to_dict(), "source": self.source,
                "base_kind": self.base_kind}
        (folder / META).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: Path | str, source: str | None = None):
        """A model saved by :meth:`save` (or by an older version: meta.json's ``scale_factor``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (WEIGHTS, CONFIG, META):
            if not (folder / name).is_file():
                raise MedimgenError(f"{folder} is not a medimgen model: {name} is missing")
        try:
            meta = json.loads((folder / META).read_text())
            name = meta["kind"]
            geometry = Geometry.from_dict(meta["geometry"], str(folder / META))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise MedimgenError(f"{folder / META} is not a medimgen model description ({type(e).__name__}: {e})") from None
        if name not in names():
            raise MedimgenError(f"{folder / META}: unknown model kind {name!r}")
        k = kind(name)
        cfg = load_generation_config(folder / CONFIG)
        try:
            tensors = load_file(str(folder / WEIGHTS))
        except Exception as e:  # safetensors' SafetensorError (an edited or truncated header), OSError
            raise MedimgenError(f"cannot read the weights {folder / WEIGHTS} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:160]})") from None
        unet, ae = _networks(name, cfg)
        controlnet = build_controlnet(cfg) if k.steers else None
        for prefix, net in (("unet", unet), ("autoencoder", ae), ("controlnet", controlnet)):
            if net is not None:
                _load(net, {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")},
                      folder / WEIGHTS, f"networks of {folder / CONFIG}")
        scale = scale_factor_of(cfg, meta) if cfg.space_of(name) == "latent" else None
        return cls(name, cfg, _eval(unet), _eval(ae), scale, geometry, str(meta.get("dataset", "")),
                   source or meta.get("source", str(folder)), controlnet=_eval(controlnet),
                   base_kind=meta.get("base_kind") or (cfg.controlnet_base() if k.steers else None))

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
    def resolve(cls, ref: ModelRef, kinds: tuple[str, ...] | None = None):
        """The model ``ref`` names (run folder, MLflow URI or the dataset's standard run), of one of ``kinds``
        (default: any registered kind)."""
        kinds = names() if kinds is None else kinds
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
        _check_request(ref, model)
        return model


def _check_request(ref: ModelRef, model: "TrainedModel") -> None:
    """A DATASET_ID (and, where the command takes one, a MODEL_TYPE) that contradicts the model named by a run
    folder or URI is refused, not ignored."""
    import re

    if ref.dataset_id is not None and re.fullmatch(r"Dataset\d{3}_.*", model.dataset or ""):
        text = str(ref.dataset_id)
        wanted = int(text) if text.isdigit() else int(text[7:10]) if re.fullmatch(r"Dataset\d{3}_.*", text) else None
        if wanted is not None and wanted != int(model.dataset[7:10]):
            raise MedimgenError(f"DATASET_ID {text} contradicts the model: {model.source} was trained on "
                                f"{model.dataset}; give {int(model.dataset[7:10])} or another model")
    if ref.dim_given and ref.dim != model.dim:
        raise MedimgenError(f"MODEL_TYPE {ref.dim} contradicts the model: {model.source} is a {model.dim} model")


def _eval(net: torch.nn.Module | None):
    return net.eval() if net is not None else None


def log_run_model(run_root: Path | str, run_id: str | None, register: bool = True, alias: str | None = None,
                  tracking_uri: str | None = None, checkpoint: str = "best"):
    """Log the trained DDPM/LDM/ControlNet of a run folder as an MLflow pyfunc model in ``run_id`` (registered, when
    ``register``, as DatasetXXX_<model>_<dim>, with the split's name appended for a split other than the default; a
    tuning trial is refused: it is never registered), with the run's quality/* metrics and a description; see
    :func:`medimgen.runs.tracking.log_model`."""
    from medimgen.runs.tracking import connect, log_model, registered_name, run_facts, version_description

    model = TrainedModel.resolve(ModelRef(str(run_root), checkpoint=checkpoint), names(samples=True))
    connect(tracking_uri)
    tags, metrics = run_facts(run_id)
    split = tags.get("medimgen.split") or Path(run_root).name
    if register and tags.get("medimgen.tuning_trial") == "true":
        raise MedimgenError(f"{run_root} is a tuning trial: trials are never registered (they would mix with real "
                            f"runs); apply it (`medimgen tune ... --trials 0 --apply-best`), train and register that")
    epochs = model.cfg.train_for(model.kind).epochs
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save(Path(tmp) / "sampler")
        name = registered_name(model.dataset, model.kind, model.dim, split) if register else None
        return log_model(folder, run_id=run_id, registered_name=name, alias=alias, experiment=model.dataset,
                         run_name=f"register_{model.kind}_{model.dim}", tags={"medimgen.source": model.source},
                         tracking_uri=tracking_uri, metrics=metrics,
                         description=version_description(model.kind, model.dim, run_id, tags, epochs, metrics))
