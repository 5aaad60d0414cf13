"""Give failed items another chance: their error rows leave the output, they become missing.

Used by ``caption-flow requeue --failed`` (orchestrator stopped) and by the admin's
``requeue`` message (orchestrator running). Each part that holds error rows is rewritten
without them: the new part is recorded, the old one forgotten and the items reopened in one
transaction, and only then is the old file removed. So the output keeps exactly one row per
item once they are captioned again, and a crash at any point leaves either the old part or
the new one as output (an old file left behind is moved aside at the next start).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


@dataclass
class Reopened:
    """What a requeue made missing again."""

    items: dict[str, list[int]] = field(default_factory=dict)  # chunk id -> item ids
    chunks: list[str] = field(default_factory=list)  # chunks that had failed as a whole

    @property
    def item_count(self) -> int:
        return sum(len(ids) for ids in self.items.values())

    def add(self, more: dict[str, list[int]]) -> None:
        for chunk_id, ids in more.items():
            self.items.setdefault(chunk_id, []).extend(ids)


def split_failed(path: str) -> tuple[pa.Table, list[tuple[str, str]]] | None:
    """The part without its error rows, and the (shard, key) of those rows; None when the
    part has none (only the error column is read to find out)."""
    errors = pq.read_table(path, columns=["error"]).column("error")
    if errors.null_count == len(errors):
        return None
    table = pq.read_table(path)
    failed = pc.is_valid(table.column("error"))
    rows = table.filter(failed).select(["shard", "item_key"]).to_pylist()
    return table.filter(pc.invert(failed)), [(r["shard"], r["item_key"]) for r in rows]
