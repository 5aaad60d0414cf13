"""The durable store on real SQLite and Parquet files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow.parquet as pq

from caption_flow.protocol.messages import ItemResult
from caption_flow.storage.parts import remove_unrecorded
from caption_flow.storage.rows import NO_TEXT, JournalRecord, encode_record
from caption_flow.storage.state import ChunkState, JournalBatch, StateDB
from caption_flow.storage.store import CaptionStore


def batch(items: list[ItemResult], contributor: str = "alice") -> JournalBatch:
    record = JournalRecord(
        dataset="d",
        shard="s",
        chunk_id="s:0",
        model="m",
        contributor_id=contributor,
        worker="w1",
        timestamp=1.0,
        items=items,
    )
    failed = sum(1 for i in items if i.error)
    return JournalBatch([i.item_id for i in items], encode_record(record), contributor, failed)


def test_chunks_get_contiguous_ids_and_keys_stay_unique(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    added = db.add_chunks([("s:0", "s", ["a", "b"]), ("t:0", "t", ["a"])])
    assert [(c.first_item, c.count) for c in added] == [(0, 2), (2, 1)]
    assert db.known_keys("s") == {"a", "b"}
    assert db.item_keys(0, 2) == {0: "a", 1: "b", 2: "a"}


async def test_commit_compact_and_recover(tmp_path: Path) -> None:
    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=3600)
    await store.start()
    await store.run_db(store.db.add_chunks, [("s:0", "s", ["a", "b", "c", "d"])])
    await asyncio.gather(
        store.commit([batch([ItemResult(0, "a", outputs={"captions": ["caption a", " "]})])]),
        store.commit([batch([ItemResult(1, "b", error="cannot decode image")])]),
        store.commit([batch([ItemResult(2, "c", outputs={"tags": ["x"]})], "bob")]),
        store.commit(chunk_states=[ChunkState("s:0", "leased", holder="x", deadline=5.0)]),
    )
    await store.commit([batch([ItemResult(3, "d", outputs={"captions": [""]})])])
    assert await store.run_db(store.db.journal_size) == 4
    assert await store.run_db(store.db.done_items, "s:0") == [0, 1, 2, 3]
    assert await store.compact() == 4
    assert await store.run_db(store.db.journal_size) == 0
    await store.close()

    parts = sorted((tmp_path / "captions").glob("part-*.parquet"))
    rows = {r["item_key"]: r for r in pq.read_table(parts[0]).to_pylist()}
    assert rows["a"]["captions"] == ["caption a"] and rows["a"]["error"] is None
    assert rows["b"]["error"] == "cannot decode image" and rows["b"]["captions"] == []
    assert rows["c"]["tags"] == ["x"] and rows["c"]["captions"] == []
    assert rows["d"]["error"] == NO_TEXT, "an item whose every generation was empty"
    db = StateDB(tmp_path / "state.db")
    assert sorted(db.contributors()) == [("alice", 3, 1), ("bob", 1, 0)]
    assert [c.status for c in db.load_chunks()] == ["leased"]
    db.close()

    # A crash between rename and record leaves an unrecorded part and a temporary file:
    # start-up removes both.
    (tmp_path / "captions" / "part-00000099.parquet").write_bytes(b"partial")
    (tmp_path / "captions" / ".part-00000100.parquet.tmp").write_bytes(b"partial")
    store = CaptionStore(tmp_path)
    await store.start()
    names = sorted(p.name for p in (tmp_path / "captions").iterdir())
    assert names == [parts[0].name]
    await store.close()


async def test_close_during_a_compaction_writes_each_row_once(tmp_path: Path) -> None:
    store = CaptionStore(tmp_path, compact_rows=50, compact_seconds=0.01)
    await store.start()
    keys = [f"k{i}" for i in range(400)]
    await store.run_db(store.db.add_chunks, [("s:0", "s", keys)])
    for start in range(0, 400, 20):
        items = [
            ItemResult(i, keys[i], outputs={"captions": ["c"]}) for i in range(start, start + 20)
        ]
        await store.commit([batch(items)])
    await asyncio.sleep(0.55)  # let the compactor start a part
    await store.close()
    table = pq.read_table(tmp_path / "captions")
    assert sorted(table.column("item_key").to_pylist()) == sorted(keys)


def test_remove_unrecorded_keeps_recorded_parts(tmp_path: Path) -> None:
    (tmp_path / "part-00000001.parquet").write_bytes(b"x")
    (tmp_path / "part-00000002.parquet").write_bytes(b"x")
    assert remove_unrecorded(tmp_path, {"part-00000001.parquet"}) == ["part-00000002.parquet"]


def test_id_runs() -> None:
    from caption_flow.storage.state import id_runs

    assert id_runs([5, 1, 2, 3, 9, 10, 3]) == [(1, 3), (5, 5), (9, 10)]
    assert id_runs([]) == []
