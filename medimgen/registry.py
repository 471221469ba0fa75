"""Log a trained sampler as an MLflow pyfunc model and register it under a predictable name."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from medimgen.errors import MedimgenError
from medimgen.sampling import Sampler, from_run
from medimgen.tracking import connect, ensure_experiment, start_existing_run


def registered_name(dataset: str, kind: str, dim: str) -> str:
    return f"{dataset}_{kind}_{dim}"


@dataclass
class Registration:
    model_uri: str
    name: str | None
    version: str | None


def log_sampler(sampler: Sampler, run_id: str | None = None, register: bool = True, alias: str | None = None,
                tracking_uri: str | None = None) -> Registration:
    """Log ``sampler`` as pyfunc model 'model' in ``run_id`` (or a new run) and register it."""
    import mlflow
    from mlflow import MlflowClient

    connect(tracking_uri)  # bounded HTTP calls; one line if the server is down
    dim = f"{sampler.cfg.data.spatial_dims}d"
    name = registered_name(sampler.dataset, sampler.kind, dim) if register else None
    code = Path(__file__).with_name("mlflow_model.py")
    with tempfile.TemporaryDirectory() as tmp:
        folder = sampler.save(Path(tmp) / "sampler")
        active = mlflow.active_run()
        ctx = start_existing_run(run_id) if (run_id and (active is None or active.info.run_id != run_id)) else _null()
        if not run_id and active is None:
            mlflow.set_experiment(experiment_id=ensure_experiment(sampler.dataset))
            ctx = mlflow.start_run(run_name=f"register_{sampler.kind}_{dim}")
        with ctx:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(code), artifacts={"sampler": str(folder)},
                pip_requirements=["medimgen"], registered_model_name=name,
            )
    version = str(info.registered_model_version) if name and info.registered_model_version else None
    if name and version:
        client = MlflowClient()
        client.set_model_version_tag(name, version, "medimgen.source", sampler.source)
        if alias:
            client.set_registered_model_alias(name, alias, version)
    return Registration(info.model_uri, name, version)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def register_run(run_root: Path | str, checkpoint: str = "best", alias: str | None = None,
                 tracking_uri: str | None = None) -> Registration:
    """`medimgen register`: log and register the sampler of a finished training run."""
    from medimgen.training.outputs import RunDir

    sampler = from_run(run_root, checkpoint)
    run_id = RunDir(Path(run_root)).checkpoint_meta()["mlflow_run_id"]
    try:
        return log_sampler(sampler, run_id=run_id, alias=alias, tracking_uri=tracking_uri)
    except MedimgenError:
        raise
    except Exception as e:
        raise MedimgenError(f"could not register the model of {run_root} in MLflow ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
