"""The journal record (one per results message) and its conversion to Parquet columns.

A record holds the shared context of a message (dataset, shard, chunk, model, contributor,
worker, time) once, and its items as msgpack maps whose field names match the protocol's
``ItemResult``, so the orchestrator journals the worker's items without rebuilding them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import pyarrow as pa

NO_TEXT = "the engine produced no text"


class StoredItem(msgspec.Struct, omit_defaults=True, gc=False):
    item_id: int
    key: str
    outputs: dict[str, list[str]] = {}
    error: str | None = None
    width: int | None = None
    height: int | None = None
    processing_ms: float = 0.0


class JournalRecord(msgspec.Struct, gc=False):
    """Items of one results message, with the context every row of them shares."""

    dataset: str
    shard: str
    chunk_id: str
    model: str
    contributor_id: str
    worker: str
    timestamp: float
    items: Sequence[Any]  # protocol ItemResult when written, StoredItem when read


_encoder = msgspec.msgpack.Encoder()


class _StoredRecord(JournalRecord, gc=False):
    items: list[StoredItem]  # type: ignore[assignment]


_decoder = msgspec.msgpack.Decoder(_StoredRecord)


def has_text(outputs: Mapping[str, Sequence[str]]) -> bool:
    """Whether any entry of any output field holds text: an item without any (and without
    an error) is stored with the error ``NO_TEXT`` and counts as failed."""
    return any(t.strip() for texts in outputs.values() for t in texts)


def is_failure(error: str | None, outputs: Mapping[str, Sequence[str]]) -> bool:
    """The one definition of a failed item: its row has an error, ``NO_TEXT`` included."""
    return error is not None or not has_text(outputs)


def record_failures(data: bytes) -> int:
    """Items of an encoded journal record that are stored as failed (0 for bytes that do
    not decode: such a record is quarantined, never stored)."""
    try:
        record = decode_record(data)
    except msgspec.DecodeError:  # ValidationError included
        return 0
    return sum(1 for item in record.items if is_failure(item.error, item.outputs))


def encode_record(record: JournalRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> JournalRecord:
    return _decoder.decode(data)


BASE_FIELDS: list[pa.Field] = [
    pa.field("dataset", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("item_key", pa.string()),
    pa.field("chunk_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("contributor_id", pa.string()),
    pa.field("worker", pa.string()),
    pa.field("timestamp", pa.timestamp("ms", tz="UTC")),
    pa.field("processing_ms", pa.float32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("error", pa.string()),
    # Null until a quality check scores the row (the original tool's column, kept for it).
    pa.field("quality_score", pa.float32()),
]


def records_to_table(
    records: Iterable[JournalRecord], output_fields: Iterable[str] = ()
) -> pa.Table:
    """One row per item. One ``list<string>`` column per output field: the job's
    ``output_fields`` always (so every part has them, empty for failed items), and any other
    field a record holds. A field keeps one entry per prompt in prompt order, so an entry
    is matched to its prompt by position: an empty generation is kept as ``""`` (blank
    text too). An item with no text at all and no error gets the error ``NO_TEXT``."""
    records = list(records)
    present = {f for r in records for item in r.items for f in item.outputs}
    fields = sorted(present.union(output_fields))
    cols: dict[str, list[Any]] = {f.name: [] for f in BASE_FIELDS}
    outs: dict[str, list[list[str]]] = {f: [] for f in fields}
    for r in records:
        n = len(r.items)
        for name, value in (
            ("dataset", r.dataset),
            ("shard", r.shard),
            ("chunk_id", r.chunk_id),
            ("model", r.model),
            ("contributor_id", r.contributor_id),
            ("worker", r.worker),
            ("timestamp", int(r.timestamp * 1000)),
        ):
            cols[name].extend([value] * n)
        for item in r.items:
            cols["item_key"].append(item.key)
            cols["processing_ms"].append(item.processing_ms)
            cols["width"].append(item.width)
            cols["height"].append(item.height)
            for f in fields:
                outs[f].append([t if t.strip() else "" for t in item.outputs.get(f, ())])
            failed = is_failure(item.error, item.outputs)
            cols["error"].append(item.error or (NO_TEXT if failed else None))
            cols["quality_score"].append(None)
    schema = pa.schema([*BASE_FIELDS, *(pa.field(f, pa.list_(pa.string())) for f in fields)])
    arrays = [pa.array(cols[f.name], f.type) for f in BASE_FIELDS]
    arrays += [pa.array(outs[f], pa.list_(pa.string())) for f in fields]
    return pa.Table.from_arrays(arrays, schema=schema)
