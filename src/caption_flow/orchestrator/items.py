"""Items over the connection: the orchestrator reads a chunk's items for a worker that cannot
read the dataset itself, and sends them over that worker's own authenticated websocket.

Only keys of a chunk leased to the asking session are read. Each session has at most one
fetch being answered (a second is refused), and a reply holds at most ``REPLY_BYTES`` of item
data (a larger fetch goes out as several replies, read one after the other), so a worker that
consumes slowly holds at most one fetch's worth of the orchestrator's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from caption_flow.config.models import DatasetConfig
from caption_flow.orchestrator.sessions import Session
from caption_flow.protocol.messages import (
    MAX_COLUMN_CHARS,
    MAX_ITEM_BYTES,
    MAX_STATS,
    Fetch,
    ItemData,
    Items,
)
from caption_flow.sources import open_source
from caption_flow.sources.base import Source, SourceItem

log = logging.getLogger(__name__)

REPLY_BYTES = 8 * 1024 * 1024  # item data in one ``items`` reply


def item_data(item: SourceItem) -> ItemData:
    """A source item as the wire carries it: plain column values only, long ones cut."""
    columns: dict[str, str | int | float | bool] = {}
    for name, value in list(item.columns.items())[:MAX_STATS]:
        if not isinstance(value, (str, int, float, bool)):
            value = str(value)
        if isinstance(value, str):
            value = value[:MAX_COLUMN_CHARS]
        columns[str(name)[:64]] = value
    data: bytes | None = item.data
    error = item.error
    if data is not None and len(data) > MAX_ITEM_BYTES:
        error = f"item of {len(data)} bytes is too large to send"
    return ItemData(
        key=item.key, data=data if error is None else None, error=error, columns=columns
    )


def take_bytes(reader: Iterator[SourceItem], limit: int) -> tuple[list[ItemData], bool]:
    """Items from ``reader`` until ``limit`` bytes (at least one item); True when exhausted."""
    taken: list[ItemData] = []
    size = 0
    for item in reader:
        data = item_data(item)
        taken.append(data)
        size += len(data.data or b"")
        if size >= limit:
            return taken, False
    return taken, True


class ItemServer:
    """Answers ``fetch`` messages. ``lease(session, chunk_id)`` gives the chunk's shard and
    the keys the session may ask for (None: the chunk is not leased to it)."""

    def __init__(
        self,
        dataset: Callable[[], DatasetConfig],
        cache_dir: Any,
        lease: Callable[[Session, str], tuple[str, set[str]] | None],
        reply_bytes: int = REPLY_BYTES,
    ) -> None:
        self._dataset = dataset
        self._cache_dir = cache_dir
        self._lease = lease
        self.reply_bytes = reply_bytes
        self._source: Source | None = None
        self._source_of: DatasetConfig | None = None
        self._busy: set[str] = set()  # sessions with a fetch being answered

    def source(self) -> Source:
        dataset = self._dataset()
        if self._source is None or dataset != self._source_of:
            self._source = open_source(dataset, cache_dir=self._cache_dir)
            self._source_of = dataset
        return self._source

    async def on_fetch(self, session: Session, message: Fetch) -> None:
        """Check the fetch now (in the read loop, so a second one is seen as such), then
        read and send in a task."""
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
        reader: Iterator[SourceItem] | None = None
        try:
            lease = self._lease(session, message.chunk_id)
            if lease is None:  # lost between the check and now (expired, released)
                raise LookupError(f"chunk {message.chunk_id} is no longer leased to you")
            shard = lease[0]
            reader = await asyncio.to_thread(self.source().read, shard, list(message.keys))
            done = False
            while not done:
                items, done = await asyncio.to_thread(take_bytes, reader, self.reply_bytes)
                if done:  # free the session for its next fetch before it can arrive
                    self._busy.discard(session.session_id)
                if not await session.send(Items(chunk_id=message.chunk_id, items=items, last=done)):
                    return
        except Exception as exc:  # an unreadable shard: the worker's read fails, it releases
            log.warning("reading %s for %s failed: %s", message.chunk_id, session.name, exc)
            self._busy.discard(session.session_id)
            await session.send(Items(chunk_id=message.chunk_id, error=f"read failed: {exc}"[:2000]))
        finally:
            self._busy.discard(session.session_id)
            close = getattr(reader, "close", None)
            if close is not None:
                close()
