"""Flags to configuration, in one place: the file found by discovery, then flags on top."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from caption_flow.config.discovery import apply_overrides, find_config, is_example, load_file
from caption_flow.config.models import (
    OrchestratorConfig,
    OrchestratorFile,
    WorkerConfig,
    WorkerFile,
)
from caption_flow.sources.hf_resolve import TABLE_SUFFIXES

log = logging.getLogger(__name__)


def found_config(component: str, config_path: str | None, examples: bool = True) -> Path | None:
    """The file discovery picks for ``component``, logged: a user should never have to
    guess which file (if any) configured a run. The examples fallback is a warning."""
    path = find_config(component, config_path, examples)
    if path is None:
        log.info("%s config: no file found; using built-in defaults", component)
    elif config_path is None and is_example(path):
        log.warning(
            "%s config: %s, the example file, taken because no other was found; copy it to "
            "./config/%s.yaml to make it yours, or pass --config",
            component,
            path,
            component,
        )
    else:
        log.info("%s config: %s", component, path)
    return path


def orchestrator_config(
    config_path: str | None, overrides: dict[str, Any], examples: bool = True
) -> OrchestratorConfig:
    path = found_config("orchestrator", config_path, examples)
    loaded = load_file(OrchestratorFile, path)
    prefixed = {f"orchestrator.{k}": v for k, v in overrides.items()}
    return apply_overrides(loaded, prefixed).orchestrator


def worker_config(
    config_path: str | None, overrides: dict[str, Any], examples: bool = True
) -> WorkerConfig:
    path = found_config("worker", config_path, examples)
    loaded = load_file(WorkerFile, path)
    prefixed = {f"worker.{k}": v for k, v in overrides.items()}
    return apply_overrides(loaded, prefixed).worker


def dataset_type_for(path: str) -> str:
    """Guess the dataset type from a ``--dataset`` argument."""
    p = Path(path)
    if path.endswith(".tar") or "{" in path or (p.is_dir() and any(p.glob("*.tar"))):
        return "webdataset"
    if path.endswith(TABLE_SUFFIXES):
        return "huggingface"  # one parquet or arrow file
    if p.is_dir() and any(p.glob("*.parquet")):
        return "huggingface"
    if p.is_dir():
        return "local_folder"
    if "/" in path and not p.exists() and not path.startswith((".", "/", "~")):
        return "huggingface"  # a hub id such as org/name
    return "local_folder"
