"""The original image bytes of exported items, read through the dataset's own source.

Folder and webdataset datasets only: a hub dataset's images live in its parquet files or
behind URLs, which the webdataset export does not re-download.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError, SourceError
from caption_flow.sources import open_source
from caption_flow.sources.webdataset import WebDatasetSource

log = logging.getLogger(__name__)


@dataclass
class ImageBytes:
    key: str
    ext: str | None  # the image's extension as in the dataset (jpg, png, ...)
    data: bytes | None
    error: str | None = None


class ImageFetcher:
    """Reads images by (shard, keys), as a worker does: no data directory is written."""

    def __init__(self, dataset: DatasetConfig) -> None:
        if dataset.type not in ("local_folder", "webdataset"):
            raise ConfigError(
                f"--format webdataset reads images from folder or tar datasets, not {dataset.type}"
            )
        self.source = open_source(dataset)

    def fetch(self, shard: str, keys: Sequence[str]) -> Iterator[ImageBytes]:
        """One :class:`ImageBytes` per key, in order."""
        exts = self._extensions(shard, keys)
        for item in self.source.read(shard, keys):
            ext = exts.get(item.key)
            yield ImageBytes(item.key, ext, item.data, item.error)

    def _extensions(self, shard: str, keys: Sequence[str]) -> dict[str, str | None]:
        source = self.source
        if not isinstance(source, WebDatasetSource):
            return {k: PurePosixPath(k).suffix.lstrip(".").lower() or None for k in keys}
        try:
            index = source.indexes.get(shard, source.locator.locate(shard))
        except SourceError as exc:
            log.warning("shard %s: %s", shard, exc)
            return {}
        found: dict[str, str | None] = {}
        for key in keys:
            image = source.image_member(index.samples.get(key, []))
            found[key] = image[0] if image is not None else None
        return found
