"""A cheap look at a dataset's location before anything starts.

The orchestrator would find a missing dataset only after creating its state database and
the CLI after drawing a progress bar; these checks run first and read no data. Remote
datasets (hub ids, URLs) are left to the listing, which needs the network anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import braceexpand

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError
from caption_flow.sources.hf_resolve import is_local_dataset
from caption_flow.sources.shards import is_remote, local_path


def check_dataset(config: DatasetConfig) -> None:
    """Raise ConfigError when a local dataset is not where ``dataset.path`` says."""
    path = config.path
    if config.type == "local_folder":
        _check_folder(path)
    elif config.type == "webdataset" and not is_remote(path):
        _check_tars(local_path(path))
    elif config.type == "huggingface" and _missing_local(path):
        raise ConfigError(f"dataset.path {path!r} not found: no such parquet/arrow file or folder")


def _missing_local(path: str) -> bool:
    """A local path (not a hub id or URL) with nothing there."""
    local = not is_remote(path) and is_local_dataset(path)
    return local and not Path(path).expanduser().exists()


def _check_folder(path: str) -> None:
    root = Path(path).expanduser()
    if root.is_file():
        raise ConfigError(
            f"dataset.path {path!r} is a file, not a folder: give the folder that holds the "
            "images (a .tar or .parquet file is read as a dataset of its own)"
        )
    if not root.is_dir():
        raise ConfigError(f"dataset folder not found: {path} (dataset.path or --dataset)")


def _check_tars(pattern: str) -> None:
    if any(ch in pattern for ch in "*?["):
        return  # globs are expanded by the listing, which says when nothing matches
    for part in braceexpand.braceexpand(pattern):
        if os.path.isfile(part) or os.path.isdir(part):
            return
    raise ConfigError(f"dataset.path {pattern!r} not found: no tar file or folder of tars there")
