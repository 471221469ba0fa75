"""MLflow "model from code": the pyfunc wrapper of a medimgen sampler (no pickled objects).

MLflow copies this file into the logged model and runs it at load time; the weights come
from the model's ``sampler`` artifact (safetensors + config YAML + meta JSON).

The input is typed the way MLflow 3 wants (a list of records, here :class:`SampleRequest`): MLflow
derives the model signature from it and validates every request. One request may also be passed
as a plain dict, ``predict({"num_images": 2, "seed": 0})``.
"""

from __future__ import annotations

import functools

import mlflow
import numpy as np
import pydantic
from mlflow.pyfunc import PythonModel


class SampleRequest(pydantic.BaseModel):
    """One request: ``num_images`` images from ``seed`` (``sampler``: ddim or ddpm, ``steps``: DDIM steps;
    None: the config's defaults; ``crop``: cut back to the data size the model's image size pads, as the
    NIfTI outputs are)."""

    num_images: int = 1
    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    crop: bool = True


class MedimgenSamplerModel(PythonModel):
    """predict([{"num_images": n, "seed": s, "sampler": "ddim", "steps": 50}, ...]) -> array (N, C, *size):
    the images of every request in order, in the dataset's units."""

    def load_context(self, context):
        from medimgen.core.devices import resolve_device
        from medimgen.generation.sampler import Sampler

        self.sampler = Sampler.load(context.artifacts["sampler"]).to(resolve_device())

    def predict(self, context, model_input: list[SampleRequest], params=None):
        from medimgen.generation.sampler import crop_to_data

        arrays = [crop_to_data(self.sampler.sample(r.num_images, seed=r.seed, sampler=r.sampler,
                                                   steps=r.steps or None), self.sampler.cfg, r.crop)[0]
                  for r in model_input]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _one_request_as_list(predict):
    """Accept one request as a plain dict (MLflow's validation, applied to ``predict`` above, wants a list)."""

    @functools.wraps(predict)
    def wrapper(self, context, model_input, params=None):
        if isinstance(model_input, (dict, SampleRequest)):
            model_input = [model_input]
        return predict(self, context, model_input, params)

    return wrapper


MedimgenSamplerModel.predict = _one_request_as_list(MedimgenSamplerModel.predict)  # after MLflow wrapped it
mlflow.models.set_model(MedimgenSamplerModel())
