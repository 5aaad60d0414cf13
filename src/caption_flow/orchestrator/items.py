"""Items over the connection: a worker that cannot read the dataset gets its chunk's items
over its own authenticated websocket.

Each item comes from the prepared buffer when a dataworker prepared it, else the orchestrator
reads it and (``prepare.on_orchestrator``) shrinks and re-encodes it itself. A fetch whose
items a connected dataworker is still preparing waits for them, at most
``prepare.wait_seconds``.

Only keys of a chunk leased to the asking session are sent. Each session has at most one
fetch being answered (a second is refused), and a reply holds at most ``REPLY_BYTES`` of item
data (a larger fetch goes out as several replies, each sent before the next is read; sending
waits while the worker does not read), so a worker that consumes slowly holds at most one
reply's worth of the orchestrator's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from caption_flow.config.models import DatasetConfig
from caption_flow.images.pool import usable_cores
from caption_flow.images.prepare import PrepareSettings
from caption_flow.orchestrator.preparation import PrepDesk
from caption_flow.orchestrator.prepared import PreparedBuffer
from caption_flow.orchestrator.sessions import Session
from caption_flow.protocol.messages import (
    Fetch,
    ItemData,
    Items,
)
from caption_flow.sources import open_source
from caption_flow.sources.base import Source, SourceItem, close_reader, take_items
from caption_flow.sources.wire import prepared_data

log = logging.getLogger(__name__)

REPLY_BYTES = 8 * 1024 * 1024  # item data in one ``items`` reply


class ItemServer:
    """Answers ``fetch`` messages. ``lease(session, chunk_id)`` gives the chunk's shard and
    the keys the session may ask for (None: the chunk is not leased to it)."""

    def __init__(
        self,
        dataset: Callable[[], DatasetConfig],
        cache_dir: Any,
        lease: Callable[[Session, str], tuple[str, set[str]] | None],
        buffer: PreparedBuffer,
        prep: PrepDesk,
        settings: Callable[[], PrepareSettings | None] = lambda: None,
        wait_seconds: float = 30.0,
        reply_bytes: int = REPLY_BYTES,
        threads: int = 0,
    ) -> None:
        self._dataset = dataset
        self._cache_dir = cache_dir
        self._lease = lease
        self.buffer = buffer
        self.prep = prep
        self.settings = settings  # None: send the dataset's bytes as they are
        self.wait_seconds = wait_seconds
        self.reply_bytes = reply_bytes
        self._threads = threads or usable_cores()
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="prepare")
        self._source: Source | None = None
        self._source_of: DatasetConfig | None = None
        self._busy: set[str] = set()  # sessions with a fetch being answered

    def source(self) -> Source:
        dataset = self._dataset()
        if self._source is None or dataset != self._source_of:
            self._source = open_source(dataset, cache_dir=self._cache_dir)
            self._source_of = dataset
        return self._source

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def on_fetch(self, session: Session, message: Fetch) -> None:
        """Check the fetch now (in the read loop, so a second one is seen as such), then
        read and send in a task."""
        session.reads_remote = True
        refusal = self._refusal(session, message)
        if refusal is not None:
            log.warning("fetch of %s refused: %s", session.name, refusal)
            await session.send(Items(chunk_id=message.chunk_id, error=refusal))
            return
        self._busy.add(session.session_id)
        task = asyncio.create_task(self._answer(session, message))
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    def _refusal(self, session: Session, message: Fetch) -> str | None:
        if session.session_id in self._busy:
            return "a fetch is already being answered: wait for its last reply"
        lease = self._lease(session, message.chunk_id)
        if lease is None:
            return f"chunk {message.chunk_id} is not leased to this session"
        allowed = lease[1]
        outside = [k for k in message.keys if k not in allowed]
        if outside:
            return f"{len(outside)} keys are not items of {message.chunk_id}"
        return None

    async def _answer(self, session: Session, message: Fetch) -> None:
        chunk_id = message.chunk_id
        keys = list(message.keys)
        reader: Iterator[SourceItem] | None = None
        try:
            await self.prep.wait_prepared(chunk_id, keys, self.wait_seconds)
            lease = self._lease(session, chunk_id)
            if lease is None:  # lost meanwhile (expired, released)
                raise LookupError(f"chunk {chunk_id} is no longer leased to you")
            own = [k for k in keys if not self.buffer.has(chunk_id, k)]
            self.prep.forget(chunk_id, own)
            if own:
                reader = await asyncio.to_thread(self.source().read, lease[0], own)
            read: list[ItemData] = []
            reply: list[ItemData] = []
            size = 0
            own_keys = set(own)
            for position, key in enumerate(keys):
                if key in own_keys:
                    if not read:
                        assert reader is not None
                        read = await self._read_own(reader)
                    item = read.pop(0)
                else:  # prepared by a dataworker (read here after all if gone meanwhile)
                    taken = self.buffer.take(chunk_id, key)
                    item = taken or await self._read_one(lease[0], key)
                reply.append(item)
                size += len(item.data or b"")
                last = position == len(keys) - 1
                if size >= self.reply_bytes or last:
                    self.prep.delivered(chunk_id, session.session_id, [i.key for i in reply])
                    if last:  # free the session for its next fetch before it can arrive
                        self._busy.discard(session.session_id)
                    sent = Items(chunk_id=chunk_id, items=reply, last=last)
                    reply, size = [], 0
                    if not await session.send(sent):
                        return
        except Exception as exc:  # an unreadable shard: the worker's read fails, it releases
            log.warning("reading %s for %s failed: %s", chunk_id, session.name, exc)
            self._busy.discard(session.session_id)
            await session.send(Items(chunk_id=chunk_id, error=f"read failed: {exc}"[:2000]))
        finally:
            self._busy.discard(session.session_id)
            close_reader(reader)

    async def _read_one(self, shard: str, key: str) -> ItemData:
        reader = await asyncio.to_thread(self.source().read, shard, [key])
        try:
            return (await self._read_own(reader))[0]
        finally:
            close_reader(reader)

    async def _read_own(self, reader: Iterator[SourceItem]) -> list[ItemData]:
        """The next few items read here, prepared on the pool's threads at once."""
        raw = await asyncio.to_thread(take_items, reader, self._threads)
        if not raw:
            raise LookupError("the dataset has fewer items than the chunk lists")
        loop = asyncio.get_running_loop()
        settings = self.settings()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(self._pool, prepared_data, item, settings) for item in raw)
        )
        self.buffer.served += len(prepared)
        return list(prepared)
