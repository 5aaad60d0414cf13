"""The state database's tables, and the migration of a database an older release wrote.

Each version is migrated in place, in one transaction, so a data directory keeps its chunks,
journal and parts across an upgrade.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path

from caption_flow.errors import StorageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4

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
    done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS items_shard_key ON items (shard, key);
CREATE INDEX IF NOT EXISTS items_chunk ON items (chunk_id, done);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    items INTEGER NOT NULL,
    record BLOB NOT NULL,
    chunk_id TEXT NOT NULL DEFAULT '',
    item_ids BLOB
);
CREATE TABLE IF NOT EXISTS parts (
    name TEXT PRIMARY KEY,
    rows INTEGER NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'recorded',
    seq INTEGER
);
CREATE TABLE IF NOT EXISTS contributors (
    contributor TEXT PRIMARY KEY,
    items INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    captions INTEGER NOT NULL DEFAULT 0,
    trust_level INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    chunk_id TEXT,
    item_ids BLOB,
    record BLOB,
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT 'db',
    created REAL NOT NULL,
    revoked REAL,
    PRIMARY KEY (role, name)
);
"""

# Version 2 -> 3: columns added in place, so a database of the previous release keeps its data.
_MIGRATE_2_TO_3 = (
    "ALTER TABLE journal ADD COLUMN chunk_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE journal ADD COLUMN item_ids BLOB",
    "ALTER TABLE items ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE parts ADD COLUMN state TEXT NOT NULL DEFAULT 'recorded'",
    "ALTER TABLE parts ADD COLUMN seq INTEGER",
)
# Version 3 -> 4: the contributors' caption counts and trust levels (the tokens table is new,
# created below). Captions stored before are estimated as one per captioned item.
_MIGRATE_3_TO_4 = (
    "ALTER TABLE contributors ADD COLUMN captions INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE contributors ADD COLUMN trust_level INTEGER NOT NULL DEFAULT 1",
    "UPDATE contributors SET captions = MAX(items - failed, 0)",
)
_PART_SEQ = re.compile(r"^part-(\d+)\.parquet$")


def _stored_version(conn: sqlite3.Connection) -> int | None:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    ).fetchone()
    if not has_meta:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return None if row is None else int(row[0])


def _set_version(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (str(SCHEMA_VERSION),),
    )


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    for statement in _MIGRATE_2_TO_3:
        conn.execute(statement)
    for (name,) in conn.execute("SELECT name FROM parts").fetchall():
        match = _PART_SEQ.match(name)
        if match:
            conn.execute("UPDATE parts SET seq=? WHERE name=?", (int(match.group(1)), name))


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    columns = {r[1] for r in conn.execute("PRAGMA table_info(contributors)")}
    if not columns or "captions" in columns:  # no table yet: it is created whole below
        return
    for statement in _MIGRATE_3_TO_4:
        conn.execute(statement)


_MIGRATIONS = {2: _migrate_2_to_3, 3: _migrate_3_to_4}


def create_or_migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new database, or bring an older one up to
    :data:`SCHEMA_VERSION`, one version after the other (all in one transaction)."""
    version = _stored_version(conn)
    if version is not None and version != SCHEMA_VERSION:
        if version not in _MIGRATIONS:
            raise StorageError(
                f"{path}: schema version {version}, this release reads versions "
                f"{min(_MIGRATIONS)} to {SCHEMA_VERSION}; open it with the release that wrote it"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for step in range(version, SCHEMA_VERSION):
                _MIGRATIONS[step](conn)
            _set_version(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        log.info("%s: schema migrated from version %d to %d", path, version, SCHEMA_VERSION)
    conn.executescript(_SCHEMA)
    if version is None:
        _set_version(conn)
