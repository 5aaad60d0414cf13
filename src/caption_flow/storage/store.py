"""The caption store: an asyncio facade over the state database and the Parquet parts.

All database writes run on one dedicated thread, so the event loop never blocks on an fsync
and SQLite sees a single writer. Results are group-committed: whatever arrived while the
previous transaction was running goes into the next one, and every submitter is answered
when its rows are durable. Compaction (decode, build columns, write Parquet) runs on a
second thread, and is never interrupted half-way: a part is always written *and* recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from caption_flow.storage.parts import next_part_seq, part_name, remove_unrecorded, write_part
from caption_flow.storage.rows import decode_record, records_to_table
from caption_flow.storage.state import ChunkState, JournalBatch, StateDB

log = logging.getLogger(__name__)
T = TypeVar("T")

_Pending = tuple[list[JournalBatch], list[ChunkState], "asyncio.Future[None]"]

# Item keys read per range read when leasing (see CaptionStore.read_keys).
KEY_READ_AHEAD = 4096


class CaptionStore:
    def __init__(
        self,
        data_dir: Path,
        compact_rows: int = 50_000,
        compact_seconds: float = 10.0,
        group_commit_ms: float = 0.0,
    ) -> None:
        self.data_dir = data_dir
        self.parts_dir = data_dir / "captions"
        self.compact_rows = compact_rows
        self.compact_seconds = compact_seconds
        self.group_commit_s = group_commit_ms / 1000.0
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-db")
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-parquet")
        self.db = StateDB(data_dir / "state.db")
        self.reader = StateDB(data_dir / "state.db", read_only=True)
        self._waiting: list[_Pending] = []
        self._in_flight: Future[None] | None = None
        self._delayed = False
        self._keys: dict[int, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._compact_lock = asyncio.Lock()
        self._journal_rows = 0
        self._oldest_unflushed: float | None = None
        self.committed_rows = 0

    async def run_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    async def start(self) -> None:
        """Repair what a crash left behind, then start the writer and the compactor."""
        recorded = await self.run_db(self.db.part_names)
        removed = remove_unrecorded(self.parts_dir, recorded)
        missing = [n for n in recorded if not (self.parts_dir / n).exists()]
        if missing:
            log.error("recorded parts missing from disk: %s", ", ".join(sorted(missing)))
        self._journal_rows = await self.run_db(self.db.journal_size)
        if self._journal_rows:
            self._oldest_unflushed = time.monotonic()
        log.info(
            "store ready: %d journal rows, %d parts, %d files removed",
            self._journal_rows,
            len(recorded),
            len(removed),
        )
        self._tasks = [asyncio.create_task(self._compactor(), name="store-compactor")]

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

    async def _compactor(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            due = self._journal_rows >= self.compact_rows or (
                self._oldest_unflushed is not None
                and time.monotonic() - self._oldest_unflushed >= self.compact_seconds
            )
            if due:
                try:
                    # Shielded so that stopping never leaves a written but unrecorded part.
                    await asyncio.shield(self.compact(until_empty=False))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("compaction failed; rows stay in the journal")

    async def compact(self, until_empty: bool = True) -> int:
        """Move journal records to Parquet parts. Returns the rows moved."""
        moved = 0
        async with self._compact_lock:
            while True:
                records, rows, last_seq = await self.run_db(
                    self.db.journal_batch, self.compact_rows
                )
                if not records:
                    self._oldest_unflushed = None
                    break
                name = part_name(next_part_seq(self.parts_dir))
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._io_thread, self._write, name, records)
                await self.run_db(self.db.record_part, name, rows, last_seq)
                moved += rows
                self._journal_rows = max(0, self._journal_rows - rows)
                self._oldest_unflushed = time.monotonic() if self._journal_rows else None
                log.info("wrote %s (%d rows)", name, rows)
                if not until_empty:
                    break
        return moved

    def _write(self, name: str, records: list[bytes]) -> None:
        table = records_to_table(decode_record(r) for r in records)
        write_part(self.parts_dir, name, table)

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
            await self.compact()  # waits for a compaction in progress (the lock)
        else:
            async with self._compact_lock:
                pass
        await self.run_db(self.db.close)
        self.reader.close()
        self._db_thread.shutdown(wait=True)
        self._io_thread.shutdown(wait=True)
