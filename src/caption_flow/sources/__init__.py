"""Dataset readers (folder, webdataset, Hugging Face). Not named ``datasets`` (the HF library)."""

from __future__ import annotations

from pathlib import Path

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError
from caption_flow.sources.base import ShardListing, Source, SourceItem
from caption_flow.sources.check import check_dataset


def open_source(
    config: DatasetConfig, path_override: str | None = None, cache_dir: Path | None = None
) -> Source:
    """The reader for ``config.type``.

    ``path_override`` is where this host sees the data (a worker's ``dataset_path``).
    ``cache_dir`` keeps metadata that is slow to rebuild (tar member indexes, parquet row
    counts, the pinned hub revision); the orchestrator passes a folder in its data directory,
    a worker may pass one of its own or None (indexes are then kept in memory only).
    """
    if config.type == "local_folder":
        from caption_flow.sources.folder import FolderSource

        return FolderSource(path_override or config.path, config.image_extensions)
    if config.type == "webdataset":
        from caption_flow.sources.webdataset import WebDatasetSource

        return WebDatasetSource(config, path_override, cache_dir)
    if config.type == "huggingface":
        from caption_flow.sources.huggingface import HuggingFaceSource

        return HuggingFaceSource(config, path_override, cache_dir)
    raise ConfigError(f"dataset.type {config.type!r} is not supported")


__all__ = ["ShardListing", "Source", "SourceItem", "check_dataset", "open_source"]
