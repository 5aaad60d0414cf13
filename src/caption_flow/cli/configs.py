"""Flags to configuration, in one place: the file found by discovery, then flags on top."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from caption_flow.config.discovery import (
    apply_overrides,
    find_config,
    find_config_or_section,
    is_example,
    load_file,
    validate,
)
from caption_flow.config.models import (
    DataWorkerConfig,
    DataWorkerFile,
    MonitorConfig,
    MonitorFile,
    OrchestratorConfig,
    OrchestratorFile,
    WorkerConfig,
    WorkerFile,
)
from caption_flow.errors import ConfigError
from caption_flow.sources.hf_resolve import TABLE_SUFFIXES

log = logging.getLogger(__name__)


def found_config(
    component: str, config_path: str | None, examples: bool = True, path: Path | None = None
) -> Path | None:
    """The file discovery picks for ``component`` (or ``path``, found otherwise), logged: a
    user should never have to guess which file (if any) configured a run. The examples
    fallback is a warning."""
    if path is None:
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


def dataworker_config(config_path: str | None, overrides: dict[str, Any]) -> DataWorkerConfig:
    path = found_config("dataworker", config_path)
    loaded = load_file(DataWorkerFile, path)
    prefixed = {f"dataworker.{k}": v for k, v in overrides.items()}
    return apply_overrides(loaded, prefixed).dataworker


def tls_overrides(cert: str | None, key: str | None, no_ssl: bool) -> dict[str, Any]:
    """The orchestrator's ``--cert``/``--key``/``--no-ssl`` as config overrides."""
    if no_ssl:
        if cert is not None or key is not None:
            raise ConfigError("--no-ssl contradicts --cert and --key: keep one or the other")
        log.info("--no-ssl: serving plain ws:// (an ssl section in the config is ignored)")
        return {"ssl": {}}
    return {"ssl.cert": cert, "ssl.key": key}


def monitor_config(config_path: str | None, overrides: dict[str, Any]) -> MonitorConfig:
    """monitor.yaml, else the ``monitor:`` section of orchestrator.yaml, at each place of
    the discovery order; a file given with --config may be either kind."""
    path = find_config_or_section("monitor", "orchestrator", config_path)
    found_config("monitor", config_path, path=path)
    if path is not None and path.name != "monitor.yaml" and config_path is None:
        log.info("monitor config: the monitor section of %s", path)
    loaded = _monitor_file(path)
    prefixed = {f"monitor.{k}": v for k, v in overrides.items()}
    return apply_overrides(loaded, prefixed).monitor


def _monitor_file(path: Path | None) -> MonitorFile:
    """A monitor.yaml, or only the monitor section of a file with an orchestrator section
    (the rest is the orchestrator's business, checked when it starts)."""
    if path is None:
        return MonitorFile()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and "orchestrator" in data:
        if "monitor" not in data:
            raise ConfigError(f"{path} has no monitor section: add one, or pass a monitor.yaml")
        return validate(MonitorFile, {"monitor": data["monitor"]}, str(path))
    return load_file(MonitorFile, path)


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
