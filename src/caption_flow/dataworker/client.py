"""``caption-flow dataworker``: a CPU client that prepares items for GPU workers without the
dataset.

It asks the orchestrator for chunks to prepare, reads their items from the dataset (any
source type, with its own path and credentials), shrinks and re-encodes each one as the
orchestrator says (:mod:`caption_flow.images.prepare`, on a pool of threads: Pillow and
libjpeg release the GIL) and sends them in messages of about ``message_mb``. At most
``unacked_messages`` are on their way: the orchestrator answers each after the item is in
its buffer, and stops reading while the buffer is full, so a dataworker never runs ahead of
the GPUs by more than the buffer.

It holds nothing the run depends on: if it dies, its chunks are prepared by another
dataworker or read by the orchestrator itself. It cannot send results (its role may not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from websockets.asyncio.client import ClientConnection as WSClient
from websockets.exceptions import ConnectionClosed

from caption_flow.config.models import DatasetConfig, DataWorkerConfig
from caption_flow.dial import (
    CONNECTION_FAILURES,
    dataset_with_credentials,
    dial,
    give_up_or_log,
    wait_to_reconnect,
)
from caption_flow.errors import ProtocolError
from caption_flow.images.pool import usable_cores
from caption_flow.images.prepare import PrepareSettings
from caption_flow.protocol.connection import ClientConnection
from caption_flow.protocol.messages import (
    MAX_PREPARED_ITEMS,
    Ack,
    Heartbeat,
    Hello,
    ItemData,
    Prepared,
    PrepAssign,
    PrepLease,
    PrepRequest,
    Reject,
    Release,
    Welcome,
    encode,
)
from caption_flow.sources import open_source
from caption_flow.sources.base import Source, close_reader, take_items
from caption_flow.sources.wire import prepared_data

log = logging.getLogger(__name__)


class DataWorker:
    def __init__(self, config: DataWorkerConfig) -> None:
        self.config = config
        self.threads = config.threads or usable_cores()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dataworker")
        self.source: Source | None = None
        self.dataset: DatasetConfig | None = None
        self.stopped = asyncio.Event()
        self.finished = False
        self.prepared = 0  # items sent and accepted
        self.sent_bytes = 0
        self._assigns: asyncio.Queue[PrepAssign] = asyncio.Queue()
        self._room: asyncio.Semaphore = asyncio.Semaphore(config.unacked_messages)
        self._unacked: dict[int, str] = {}  # seq -> chunk
        self._refused: set[str] = set()  # chunks the orchestrator refused items of
        self._seq = 0

    # -- life cycle -------------------------------------------------------------------------
    async def run(self) -> None:
        """Prepare until stopped, or until the run is finished when ``exit_when_done``."""
        delay = 0.5
        try:
            while not self.stopped.is_set():
                try:
                    async with dial(self.config.server, self.config.verify_ssl) as ws:
                        delay = 0.5
                        await self._session(ws)
                except (*CONNECTION_FAILURES, ProtocolError) as exc:
                    give_up_or_log(exc, "dataworker", self.config.server)
                if self.stopped.is_set() or (self.finished and self.config.exit_when_done):
                    return
                delay = await wait_to_reconnect(
                    self.stopped, delay, self.config.reconnect_max_seconds
                )
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        self.stopped.set()

    # -- one connection ---------------------------------------------------------------------
    async def _session(self, ws: WSClient) -> None:
        protocol = ClientConnection()
        await ws.send(
            encode(
                Hello(
                    role="dataworker",
                    token=self.config.token,
                    name=self.config.name,
                    capabilities={"threads": self.threads},
                )
            )
        )
        welcome = protocol.receive(await ws.recv())
        assert isinstance(welcome, Welcome)
        self._open_dataset(welcome.config)
        log.info("connected as %s (session %s)", welcome.contributor, welcome.session_id)
        # A new connection: what the last one had on its way is forgotten there too.
        self._room = asyncio.Semaphore(self.config.unacked_messages)
        self._unacked.clear()
        self._assigns = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._heartbeat_loop(ws)),
            asyncio.create_task(self._prepare_loop(ws)),
        ]
        stopping = asyncio.create_task(self.stopped.wait())
        try:
            reading = asyncio.create_task(self._read(ws, protocol))
            done, _ = await asyncio.wait(
                [reading, stopping, tasks[1]], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stopping:
                    task.result()  # raises what ended it (a lost connection)
        finally:
            for task in [*tasks, stopping]:
                task.cancel()
            await asyncio.gather(*tasks, stopping, return_exceptions=True)
            with contextlib.suppress(Exception):
                await ws.close()

    def _open_dataset(self, config: dict[str, Any]) -> None:
        settings = config.get("dataset")
        if not settings:
            raise ProtocolError("the orchestrator sent no dataset")
        dataset = dataset_with_credentials(settings, self.config.dataset_storage_options)
        if dataset != self.dataset:
            self.dataset = dataset
            self.source = open_source(dataset, path_override=self.config.dataset_path)

    async def _read(self, ws: WSClient, protocol: ClientConnection) -> None:
        async for frame in ws:
            message = protocol.receive(frame)
            if isinstance(message, PrepAssign):
                self._assigns.put_nowait(message)
            elif isinstance(message, (Ack, Reject)):
                chunk_id = self._unacked.pop(message.seq, None)
                if chunk_id is None:
                    continue
                self._room.release()
                if isinstance(message, Ack):
                    self.prepared += message.accepted
                else:
                    log.warning("items of %s refused: %s", chunk_id, message.reason)
                    self._refused.add(chunk_id)

    async def _heartbeat_loop(self, ws: WSClient) -> None:
        started, prepared, sent = time.monotonic(), self.prepared, self.sent_bytes
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            elapsed = max(time.monotonic() - started, 1e-9)
            stats = {
                "items_per_s": round((self.prepared - prepared) / elapsed, 2),
                "mb_per_s": round((self.sent_bytes - sent) / elapsed / 1e6, 3),
                "prepared": float(self.prepared),
                "threads": float(self.threads),
            }
            started, prepared, sent = time.monotonic(), self.prepared, self.sent_bytes
            await ws.send(encode(Heartbeat(stats=stats)))

    # -- preparing ------------------------------------------------------------------------
    async def _prepare_loop(self, ws: WSClient) -> None:
        idle_said = False
        while not self.stopped.is_set():
            await ws.send(encode(PrepRequest(count=self.config.chunks_ahead)))
            assign = await self._assigns.get()
            if assign.finished:
                self.finished = True
                if self.config.exit_when_done:
                    log.info("the run is finished; stopping")
                    return
            if not assign.chunks:
                if not idle_said:
                    log.info("nothing to prepare now; asking again")
                    idle_said = True
                await asyncio.sleep(max(assign.retry_after, 0.2))
                continue
            idle_said = False
            settings = PrepareSettings.from_wire(assign.image)
            for lease in assign.chunks:
                await self._prepare_chunk(ws, lease, settings)

    async def _prepare_chunk(
        self, ws: WSClient, lease: PrepLease, settings: PrepareSettings
    ) -> None:
        """Read, prepare and send one chunk's items; a read failure hands the chunk back."""
        assert self.source is not None
        loop = asyncio.get_running_loop()
        self._refused.discard(lease.chunk_id)
        limit = int(self.config.message_mb * 1024 * 1024)
        window = self.threads * 2
        reader = None
        try:
            reader = await asyncio.to_thread(self.source.read, lease.shard, lease.keys)
            pending: list[ItemData] = []
            size = 0
            left = len(lease.keys)
            while left > 0 and lease.chunk_id not in self._refused:
                raw = await asyncio.to_thread(take_items, reader, min(window, left))
                if not raw:
                    break
                left -= len(raw)
                prepared = await asyncio.gather(
                    *(loop.run_in_executor(self.pool, prepared_data, it, settings) for it in raw)
                )
                for item in prepared:
                    pending.append(item)
                    size += len(item.data or b"")
                    if size >= limit or len(pending) >= MAX_PREPARED_ITEMS:
                        await self._send(ws, lease.chunk_id, pending, last=False)
                        pending, size = [], 0
            if lease.chunk_id not in self._refused:
                await self._send(ws, lease.chunk_id, pending, last=True)
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:  # an unreadable shard: another reader may do better
            log.warning("preparing %s failed: %s; handing it back", lease.chunk_id, exc)
            await ws.send(encode(Release(chunk_id=lease.chunk_id, reason=str(exc)[:2000])))
        finally:
            close_reader(reader)

    async def _send(self, ws: WSClient, chunk_id: str, items: list[ItemData], last: bool) -> None:
        await self._room.acquire()  # at most unacked_messages on their way
        self._seq += 1
        self._unacked[self._seq] = chunk_id
        frame = encode(Prepared(chunk_id=chunk_id, seq=self._seq, items=items, last=last))
        self.sent_bytes += len(frame)
        await ws.send(frame)
