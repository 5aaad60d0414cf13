"""Configuration: validated models and YAML discovery."""

from caption_flow.config.discovery import apply_overrides, find_config, load_file
from caption_flow.config.models import (
    DatasetConfig,
    ImageConfig,
    ModelConfig,
    OrchestratorConfig,
    OrchestratorFile,
    SamplingConfig,
    WorkerConfig,
    WorkerFile,
)

__all__ = [
    "DatasetConfig",
    "ImageConfig",
    "ModelConfig",
    "OrchestratorConfig",
    "OrchestratorFile",
    "SamplingConfig",
    "WorkerConfig",
    "WorkerFile",
    "apply_overrides",
    "find_config",
    "load_file",
]
