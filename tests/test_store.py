"""The durable store on real SQLite and Parquet files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow.parquet as pq

from caption_flow.storage.parts import remove_unrecorded
from caption_flow.storage.rows import OutputRow, encode_row
from caption_flow.storage.state import ChunkState, JournalEntry, StateDB
from caption_flow.storage.store import CaptionStore


def entry(item_id: int, key: str, error: str | None = None) -> JournalEntry:
    row = OutputRow(
        dataset="d",
        shard="s",
        item_key=key,
        chunk_id="s:0",
        outputs={} if error else {"captions": [f"caption {key}"]},
        model="m",
        contributor_id="alice",
        worker="w1",
        timestamp=1.0,
        error=error,
    )
    return JournalEntry(item_id, encode_row(row), "alice", error is not None)


def test_chunks_get_contiguous_ids_and_keys_stay_unique(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    added = db.add_chunks([("s:0", "s", ["a", "b"]), ("t:0", "t", ["a"])])
    assert [(c.first_item, c.count) for c in added] == [(0, 2), (2, 1)]
    assert db.known_keys("s") == {"a", "b"}
    assert db.item_keys(0, 2) == {0: "a", 1: "b", 2: "a"}


async def test_commit_compact_and_recover(tmp_path: Path) -> None:
    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=3600, group_commit_ms=0)
    await store.start()
    await store.run_db(store.db.add_chunks, [("s:0", "s", ["a", "b", "c"])])
    await asyncio.gather(
        store.commit([entry(0, "a")]),
        store.commit([entry(1, "b", error="cannot decode image")]),
        store.commit(chunk_states=[ChunkState("s:0", "leased", holder="x", deadline=5.0)]),
    )
    # A resend of item 0 after a lost ack: the journal keeps one row.
    await store.commit([entry(0, "a")])
    assert await store.run_db(store.db.journal_size) == 2
    assert await store.compact() == 2
    assert await store.run_db(store.db.journal_size) == 0
    await store.close()

    parts = sorted((tmp_path / "captions").glob("part-*.parquet"))
    table = pq.read_table(parts[0])
    assert table.column("item_key").to_pylist() == ["a", "b"]
    assert table.column("error").to_pylist() == [None, "cannot decode image"]
    assert table.column("captions").to_pylist() == [["caption a"], []]
    db = StateDB(tmp_path / "state.db")
    assert db.contributors() == [("alice", 2, 1)]
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


def test_remove_unrecorded_keeps_recorded_parts(tmp_path: Path) -> None:
    (tmp_path / "part-00000001.parquet").write_bytes(b"x")
    (tmp_path / "part-00000002.parquet").write_bytes(b"x")
    assert remove_unrecorded(tmp_path, {"part-00000001.parquet"}) == ["part-00000002.parquet"]
