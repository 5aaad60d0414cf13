"""The caption store: an asyncio facade over the state database and the Parquet parts.

All database work runs on one dedicated thread, so the event loop never blocks on an fsync
and SQLite sees a single writer. Results are group-committed: whatever arrived while the
previous transaction was running goes into the next one, and every submitter is answered
when its rows are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from caption_flow.storage.parts import next_part_seq, part_name, remove_unrecorded, write_part
from caption_flow.storage.rows import decode_row, rows_to_table
from caption_flow.storage.state import ChunkState, JournalEntry, StateDB

log = logging.getLogger(__name__)
T = TypeVar("T")


class CaptionStore:
    def __init__(
        self,
        data_dir: Path,
        compact_rows: int = 50_000,
        compact_seconds: float = 10.0,
        group_commit_ms: float = 5.0,
    ) -> None:
        self.data_dir = data_dir
        self.parts_dir = data_dir / "captions"
        self.compact_rows = compact_rows
        self.compact_seconds = compact_seconds
        self.group_commit_s = group_commit_ms / 1000.0
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-db")
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-parquet")
        self.db = StateDB(data_dir / "state.db")
        self._queue: asyncio.Queue[
            tuple[list[JournalEntry], list[ChunkState], asyncio.Future[None]]
        ]
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-db-read")
        self._reader: StateDB | None = None
        self._tasks: list[asyncio.Task[None]] = []
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
        self._queue = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._writer(), name="store-writer"),
            asyncio.create_task(self._compactor(), name="store-compactor"),
        ]

    async def commit(
        self, entries: Sequence[JournalEntry] = (), chunk_states: Sequence[ChunkState] = ()
    ) -> None:
        """Return once ``entries`` and ``chunk_states`` are durable (group-committed)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((list(entries), list(chunk_states), future))
        await future

    async def read_keys(self, first: int, last: int) -> dict[int, str]:
        """Item keys by id, read on a second connection (keys never change once written)."""
        if self._reader is None:
            self._reader = StateDB(self.data_dir / "state.db", read_only=True)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader_thread, self._reader.item_keys, first, last)

    async def _writer(self) -> None:
        while True:
            first = await self._queue.get()
            if self.group_commit_s:
                await asyncio.sleep(self.group_commit_s)
            group = [first]
            while not self._queue.empty():
                group.append(self._queue.get_nowait())
            entries = [e for g in group for e in g[0]]
            states = [c for g in group for c in g[1]]
            try:
                await self.run_db(self.db.commit, entries, states)
            except Exception as exc:
                log.exception("commit of %d rows failed", len(entries))
                for _, _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.committed_rows += len(entries)
            self._journal_rows += len(entries)
            if self._oldest_unflushed is None and entries:
                self._oldest_unflushed = time.monotonic()
            for _, _, fut in group:
                if not fut.done():
                    fut.set_result(None)

    async def _compactor(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            due = self._journal_rows >= self.compact_rows or (
                self._oldest_unflushed is not None
                and time.monotonic() - self._oldest_unflushed >= self.compact_seconds
            )
            if due:
                try:
                    await self.compact()
                except Exception:
                    log.exception("compaction failed; rows stay in the journal")

    async def compact(self) -> int:
        """Move journal rows to Parquet parts until the journal is empty. Returns rows moved."""
        moved = 0
        while True:
            batch = await self.run_db(self.db.journal_batch, max(self.compact_rows, 1))
            if not batch:
                break
            rows = [decode_row(blob) for _, blob in batch]
            fields = sorted({f for r in rows for f in r.outputs})
            name = part_name(next_part_seq(self.parts_dir))
            table = rows_to_table(rows, fields)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._io_thread, write_part, self.parts_dir, name, table)
            await self.run_db(self.db.record_part, name, [i for i, _ in batch])
            moved += len(batch)
            self._journal_rows = max(0, self._journal_rows - len(batch))
            log.info("wrote %s (%d rows)", name, len(batch))
        self._oldest_unflushed = None
        return moved

    async def close(self, flush: bool = True) -> None:
        """Stop the tasks; with ``flush``, move the journal to Parquet first."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if flush:
            await self.compact()
        await self.run_db(self.db.close)
        if self._reader is not None:
            reader = self._reader
            await asyncio.get_running_loop().run_in_executor(self._reader_thread, reader.close)
        self._reader_thread.shutdown(wait=True)
        self._db_thread.shutdown(wait=True)
        self._io_thread.shutdown(wait=True)
