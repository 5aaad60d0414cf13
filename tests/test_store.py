"""The durable store on real SQLite and Parquet files."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import eventually, read_rows

from caption_flow.errors import StorageError
from caption_flow.storage.lock import LOCK_NAME
from caption_flow.storage.parts import part_name, write_part
from caption_flow.storage.rows import (
    NO_TEXT,
    JournalRecord,
    StoredItem,
    encode_record,
    records_to_table,
)
from caption_flow.storage.state import ChunkState, JournalBatch, StateDB, id_runs
from caption_flow.storage.store import CaptionStore


def record(items: list[StoredItem], contributor: str = "alice", chunk_id: str = "s:0") -> bytes:
    return encode_record(
        JournalRecord(
            dataset="d",
            shard="s",
            chunk_id=chunk_id,
            model="m",
            contributor_id=contributor,
            worker="w1",
            timestamp=1.0,
            items=items,
        )
    )


def batch(items: list[StoredItem], contributor: str = "alice") -> JournalBatch:
    failed = sum(1 for i in items if i.error)
    ids = [i.item_id for i in items]
    return JournalBatch(ids, record(items, contributor), contributor, failed, chunk_id="s:0")


def captioned(item_id: int, key: str, text: str = "c") -> StoredItem:
    return StoredItem(item_id, key, outputs={"captions": [text]})


def part_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "captions").glob("part-*.parquet"))


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
        store.commit([batch([StoredItem(0, "a", outputs={"captions": ["caption a", " "]})])]),
        store.commit([batch([StoredItem(1, "b", error="cannot decode image")])]),
        store.commit([batch([StoredItem(2, "c", outputs={"tags": ["x"]})], "bob")]),
        store.commit(chunk_states=[ChunkState("s:0", "leased", holder="x", deadline=5.0)]),
    )
    await store.commit([batch([StoredItem(3, "d", outputs={"captions": [""]})])])
    assert await store.run_db(store.db.journal_size) == 4
    assert await store.run_db(store.db.done_items, "s:0") == [0, 1, 2, 3]
    assert await store.compact() == 4
    assert await store.run_db(store.db.journal_size) == 0
    await store.close()

    parts = sorted((tmp_path / "captions").glob("part-*.parquet"))
    rows = {r["item_key"]: r for r in pq.read_table(parts[0]).to_pylist()}
    assert rows["a"]["captions"] == ["caption a", ""] and rows["a"]["error"] is None
    assert rows["b"]["error"] == "cannot decode image" and rows["b"]["captions"] == []
    assert rows["c"]["tags"] == ["x"] and rows["c"]["captions"] == []
    assert rows["d"]["error"] == NO_TEXT, "an item whose every generation was empty"
    db = StateDB(tmp_path / "state.db")
    assert sorted(db.contributors()) == [("alice", 3, 1), ("bob", 1, 0)]
    # The chunk's last item was made done by the last batch: that same transaction marked
    # the chunk done, over the lease state written earlier.
    assert [c.status for c in db.load_chunks()] == ["done"]
    db.close()

    # A temporary file is never output: start-up removes it.
    (tmp_path / "captions" / ".part-00000100.parquet.tmp").write_bytes(b"partial")
    store = CaptionStore(tmp_path)
    await store.start()
    assert sorted(p.name for p in (tmp_path / "captions").iterdir()) == [parts[0].name]
    await store.close()


async def test_close_during_a_compaction_writes_each_row_once(tmp_path: Path) -> None:
    store = CaptionStore(tmp_path, compact_rows=50, compact_seconds=0.01)
    await store.start()
    keys = [f"k{i}" for i in range(400)]
    await store.run_db(store.db.add_chunks, [("s:0", "s", keys)])
    for start in range(0, 400, 20):
        await store.commit([batch([captioned(i, keys[i]) for i in range(start, start + 20)])])
    await asyncio.sleep(0.55)  # let the compactor start a part
    await store.close()
    table = pq.read_table(tmp_path / "captions")
    assert sorted(table.column("item_key").to_pylist()) == sorted(keys)


def test_id_runs() -> None:
    assert id_runs([5, 1, 2, 3, 9, 10, 3]) == [(1, 3), (5, 5), (9, 10)]
    assert id_runs([]) == []


# The schema of the previous release (version 2), as it created its tables.
V2_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks (
    chunk_id TEXT PRIMARY KEY, shard TEXT NOT NULL, first_item INTEGER NOT NULL,
    count INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, holder TEXT, deadline REAL
);
CREATE INDEX chunks_shard ON chunks (shard);
CREATE TABLE items (
    item_id INTEGER PRIMARY KEY, chunk_id TEXT NOT NULL, shard TEXT NOT NULL,
    key TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX items_shard_key ON items (shard, key);
CREATE INDEX items_chunk ON items (chunk_id, done);
CREATE TABLE journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, items INTEGER NOT NULL, record BLOB NOT NULL
);
CREATE TABLE parts (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE contributors (
    contributor TEXT PRIMARY KEY, items INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, first_seen REAL NOT NULL, last_seen REAL NOT NULL
);
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO chunks VALUES ('s:0', 's', 0, 4, 'done', 1, NULL, NULL, NULL);
INSERT INTO items(item_id, chunk_id, shard, key, done) VALUES
    (0, 's:0', 's', 'a', 1), (1, 's:0', 's', 'b', 1), (2, 's:0', 's', 'c', 1),
    (3, 's:0', 's', 'd', 0);
INSERT INTO contributors VALUES ('alice', 3, 0, 1.0, 1.0);
INSERT INTO parts VALUES ('part-00000003.parquet', 1, 1.0);
"""


async def test_a_version_2_database_migrates_in_place_and_keeps_its_data(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.executescript(V2_DDL)
    good = record([captioned(1, "b", "kept")])
    huge = record([StoredItem(2, "c", width=2**40)])  # a v2 record: ids only inside it
    conn.executemany("INSERT INTO journal(items, record) VALUES (1, ?)", [(good,), (huge,)])
    conn.commit()
    conn.close()
    old = JournalRecord("d", "s", "s:0", "m", "alice", "w", 1.0, [captioned(0, "a", "old")])
    write_part(tmp_path / "captions", "part-00000003.parquet", records_to_table([old]))

    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=3600)
    requeued: list[tuple[str, list[int]]] = []
    store.on_quarantine = lambda chunk, ids, reason: requeued.append((chunk, ids))
    await store.start()
    assert await store.run_db(store.db.get_meta, "schema_version") == "4"
    assert await store.run_db(store.db.journal_size) == 2
    assert await store.run_db(store.db.contributors) == [("alice", 3, 0)]
    assert await store.run_db(store.db.part_names) == {"part-00000003.parquet"}
    assert await store.compact() == 1
    assert requeued == [("s:0", [2])], "a v2 record's ids are read from the record"
    assert await store.run_db(store.db.done_items, "s:0") == [0, 1]
    await store.close()

    assert part_files(tmp_path) == ["part-00000003.parquet", "part-00000004.parquet"]
    rows = [(r["item_key"], r["captions"]) for r in read_rows(tmp_path)]
    assert rows == [("a", ["old"]), ("b", ["kept"])]
    db = StateDB(tmp_path / "state.db")
    assert [c.status for c in db.load_chunks()] == ["pending"], "item 2 is no longer done"
    assert db.item_attempts("s:0") == {2: 1}
    db.close()


def test_results_and_their_chunk_state_commit_in_one_transaction(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.add_chunks([("s:0", "s", ["a", "b"])])
    broken = JournalBatch([0], None, "alice", chunk_id="s:0")  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        db.commit([broken], [ChunkState("s:0", "done")])
    assert [c.status for c in db.load_chunks()] == ["pending"], "rolled back together"
    assert db.done_items("s:0") == []

    db.commit([batch([captioned(0, "a"), captioned(1, "b")])], [ChunkState("s:0", "done")])
    db.close()
    db = StateDB(tmp_path / "state.db")
    assert [c.status for c in db.load_chunks()] == ["done"]
    assert db.done_items("s:0") == [0, 1] and db.journal_size() == 2
    db.close()


def test_retry_ids_count_attempts_without_marking_done(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.add_chunks([("s:0", "s", ["a", "b", "c"]), ("t:0", "t", ["a"])])
    one = JournalBatch([0], record([captioned(0, "a")]), "alice", 1, "s:0", retry_ids=[1, 2])
    db.commit([one], [])
    db.commit([JournalBatch([], b"", "bob", 1, "s:0", retry_ids=[2])], [])
    assert db.item_attempts("s:0") == {1: 1, 2: 2}
    assert db.item_attempts("t:0") == {}
    assert db.done_items("s:0") == [0]
    assert db.journal_size() == 1, "an attempt alone writes no journal record"
    db.close()


async def test_unstorable_records_are_quarantined_and_the_store_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=0.05)
    requeued: list[tuple[str, list[int], str]] = []
    store.on_quarantine = lambda chunk, ids, reason: requeued.append((chunk, ids, reason))
    await store.start()
    await store.run_db(store.db.add_chunks, [("s:0", "s", ["a", "b", "c", "d", "e", "f"])])
    await store.commit(
        [
            batch([captioned(0, "a")]),
            batch([StoredItem(1, "b", width=2**40), StoredItem(2, "c", height=7)]),
            JournalBatch([3], b"\xc1 not msgpack", "mallory", chunk_id="s:0"),
            batch([captioned(4, "d")]),
        ],
        [ChunkState("s:0", "done")],
    )
    await eventually(lambda: bool(part_files(tmp_path)), 10, "the first part")
    assert sorted(r["item_key"] for r in read_rows(tmp_path)) == ["a", "d"]
    assert [(c, ids) for c, ids, _ in requeued] == [("s:0", [1, 2]), ("s:0", [3])]
    assert "too large" in requeued[0][2] and "decode" in requeued[1][2]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "quarantined" in r.msg]
    assert len(errors) == 2, "each quarantined record is logged once"

    quarantined = await store.run_db(store.db.quarantined)
    assert [(chunk, ids) for _, chunk, ids, _ in quarantined] == [("s:0", [1, 2]), ("s:0", [3])]
    assert await store.run_db(store.db.done_items, "s:0") == [0, 4]
    assert await store.run_db(store.db.item_attempts, "s:0") == {1: 1, 2: 1, 3: 1}
    assert [c.status for c in await store.run_db(store.db.load_chunks)] == ["pending"]
    assert await store.run_db(store.db.journal_size) == 0

    # The compactor keeps going: the re-captioned items reach Parquet.
    await store.commit([batch([captioned(i, k) for i, k in [(1, "b"), (2, "c"), (3, "e")]])])
    await eventually(lambda: len(part_files(tmp_path)) == 2, 10, "the second part")
    assert sorted(r["item_key"] for r in read_rows(tmp_path)) == ["a", "b", "c", "d", "e"]
    await store.close()


async def test_a_failing_compaction_backs_off_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=0.01)
    await store.start()
    await store.run_db(store.db.add_chunks, [("s:0", "s", ["a"])])
    (tmp_path / "captions").write_bytes(b"")  # a file where the parts folder goes
    await store.commit([batch([captioned(0, "a")])])

    def failures() -> list[float]:
        return [r.created for r in caplog.records if "compaction failed" in r.msg]

    await eventually(lambda: len(failures()) >= 2, 20, "two failed compactions")
    first, second = failures()[:2]
    # A sleep is a lower bound on any machine: without back-off the gap would be 0.5 s.
    assert second - first >= 0.9, failures()
    assert await store.run_db(store.db.intended_parts) == [], "a failed part is taken back"
    assert await store.run_db(store.db.quarantined) == [], "nothing wrong with the record"

    (tmp_path / "captions").unlink()
    await eventually(lambda: bool(part_files(tmp_path)), 30, "compaction to recover")
    await store.close()
    assert [r["item_key"] for r in read_rows(tmp_path)] == ["a"]


async def test_an_intended_part_is_removed_at_start(tmp_path: Path) -> None:
    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=3600)
    await store.start()
    await store.run_db(store.db.add_chunks, [("s:0", "s", ["a", "b"])])
    await store.commit([batch([captioned(0, "a"), captioned(1, "b")])])
    # What a kill between rename and record leaves: an intended part on disk.
    name = await store.run_db(store.db.intend_part, part_name)
    table = records_to_table([])
    write_part(store.parts_dir, name, table)
    await store.close(flush=False)

    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=3600)
    await store.start()
    assert part_files(tmp_path) == []
    assert not (tmp_path / "captions" / "unrecognised").exists()
    assert await store.run_db(store.db.intended_parts) == []
    assert await store.compact() == 2, "its rows were still in the journal"
    await store.close()
    assert part_files(tmp_path) == [part_name(1)]
    assert sorted(r["item_key"] for r in read_rows(tmp_path)) == ["a", "b"]


async def test_an_unknown_part_is_moved_aside_not_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=3600)
    await store.start()
    await store.run_db(store.db.add_chunks, [("s:0", "s", ["a"])])
    await store.commit([batch([captioned(0, "a")])])
    await store.compact()
    await store.close()
    stranger = tmp_path / "captions" / "part-00000099.parquet"
    stranger.write_bytes(b"someone else's captions")

    store = CaptionStore(tmp_path)
    await store.start()
    await store.close()
    aside = tmp_path / "captions" / "unrecognised"
    assert (aside / stranger.name).read_bytes() == b"someone else's captions"
    assert part_files(tmp_path) == [part_name(1)]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(stranger.name in m and str(aside) in m for m in logged), logged


async def test_part_numbers_come_from_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for key in ["a", "b"]:
        store = CaptionStore(tmp_path, compact_rows=1000, compact_seconds=3600)
        await store.start()
        [chunk] = await store.run_db(store.db.add_chunks, [(f"s:{key}", "s", [key])])
        await store.commit([batch([captioned(chunk.first_item, key)])])
        await store.compact()
        await store.close()
        for path in (tmp_path / "captions").iterdir():  # the folder is emptied
            path.unlink()
    assert any(
        "missing" in r.getMessage() and part_name(1) in r.getMessage() for r in caplog.records
    )
    db = StateDB(tmp_path / "state.db")
    assert db.part_names() == {part_name(1), part_name(2)}
    db.close()


def test_parts_without_a_state_db_refuse_to_start_and_touch_nothing(tmp_path: Path) -> None:
    parts = tmp_path / "captions"
    write_part(parts, part_name(1), records_to_table([]))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(StorageError) as raised:
        CaptionStore(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "state.db" in message and "--data-dir" in message
    # Only the (released, empty) lock file is new: the lock is taken before anything else.
    lock = tmp_path / LOCK_NAME
    assert lock.read_bytes() == b""
    assert sorted(str(p) for p in tmp_path.rglob("*") if p != lock) == before
