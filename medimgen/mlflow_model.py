"""MLflow "model from code": the pyfunc wrapper of a medimgen sampler (no pickled objects).

MLflow copies this file into the logged model and runs it at load time; the weights come
from the model's ``sampler`` artifact (safetensors + config YAML + meta JSON).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class MedimgenSamplerModel(PythonModel):
    """predict({"num_images": n, "seed": s, "sampler": "ddim", "steps": 50}) -> array (n, C, *size)."""

    def load_context(self, context):
        from medimgen.sampling import Sampler, resolve_device

        self.sampler = Sampler.load(context.artifacts["sampler"]).to(resolve_device())

    def predict(self, context, model_input, params=None):
        args = dict(params or {})
        if hasattr(model_input, "to_dict"):  # a pandas DataFrame with one row
            args.update({k: v[0] for k, v in model_input.to_dict(orient="list").items()})
        elif isinstance(model_input, dict):
            args.update(model_input)
        steps = args.get("steps")
        return self.sampler.sample(
            num_images=int(args.get("num_images", 1)),
            seed=int(args.get("seed", 0)),
            sampler=args.get("sampler"),
            steps=int(steps) if steps else None,
        )


import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
mlflow.models.set_model(MedimgenSamplerModel())
