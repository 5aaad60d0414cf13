"""Check a data directory's state database against its Parquet parts (``scan-chunks``).

The output is right when every item marked done has exactly one row, in a recorded part or
in the journal, and every row belongs to a done item. This module reads both sides once (a
*census*), and turns every difference into a :class:`Finding`: what is wrong, how often, a
few examples, and what ``--fix`` does about it (see :mod:`caption_flow.storage.scan_repair`).

A scan changes nothing. It may run beside a running orchestrator (the database is read in one
snapshot, the parts folder a moment apart, so such a report may be moving); leases and the
journal are then the orchestrator's business and are not reported.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from caption_flow.errors import StorageError
from caption_flow.storage.identity import DB_NAME, PARTS_DIR
from caption_flow.storage.lock import LOCK_NAME, describe_holder
from caption_flow.storage.parts import PART_GLOB, TMP_GLOB, UNRECOGNISED
from caption_flow.storage.rows import decode_record
from caption_flow.storage.schema import SCHEMA_VERSION
from caption_flow.storage.state import StateDB

log = logging.getLogger(__name__)

PROBLEM = "problem"  # wrong, and counted in the exit status
DAMAGED = "damaged"  # a file that cannot be read: reported, never changed
INFO = "info"  # worth knowing, not wrong
EXAMPLES = 5
_BATCH_ROWS = 65_536

Key = tuple[str, str]  # (shard, item key): how a row names its item


@dataclass
class Finding:
    kind: str
    severity: str
    count: int
    about: str  # what is wrong, in a few words
    fix: str  # what --fix does about it, or why it cannot
    examples: list[str] = field(default_factory=list)


@dataclass
class ScanReport:
    data_dir: Path
    running: str | None  # the orchestrator holding the directory during a read-only scan
    findings: list[Finding]

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity != INFO]

    @property
    def clean(self) -> bool:
        return not self.problems


def show(key: Key) -> str:
    shard, item = key
    return item if shard in ("", ".") else f"{shard}/{item}"


def running_orchestrator(data_dir: Path) -> str | None:
    """Who holds ``data_dir``'s lock, described, or None. Probes with a shared lock that is
    released at once, so the lock file is never changed (and not created)."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {data_dir / LOCK_NAME}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
            except (OSError, ValueError):
                info = {}
            return describe_holder(info if isinstance(info, dict) else {})
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass
class Census:
    """Both sides of the output, read once: the database's items, parts, journal and chunks,
    and every part file's rows (or why it cannot be read)."""

    ids: dict[Key, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    recorded: list[str] = field(default_factory=list)  # by name, i.e. in write order
    intended: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    tmp: list[str] = field(default_factory=list)
    rows: dict[str, list[Key]] = field(default_factory=dict)  # readable part files
    damaged: dict[str, str] = field(default_factory=dict)  # part file -> why unreadable
    journal: list[Key] = field(default_factory=list)
    journal_records: int = 0
    journal_unreadable: int = 0
    chunks: list[tuple[str, str, str | None, int, int]] = field(default_factory=list)
    quarantined: list[tuple[int, str, list[int], str]] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [n for n in self.recorded if n not in self.rows and n not in self.damaged]

    def output_keys(self) -> Iterator[Key]:
        """Every row of the output: recorded parts in write order, then the journal."""
        for name in self.recorded:
            yield from self.rows.get(name, ())
        yield from self.journal

    def occurrences(self) -> collections.Counter[int]:
        """Rows per known item in the output."""
        return collections.Counter(
            i for k in self.output_keys() if (i := self.ids.get(k)) is not None
        )

    def adoptable(self, occurrences: collections.Counter[int]) -> dict[str, str | None]:
        """Each unrecorded part file: None when it can be recorded (readable, and its rows
        are items marked done that have no row anywhere else), else why not."""
        taken = set(occurrences)
        verdicts: dict[str, str | None] = {}
        for name in self.unrecorded:
            if name in self.damaged:
                verdicts[name] = "it cannot be read"
                continue
            if self.damaged:
                verdicts[name] = "a recorded part is damaged, so its rows may be in the output"
                continue
            ids = [self.ids.get(k) for k in self.rows[name]]
            why = None
            if not ids:
                why = "it holds no rows"
            elif None in ids:
                why = "it holds rows of items the database does not list"
            elif any(i not in self.done for i in ids if i is not None):
                why = "it holds rows of items not marked done"
            elif len(set(ids)) != len(ids) or taken.intersection(i for i in ids if i is not None):
                why = "its rows are already in the output"
            if why is None:
                taken.update(i for i in ids if i is not None)
            verdicts[name] = why
        return verdicts


def read_part_keys(path: Path) -> list[Key]:
    """Every row's (shard, item_key), decoding every column so that a damaged page is found.
    Raises what pyarrow raises for a file that cannot be read."""
    keys: list[Key] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
        names = batch.schema.names
        if "shard" not in names or "item_key" not in names:
            raise ValueError("not a caption part: no shard or item_key column")
        keys.extend(
            zip(
                batch.column("shard").to_pylist(), batch.column("item_key").to_pylist(), strict=True
            )
        )
    return keys


def _read_parts(census: Census, folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        try:
            census.rows[name] = read_part_keys(path)
        except (OSError, ValueError, pa.ArrowException) as exc:
            census.damaged[name] = f"{type(exc).__name__}: {exc}"


def take_census(db: StateDB, folder: Path) -> Census:
    """Read the database in one snapshot, then the part files. The folder is listed first: a
    part's name is recorded (as intended) before its file exists, so every file listed is
    known to the snapshot unless it truly is foreign."""
    census = Census()
    files = sorted(p.name for p in folder.glob(PART_GLOB)) if folder.is_dir() else []
    census.tmp = sorted(p.name for p in folder.glob(TMP_GLOB)) if folder.is_dir() else []
    db.conn.execute("BEGIN")
    try:
        for item_id, shard, key, done in db.all_items():
            census.ids[(shard, key)] = item_id
            if done:
                census.done.add(item_id)
        census.recorded = sorted(db.part_names())
        census.intended = sorted(db.intended_parts())
        keys = {i: k for k, i in census.ids.items()}
        for entry in db.journal_batch(2**62):
            census.journal_records += 1
            census.journal.extend(_journal_keys(entry.item_ids, entry.record, keys, census))
        census.chunks = db.chunk_progress()
        census.quarantined = db.quarantined()
    finally:
        db.conn.execute("COMMIT")
    known = set(census.recorded) | set(census.intended)
    census.unrecorded = [n for n in files if n not in known]
    _read_parts(census, folder, census.recorded + census.unrecorded)
    return census


def _journal_keys(
    ids: list[int] | None, record: bytes, keys: dict[int, Key], census: Census
) -> list[Key]:
    if ids is not None:
        return [keys[i] for i in ids if i in keys]
    try:  # written by schema version 2: the ids are only inside the record
        decoded = decode_record(record)
    except msgspec.DecodeError:
        census.journal_unreadable += 1  # quarantined, with its reason, when compacted
        return []
    return [(decoded.shard, item.key) for item in decoded.items]


def database_damage(db: StateDB) -> Finding | None:
    """A finding when the database is damaged or too old to be scanned as it is."""
    try:
        problems = db.integrity_problems()
        version = None if problems else db.get_meta("schema_version")
    except sqlite3.Error as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        return Finding(
            "database-damaged",
            DAMAGED,
            len(problems),
            f"{db.path} fails SQLite's integrity check",
            "nothing: restore state.db from a backup (or run `sqlite3 state.db .recover`)",
            problems[:EXAMPLES],
        )
    if version == str(SCHEMA_VERSION):
        return None
    about = f"{db.path} has schema version {version}, this release writes {SCHEMA_VERSION}"
    if version is not None and version.isdigit() and int(version) < SCHEMA_VERSION:
        fix = "migrates it in place (as the next orchestrator start would), then scans"
        return Finding("database-schema", PROBLEM, 1, about, fix)
    fix = "nothing: open it with the release that wrote it"
    return Finding("database-newer", PROBLEM, 1, about, fix)


def findings(census: Census, live: bool) -> list[Finding]:
    """Every difference between the database and the parts (and what is worth knowing)."""
    out: list[Finding] = []

    def add(kind: str, severity: str, about: str, fix: str, found: list[str]) -> None:
        if found:
            out.append(Finding(kind, severity, len(found), about, fix, found[:EXAMPLES]))

    add(
        "part-damaged",
        DAMAGED,
        "part files that cannot be read",
        "nothing to a recorded part (restore it, or move it away and --fix re-queues its "
        "items); an unrecorded one is moved aside like any other",
        [f"{n}: {why}" for n, why in sorted(census.damaged.items())],
    )
    add(
        "part-missing",
        PROBLEM,
        "recorded parts missing from disk (their captions are gone)",
        "forgets them; their items are re-queued",
        census.missing,
    )
    verdicts = census.adoptable(census.occurrences())
    add(
        "part-unrecorded",
        PROBLEM,
        "part files the database does not record (not part of the output)",
        f"records those whose rows are done items stored nowhere else, moves the others to "
        f"{PARTS_DIR}/{UNRECOGNISED}/",
        [
            f"{n}: " + ("can be recorded" if v is None else f"moved aside, {v}")
            for n, v in verdicts.items()
        ],
    )
    add(
        "part-intended",
        PROBLEM,
        "parts being written (now, or interrupted before being recorded)"
        if live
        else "parts written but not recorded before an interruption",
        "removes them: their rows are still in the journal or in the part they replace",
        census.intended,
    )
    add("tmp-file", INFO, "unfinished temporary part files", "removes them", census.tmp)
    out += _row_findings(census)
    out += _chunk_findings(census, live)
    if census.journal_records and not live:
        out.append(
            Finding(
                "journal",
                INFO,
                len(census.journal),
                f"rows in {census.journal_records} journal record(s) not yet in Parquet "
                f"({census.journal_unreadable} unreadable)",
                "compacts them into a part (the next orchestrator start would too)",
                [show(k) for k in census.journal[:EXAMPLES]],
            )
        )
    add(
        "quarantine",
        INFO,
        "results set aside because they could not be stored; their items were re-queued",
        "nothing: kept in state.db's quarantine table for inspection",
        [
            f"record {s} (chunk {c}, {len(ids)} items): {why}"
            for s, c, ids, why in census.quarantined
        ],
    )
    return out


def _row_findings(census: Census) -> list[Finding]:
    out: list[Finding] = []
    occurrences = census.occurrences()
    keys = {i: k for k, i in census.ids.items()}
    without = sorted(census.done.difference(occurrences))
    if without:
        fix = "re-queues them (not done, their chunks pending): their captions are gone"
        if census.damaged:
            fix = "nothing while a part is damaged: their rows may be in it"
        out.append(
            Finding(
                "item-without-row",
                PROBLEM,
                len(without),
                "items marked done with no row in the output",
                fix,
                [show(keys[i]) for i in without[:EXAMPLES]],
            )
        )
    duplicates = sorted(i for i, n in occurrences.items() if n > 1)
    if duplicates:
        out.append(
            Finding(
                "row-duplicate",
                PROBLEM,
                sum(occurrences[i] - 1 for i in duplicates),
                f"extra rows of {len(duplicates)} item(s) that have more than one",
                "drops the extra rows, keeping each item's first (the parts are rewritten)",
                [f"{show(keys[i])} x{occurrences[i]}" for i in duplicates[:EXAMPLES]],
            )
        )
    undone = sorted(i for i in occurrences if i not in census.done)
    if undone:
        out.append(
            Finding(
                "row-item-not-done",
                PROBLEM,
                len(undone),
                "items with a row in the output that are not marked done",
                "marks them done, keeping their row (so they are not captioned twice)",
                [show(keys[i]) for i in undone[:EXAMPLES]],
            )
        )
    unknown = [k for k in census.output_keys() if k not in census.ids]
    if unknown:
        out.append(
            Finding(
                "row-unknown-item",
                PROBLEM,
                len(unknown),
                "rows of items this database does not list (another dataset's?)",
                "nothing: the rows are kept; check where the part came from",
                [show(k) for k in unknown[:EXAMPLES]],
            )
        )
    return out


def _chunk_findings(census: Census, live: bool) -> list[Finding]:
    stale: list[str] = []
    wrong: list[str] = []
    for chunk_id, status, holder, items, done in census.chunks:
        finished = done == items
        if status == "leased" and not live:
            stale.append(f"{chunk_id} (held by {holder or 'nobody'})")
        elif status == "done" and not finished:
            wrong.append(f"{chunk_id}: done, {items - done} of {items} items not done")
        elif status != "done" and finished:
            wrong.append(f"{chunk_id}: {status}, all {items} items done")
    out = []
    if stale:
        out.append(
            Finding(
                "lease-stale",
                PROBLEM,
                len(stale),
                "chunks marked leased while no orchestrator runs",
                "puts them back to pending (the next start would hold them for their worker "
                "for the reconnect window)",
                stale[:EXAMPLES],
            )
        )
    if wrong:
        out.append(
            Finding(
                "chunk-state",
                PROBLEM,
                len(wrong),
                "chunks whose status disagrees with their items",
                "marks them done or pending by their items",
                wrong[:EXAMPLES],
            )
        )
    return out


def require_db(data_dir: Path) -> Path:
    """``data_dir``'s state database; StorageError when there is none (nothing is created)."""
    db_path = data_dir / DB_NAME
    if not db_path.is_file():
        raise StorageError(
            f"{db_path} does not exist: nothing to scan (is {data_dir} the orchestrator's "
            "--data-dir?)"
        )
    return db_path


def scan(data_dir: Path) -> ScanReport:
    """Scan ``data_dir`` read-only; StorageError when it has no state database."""
    db_path = require_db(data_dir)
    running = running_orchestrator(data_dir)
    try:
        db = StateDB(db_path, read_only=True)
    except StorageError as exc:
        found = Finding("database-damaged", DAMAGED, 1, str(exc), "nothing", [str(exc)])
        return ScanReport(data_dir, running, [found])
    try:
        return ScanReport(data_dir, running, scan_db(db, data_dir, live=running is not None))
    finally:
        db.close()


def scan_db(db: StateDB, data_dir: Path, live: bool) -> list[Finding]:
    """The findings for an open database (read-only or held under the lock)."""
    damage = database_damage(db)
    if damage is not None:
        return [damage]
    try:
        census = take_census(db, data_dir / PARTS_DIR)
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            db.conn.execute("ROLLBACK")
        why = f"{type(exc).__name__}: {exc}"
        return [
            Finding("database-damaged", DAMAGED, 1, f"{db.path} cannot be read", "nothing", [why])
        ]
    return findings(census, live)
