"""One parquet or arrow file as blocks of rows, read one block and a few columns at a time.

Parquet: the footer gives the row count and the row groups, so listing costs a footer read
(a few KiB, also over HTTP) and a worker reads just the row groups, and just the columns,
that its chunk needs. Arrow (``datasets`` cache and ``save_to_disk`` files, IPC stream or
file format): memory-mapped locally, so its record batches are the blocks at no cost.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from caption_flow.errors import SourceError
from caption_flow.sources.shards import is_remote, local_path

logger = logging.getLogger(__name__)


class TableShard:
    """Row count, schema, and blocks (row groups or record batches) of one table file."""

    def __init__(self, location: str, storage_options: dict[str, Any]) -> None:
        self.location = location
        self._handle: Any = None
        self._parquet: pq.ParquetFile | None = None
        self._batches: list[pa.RecordBatch] = []
        try:
            if location.endswith(".arrow"):
                self._open_arrow(storage_options)
            else:
                self._open_parquet(storage_options)
        except (OSError, pa.ArrowException, ValueError) as exc:
            self.close()
            raise SourceError(f"cannot open table {location}: {exc}") from exc

    def _open_parquet(self, storage_options: dict[str, Any]) -> None:
        if is_remote(self.location):
            fs, path = fsspec.core.url_to_fs(self.location, **storage_options)
            self._handle = fs.open(path, "rb", block_size=1024 * 1024)
            self._parquet = pq.ParquetFile(self._handle, pre_buffer=True)
        else:
            self._parquet = pq.ParquetFile(local_path(self.location), pre_buffer=True)
        meta = self._parquet.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.schema: pa.Schema = self._parquet.schema_arrow
        self._set_blocks(sizes)

    def _open_arrow(self, storage_options: dict[str, Any]) -> None:
        if is_remote(self.location):
            logger.warning("arrow files are read whole when remote; fetching %s", self.location)
            with fsspec.open(self.location, "rb", **storage_options) as remote:
                source: Any = pa.py_buffer(remote.read())
        else:
            source = pa.memory_map(local_path(self.location))
            self._handle = source
        try:
            reader: Any = pa.ipc.open_file(source)
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except pa.ArrowInvalid:  # datasets writes the IPC stream format
            if hasattr(source, "seek"):
                source.seek(0)
            reader = pa.ipc.open_stream(source)
            self._batches = list(reader)
        self.schema = reader.schema
        self._set_blocks([batch.num_rows for batch in self._batches])

    def _set_blocks(self, sizes: list[int]) -> None:
        self.block_starts: list[int] = []
        total = 0
        for size in sizes:
            self.block_starts.append(total)
            total += size
        self.num_rows = total

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts)

    def block_of(self, row: int) -> int:
        return bisect.bisect_right(self.block_starts, row) - 1

    def read_block(self, index: int, columns: list[str]) -> pa.Table:
        """Rows of one block, only ``columns``."""
        try:
            if self._parquet is not None:
                return self._parquet.read_row_group(index, columns=columns)
            return pa.Table.from_batches([self._batches[index]]).select(columns)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise SourceError(f"cannot read block {index} of {self.location}: {exc}") from exc

    def read_column(self, name: str) -> list[Any]:
        """One column for every row (id columns: small next to the images)."""
        try:
            if self._parquet is not None:
                return self._parquet.read(columns=[name]).column(0).to_pylist()
            return [v for b in self._batches for v in b.column(name).to_pylist()]
        except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
            raise SourceError(f"cannot read column {name!r} of {self.location}: {exc}") from exc

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
