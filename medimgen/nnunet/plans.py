"""Read-only view of a preprocessed nnU-Net dataset: plans, dataset.json, fingerprint.

Wraps nnunetv2's own PlansManager/ConfigurationManager instead of re-parsing the JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from medimgen.core.errors import MedimgenError
from medimgen.core.paths import preprocessed_dataset_dir

# medimgen's dimensionality name -> nnU-Net configuration name
NNUNET_CONFIGURATION = {"2d": "2d", "3d": "3d_fullres"}


def read_json(path: Path, missing: str = "re-run nnUNetv2_plan_and_preprocess for this dataset"):
    """One of nnU-Net's JSON files; a missing (``missing``: what to do) or unreadable one is a one-line error."""
    if not path.is_file():
        raise MedimgenError(f"{path} is missing: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MedimgenError(f"cannot read {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MedimgenError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


@dataclass
class DatasetPlans:
    """nnU-Net's view of one preprocessed dataset."""

    folder: Path
    plans_identifier: str = "nnUNetPlans"

    @classmethod
    def from_id(cls, dataset_id: int | str, plans_identifier: str = "nnUNetPlans") -> "DatasetPlans":
        import re

        from medimgen.config.schema import PLANS_IDENTIFIER, PLANS_IDENTIFIER_ALLOWED

        if not re.fullmatch(PLANS_IDENTIFIER, plans_identifier):
            raise MedimgenError(f"nnU-Net plans identifier must be {PLANS_IDENTIFIER_ALLOWED}, got {plans_identifier!r}")
        return cls(preprocessed_dataset_dir(dataset_id, plans_identifier), plans_identifier)

    @classmethod
    def planned(cls, dataset_id: int | str, config=None) -> "DatasetPlans":
        """The dataset opened with the nnU-Net plans medimgen planned it from (`medimgen plan --plans`): every
        command after `plan` opens it this way. ``config``: a GenerationConfig (its data.plans_identifier) or a
        medimgen_config.yaml path (its dataset.plans_identifier); default: the dataset's medimgen_config.yaml,
        nnUNetPlans while there is none."""
        if config is not None and not isinstance(config, (str, Path)):
            return cls.from_id(dataset_id, config.data.plans_identifier)
        from medimgen.config import load_config
        from medimgen.core.paths import config_path

        path = Path(config) if config is not None else config_path(dataset_id)
        return cls.from_id(dataset_id, load_config(path).dataset.plans_identifier if path.is_file() else "nnUNetPlans")

    @property
    def plans_file(self) -> Path:
        return self.folder / f"{self.plans_identifier}.json"

    @cached_property
    def plans_dict(self) -> dict:
        return read_json(self.plans_file)

    @cached_property
    def manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans_dict)

    @cached_property
    def dataset_json(self) -> dict:
        return read_json(self.folder / "dataset.json")

    @cached_property
    def fingerprint(self) -> dict:
        return read_json(self.folder / "dataset_fingerprint.json")

    # ------------------------------------------------------------------ dataset facts
    @property
    def name(self) -> str:
        """nnU-Net's dataset_name from the plans: it names folders, so it must be a dataset folder name."""
        from medimgen.core.names import check_dataset_name

        return check_dataset_name(self.manager.dataset_name, f"dataset_name in {self.plans_file}")

    @property
    def dataset_id(self) -> int:
        return int(self.name[len("Dataset"):len("Dataset") + 3])

    @property
    def channel_names(self) -> tuple[str, ...]:
        names = self.dataset_json.get("channel_names") or self.dataset_json.get("modality")
        return tuple(names[k] for k in sorted(names, key=int))

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_training(self) -> int:
        return int(self.dataset_json["numTraining"])

    @property
    def labels(self) -> dict:
        return dict(self.dataset_json.get("labels", {}))

    @property
    def file_ending(self) -> str:
        return self.dataset_json.get("file_ending", ".nii.gz")

    @property
    def foreground_intensity_properties(self) -> list[dict]:
        props = self.manager.foreground_intensity_properties_per_channel
        return [props[str(c)] for c in range(self.num_channels)]

    # ------------------------------------------------------------------ configurations
    @property
    def available_dims(self) -> list[str]:
        have = set(self.manager.available_configurations)
        return [dim for dim, conf in NNUNET_CONFIGURATION.items() if conf in have]

    def configuration(self, dim: str):
        """nnunetv2 ConfigurationManager for '2d' or '3d' (3d_fullres)."""
        name = NNUNET_CONFIGURATION[dim]
        if name not in self.manager.available_configurations:
            raise MedimgenError(f"{self.name} has no nnU-Net '{name}' configuration (2D data has only '2d')")
        return self.manager.get_configuration(name)

    def preprocessed_folder(self, dim: str) -> Path:
        folder = self.folder / self.configuration(dim).data_identifier
        if not folder.is_dir():
            raise MedimgenError(
                f"{folder} is missing: run `nnUNetv2_preprocess -d {self.dataset_id} -c {NNUNET_CONFIGURATION[dim]}`")
        return folder
