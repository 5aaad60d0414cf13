"""The caption store: an asyncio facade over the state database and the Parquet parts.

All database writes run on one dedicated thread, so the event loop never blocks on an fsync
and SQLite sees a single writer. Results are group-committed: whatever arrived while the
previous transaction was running goes into the next one, and every submitter is answered
when its rows are durable. Compaction (decode, build columns, write Parquet) runs on a
second thread, and is never interrupted half-way: a part is always written *and* recorded.

Journal records come from workers, so compaction expects records it cannot store: each such
record is quarantined with its reason and its items go back to the queue, and the rest of the
batch is written as usual. A compaction that fails for any other reason is logged and tried
again later, with a growing pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from caption_flow import faults
from caption_flow.errors import StorageError
from caption_flow.storage import identity
from caption_flow.storage.lock import DataDirLock
from caption_flow.storage.parts import (
    PART_GLOB,
    check_part,
    move_unrecognised,
    part_name,
    remove_part,
    remove_stray_tmp,
    write_part,
)
from caption_flow.storage.reader import failed_rows
from caption_flow.storage.requeue import Reopened, split_failed
from caption_flow.storage.rows import decode_record, record_failures, records_to_table
from caption_flow.storage.state import ChunkState, JournalBatch, JournalEntry, Quarantined, StateDB
from caption_flow.storage.tables import DATASET_NAME_KEY, write_tables

if TYPE_CHECKING:
    from caption_flow.config.models import DatasetConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

_Pending = tuple[list[JournalBatch], list[ChunkState], "asyncio.Future[None]"]

# Item keys read per range read when leasing (see CaptionStore.read_keys).
KEY_READ_AHEAD = 4096
# The compactor looks at the journal this often; after a failure it waits twice as long each
# time, up to COMPACT_BACKOFF_MAX_S, so a broken disk is retried without spinning.
COMPACT_POLL_S = 0.5
COMPACT_BACKOFF_MAX_S = 30.0
# A quarantine reason is an exception message, which may quote worker data: keep it short.
REASON_CHARS = 500
# The side tables (storage/tables.py) are rewritten after a compaction only once the time
# since their last rewrite is this many times what that rewrite took: a huge jobs table costs
# the Parquet thread at most about a tenth of its time. They are always rewritten at close.
TABLES_COST_RATIO = 10.0

QuarantineHook = Callable[[str, list[int], str], None]


class CaptionStore:
    def __init__(
        self,
        data_dir: Path,
        compact_rows: int = 50_000,
        compact_seconds: float = 10.0,
        group_commit_ms: float = 0.0,
        dataset: DatasetConfig | None = None,
        force_new_dataset: bool = False,
    ) -> None:
        """Locks ``data_dir`` first (StorageError while another process holds it). With
        ``dataset``, a directory that belongs to another dataset is refused, or with
        ``force_new_dataset`` its run is moved aside (see :mod:`caption_flow.storage.identity`).
        """
        self.data_dir = data_dir
        self.parts_dir = data_dir / "captions"
        self.compact_rows = compact_rows
        self.compact_seconds = compact_seconds
        self.group_commit_s = group_commit_ms / 1000.0
        # Called on the event loop once records are quarantined: (chunk_id, item_ids, reason).
        self.on_quarantine: QuarantineHook | None = None
        # Output columns every part gets, even when no row of it has text for them (the
        # orchestrator sets the job's fields here), so parts agree on their schema.
        self.output_fields: set[str] = set()
        # Rows stored with an error (NO_TEXT included), journal and parts together: counted
        # from the output at start, then kept up to date by every change of the output.
        self.items_failed = 0
        self.lock = DataDirLock.acquire(data_dir)
        try:
            self.identity = None if dataset is None else identity.DatasetIdentity.of(dataset)
            if self.identity is not None:
                identity.claim(data_dir, self.identity, force_new_dataset)
            self._refuse_parts_without_database()
            self.db = StateDB(data_dir / "state.db")
            if self.identity is not None:
                identity.record(self.db, self.identity)
            if dataset is not None:  # the name rows carry, for the jobs table
                self.db.set_meta(DATASET_NAME_KEY, dataset.name or dataset.path)
            self.reader = StateDB(data_dir / "state.db", read_only=True)
        except BaseException:
            self.lock.release()
            raise
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-db")
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-parquet")
        self._waiting: list[_Pending] = []
        self._in_flight: Future[None] | None = None
        self._delayed = False
        self._keys: dict[int, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._compact_lock = asyncio.Lock()
        self._journal_rows = 0
        self._oldest_unflushed: float | None = None
        self.committed_rows = 0
        self.compact_failures = 0
        self._tables_at = 0.0  # monotonic time of the last rewrite of the side tables
        self._tables_cost_s = 0.0  # and how long it took

    def _refuse_parts_without_database(self) -> None:
        """Parts without the database that records them: a lost or misplaced state.db. Going
        on would start a new run over the old output, so stop before creating anything."""
        if (self.data_dir / "state.db").exists() or not self.parts_dir.is_dir():
            return
        found = sum(1 for _ in self.parts_dir.rglob(PART_GLOB))
        if found:
            raise StorageError(
                f"{self.parts_dir} holds {found} caption part file(s) but "
                f"{self.data_dir / 'state.db'} does not exist: restore state.db to resume that "
                f"run, or move {self.parts_dir} away (or use another --data-dir) to start a new "
                "one; nothing was changed"
            )

    async def run_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    async def _run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the Parquet thread."""
        return await asyncio.get_running_loop().run_in_executor(self._io_thread, fn, *args)

    async def start(self) -> None:
        """Repair what a crash left behind, then start the writer and the compactor."""
        recorded = await self.run_db(self._repair)
        self._journal_rows = await self.run_db(self.db.journal_size)
        self.items_failed = await self.run_db(self._journal_failures) + await self._run_io(
            self._parts_failures, await self.run_db(self.db.part_names)
        )
        if self._journal_rows:
            self._oldest_unflushed = time.monotonic()
        log.info("store ready: %d journal rows, %d parts", self._journal_rows, recorded)
        self._tasks = [asyncio.create_task(self._compactor(), name="store-compactor")]

    def _journal_failures(self) -> int:
        return sum(record_failures(r) for r in self.db.journal_records())

    def _parts_failures(self, names: set[str]) -> int:
        return sum(failed_rows(self.parts_dir / n) for n in names if (self.parts_dir / n).exists())

    def _repair(self) -> int:
        """Remove intended parts and temporary files (their rows are in the journal), move
        unknown parts aside, report recorded parts that are gone. Returns the parts recorded."""
        intended = self.db.intended_parts()
        for name in intended:
            if remove_part(self.parts_dir, name):
                log.warning("removed %s, written but not recorded before a crash", name)
        self.db.forget_parts(intended)
        remove_stray_tmp(self.parts_dir)
        recorded = self.db.part_names()
        move_unrecognised(self.parts_dir, recorded)
        missing = sorted(n for n in recorded if not (self.parts_dir / n).exists())
        if missing:
            log.error(
                "%d recorded part(s) missing from %s, their rows are lost from the output: %s",
                len(missing),
                self.parts_dir,
                ", ".join(missing),
            )
        return len(recorded)

    async def commit(
        self, batches: Sequence[JournalBatch] = (), chunk_states: Sequence[ChunkState] = ()
    ) -> None:
        """Return once ``batches`` and ``chunk_states`` are durable (group-committed)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((list(batches), list(chunk_states), future))
        if self._in_flight is None and not self._delayed:
            # Start on the next loop turn at the earliest, so that every message already read
            # in this one joins the group.
            self._delayed = True
            loop = asyncio.get_running_loop()
            if self.group_commit_s:
                loop.call_later(self.group_commit_s, self._start_commit)
            else:
                loop.call_soon(self._start_commit)
        await future

    def _start_commit(self) -> None:
        """Hand everything waiting to the database thread as one transaction. Driven by
        callbacks rather than a task, so a group costs one thread round trip and no extra
        event-loop wake-ups."""
        self._delayed = False
        if self._in_flight is not None or not self._waiting:
            return
        group, self._waiting = self._waiting, []
        batches = [b for g in group for b in g[0]]
        states = [c for g in group for c in g[1]]
        loop = asyncio.get_running_loop()
        done = self._db_thread.submit(self.db.commit, batches, states)
        self._in_flight = done
        done.add_done_callback(
            lambda f: loop.call_soon_threadsafe(self._commit_done, group, batches, f)
        )

    def _commit_done(
        self, group: list[_Pending], batches: list[JournalBatch], done: Future[None]
    ) -> None:
        self._in_flight = None
        exc = done.exception()
        if exc is not None:
            log.error("commit of %d records failed: %s", len(batches), exc)
        else:
            rows = sum(len(b.item_ids) for b in batches)
            self.items_failed += sum(b.failed for b in batches)
            self.committed_rows += rows
            self._journal_rows += rows
            if self._oldest_unflushed is None and rows:
                self._oldest_unflushed = time.monotonic()
        for _, _, fut in group:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(None)
        if self._waiting:
            self._start_commit()

    def read_keys(self, first: int, last: int) -> dict[int, str]:
        """Item keys by id, from a read-only connection on the caller's thread (keys never
        change once written). Reads ahead: chunks are leased mostly in id order, so one
        indexed range read serves the next leases too."""
        if first not in self._keys or last not in self._keys:
            if len(self._keys) > 4 * KEY_READ_AHEAD:
                self._keys.clear()
            self._keys.update(self.reader.item_keys(first, max(last, first + KEY_READ_AHEAD)))
        return {i: self._keys.pop(i) for i in range(first, last + 1) if i in self._keys}

    # -- compaction -------------------------------------------------------------------------
    async def _compactor(self) -> None:
        """Compact when due; log every failure and retry after a pause that doubles."""
        while True:
            pause = COMPACT_POLL_S * 2**self.compact_failures
            await asyncio.sleep(min(pause, COMPACT_BACKOFF_MAX_S))
            due = self._journal_rows >= self.compact_rows or (
                self._oldest_unflushed is not None
                and time.monotonic() - self._oldest_unflushed >= self.compact_seconds
            )
            if not due:
                continue
            try:
                # Shielded so that stopping never leaves a written but unrecorded part.
                moved = await asyncio.shield(self.compact(until_empty=False))
            except asyncio.CancelledError:
                raise
            except Exception:
                self.compact_failures += 1
                log.exception(
                    "compaction failed (%d time(s) in a row); rows stay in the journal, "
                    "next try in %.1fs",
                    self.compact_failures,
                    min(COMPACT_POLL_S * 2**self.compact_failures, COMPACT_BACKOFF_MAX_S),
                )
            else:
                self.compact_failures = 0
                if moved:
                    await self.write_tables(due_only=True)

    async def compact(self, until_empty: bool = True) -> int:
        """Move journal records to Parquet parts, quarantining records that cannot be
        stored. Returns the rows written."""
        moved = 0
        async with self._compact_lock:
            while True:
                entries = await self.run_db(self.db.journal_batch, self.compact_rows)
                if not entries:
                    self._oldest_unflushed = None
                    break
                table, bad = await self._run_io(self._build, entries)
                if table is not None:
                    try:
                        await self._write_part(entries, table)
                    except Exception:
                        bad = await self._run_io(self._find_bad, entries)
                        if not bad:
                            raise
                if bad:
                    await self._quarantine(bad)
                    continue  # the same batch without them; not counted as a part
                assert table is not None
                moved += table.num_rows
                if not until_empty:
                    break
        return moved

    def _build(self, entries: list[JournalEntry]) -> tuple[pa.Table | None, list[Quarantined]]:
        """The batch's table, or (None, the records that make it fail)."""
        try:
            records = (decode_record(e.record) for e in entries)
            return records_to_table(records, self.output_fields), []
        except Exception as exc:  # worker data: any failure may be one bad record
            log.warning("%d journal records cannot be converted together (%s)", len(entries), exc)
        bad = self._find_bad(entries)
        if not bad:
            raise StorageError("a journal batch cannot be converted, yet each record can")
        return None, bad

    @staticmethod
    def _find_bad(entries: list[JournalEntry]) -> list[Quarantined]:
        """Decode, convert and encode each record on its own: those that fail, with why."""
        bad = []
        for e in entries:
            ids = e.item_ids or []
            try:
                record = decode_record(e.record)
            except Exception as exc:  # bytes that are not a record
                reason = f"cannot decode the record: {exc}"
                bad.append(Quarantined(e.seq, e.chunk_id, ids, e.record, reason[:REASON_CHARS]))
                continue
            try:
                check_part(records_to_table([record]))
            except Exception as exc:  # values Arrow or Parquet refuse (out of range, ...)
                reason = f"cannot store the record: {type(exc).__name__}: {exc}"
                if e.item_ids is None:  # written by schema version 2
                    ids = [item.item_id for item in record.items]
                chunk_id = e.chunk_id or record.chunk_id
                bad.append(Quarantined(e.seq, chunk_id, ids, e.record, reason[:REASON_CHARS]))
        return bad

    async def _write_part(self, entries: list[JournalEntry], table: pa.Table) -> None:
        name = await self.run_db(self.db.intend_part, part_name)
        try:
            await self._run_io(self._write, name, table)
            await self.run_db(self.db.record_part, name, table.num_rows, entries[-1].seq)
        except BaseException:
            # Not output: take the file and the intention back (start-up would otherwise).
            with contextlib.suppress(Exception):
                await self._run_io(remove_part, self.parts_dir, name)
                await self.run_db(self.db.forget_parts, [name])
            raise
        self._journal_rows = max(0, self._journal_rows - sum(e.items for e in entries))
        self._oldest_unflushed = time.monotonic() if self._journal_rows else None
        log.info("wrote %s (%d rows)", name, table.num_rows)

    def _write(self, name: str, table: pa.Table) -> None:
        write_part(self.parts_dir, name, table)
        faults.reach(faults.PART_RENAMED)

    async def _quarantine(self, bad: list[Quarantined]) -> None:
        removed = await self.run_db(self.db.quarantine, bad)
        self.items_failed = max(0, self.items_failed - sum(record_failures(q.record) for q in bad))
        self._journal_rows = max(0, self._journal_rows - removed)
        for q in bad:
            log.error(
                "journal record %d (chunk %r, items %s) quarantined, its items go back to the "
                "queue: %s",
                q.seq,
                q.chunk_id,
                q.item_ids,
                q.reason,
            )
            if self.on_quarantine is not None:
                try:
                    self.on_quarantine(q.chunk_id, list(q.item_ids), q.reason)
                except Exception:
                    log.exception("re-queueing the items of quarantined record %d failed", q.seq)

    async def write_tables(self, due_only: bool = False) -> None:
        """Rewrite ``contributors.parquet`` and ``jobs.parquet`` on the Parquet thread. With
        ``due_only``, only if due (see TABLES_COST_RATIO). A failure is logged, not raised:
        the tables are a view of state.db, which stays the truth."""
        now = time.monotonic()
        if due_only and now - self._tables_at < TABLES_COST_RATIO * self._tables_cost_s:
            return
        try:
            contributors, jobs = await self._run_io(write_tables, self.data_dir)
        except Exception:
            log.exception("could not rewrite the contributors and jobs tables in %s", self.data_dir)
            return
        self._tables_at = time.monotonic()
        self._tables_cost_s = self._tables_at - now
        log.debug(
            "tables rewritten: %d contributors, %d jobs in %.3fs",
            contributors,
            jobs,
            self._tables_cost_s,
        )

    async def requeue_failed(self) -> Reopened:
        """Take every stored error row out of the output and reopen its item, and put failed
        chunks back in play (see :mod:`caption_flow.storage.requeue`)."""
        await self.compact()  # every stored failure is in a part now
        reopened = Reopened()
        async with self._compact_lock:
            for name in sorted(await self.run_db(self.db.part_names)):
                split = await self._run_io(split_failed, str(self.parts_dir / name))
                if split is None:
                    continue
                kept, failed = split
                new = None
                if kept.num_rows:
                    new = await self.run_db(self.db.intend_part, part_name)
                    await self._run_io(write_part, self.parts_dir, new, kept)
                ids = await self.run_db(self.db.swap_part, name, new, kept.num_rows, failed)
                (self.parts_dir / name).unlink(missing_ok=True)
                reopened.add(ids)
                self.items_failed = max(0, self.items_failed - len(failed))
                log.info("%s: %d failed rows taken out (now %s)", name, len(failed), new)
            reopened.chunks = await self.run_db(self.db.revive_failed_chunks)
        return reopened

    async def close(self, flush: bool = True) -> None:
        """Stop the tasks; with ``flush``, move the journal to Parquet first."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._in_flight is not None:  # a commit handed to the database thread completes
            await asyncio.wrap_future(self._in_flight)
        if flush:
            try:
                await self.compact()  # waits for a compaction in progress (the lock)
            except Exception:
                log.exception(
                    "could not write the journal to Parquet on stop; its rows stay in "
                    "state.db and are written at the next start"
                )
        else:
            async with self._compact_lock:
                pass
        await self.write_tables()
        await self.run_db(self.db.close)
        self.reader.close()
        self._db_thread.shutdown(wait=True)
        self._io_thread.shutdown(wait=True)
        self.lock.release()
