"""Parquet: one schema in every file, files of ``rows_per_file`` rows.

Files are written under a temporary name and renamed when complete, so a reader of the
folder (or an interrupted export) never sees a truncated file under the final name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from caption_flow.errors import ConfigError
from caption_flow.export.base import ExportResult, WriterOptions, require_output

log = logging.getLogger(__name__)

FILE_GLOB = "captions-*.parquet"


def clear_folder(folder: Path, pattern: str, overwrite: bool, what: str) -> None:
    """Refuse a folder holding an earlier export unless ``overwrite``, then remove only the
    files ``pattern`` names (nothing else in the folder is touched)."""
    folder.mkdir(parents=True, exist_ok=True)
    earlier = sorted(folder.glob(pattern))
    if earlier and not overwrite:
        raise ConfigError(
            f"{folder} already holds {len(earlier)} {what} file(s) ({earlier[0].name}, ...): "
            "pass --overwrite to replace them, or choose another --output"
        )
    for path in earlier:
        path.unlink()


class ParquetWriter:
    ordered = False

    def __init__(self, options: WriterOptions) -> None:
        self.folder = require_output(options, "parquet")
        self.rows_per_file = max(1, options.rows_per_file)
        clear_folder(self.folder, FILE_GLOB, options.overwrite, "parquet")
        self.result = ExportResult()
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._in_file = 0

    def write(self, batch: pa.RecordBatch) -> None:
        start = 0
        while start < batch.num_rows:
            if self._writer is None:
                self._open(batch.schema)
            assert self._writer is not None
            take = min(batch.num_rows - start, self.rows_per_file - self._in_file)
            self._writer.write_batch(batch.slice(start, take))
            self._in_file += take
            self.result.rows += take
            start += take
            if self._in_file >= self.rows_per_file:
                self._finish()

    def _open(self, schema: pa.Schema) -> None:
        name = f"captions-{len(self.result.files):05d}.parquet"
        self._tmp = self.folder / f".{name}.tmp"
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self._in_file = 0

    def _finish(self) -> None:
        if self._writer is None or self._tmp is None:
            return
        self._writer.close()
        final = self.folder / self._tmp.name[1:].removesuffix(".tmp")
        self._tmp.replace(final)
        self.result.files.append(final)
        self._writer = None

    def close(self) -> ExportResult:
        self._finish()
        return self.result
