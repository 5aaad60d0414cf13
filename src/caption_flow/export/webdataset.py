"""New webdataset tar shards: each item's original image bytes (unchanged), its caption as
``.txt`` and its whole row as ``.json``, ``shard_size`` items per shard.

A sample's key is the item key without its extension (a folder dataset's ``a/b.jpg`` becomes
``a/b``, dots in the name turn into ``_`` so readers split members right); the ``.json``
keeps the original ``shard`` and ``item_key``.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import pyarrow as pa

from caption_flow.errors import ConfigError
from caption_flow.export.base import (
    ExportResult,
    WriterOptions,
    caption_field,
    pick_caption,
    require_output,
)
from caption_flow.export.images import ImageFetcher
from caption_flow.export.parquet import clear_folder

log = logging.getLogger(__name__)

FILE_GLOB = "shard-*.tar"


def sample_key(item_key: str, folder_dataset: bool) -> str:
    """A webdataset key for an item: no extension, no dot in the last path part."""
    path = PurePosixPath(item_key)
    if folder_dataset:
        path = path.with_suffix("")
    name = path.name.replace(".", "_") or "_"
    return str(path.with_name(name)) if str(path.parent) != "." else name


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


class WebDatasetWriter:
    ordered = True

    def __init__(self, options: WriterOptions) -> None:
        if options.dataset is None:
            raise ConfigError("--format webdataset needs the dataset: pass --config")
        self.folder = require_output(options, "webdataset")
        self.shard_size = max(1, options.shard_size)
        clear_folder(self.folder, FILE_GLOB, options.overwrite, "tar")
        self.options = options
        self.folder_dataset = options.dataset.type == "local_folder"
        self.images = ImageFetcher(options.dataset)
        self.result = ExportResult()
        self._field: str | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._encoder = msgspec.json.Encoder(enc_hook=_json_default)

    def write(self, batch: pa.RecordBatch) -> None:
        if self._field is None:
            self._field = caption_field(batch.schema, self.options.field)
        rows = batch.to_pylist()
        # Read images a shard at a time, in the batch's order (rows come sorted by shard).
        start = 0
        while start < len(rows):
            shard = rows[start]["shard"]
            end = start
            while end < len(rows) and rows[end]["shard"] == shard:
                end += 1
            group = rows[start:end]
            images = self.images.fetch(shard, [r["item_key"] for r in group])
            for row, image in zip(group, images, strict=True):
                if image.data is None or image.ext is None:
                    log.warning(
                        "%s %s: image not exported: %s", shard, row["item_key"], image.error
                    )
                    self.result.skip("image unreadable")
                    continue
                self._add(row, image.ext, image.data)
            start = end

    def _add(self, row: dict[str, Any], ext: str, data: bytes) -> None:
        if self._tar is None:
            name = f"shard-{len(self.result.files):06d}.tar"
            self._tmp = self.folder / f".{name}.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self._in_shard = 0
        key = sample_key(row["item_key"], self.folder_dataset)
        caption = pick_caption(row.get(self._field or ""), self.options.caption) or ""
        for suffix, payload in (
            (ext, data),
            ("txt", caption.encode("utf-8")),
            ("json", self._encoder.encode(row)),
        ):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(payload)
            info.mtime = int(time.time())
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self._in_shard += 1
        self.result.rows += 1
        if self._in_shard >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        final = self.folder / self._tmp.name[1:].removesuffix(".tmp")
        self._tmp.replace(final)
        self.result.files.append(final)
        self._tar = None

    def close(self) -> ExportResult:
        self._finish()
        return self.result
