"""Flags to configuration, in one place: the file found by discovery, then flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caption_flow.config.discovery import apply_overrides, find_config, load_file
from caption_flow.config.models import (
    OrchestratorConfig,
    OrchestratorFile,
    WorkerConfig,
    WorkerFile,
)


def orchestrator_config(config_path: str | None, overrides: dict[str, Any]) -> OrchestratorConfig:
    path = find_config("orchestrator", config_path)
    loaded = load_file(OrchestratorFile, path)
    prefixed = {f"orchestrator.{k}": v for k, v in overrides.items()}
    return apply_overrides(loaded, prefixed).orchestrator


def worker_config(config_path: str | None, overrides: dict[str, Any]) -> WorkerConfig:
    path = find_config("worker", config_path)
    loaded = load_file(WorkerFile, path)
    prefixed = {f"worker.{k}": v for k, v in overrides.items()}
    return apply_overrides(loaded, prefixed).worker


def dataset_type_for(path: str) -> str:
    """Guess the dataset type from a ``--dataset`` argument."""
    p = Path(path)
    if path.endswith(".tar") or "{" in path or (p.is_dir() and any(p.glob("*.tar"))):
        return "webdataset"
    if p.is_dir() and any(p.glob("*.parquet")):
        return "huggingface"
    if p.is_dir():
        return "local_folder"
    if "/" in path and not p.exists() and not path.startswith((".", "/", "~")):
        return "huggingface"  # a hub id such as org/name
    return "local_folder"
