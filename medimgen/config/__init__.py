"""Typed generation configs and their YAML form."""

from medimgen.config.io import (
    apply_overrides,
    flatten,
    from_dict,
    is_user_edited,
    load_config,
    load_generation_config,
    render_generation_config,
    render_yaml,
    save_config,
    save_generation_config,
    to_dict,
)
from medimgen.config.schema import (
    AutoencoderConfig,
    DataConfig,
    DatasetInfo,
    DerivedConfig,
    DiscriminatorConfig,
    GenerationConfig,
    LossConfig,
    MedimgenConfig,
    MemoryConfig,
    SchedulerConfig,
    TrackingConfig,
    TrainConfig,
    UNetConfig,
)

__all__ = [
    "AutoencoderConfig", "DataConfig", "DatasetInfo", "DerivedConfig", "DiscriminatorConfig", "GenerationConfig", "LossConfig",
    "MedimgenConfig", "MemoryConfig", "SchedulerConfig", "TrackingConfig", "TrainConfig", "UNetConfig",
    "apply_overrides", "flatten", "from_dict", "is_user_edited", "load_config", "load_generation_config",
    "render_generation_config", "render_yaml", "save_config", "save_generation_config", "to_dict",
]
