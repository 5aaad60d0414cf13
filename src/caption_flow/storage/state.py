"""The state database: chunks, items, contributors, the result journal and written parts.

One connection, used from one thread at a time (the orchestrator's database thread), so every
write is serialised without locks of our own. A result is durable once
:meth:`StateDB.commit_results` returns: its journal rows and its items' done flags are written
in the same transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from caption_flow.errors import StorageError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id TEXT PRIMARY KEY,
    shard TEXT NOT NULL,
    first_item INTEGER NOT NULL,
    count INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    holder TEXT,
    deadline REAL
);
CREATE INDEX IF NOT EXISTS chunks_shard ON chunks (shard);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL,
    shard TEXT NOT NULL,
    key TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS items_shard_key ON items (shard, key);
CREATE INDEX IF NOT EXISTS items_chunk ON items (chunk_id, done);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, items INTEGER NOT NULL, record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    name TEXT PRIMARY KEY, rows INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS contributors (
    contributor TEXT PRIMARY KEY,
    items INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ChunkRow:
    chunk_id: str
    shard: str
    first_item: int
    count: int
    status: str
    attempts: int
    reason: str | None


@dataclass(frozen=True)
class ChunkState:
    """A chunk's lease state as the book sees it, mirrored for observability and restarts."""

    chunk_id: str
    status: str
    attempts: int = 0
    reason: str | None = None
    holder: str | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class JournalBatch:
    """One encoded journal record, the items it makes done, and who made them."""

    item_ids: Sequence[int]
    record: bytes
    contributor: str
    failed: int = 0


def id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Collapse ids into inclusive (first, last) runs: a chunk's results are mostly
    contiguous, so one statement marks a whole batch done."""
    runs: list[tuple[int, int]] = []
    for i in sorted(ids):
        if runs and i <= runs[-1][1] + 1:
            if i > runs[-1][1]:
                runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


class StateDB:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self._synchronous = ""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            if read_only:
                self.conn.execute("PRAGMA query_only=1")
                return
            self.conn.execute("PRAGMA journal_mode=WAL")
            self._set_synchronous("FULL")
            self.conn.execute("PRAGMA busy_timeout=5000")
            self.conn.executescript(_SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open state database {path}: {exc}") from exc

    def _set_synchronous(self, level: str) -> None:
        if level != self._synchronous:
            self.conn.execute(f"PRAGMA synchronous={level}")
            self._synchronous = level

    def _check_version(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StorageError(f"{self.path}: schema version {row[0]}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    # -- meta -----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=?",
            (key, value, value),
        )

    # -- chunks and items ----------------------------------------------------------------
    def known_keys(self, shard: str) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM items WHERE shard=?", (shard,))}

    def next_chunk_seq(self, shard: str) -> int:
        row = self.conn.execute("SELECT COUNT(*) FROM chunks WHERE shard=?", (shard,)).fetchone()
        return int(row[0])

    def add_chunks(self, chunks: Sequence[tuple[str, str, Sequence[str]]]) -> list[ChunkRow]:
        """Insert (chunk_id, shard, keys) chunks with fresh contiguous item ids, atomically."""
        added: list[ChunkRow] = []
        with self._transaction():
            row = self.conn.execute("SELECT COALESCE(MAX(item_id), -1) FROM items").fetchone()
            next_id = int(row[0]) + 1
            for chunk_id, shard, keys in chunks:
                self.conn.execute(
                    "INSERT INTO chunks(chunk_id, shard, first_item, count) VALUES(?,?,?,?)",
                    (chunk_id, shard, next_id, len(keys)),
                )
                self.conn.executemany(
                    "INSERT INTO items(item_id, chunk_id, shard, key) VALUES(?,?,?,?)",
                    ((next_id + i, chunk_id, shard, k) for i, k in enumerate(keys)),
                )
                added.append(ChunkRow(chunk_id, shard, next_id, len(keys), "pending", 0, None))
                next_id += len(keys)
        return added

    def load_chunks(self) -> Iterator[ChunkRow]:
        for r in self.conn.execute(
            "SELECT chunk_id, shard, first_item, count, status, attempts, reason FROM chunks "
            "ORDER BY first_item"
        ):
            yield ChunkRow(*r)

    def done_items(self, chunk_id: str) -> list[int]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT item_id FROM items WHERE chunk_id=? AND done=1", (chunk_id,)
            )
        ]

    def item_keys(self, first: int, last: int) -> dict[int, str]:
        rows = self.conn.execute(
            "SELECT item_id, key FROM items WHERE item_id BETWEEN ? AND ?", (first, last)
        )
        return dict(rows.fetchall())

    def commit(self, batches: Sequence[JournalBatch], states: Sequence[ChunkState]) -> None:
        """Journal records, done flags, contributor counts and chunk states: one transaction.

        The caller (the orchestrator's chunk book, the only writer) passes only items that
        are not done yet; that is what makes a resend after a lost ack write nothing twice.
        """
        # Results are fsynced before they are acknowledged. A group of lease changes alone is
        # not: in WAL mode it survives a killed process, and the next results commit fsyncs
        # it too. A lease lost to a power cut only means a chunk is leased again.
        self._set_synchronous("FULL" if batches else "NORMAL")
        with self._transaction():
            if batches:
                self._write_batches(batches)
            self.conn.executemany(
                "UPDATE chunks SET status=?, attempts=?, reason=?, holder=?, deadline=? "
                "WHERE chunk_id=?",
                (
                    (s.status, s.attempts, s.reason, s.holder, s.deadline, s.chunk_id)
                    for s in states
                ),
            )

    def _write_batches(self, batches: Sequence[JournalBatch]) -> None:
        now = time.time()
        per_contributor: dict[str, list[int]] = {}
        for b in batches:
            counts = per_contributor.setdefault(b.contributor, [0, 0])
            counts[0] += len(b.item_ids)
            counts[1] += b.failed
        self.conn.executemany(
            "INSERT INTO journal(items, record) VALUES(?, ?)",
            ((len(b.item_ids), b.record) for b in batches if b.item_ids),
        )
        self.conn.executemany(
            "UPDATE items SET done=1 WHERE item_id BETWEEN ? AND ?",
            id_runs(i for b in batches for i in b.item_ids),
        )
        self.conn.executemany(
            "INSERT INTO contributors(contributor, items, failed, first_seen, last_seen) "
            "VALUES(?,?,?,?,?) ON CONFLICT(contributor) DO UPDATE SET "
            "items=items+excluded.items, failed=failed+excluded.failed, last_seen=?",
            ((c, n, f, now, now, now) for c, (n, f) in per_contributor.items()),
        )

    def contributors(self) -> list[tuple[str, int, int]]:
        return self.conn.execute(
            "SELECT contributor, items, failed FROM contributors ORDER BY items DESC"
        ).fetchall()

    # -- compaction -----------------------------------------------------------------------
    def journal_size(self) -> int:
        """Items (not records) waiting in the journal."""
        return int(self.conn.execute("SELECT COALESCE(SUM(items), 0) FROM journal").fetchone()[0])

    def journal_batch(self, max_items: int) -> tuple[list[bytes], int, int]:
        """The oldest records up to about ``max_items`` items: (records, items, last seq)."""
        records: list[bytes] = []
        items = last = 0
        for seq, count, record in self.conn.execute(
            "SELECT seq, items, record FROM journal ORDER BY seq"
        ):
            records.append(record)
            items += count
            last = seq
            if items >= max_items:
                break
        return records, items, last

    def record_part(self, name: str, rows: int, last_seq: int) -> None:
        """The part file is on disk: record it and drop its records from the journal, atomically."""
        with self._transaction():
            self.conn.execute(
                "INSERT INTO parts(name, rows, created) VALUES(?,?,?)", (name, rows, time.time())
            )
            self.conn.execute("DELETE FROM journal WHERE seq <= ?", (last_seq,))

    def part_names(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM parts")}

    # -- helpers --------------------------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
