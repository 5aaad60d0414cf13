"""Caption files: ``a/b.jpg`` -> ``a/b.txt``, the layout LoRA and fine-tuning trainers read.

Beside the images of a folder dataset (no ``--output``), or into ``--output`` mirroring the
dataset's tree (tar and hub datasets: ``<shard name>/<key>.txt``). An existing file is kept
unless ``overwrite``: a caption someone edited by hand is never replaced by surprise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

import pyarrow as pa

from caption_flow.errors import ConfigError
from caption_flow.export.base import ExportResult, WriterOptions, caption_field, pick_caption

log = logging.getLogger(__name__)


def shard_folder(shard: str) -> str:
    """A folder name for a shard id (a tar path or URL): its file name without suffixes."""
    name = PurePosixPath(shard.rstrip("/")).name or "shard"
    return name.split(".", 1)[0] or name


class TxtWriter:
    ordered = False

    def __init__(self, options: WriterOptions) -> None:
        dataset = options.dataset
        self.folder_dataset = dataset is not None and dataset.type == "local_folder"
        if options.output is not None:
            self.root = options.output
        elif self.folder_dataset and dataset is not None:
            self.root = Path(dataset.path).expanduser()
        else:
            raise ConfigError(
                "--format txt writes beside the images only for folder datasets: "
                "pass --output for this one"
            )
        self.options = options
        self.result = ExportResult()
        self._field: str | None = None
        self._resolved = self.root.resolve()

    def _target(self, shard: str, key: str) -> Path | None:
        if self.folder_dataset:
            path = (self._resolved / key).with_suffix(".txt")
        else:  # a tar key may hold dots: never cut it at one
            path = self._resolved / shard_folder(shard) / f"{key}.txt"
        return path if path.resolve().is_relative_to(self._resolved) else None

    def write(self, batch: pa.RecordBatch) -> None:
        if self._field is None:
            self._field = caption_field(batch.schema, self.options.field)
        shards = batch.column("shard").to_pylist()
        keys = batch.column("item_key").to_pylist()
        texts = batch.column(self._field).to_pylist()
        for shard, key, entries in zip(shards, keys, texts, strict=True):
            caption = pick_caption(entries, self.options.caption)
            if caption is None:
                self.result.skip("no caption text")
                continue
            path = self._target(shard, key)
            if path is None:
                self.result.skip("key outside the output folder")
                continue
            if path.exists() and not self.options.overwrite:
                self.result.skip("file exists (use --overwrite)")
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(caption + "\n", encoding="utf-8")
            os.replace(tmp, path)
            self.result.rows += 1

    def close(self) -> ExportResult:
        self.result.files = [self.root]
        return self.result
