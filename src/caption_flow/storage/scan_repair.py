"""``scan-chunks --fix``: repair what a scan finds, without losing a caption.

Runs with the data directory locked (as an orchestrator would be), through the caption
store, in an order where each step leaves the directory consistent if interrupted:

1. leftovers of an interrupted write go (temporary files, intended parts: their rows are
   still in the journal, or in the part they were replacing);
2. unrecorded part files are recorded when their rows are done items stored nowhere else,
   else moved aside, never deleted (before anything is written, so no new part takes a
   foreign file's name);
3. the journal is compacted, so every stored row is in a part;
4. duplicate rows are dropped, keeping each item's first: a part is rewritten as a new
   intended part, one transaction records it and forgets the old one, then the old file
   goes (the pattern of ``requeue --failed``);
5. items marked done without a row are re-queued (not while a part is damaged: their rows
   may be in it), items with a row are marked done, recorded parts gone from disk forgotten;
6. chunk statuses are set by their items.

Leases are reset first: nobody holds one while the directory is locked.

A damaged database is never opened for writing; a damaged part is never changed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from caption_flow.errors import StorageError
from caption_flow.storage.identity import PARTS_DIR
from caption_flow.storage.parts import (
    UNRECOGNISED,
    move_unrecognised,
    part_name,
    remove_part,
    remove_stray_tmp,
    write_part,
)
from caption_flow.storage.scan import (
    EXAMPLES,
    Census,
    ScanReport,
    database_damage,
    require_db,
    running_orchestrator,
    scan_db,
    show,
    take_census,
)
from caption_flow.storage.schema import SCHEMA_VERSION
from caption_flow.storage.state import StateDB
from caption_flow.storage.store import CaptionStore

log = logging.getLogger(__name__)


@dataclass
class Repair:
    kind: str  # the finding it answers
    count: int
    what: str
    examples: list[str] = field(default_factory=list)


@dataclass
class FixReport:
    before: ScanReport
    repairs: list[Repair]
    after: ScanReport
    skipped: list[str] = field(default_factory=list)  # repairs not made, with why

    def did(self, kind: str, count: int, what: str, examples: list[str] | None = None) -> None:
        if count:
            self.repairs.append(Repair(kind, count, what, (examples or [])[:EXAMPLES]))
            log.info("scan-chunks --fix: %s: %s", kind, what)


async def fix(data_dir: Path) -> FixReport:
    """Scan ``data_dir`` and repair it. StorageError when an orchestrator holds it."""
    holder = running_orchestrator(data_dir)
    if holder is not None:
        raise StorageError(
            f"scan-chunks --fix refused: {data_dir} is in use by a running orchestrator "
            f"({holder}); stop it first, or scan without --fix (read-only)"
        )
    # Checked read-only first: a damaged database is never opened for writing.
    db = StateDB(require_db(data_dir), read_only=True)
    try:
        damage = database_damage(db)
    finally:
        db.close()
    if damage is not None and damage.kind != "database-schema":
        report = ScanReport(data_dir, None, [damage])
        return FixReport(report, [], report, [f"nothing changed: {damage.about}"])
    store = CaptionStore(data_dir)  # locks it (and migrates an older schema)
    try:
        before = ScanReport(data_dir, None, scan_db(store.db, data_dir, live=False))
        if any(f.kind == "database-damaged" for f in before.findings):
            return FixReport(before, [], before, ["nothing changed: the database is damaged"])
        result = FixReport(before, [], before)
        if damage is not None:  # an older schema, migrated when the store opened it
            before.findings.insert(0, damage)
            result.did(damage.kind, 1, f"migrated to schema version {SCHEMA_VERSION}")
        await _repair(store, result)
        result.after = ScanReport(data_dir, None, scan_db(store.db, data_dir, live=False))
        return result
    finally:
        await store.close(flush=False)


async def _repair(store: CaptionStore, result: FixReport) -> None:
    db, folder, did = store.db, store.parts_dir, result.did
    leases = db.reset_leases()  # first: nobody holds a lease while the directory is locked
    did("lease-stale", len(leases), f"put {len(leases)} leased chunk(s) back to pending", leases)
    tmp = remove_stray_tmp(folder)
    did("tmp-file", len(tmp), f"removed {len(tmp)} temporary part file(s)", tmp)
    intended = db.intended_parts()
    for name in intended:
        remove_part(folder, name)
    db.forget_parts(intended)
    did("part-intended", len(intended), f"removed {len(intended)} intended part(s)", intended)

    census = take_census(db, folder)
    verdicts = census.adoptable(census.occurrences())
    adopted = [n for n, why in verdicts.items() if why is None]
    for name in adopted:
        db.adopt_part(name, len(census.rows[name]))
    did("part-unrecorded", len(adopted), f"recorded {len(adopted)} part(s) as output", adopted)
    moved = move_unrecognised(folder, set(census.recorded) | set(adopted))
    names = [f"{p.name} ({verdicts.get(p.name) or 'unknown'})" for p in moved]
    did(
        "part-unrecorded",
        len(moved),
        f"moved {len(moved)} part(s) to {PARTS_DIR}/{UNRECOGNISED}/ (kept, not output)",
        names,
    )

    if census.journal_records:
        quarantined = len(census.quarantined)
        try:
            rows = await store.compact()
        except Exception as exc:  # the rows stay in the journal: reported, never dropped
            log.exception("scan-chunks --fix: compacting the journal failed")
            result.skipped.append(f"journal not compacted: {type(exc).__name__}: {exc}")
        else:
            set_aside = len(db.quarantined()) - quarantined
            extra = (
                f" ({set_aside} record(s) quarantined, their items re-queued)" if set_aside else ""
            )
            did("journal", rows, f"compacted {rows} journal row(s) into parts{extra}")

    census = take_census(db, folder)
    _drop_duplicates(db, folder, census, result)
    census = take_census(db, folder)
    occurrences = census.occurrences()
    keys = {i: k for k, i in census.ids.items()}
    undone = sorted(i for i in occurrences if i not in census.done)
    changed = db.mark_items_done(undone)
    did(
        "row-item-not-done",
        changed,
        f"marked {changed} item(s) with a row done",
        [show(keys[i]) for i in undone],
    )
    without = sorted(census.done.difference(occurrences))
    if census.damaged:
        if without or census.missing:
            result.skipped.append(
                f"{len(without)} item(s) without a row not re-queued and "
                f"{len(census.missing)} missing part(s) not forgotten: "
                f"{len(census.damaged)} part(s) are damaged and may hold their rows"
            )
    else:
        missing = census.missing
        chunks = db.reopen_items(without, forget_parts=missing)
        did(
            "part-missing",
            len(missing),
            f"forgot {len(missing)} recorded part(s) gone from disk",
            missing,
        )
        did(
            "item-without-row",
            len(without),
            f"re-queued {len(without)} item(s) whose rows are gone ({len(chunks)} chunk(s) "
            "back to pending)",
            [show(keys[i]) for i in without],
        )

    reopened = db.reopen_unfinished_chunks()
    finished = db.finish_chunks()
    did(
        "chunk-state",
        len(reopened),
        f"{len(reopened)} chunk(s) with items not done: pending",
        reopened,
    )
    did("chunk-state", finished, f"{finished} chunk(s) with every item done: done")


def _drop_duplicates(db: StateDB, folder: Path, census: Census, result: FixReport) -> None:
    """Rewrite each part holding a row of an item already seen earlier in the output."""
    seen: set[int] = set()
    drops: dict[str, list[int]] = {}
    for name in census.recorded:
        for index, key in enumerate(census.rows.get(name, ())):
            item = census.ids.get(key)
            if item is None:
                continue
            if item in seen:
                drops.setdefault(name, []).append(index)
            seen.add(item)
    dropped = 0
    rewritten: list[str] = []
    for name, rows in drops.items():
        new = _rewrite_without(db, folder, name, set(rows))
        dropped += len(rows)
        rewritten.append(f"{name} -> {new or 'removed (every row was a duplicate)'}")
    result.did(
        "row-duplicate",
        dropped,
        f"dropped {dropped} duplicate row(s), keeping each item's first; "
        f"{len(rewritten)} part(s) rewritten",
        rewritten,
    )


def _rewrite_without(db: StateDB, folder: Path, name: str, drop: set[int]) -> str | None:
    """Replace part ``name`` by a new part without the rows ``drop`` (None: by nothing)."""
    table = pq.read_table(folder / name)
    keep = pa.array([i not in drop for i in range(table.num_rows)], pa.bool_())
    kept = table.filter(keep)
    new = None
    if kept.num_rows:
        new = db.intend_part(part_name)
        write_part(folder, new, kept)
    db.swap_part(name, new, kept.num_rows, ())
    with contextlib.suppress(FileNotFoundError):
        (folder / name).unlink()
    log.info("%s: %d duplicate row(s) dropped (now %s)", name, len(drop), new)
    return new
