"""The committed output as one de-duplicated relation, streamed in Arrow record batches.

Only parts that ``state.db`` records are output: a part being written, or one a crash left
unrecorded, is never read, so an export is safe while the orchestrator runs (no lock taken;
``state.db`` is only read). Parts written under different jobs can have different output
columns; DuckDB reads them by column name, with nulls where a part lacks one. The store
promises one row per item; the reader still keeps only the latest row per (shard, item_key),
so an export never holds an item twice whatever a repair or a bug left behind.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from caption_flow.errors import ConfigError, StorageError
from caption_flow.storage.identity import DB_NAME, PARTS_DIR
from caption_flow.storage.rows import BASE_FIELDS

log = logging.getLogger(__name__)

BASE_COLUMNS = [f.name for f in BASE_FIELDS]
BATCH_ROWS = 8192
# DuckDB spills the de-duplication to disk past this, so memory stays bounded on any size.
MEMORY_LIMIT = "256MB"


@dataclass(frozen=True)
class Selection:
    """Which rows and output fields an export takes. ``where`` is a DuckDB expression on
    the row (``len(captions[1]) > 20``), applied after de-duplication."""

    fields: tuple[str, ...] | None = None  # output fields; None: all of them
    include_failed: bool = False
    where: str | None = None
    limit: int | None = None
    contributors: tuple[str, ...] = ()
    since: datetime | None = None


def recorded_parts(data_dir: Path) -> list[Path]:
    """The part files ``state.db`` records, in name order, read without writing anything."""
    db_path = data_dir / DB_NAME
    if not db_path.is_file():
        raise StorageError(f"no {DB_NAME} in {data_dir}: is --data-dir the orchestrator's?")
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = [r[0] for r in conn.execute("SELECT name FROM parts WHERE state='recorded'")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {db_path}: {exc}") from exc
    parts = data_dir / PARTS_DIR
    missing = [n for n in names if not (parts / n).is_file()]
    if missing:
        raise StorageError(
            f"{len(missing)} recorded part(s) missing from {parts} (first: {missing[0]}): "
            "run `caption-flow scan-chunks --fix` before exporting"
        )
    return [parts / n for n in sorted(names)]


def quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class CommittedOutput:
    """The recorded parts at the moment of opening. Parts recorded later are not seen."""

    def __init__(self, data_dir: Path, memory_limit: str = MEMORY_LIMIT) -> None:
        self.data_dir = data_dir
        self.files = recorded_parts(data_dir)
        schema = pa.unify_schemas([pq.read_schema(f) for f in self.files]) if self.files else None
        extra = [f for f in schema if f.name not in BASE_COLUMNS] if schema else []
        #: Output fields (list<string> columns) present in at least one part.
        self.fields = sorted(f.name for f in extra if pa.types.is_list(f.type))
        self._spill = tempfile.TemporaryDirectory(prefix="captionflow-export-")
        self.conn = duckdb.connect(":memory:")
        self.conn.execute("SET TimeZone='UTC'")
        self.conn.execute(f"SET memory_limit='{memory_limit}'")
        self.conn.execute(f"SET temp_directory='{self._spill.name}'")
        self.conn.execute("SET preserve_insertion_order=false")

    def close(self) -> None:
        self.conn.close()
        self._spill.cleanup()

    def __enter__(self) -> CommittedOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def output_fields(self, selection: Selection) -> list[str]:
        """The output fields ``selection`` names, checked against the parts."""
        if selection.fields is None:
            return list(self.fields)
        unknown = [f for f in selection.fields if f not in self.fields]
        if unknown:
            have = ", ".join(self.fields) or "none"
            raise ConfigError(f"--fields: no output field {unknown[0]!r} (the output has: {have})")
        return list(selection.fields)

    def schema(self, selection: Selection) -> pa.Schema:
        """The one schema every exported batch has."""
        listed = [pa.field(f, pa.list_(pa.string())) for f in self.output_fields(selection)]
        return pa.schema([*BASE_FIELDS, *listed])

    def _sql(self, selection: Selection, columns: str) -> tuple[str, list[object]]:
        """The selected rows. De-duplication keeps, per (shard, item_key), the row with the
        latest timestamp (then the last part, the last row): a hash aggregate over the keys
        only, semi-joined back to the streamed rows, so only the keys are ever held."""
        files = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in self.files) + "]"
        source = f"read_parquet({files}, union_by_name=true, filename=true, file_row_number=true)"
        keep = (
            "SELECT max({'t': timestamp, 'f': filename, 'r': file_row_number}) AS k "
            f"FROM {source} GROUP BY shard, item_key"
        )
        latest = (
            f"SELECT * EXCLUDE (filename, file_row_number) FROM {source} AS p "
            f"SEMI JOIN ({keep}) AS keep ON p.filename = keep.k.f "
            "AND p.file_row_number = keep.k.r"
        )
        where: list[str] = []
        params: list[object] = []
        if not selection.include_failed:
            where.append("error IS NULL")
        if selection.contributors:
            where.append(f"contributor_id IN ({', '.join('?' for _ in selection.contributors)})")
            params.extend(selection.contributors)
        if selection.since is not None:
            where.append("timestamp >= ?")
            params.append(selection.since)
        if selection.where:
            where.append(f"({selection.where})")
        sql = f"SELECT {columns} FROM ({latest})"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return sql, params

    def count(self, selection: Selection) -> int:
        """Rows an export of ``selection`` writes."""
        if not self.files:
            return 0
        sql, params = self._sql(selection, "count(*)")
        relation = self._relation(sql, params)
        try:
            rows = relation.fetchall() if relation is not None else []
        except duckdb.Error as exc:
            raise _read_error(exc) from exc
        total = int(rows[0][0]) if rows else 0  # type: ignore[call-overload]
        return min(total, selection.limit) if selection.limit is not None else total

    def batches(
        self, selection: Selection, batch_rows: int = BATCH_ROWS, order: bool = False
    ) -> Iterator[pa.RecordBatch]:
        """The selected rows in record batches of :meth:`schema`; sorted by (shard, item_key)
        with ``order`` (a sort that spills to disk past the memory limit: about 1.5 times
        slower), else in no set order."""
        if not self.files:
            return
        schema = self.schema(selection)
        columns = ", ".join(quote_name(f.name) for f in schema)
        sql, params = self._sql(selection, columns)
        if order:
            sql += " ORDER BY shard, item_key"
        if selection.limit is not None:
            sql += f" LIMIT {int(selection.limit)}"
        relation = self._relation(sql, params)
        if relation is None:
            return
        try:
            for batch in relation.to_arrow_reader(batch_rows):
                yield _conform(batch, schema)
        except duckdb.Error as exc:
            raise _read_error(exc) from exc

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """Run ``sql`` where ``latest`` names the de-duplicated rows (failed ones included)."""
        if not self.files:
            return []
        inner, inner_params = self._sql(Selection(include_failed=True), "*")
        full = f"WITH latest AS ({inner}) {sql}"
        relation = self._relation(full, [*inner_params, *params])
        try:
            return relation.fetchall() if relation is not None else []
        except duckdb.Error as exc:
            raise _read_error(exc) from exc

    def _relation(self, sql: str, params: Sequence[object]) -> duckdb.DuckDBPyRelation | None:
        """``sql`` as a relation (streamed when read: a DB-API result would copy every row)."""
        try:
            return self.conn.sql(sql, params=list(params))
        except duckdb.Error as exc:
            raise _read_error(exc) from exc


def _read_error(exc: duckdb.Error) -> ConfigError:
    """A --where that DuckDB rejects is the usual cause: said in one line."""
    return ConfigError(f"cannot select the rows (check --where): {' '.join(str(exc).split())}")


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """DuckDB's Arrow types (microsecond timestamps, views) cast to the stored ones."""
    if batch.schema.equals(schema):
        return batch
    arrays = [batch.column(i).cast(schema.field(i).type) for i in range(len(schema))]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
