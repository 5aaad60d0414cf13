"""The output row: one per item, journaled as msgpack, compacted to Parquet."""

from __future__ import annotations

import msgspec
import pyarrow as pa


class OutputRow(msgspec.Struct, omit_defaults=True):
    dataset: str
    shard: str
    item_key: str
    chunk_id: str
    outputs: dict[str, list[str]]
    model: str
    contributor_id: str
    worker: str
    timestamp: float
    processing_ms: float = 0.0
    width: int | None = None
    height: int | None = None
    error: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(OutputRow)


def encode_row(row: OutputRow) -> bytes:
    return _encoder.encode(row)


def decode_row(data: bytes) -> OutputRow:
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
]


def rows_to_table(rows: list[OutputRow], output_fields: list[str]) -> pa.Table:
    """Columns: the base fields, then one list<string> column per output field."""
    columns: dict[str, list[object]] = {f.name: [] for f in BASE_FIELDS}
    for name in output_fields:
        columns[name] = []
    for r in rows:
        columns["dataset"].append(r.dataset)
        columns["shard"].append(r.shard)
        columns["item_key"].append(r.item_key)
        columns["chunk_id"].append(r.chunk_id)
        columns["model"].append(r.model)
        columns["contributor_id"].append(r.contributor_id)
        columns["worker"].append(r.worker)
        columns["timestamp"].append(int(r.timestamp * 1000))
        columns["processing_ms"].append(r.processing_ms)
        columns["width"].append(r.width)
        columns["height"].append(r.height)
        columns["error"].append(r.error)
        for name in output_fields:
            columns[name].append(r.outputs.get(name, []))
    fields = [*BASE_FIELDS, *(pa.field(n, pa.list_(pa.string())) for n in output_fields)]
    schema = pa.schema(fields)
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in fields}, schema=schema)
