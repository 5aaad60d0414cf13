"""The state database: chunks, items, contributors, the result journal and written parts.

One connection, used from one thread at a time (the orchestrator's database thread), so every
write is serialised without locks of our own. A result is durable once :meth:`StateDB.commit`
returns: its journal record, its items' done flags and its chunk's state are written in the
same transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from caption_flow.errors import StorageError
from caption_flow.storage.schema import create_or_migrate

log = logging.getLogger(__name__)

_ids_encoder = msgspec.msgpack.Encoder()
_ids_decoder = msgspec.msgpack.Decoder(list[int])


@dataclass(frozen=True)
class ChunkRow:
    chunk_id: str
    shard: str
    first_item: int
    count: int
    status: str
    attempts: int
    reason: str | None
    holder: str | None = None  # for a leased chunk: who may reclaim it after a restart


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
    """One encoded journal record, the items it makes done, and who made them.

    ``retry_ids`` failed in this message but are not done: each counts one more attempt.
    ``captions`` is how many non-empty caption strings the record stores.
    """

    item_ids: Sequence[int]
    record: bytes
    contributor: str
    failed: int = 0
    chunk_id: str = ""
    retry_ids: Sequence[int] = ()
    captions: int = 0


@dataclass(frozen=True)
class JournalEntry:
    """A journal record as the compactor reads it. ``item_ids`` is None for a record written
    by schema version 2 (the ids are then only inside the record)."""

    seq: int
    chunk_id: str
    items: int
    item_ids: list[int] | None
    record: bytes


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


@dataclass(frozen=True)
class Quarantined:
    """A journal record set aside because it cannot become Parquet rows."""

    seq: int
    chunk_id: str
    item_ids: list[int]
    record: bytes
    reason: str


def _decode_ids(blob: bytes | None) -> list[int] | None:
    if blob is None:
        return None
    try:
        return _ids_decoder.decode(blob)
    except msgspec.DecodeError:
        return None


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
            create_or_migrate(self.conn, path)
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open state database {path}: {exc}") from exc

    def _set_synchronous(self, level: str) -> None:
        if level != self._synchronous:
            self.conn.execute(f"PRAGMA synchronous={level}")
            self._synchronous = level

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
            "SELECT chunk_id, shard, first_item, count, status, attempts, reason, holder "
            "FROM chunks ORDER BY first_item"
        ):
            yield ChunkRow(*r)

    def done_items(self, chunk_id: str) -> list[int]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT item_id FROM items WHERE chunk_id=? AND done=1", (chunk_id,)
            )
        ]

    def item_attempts(self, chunk_id: str) -> dict[int, int]:
        """Failed tries per item of a chunk (only items with any), to rebuild the lease book."""
        rows = self.conn.execute(
            "SELECT item_id, attempts FROM items WHERE chunk_id=? AND attempts>0", (chunk_id,)
        )
        return dict(rows.fetchall())

    def item_keys(self, first: int, last: int) -> dict[int, str]:
        rows = self.conn.execute(
            "SELECT item_id, key FROM items WHERE item_id BETWEEN ? AND ?", (first, last)
        )
        return dict(rows.fetchall())

    def commit(self, batches: Sequence[JournalBatch], states: Sequence[ChunkState]) -> None:
        """Journal records, done flags, attempts, contributor counts and chunk states: one
        transaction, so a chunk's state never lags the results that changed it.

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
            if batches:  # last: a chunk whose last item is now done is done, whatever else
                self.finish_chunks({b.chunk_id for b in batches if b.item_ids})

    def finish_chunks(self, chunk_ids: Iterable[str] | None = None) -> int:
        """Mark done every chunk (of ``chunk_ids``, or all) whose items are all done: in the
        results' own transaction, a finished chunk is never left 'leased' by a crash.
        Returns how many chunks changed."""
        sql = (
            "UPDATE chunks SET status='done', holder=NULL, deadline=NULL "
            "WHERE status != 'done' AND NOT EXISTS "
            "(SELECT 1 FROM items WHERE items.chunk_id = chunks.chunk_id AND items.done = 0)"
        )
        if chunk_ids is None:
            return self.conn.execute(sql).rowcount
        return sum(
            self.conn.execute(sql + " AND chunk_id = ?", (c,)).rowcount for c in chunk_ids if c
        )

    def _write_batches(self, batches: Sequence[JournalBatch]) -> None:
        now = time.time()
        per_contributor: dict[str, list[int]] = {}
        for b in batches:
            counts = per_contributor.setdefault(b.contributor, [0, 0, 0])
            counts[0] += len(b.item_ids)
            counts[1] += b.failed
            counts[2] += b.captions
        self.conn.executemany(
            "INSERT INTO journal(items, record, chunk_id, item_ids) VALUES(?, ?, ?, ?)",
            (
                (len(b.item_ids), b.record, b.chunk_id, _ids_encoder.encode(list(b.item_ids)))
                for b in batches
                if b.item_ids
            ),
        )
        self.conn.executemany(
            "UPDATE items SET done=1 WHERE item_id BETWEEN ? AND ?",
            id_runs(i for b in batches for i in b.item_ids),
        )
        self.conn.executemany(
            "UPDATE items SET attempts=attempts+1 WHERE item_id BETWEEN ? AND ?",
            id_runs(i for b in batches for i in b.retry_ids),
        )
        self.conn.executemany(
            "INSERT INTO contributors(contributor, items, failed, captions, first_seen, "
            "last_seen) VALUES(?,?,?,?,?,?) ON CONFLICT(contributor) DO UPDATE SET "
            "items=items+excluded.items, failed=failed+excluded.failed, "
            "captions=captions+excluded.captions, last_seen=excluded.last_seen",
            ((c, n, f, k, now, now) for c, (n, f, k) in per_contributor.items()),
        )

    def contributors(self) -> list[tuple[str, int, int]]:
        return self.conn.execute(
            "SELECT contributor, items, failed FROM contributors ORDER BY items DESC"
        ).fetchall()

    # -- compaction -----------------------------------------------------------------------
    def journal_size(self) -> int:
        """Items (not records) waiting in the journal."""
        return int(self.conn.execute("SELECT COALESCE(SUM(items), 0) FROM journal").fetchone()[0])

    def journal_batch(self, max_items: int) -> list[JournalEntry]:
        """The oldest records, up to about ``max_items`` items."""
        entries: list[JournalEntry] = []
        items = 0
        for seq, chunk_id, count, ids, record in self.conn.execute(
            "SELECT seq, chunk_id, items, item_ids, record FROM journal ORDER BY seq"
        ):
            entries.append(JournalEntry(seq, chunk_id, count, _decode_ids(ids), record))
            items += count
            if items >= max_items:
                break
        return entries

    def journal_records(self) -> Iterator[bytes]:
        """Every journal record, oldest first (read one at a time)."""
        for (record,) in self.conn.execute("SELECT record FROM journal ORDER BY seq"):
            yield bytes(record)

    def quarantine(self, bad: Sequence[Quarantined]) -> int:
        """Set aside records that cannot become Parquet rows. Returns the journal items
        removed.

        In one transaction each record moves from the journal to ``quarantine``, its items
        are no longer done and count one more attempt, and a chunk marked done goes back to
        pending, so a restart re-queues them even if the caller never does.
        """
        now = time.time()
        removed = 0
        with self._transaction():
            for q in bad:
                row = self.conn.execute(
                    "SELECT items FROM journal WHERE seq=?", (q.seq,)
                ).fetchone()
                removed += int(row[0]) if row else 0
                self.conn.execute("DELETE FROM journal WHERE seq=?", (q.seq,))
                self.conn.execute(
                    "INSERT INTO quarantine(seq, chunk_id, item_ids, record, reason, created) "
                    "VALUES(?,?,?,?,?,?)",
                    (q.seq, q.chunk_id, _ids_encoder.encode(q.item_ids), q.record, q.reason, now),
                )
                runs = id_runs(q.item_ids)
                self.conn.executemany(
                    "UPDATE chunks SET status='pending', holder=NULL, deadline=NULL "
                    "WHERE status='done' AND chunk_id IN "
                    "(SELECT DISTINCT chunk_id FROM items WHERE item_id BETWEEN ? AND ?)",
                    runs,
                )
                self.conn.executemany(
                    "UPDATE items SET done=0, attempts=attempts+1 WHERE item_id BETWEEN ? AND ?",
                    runs,
                )
        return removed

    def quarantined(self) -> list[tuple[int, str, list[int], str]]:
        """Records set aside: (seq, chunk_id, item_ids, reason), oldest first."""
        return [
            (seq, chunk_id or "", _decode_ids(ids) or [], reason)
            for seq, chunk_id, ids, reason in self.conn.execute(
                "SELECT seq, chunk_id, item_ids, reason FROM quarantine ORDER BY seq"
            )
        ]

    def intend_part(self, name_of: Callable[[int], str]) -> str:
        """Reserve the next part number (from the database, never the folder) and record
        the part's name as intended before its file is written. Returns the name."""
        with self._transaction():
            row = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM parts").fetchone()
            seq = int(row[0]) + 1
            name = name_of(seq)
            self.conn.execute(
                "INSERT INTO parts(name, rows, created, state, seq) VALUES(?,0,?,'intended',?)",
                (name, time.time(), seq),
            )
        return name

    def record_part(self, name: str, rows: int, last_seq: int) -> None:
        """The intended part is on disk: mark it recorded and drop its records from the
        journal, atomically."""
        with self._transaction():
            cur = self.conn.execute(
                "UPDATE parts SET state='recorded', rows=?, created=? "
                "WHERE name=? AND state='intended'",
                (rows, time.time(), name),
            )
            if cur.rowcount != 1:
                raise StorageError(f"part {name} was not recorded as intended")
            self.conn.execute("DELETE FROM journal WHERE seq <= ?", (last_seq,))

    def swap_part(
        self, old: str, new: str | None, rows: int, reopen: Sequence[tuple[str, str]]
    ) -> dict[str, list[int]]:
        """Replace part ``old`` by the intended part ``new`` (None: by nothing) and reopen the
        items (shard, key) whose rows it left out, in one transaction. Returns the reopened
        item ids by chunk."""
        reopened: dict[str, list[int]] = {}
        with self._transaction():
            if new is not None:
                self.conn.execute(
                    "UPDATE parts SET state='recorded', rows=?, created=? "
                    "WHERE name=? AND state='intended'",
                    (rows, time.time(), new),
                )
            self.conn.execute("DELETE FROM parts WHERE name=?", (old,))
            for shard, key in reopen:
                row = self.conn.execute(
                    "SELECT item_id, chunk_id FROM items WHERE shard=? AND key=?", (shard, key)
                ).fetchone()
                if row is not None:
                    reopened.setdefault(row[1], []).append(int(row[0]))
            self.conn.executemany(
                "UPDATE items SET done=0, attempts=0 WHERE item_id=?",
                ((i,) for ids in reopened.values() for i in ids),
            )
            self.conn.executemany(
                "UPDATE chunks SET status='pending', holder=NULL, deadline=NULL "
                "WHERE chunk_id=? AND status='done'",
                ((c,) for c in reopened),
            )
        return reopened

    def revive_failed_chunks(self) -> list[str]:
        """Failed chunks become pending with a clean slate of attempts."""
        with self._transaction():
            rows = self.conn.execute(
                "UPDATE chunks SET status='pending', attempts=0, reason=NULL, holder=NULL, "
                "deadline=NULL WHERE status='failed' RETURNING chunk_id"
            ).fetchall()
        return sorted(r[0] for r in rows)

    def forget_parts(self, names: Iterable[str]) -> None:
        """Drop intended parts whose files were removed (their rows are still journaled)."""
        with self._transaction():
            self.conn.executemany(
                "DELETE FROM parts WHERE name=? AND state='intended'", ((n,) for n in names)
            )

    def part_names(self) -> set[str]:
        """Recorded parts: the output."""
        return {r[0] for r in self.conn.execute("SELECT name FROM parts WHERE state='recorded'")}

    def intended_parts(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM parts WHERE state='intended'")]

    # -- read-only views for the output tables (storage/tables.py) -----------------------
    def contributor_batches(self, size: int) -> Iterator[list[tuple[str, int, int]]]:
        """(contributor, items stored, items failed) in batches of up to ``size`` rows, by
        name: one statement, so one consistent snapshot in WAL mode."""
        cursor = self.conn.execute(
            "SELECT contributor, items, failed FROM contributors ORDER BY contributor"
        )
        while rows := cursor.fetchmany(size):
            yield rows

    def chunk_batches(self, size: int) -> Iterator[list[tuple[str, str, str, str | None]]]:
        """(chunk_id, shard, status, holder) in batches of up to ``size`` rows, in the order
        they were listed (rowid: no sort, so millions of chunks are read without holding them
        all, in SQLite or here)."""
        cursor = self.conn.execute(
            "SELECT chunk_id, shard, status, holder FROM chunks ORDER BY rowid"
        )
        while rows := cursor.fetchmany(size):
            yield rows

    # -- scan-chunks: checks and repairs (storage/scan.py) ---------------------------------
    def integrity_problems(self) -> list[str]:
        """What ``PRAGMA integrity_check`` finds wrong (empty when the file is sound)."""
        rows = [str(r[0]) for r in self.conn.execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    def all_items(self) -> Iterator[tuple[int, str, str, bool]]:
        """(item_id, shard, key, done) of every item, in id order."""
        for item_id, shard, key, done in self.conn.execute(
            "SELECT item_id, shard, key, done FROM items ORDER BY item_id"
        ):
            yield int(item_id), shard, key, bool(done)

    def chunk_progress(self) -> list[tuple[str, str, str | None, int, int]]:
        """(chunk_id, status, holder, items, items done) of every chunk, in item order."""
        return self.conn.execute(
            "SELECT c.chunk_id, c.status, c.holder, COUNT(i.item_id), "
            "COALESCE(SUM(i.done), 0) FROM chunks c LEFT JOIN items i ON i.chunk_id = c.chunk_id "
            "GROUP BY c.chunk_id ORDER BY c.first_item"
        ).fetchall()

    def adopt_part(self, name: str, rows: int) -> None:
        """Record a part file the database did not know, as output. Its number (from its
        name) is reserved, so no later part is written under the same name."""
        number = name.removeprefix("part-").removesuffix(".parquet")
        with self._transaction():
            self.conn.execute(
                "INSERT INTO parts(name, rows, created, state, seq) VALUES(?,?,?,'recorded',?)",
                (name, rows, time.time(), int(number) if number.isdigit() else None),
            )

    def reopen_items(self, item_ids: Iterable[int], forget_parts: Iterable[str] = ()) -> list[str]:
        """Items marked done whose rows are gone become missing again, their done chunks
        pending, and the recorded parts ``forget_parts`` (gone from disk) are forgotten: one
        transaction. Returns the chunks reopened."""
        runs = id_runs(item_ids)
        with self._transaction():
            self.conn.executemany(
                "DELETE FROM parts WHERE name=? AND state='recorded'", ((n,) for n in forget_parts)
            )
            chunks: set[str] = set()
            for first, last in runs:
                chunks.update(
                    r[0]
                    for r in self.conn.execute(
                        "UPDATE chunks SET status='pending', holder=NULL, deadline=NULL "
                        "WHERE status='done' AND chunk_id IN (SELECT DISTINCT chunk_id FROM "
                        "items WHERE item_id BETWEEN ? AND ?) RETURNING chunk_id",
                        (first, last),
                    )
                )
            self.conn.executemany("UPDATE items SET done=0 WHERE item_id BETWEEN ? AND ?", runs)
        return sorted(chunks)

    def mark_items_done(self, item_ids: Iterable[int]) -> int:
        """Items whose row is in the output but that are not marked done: done (their
        chunks' status is the caller's next step, :meth:`finish_chunks`). Returns the items
        changed."""
        changed = 0
        with self._transaction():
            for first, last in id_runs(item_ids):
                changed += self.conn.execute(
                    "UPDATE items SET done=1 WHERE done=0 AND item_id BETWEEN ? AND ?",
                    (first, last),
                ).rowcount
        return changed

    def reset_leases(self) -> list[str]:
        """Leased chunks become pending (call only while no orchestrator holds the data
        directory: then no lease is alive). Returns their ids."""
        with self._transaction():
            rows = self.conn.execute(
                "UPDATE chunks SET status='pending', holder=NULL, deadline=NULL "
                "WHERE status='leased' RETURNING chunk_id"
            ).fetchall()
        return sorted(r[0] for r in rows)

    def reopen_unfinished_chunks(self) -> list[str]:
        """Chunks marked done that still have items not done become pending. Returns them."""
        with self._transaction():
            rows = self.conn.execute(
                "UPDATE chunks SET status='pending', holder=NULL, deadline=NULL "
                "WHERE status='done' AND EXISTS (SELECT 1 FROM items "
                "WHERE items.chunk_id = chunks.chunk_id AND items.done = 0) RETURNING chunk_id"
            ).fetchall()
        return sorted(r[0] for r in rows)

    # -- leaderboard and tokens (orchestrator/leaderboard.py, orchestrator/auth.py) -------
    def leaderboard(self, limit: int) -> list[tuple[str, int, int, int, float, float, int]]:
        """(contributor, items, failed, captions, first_seen, last_seen, trust_level) of the
        ``limit`` contributors with most items."""
        return self.conn.execute(
            "SELECT contributor, items, failed, captions, first_seen, last_seen, trust_level "
            "FROM contributors ORDER BY items DESC, contributor LIMIT ?",
            (limit,),
        ).fetchall()

    def contributor_items(self) -> int:
        """Items over every contributor: the leaderboard's denominator."""
        row = self.conn.execute("SELECT COALESCE(SUM(items), 0) FROM contributors")
        return int(row.fetchone()[0])

    def tokens(self) -> list[tuple[str, str, str, str, float | None]]:
        """(role, name, token_hash, source, revoked) of every stored token or revocation."""
        return self.conn.execute(
            "SELECT role, name, token_hash, source, revoked FROM tokens ORDER BY role, name"
        ).fetchall()

    def add_token(self, role: str, name: str, token_hash: str) -> None:
        """Store a token's hash (never the token). A revoked entry of that name is replaced;
        a live one is refused (StorageError): revoke it first."""
        with self._transaction():
            row = self.conn.execute(
                "SELECT revoked FROM tokens WHERE role=? AND name=?", (role, name)
            ).fetchone()
            if row is not None and row[0] is None:
                raise StorageError(f"a {role} token named {name!r} exists: revoke it first")
            self.conn.execute(
                "INSERT INTO tokens(role, name, token_hash, source, created, revoked) "
                "VALUES(?,?,?,'db',?,NULL) ON CONFLICT(role, name) DO UPDATE SET "
                "token_hash=excluded.token_hash, source='db', created=excluded.created, "
                "revoked=NULL",
                (role, name, token_hash, time.time()),
            )

    def revoke_token(self, role: str, name: str) -> None:
        """Refuse ``role``/``name`` from now on, whether its token is stored here or in the
        config (a config token's revocation is a row without a hash)."""
        now = time.time()
        self.conn.execute(
            "INSERT INTO tokens(role, name, token_hash, source, created, revoked) "
            "VALUES(?,?,'','config',?,?) ON CONFLICT(role, name) DO UPDATE SET revoked=?",
            (role, name, now, now, now),
        )

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
