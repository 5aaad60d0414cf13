"""The dataset read through the orchestrator, for a worker that cannot read it itself.

``RemoteSource.for_chunk(chunk_id)`` gives a :class:`Source` whose ``read`` (run in a thread
by the pipeline) asks the orchestrator for the next keys (``fetch``) and waits for its
``items`` replies, which the worker's connection loop hands to :meth:`RemoteSource.on_items`.
One fetch at a time: the next is sent only once the last reply arrived, so the orchestrator
never reads faster than this worker consumes. A lost connection or a refusal fails the read
(SourceError), and the worker hands the chunk back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError, SourceError
from caption_flow.protocol.messages import Fetch, ItemData, Items
from caption_flow.sources.base import ShardListing, SourceItem
from caption_flow.sources.check import check_dataset

log = logging.getLogger(__name__)

FETCH_KEYS = 64  # keys per fetch: one fetch's items are what this worker holds ahead
FETCH_TIMEOUT = 300.0  # seconds a reply may take (the orchestrator reads on a thread)


def reads_dataset(dataset: DatasetConfig, path_override: str | None) -> bool:
    """read_dataset "auto": whether this host can read the dataset itself: a remote URL or a
    hub dataset (read with this worker's credentials), or a local path that passes the same
    check the orchestrator makes at start (brace patterns and globs of shards included)."""
    path = path_override or dataset.path
    if "://" in path:
        return True
    try:
        check_dataset(dataset.model_copy(update={"path": path}))
    except ConfigError:
        return False
    return True


class RemoteSource:
    """Items fetched over the worker's connection. ``send`` sends a frame on the current
    connection (raising SourceError when there is none)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[Fetch], Awaitable[None]],
        fetch_keys: int = FETCH_KEYS,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self._loop = loop
        self._send = send
        self.fetch_keys = fetch_keys
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._waiting: tuple[str, list[ItemData], asyncio.Future[list[ItemData]]] | None = None

    def for_chunk(self, chunk_id: str) -> ChunkReader:
        return ChunkReader(self, chunk_id)

    # -- on the worker's loop -------------------------------------------------------------
    def on_items(self, message: Items) -> None:
        """A reply from the orchestrator; anything not for the fetch waiting is dropped."""
        waiting = self._waiting
        if waiting is None or waiting[0] != message.chunk_id or waiting[2].done():
            log.debug("items for %s not waited for; dropped", message.chunk_id)
            return
        _, collected, future = waiting
        if message.error is not None:
            future.set_exception(SourceError(f"orchestrator refused items: {message.error}"))
            return
        collected.extend(message.items)
        if message.last:
            future.set_result(collected)

    def connection_lost(self) -> None:
        """The connection ended: the fetch waiting will never be answered."""
        waiting = self._waiting
        if waiting is not None and not waiting[2].done():
            waiting[2].set_exception(SourceError("connection lost while fetching items"))

    async def fetch(self, chunk_id: str, keys: list[str]) -> list[ItemData]:
        async with self._lock:
            future: asyncio.Future[list[ItemData]] = self._loop.create_future()
            self._waiting = (chunk_id, [], future)
            try:
                await self._send(Fetch(chunk_id=chunk_id, keys=keys))
                items = await asyncio.wait_for(future, self.timeout)
            except TimeoutError:
                raise SourceError(f"no items for {chunk_id} in {self.timeout:.0f}s") from None
            finally:
                self._waiting = None
        if [i.key for i in items] != keys:
            raise SourceError(f"the orchestrator sent other items than asked for {chunk_id}")
        return items

    # -- in the pipeline's reader thread --------------------------------------------------
    def read_chunk(self, chunk_id: str, keys: Sequence[str]) -> Iterator[SourceItem]:
        """The chunk's items, one fetch ahead: the next fetch is asked for as soon as the
        last one arrived, so the orchestrator reads (and prepares) it while this worker
        captions; at most two fetches' items are held here."""
        batches = [
            list(keys[i : i + self.fetch_keys]) for i in range(0, len(keys), self.fetch_keys)
        ]
        # A fetch left behind when the reader stops early is not cancelled: it finishes on
        # the loop, and the next chunk's first fetch waits for it (one fetch at a time).
        ahead = self._submit(chunk_id, batches[0]) if batches else None
        for index in range(len(batches)):
            assert ahead is not None
            items = ahead.result()
            following = index + 1 < len(batches)
            ahead = self._submit(chunk_id, batches[index + 1]) if following else None
            yield from self._items(items)

    def _submit(self, chunk_id: str, keys: list[str]) -> concurrent.futures.Future[list[ItemData]]:
        return asyncio.run_coroutine_threadsafe(self.fetch(chunk_id, keys), self._loop)

    @staticmethod
    def _items(items: list[ItemData]) -> Iterator[SourceItem]:
        for item in items:
            yield SourceItem(
                item.key, item.data, dict(item.columns), item.error, item.width, item.height
            )


class ChunkReader:
    """The Source interface over one chunk's items (``shard`` is the orchestrator's)."""

    def __init__(self, remote: RemoteSource, chunk_id: str) -> None:
        self._remote = remote
        self._chunk_id = chunk_id

    def list_shards(self) -> Iterator[ShardListing]:
        raise SourceError("a worker reading through the orchestrator lists no shards")

    def read(self, shard: str, keys: Sequence[str]) -> Iterator[SourceItem]:
        return self._remote.read_chunk(self._chunk_id, keys)
