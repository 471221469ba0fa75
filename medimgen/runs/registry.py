"""`medimgen register`: log and register the model of a finished training run (MLflow through medimgen.runs.tracking)."""

from __future__ import annotations

import re
from pathlib import Path

from medimgen.core.errors import MedimgenError
from medimgen.core.names import check_name
from medimgen.runs.folders import RunDir, log_run_model
from medimgen.runs.tracking import Registration


def register_run(run_root: Path | str, checkpoint: str = "best", alias: str | None = None,
                 tracking_uri: str | None = None) -> Registration:
    """Log the sampler of a training run folder as a pyfunc model in its own MLflow run and register it.

    The alias is checked first: a refused alias creates no version (register succeeds or changes nothing)."""
    if alias is not None:
        check_name(alias, "--alias")
        if re.fullmatch(r"(?i)v\d+|latest", alias):  # MLflow reserves these (version references)
            raise MedimgenError(f"--alias {alias!r}: MLflow reserves 'latest' and v<number> for versions; "
                                f"choose another alias, e.g. champion")
    run_id = RunDir(Path(run_root)).checkpoint_meta()["mlflow_run_id"]
    try:
        return log_run_model(run_root, run_id, True, alias, tracking_uri, checkpoint)
    except MedimgenError:
        raise
    except Exception as e:
        raise MedimgenError(f"could not register the model of {run_root} in MLflow ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
