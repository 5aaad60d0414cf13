"""Dataset readers (folder, webdataset, Hugging Face). Not named ``datasets`` (the HF library)."""

from __future__ import annotations

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError
from caption_flow.sources.base import ShardListing, Source, SourceItem


def open_source(config: DatasetConfig, path_override: str | None = None) -> Source:
    """The reader for ``config.type``; ``path_override`` is where this host sees the data."""
    if config.type == "local_folder":
        from caption_flow.sources.folder import FolderSource

        return FolderSource(path_override or config.path, config.image_extensions)
    raise ConfigError(f"dataset.type {config.type!r} is not supported yet")


__all__ = ["ShardListing", "Source", "SourceItem", "open_source"]
