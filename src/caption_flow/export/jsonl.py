"""JSON Lines: one object per item (timestamps ISO 8601 in UTC); a ``.gz`` name compresses.

Each batch is turned into JSON by DuckDB (``to_json``) rather than row by row in Python:
about four times faster, and the text is the same JSON."""

from __future__ import annotations

import gzip
from typing import IO

import duckdb
import pyarrow as pa

from caption_flow.errors import ConfigError
from caption_flow.export.base import ExportResult, WriterOptions, require_output
from caption_flow.export.reader import quote_name

ISO_MS = "%Y-%m-%dT%H:%M:%S.%gZ"


class JsonlWriter:
    ordered = False

    def __init__(self, options: WriterOptions) -> None:
        self.path = require_output(options, "jsonl")
        if self.path.exists() and not options.overwrite:
            raise ConfigError(f"{self.path} exists: pass --overwrite to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        # Kept open across write() calls and closed in close(): no context manager fits.
        self._file: IO[bytes] | gzip.GzipFile
        if self.path.suffix == ".gz":
            self._file = gzip.open(self._tmp, "wb", compresslevel=5)  # noqa: SIM115
        else:
            self._file = open(self._tmp, "wb")  # noqa: SIM115
        self._conn = duckdb.connect(":memory:")
        self._conn.execute("SET TimeZone='UTC'")
        self.json_fields = options.json_fields
        self.result = ExportResult()

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._conn.register("batch", batch)
        replaced = [f"strftime(timestamp, '{ISO_MS}') AS timestamp"]
        for name in self.json_fields:
            if name in batch.schema.names:
                column = quote_name(name)
                replaced.append(
                    f"list_transform({column}, lambda x: CASE WHEN json_valid(x) THEN x::JSON "
                    f"ELSE to_json(x) END) AS {column}"
                )
        lines = self._conn.sql(
            f"SELECT to_json(b) FROM (SELECT * REPLACE ({', '.join(replaced)}) FROM batch) AS b"
        ).to_arrow_table()
        self._conn.unregister("batch")
        text = "\n".join(lines.column(0).to_pylist()) + "\n"
        self._file.write(text.encode("utf-8"))
        self.result.rows += batch.num_rows

    def close(self) -> ExportResult:
        self._conn.close()
        self._file.close()
        self._tmp.replace(self.path)
        self.result.files.append(self.path)
        return self.result
