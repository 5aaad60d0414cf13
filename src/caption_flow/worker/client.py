"""The worker's connection to the orchestrator: hello, work requests, results, reconnects.

Chunks, unacknowledged results and the pipeline live across connections; a connection only
moves messages. After a drop the worker reconnects with exponential back-off, asks to keep
the chunks it holds, resends every unacknowledged result and carries on.

Every chunk the worker stops working on is released, never left to heartbeats: a clean stop
releases without a reason; a chunk whose shard cannot be read, whose engine cannot run even
one item, or whose results were rejected is released with the reason (the orchestrator counts
an attempt). After a read or engine failure the worker waits (exponential back-off with
jitter) before asking for work again, so a broken worker cannot burn through a dataset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from websockets.asyncio.client import ClientConnection as WSClient
from websockets.exceptions import ConnectionClosed

from caption_flow.config.models import DatasetConfig, ImageConfig, ModelConfig, WorkerConfig
from caption_flow.dial import (
    CONNECTION_FAILURES,
    dataset_with_credentials,
    dial,
    give_up_or_log,
    wait_to_reconnect,
)
from caption_flow.engines.captioner import Captioner
from caption_flow.engines.openai_engine import openai_loader, worker_model
from caption_flow.errors import EngineUnavailableError, ProtocolError, SourceError
from caption_flow.images.pool import DecodePool
from caption_flow.protocol.connection import ClientConnection
from caption_flow.protocol.messages import (
    MAX_HELD_CHUNKS,
    Ack,
    Assign,
    ChunkLease,
    ConfigUpdate,
    Fetch,
    Heartbeat,
    Hello,
    ItemResult,
    Items,
    Reject,
    Release,
    Request,
    Welcome,
    encode,
)
from caption_flow.sources import open_source
from caption_flow.sources.base import Source
from caption_flow.worker.outbox import AckLog, Outbox
from caption_flow.worker.pipeline import Backoff, BatchLimit, ChunkPipeline, EngineClock
from caption_flow.worker.remote_source import RemoteSource, reads_dataset

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000  # the protocol allows more; a reason is for people, not a dump
SETTLE_BEFORE_RELEASE_SECONDS = 10.0  # results sent before a release should land first


class Worker:
    def __init__(self, config: WorkerConfig, captioner: Captioner | None = None) -> None:
        self.config = config
        self.captioner = captioner or Captioner(
            config.engine,
            model_override=worker_model(config),
            precision=config.precision,
            loader=openai_loader(config) if config.engine == "openai" else None,
        )
        self.limit = BatchLimit()  # the effective batch size, halved by engine failures
        self.outbox = Outbox()
        self.ack_log = AckLog(config.ack_log) if config.ack_log is not None else None
        self.queue: asyncio.Queue[ChunkLease] = asyncio.Queue()
        self.current: ChunkLease | None = None
        self.abandoned: set[str] = set()
        self.job: ModelConfig | None = None
        self.dataset: DatasetConfig | None = None
        self.source: Source | None = None
        self.remote: RemoteSource | None = None  # set while items come over the connection
        self.clock = EngineClock()
        self.lease_seconds = float("inf")
        self.job_heartbeat_seconds = float("inf")  # the orchestrator's wish, if it said one
        self.backoff = Backoff(config.engine_backoff_seconds, config.engine_backoff_max_seconds)
        self._current_abandoned = False
        self._vetoed_job: ModelConfig | None = None
        self.fatal: Exception | None = None  # why processing stopped for good, if it did
        self.session_id: str | None = None
        self.finished = asyncio.Event()  # the orchestrator has no more work for anyone
        self.stopped = asyncio.Event()
        self._ws: WSClient | None = None
        self._closing: asyncio.Future[None] | None = None
        self._ready = asyncio.Event()  # a job has been received
        self._want_work = asyncio.Event()
        self._want_work.set()
        self._idle_logged: str | None = None  # why "waiting for work" was last said
        self._decode_pool = DecodePool(ImageConfig(), threads=config.decode_threads)
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="captionflow-engine")

    # -- life cycle -------------------------------------------------------------------------
    async def run(self) -> None:
        """Work until stopped, or until the dataset is finished when ``exit_when_done``."""
        processing = asyncio.create_task(self._process_loop(), name="worker-pipeline")
        try:
            await self._connect_loop()
        finally:
            processing.cancel()
            await asyncio.gather(processing, return_exceptions=True)
            if self._closing is not None:
                await asyncio.gather(self._closing, return_exceptions=True)
            self._decode_pool.close()
            self._engine_thread.shutdown(wait=True)
            self.captioner.close()
            if self.ack_log is not None:
                self.ack_log.close()
        if self.fatal is not None:
            raise self.fatal

    def stop(self) -> None:
        """Stop cleanly: hand held chunks back so others get them at once, then close."""
        self.stopped.set()
        if self._ws is not None:
            held = self._held_chunks()  # now, before the pipeline lets go of its chunk
            self._closing = asyncio.ensure_future(self._release_and_close(self._ws, held))

    async def _release_and_close(self, ws: WSClient, held: list[str]) -> None:
        with contextlib.suppress(ConnectionClosed):
            for chunk_id in held:
                await ws.send(encode(Release(chunk_id=chunk_id)))
        await ws.close()

    async def _connect_loop(self) -> None:
        delay = 0.5
        while not self.stopped.is_set():
            try:
                async with dial(self.config.server, self.config.verify_ssl) as ws:
                    self._ws = ws
                    delay = 0.5
                    await self._session(ws)
            except (*CONNECTION_FAILURES, ProtocolError) as exc:
                give_up_or_log(exc, "worker", self.config.server)
            finally:
                self._ws = None
            if self._done():
                if self.stopped.is_set():
                    log.info("stopped; chunks not finished are handed back")
                else:
                    log.info("all work is done; stopping")
                return
            delay = await wait_to_reconnect(self.stopped, delay, self.config.reconnect_max_seconds)

    def _done(self) -> bool:
        return self.stopped.is_set() or (
            self.config.exit_when_done
            and self.finished.is_set()
            and self.current is None
            and self.queue.empty()
            and len(self.outbox) == 0
        )

    # -- one connection ---------------------------------------------------------------------
    async def _session(self, ws: WSClient) -> None:
        protocol = ClientConnection()
        # The hello carries at most MAX_HELD_CHUNKS (the server refuses more); any others
        # are given up below, like chunks the orchestrator did not hand back.
        everything = self._held_chunks()
        held = everything[:MAX_HELD_CHUNKS]
        await ws.send(
            encode(
                Hello(
                    role="worker",
                    token=self.config.token,
                    name=self.config.name,
                    capabilities=self._capabilities(),
                    held_chunks=held,
                )
            )
        )
        welcome = protocol.receive(await ws.recv())
        assert isinstance(welcome, Welcome)
        self.session_id = welcome.session_id
        self._apply_job(welcome.config)
        self._forget_unresumed(set(everything) - set(welcome.resumed_chunks))
        log.info("connected as %s (session %s)", welcome.contributor, welcome.session_id)
        for message in self.outbox.unacked():
            await ws.send(encode(message))
        tasks = [
            asyncio.create_task(self._heartbeat_loop(ws)),
            asyncio.create_task(self._request_loop(ws)),
        ]
        try:
            async for frame in ws:
                await self._on_message(protocol.receive(frame))
                if self._done():
                    await ws.close()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.remote is not None:
                self.remote.connection_lost()

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, Ack):
            settled = self.outbox.settle(message.seq)
            if settled is not None and self.ack_log is not None:
                self.ack_log.write(settled)
        elif isinstance(message, Reject):
            settled = self.outbox.settle(message.seq)
            if settled is not None and settled.chunk_id not in self.abandoned:
                log.warning(
                    "results for %s rejected: %s; releasing it", settled.chunk_id, message.reason
                )
                self._abandon(settled.chunk_id)
                await self._release(settled.chunk_id, f"rejected: {message.reason}")
        elif isinstance(message, Assign):
            log.debug(
                "assigned %s (finished=%s)", [c.chunk_id for c in message.chunks], message.finished
            )
            for chunk in message.chunks:
                self.abandoned.discard(chunk.chunk_id)  # a new lease, whatever happened before
                if self.backoff.active():
                    # Asked for before the failure: hand it straight back, at no cost to it.
                    await self._release(chunk.chunk_id, "")
                else:
                    self.queue.put_nowait(chunk)
            if message.finished:
                self.finished.set()
            if not message.chunks:
                why = "the dataset is finished" if message.finished else "no chunk is free now"
                leaving = message.finished and self.config.exit_when_done
                busy = self.current is not None or not self.queue.empty() or len(self.outbox)
                if not (why == self._idle_logged or leaving or busy):
                    self._idle_logged = why  # once per idle spell and reason, not per poll
                    log.info("waiting for work: %s", why)
                asyncio.get_running_loop().call_later(
                    max(message.retry_after, 0.2), self._want_work.set
                )
            else:
                self._idle_logged = None
                self._want_work.set()
        elif isinstance(message, Items):
            if self.remote is not None:
                self.remote.on_items(message)
        elif isinstance(message, ConfigUpdate):
            self._apply_job(message.config)
            log.info("job updated by the orchestrator; applies from the next batch")

    def _apply_job(self, payload: dict[str, Any]) -> None:
        """Take the orchestrator's job, under this worker's own rules.

        The worker's veto on remote code is applied here, so neither the orchestrator's
        config nor an admin's ``set_config`` can turn it on; dataset credentials come from
        this worker's config, never from the orchestrator.
        """
        job = ModelConfig.model_validate(payload["vllm"])
        if job.trust_remote_code and not self.config.allow_remote_code:
            if job != self._vetoed_job:
                log.warning(
                    "the job asks for trust_remote_code; running without it (start the "
                    "worker with --allow-remote-code to allow a model's own code)"
                )
                self._vetoed_job = job
            job = job.model_copy(update={"trust_remote_code": False})
        self.job = job
        self.lease_seconds = float(payload.get("lease_seconds", self.lease_seconds))
        wanted = payload.get("heartbeat_seconds")
        if isinstance(wanted, (int, float)) and wanted > 0:
            self.job_heartbeat_seconds = float(wanted)
        dataset = dataset_with_credentials(payload["dataset"], self.config.dataset_storage_options)
        if dataset != self.dataset:
            self.dataset = dataset
            if self._reads_dataset():
                self.source = open_source(dataset, path_override=self.config.dataset_path)
                self.remote = None
            else:
                log.info("the dataset is not readable here: items come from the orchestrator")
                self.remote = RemoteSource(asyncio.get_running_loop(), self._send_fetch)
        self._ready.set()

    def _reads_dataset(self) -> bool:
        """The worker's read_dataset setting; "auto" looks at the dataset once it is known."""
        if self.config.read_dataset != "auto":
            return self.config.read_dataset == "yes"
        if self.dataset is None:
            return True
        return reads_dataset(self.dataset, self.config.dataset_path)

    async def _send_fetch(self, message: Fetch) -> None:
        ws = self._ws
        if ws is None:
            raise SourceError("not connected: cannot fetch items")
        try:
            await ws.send(encode(message))
        except ConnectionClosed:
            raise SourceError("connection lost while fetching items") from None

    def _held_chunks(self) -> list[str]:
        held = {c.chunk_id for c in self.queue._queue}  # type: ignore[attr-defined]
        if self.current is not None:
            held.add(self.current.chunk_id)
        held |= self.outbox.chunks()
        return sorted(held - self.abandoned)

    def _forget_unresumed(self, lost: set[str]) -> None:
        for chunk_id in lost:
            self._abandon(chunk_id)

    def _abandon(self, chunk_id: str, keep_results: bool = False) -> None:
        """Stop working on ``chunk_id``; unless ``keep_results``, forget its unsent results."""
        self.abandoned.add(chunk_id)
        if self.current is not None and self.current.chunk_id == chunk_id:
            self._current_abandoned = True
        if not keep_results:
            self.outbox.drop_chunk(chunk_id)

    async def _release(self, chunk_id: str, reason: str) -> None:
        """Hand ``chunk_id`` back now. Without a connection the next hello omits it instead."""
        ws = self._ws
        if ws is None:
            log.info("not connected; %s is handed back by omission on reconnect", chunk_id)
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode(Release(chunk_id=chunk_id, reason=reason[:MAX_REASON_CHARS])))

    def heartbeat_interval(self) -> float:
        """Often enough that a lease never lapses while this worker is alive."""
        return min(
            self.config.heartbeat_seconds, self.job_heartbeat_seconds, self.lease_seconds / 3
        )

    def _capabilities(self) -> dict[str, str | int | float | bool]:
        """What monitors show of this worker: texts here, numbers in heartbeats."""
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if self.config.gpu_id is not None:
            gpu = str(self.config.gpu_id)
        capabilities: dict[str, str | int | float | bool] = {
            "engine": self.config.engine,
            "model": self.config.model or "",
            "gpu": f"cuda:{gpu}" if gpu.strip() else "",
        }
        if self.config.gpu_id is not None:
            capabilities["gpu_id"] = self.config.gpu_id
        capabilities["reads_dataset"] = self._reads_dataset()
        return capabilities

    def heartbeat_stats(self, elapsed: float, items: int) -> dict[str, float]:
        """Numbers only (the protocol's stats are floats, at most 32): ``items`` is the
        engine's item count when the last heartbeat went out, ``elapsed`` seconds ago."""
        queued: list[ChunkLease] = list(self.queue._queue)  # type: ignore[attr-defined]
        stats = {
            "items_per_s": round((self.clock.items - items) / max(elapsed, 1e-6), 3),
            "engine_busy": round(self.clock.busy_fraction(), 3),
            "tokens": float(self.clock.tokens),
            "queued_chunks": float(len(queued)),
            "queued_items": float(sum(len(c.items) for c in queued)),
            "unacked": float(len(self.outbox)),
            "chunk_items": float(len(self.current.items)) if self.current is not None else 0.0,
        }
        if self.limit.limit is not None:
            stats["batch_limit"] = float(self.limit.limit)
        if self.config.gpu_id is not None:
            stats["gpu_id"] = float(self.config.gpu_id)
        return stats

    async def _heartbeat_loop(self, ws: WSClient) -> None:
        started, items = time.monotonic(), self.clock.items
        while True:
            await asyncio.sleep(self.heartbeat_interval())
            stats = self.heartbeat_stats(time.monotonic() - started, items)
            started, items = time.monotonic(), self.clock.items
            current = self.current.chunk_id if self.current is not None else ""
            await ws.send(encode(Heartbeat(stats=stats, chunk=current)))

    async def _request_loop(self, ws: WSClient) -> None:
        while True:
            await self._want_work.wait()
            self._want_work.clear()
            if self.backoff.active():
                continue  # the back-off sets the event again when it ends
            want = self._chunks_wanted()
            if want > 0 and not self.stopped.is_set():
                await ws.send(encode(Request(count=want)))

    def _chunks_wanted(self) -> int:
        """How many chunks to ask for now: the one to caption plus those held ahead, counted
        in chunks (``prefetch_chunks``) or in items (``prefetch_items``)."""
        queued: list[ChunkLease] = list(self.queue._queue)  # type: ignore[attr-defined]
        have = len(queued) + (1 if self.current is not None else 0)
        ahead = self.config.prefetch_items
        if ahead is None:
            return 1 + self.config.prefetch_chunks - have
        if have == 0:
            return 2 if ahead > 0 else 1
        # Without a current chunk, the first queued one is about to be it.
        held_ahead = queued if self.current is not None else queued[1:]
        # One at a time: the next request follows the assignment, until enough is held.
        return 1 if sum(len(c.items) for c in held_ahead) < ahead else 0

    # -- processing -------------------------------------------------------------------------
    async def _process_loop(self) -> None:
        await self._ready.wait()
        while True:
            chunk = await self.queue.get()
            self._want_work.set()
            if chunk.chunk_id in self.abandoned:
                continue
            self.current = chunk
            self._current_abandoned = False
            stopped_by: str | None = None
            try:
                await self._caption_chunk(chunk)
                self.backoff.reset()
            except EngineUnavailableError as exc:
                stopped_by = str(exc)
                self.backoff.begin()
                log.error(
                    "the engine cannot caption even one item (%s); handing back %s and the "
                    "queued chunks",
                    exc,
                    chunk.chunk_id,
                )
                await self._stop_chunk(chunk, stopped_by)
                await self._hand_back_queue()
            except SourceError as exc:
                stopped_by = str(exc)
                self.backoff.begin()
                log.error("%s; handing the chunk back", exc)
                await self._stop_chunk(chunk, stopped_by)
            except Exception as exc:
                # The engine cannot run this job (a model that does not load, an invalid
                # stage graph, or a bug): never sit on leases it cannot finish.
                log.error("cannot caption: %s; handing chunks back and stopping", exc)
                self.fatal = exc
                self.stop()
                return
            finally:
                self.current = None
            if stopped_by is not None:
                await self._back_off(stopped_by)
            self._want_work.set()
            if self._done() and self._ws is not None:
                await self._ws.close()

    async def _caption_chunk(self, chunk: ChunkLease) -> None:
        source = self.remote.for_chunk(chunk.chunk_id) if self.remote is not None else self.source
        assert source is not None
        pipeline = ChunkPipeline(
            source,
            self.captioner,
            self._decode_pool,
            self._engine_thread,
            self.clock,
            self.limit,
            ready_items=self.config.ready_items,
        )
        chunk_id = chunk.chunk_id
        await pipeline.run(
            chunk,
            job=lambda: self._job(),
            batch_size=lambda: self.config.batch_size or self._job().batch_size,
            emit=self._emit,
            abandoned=lambda: self._current_abandoned or chunk_id in self.abandoned,
        )

    async def _stop_chunk(self, chunk: ChunkLease, reason: str) -> None:
        """Release a chunk this worker could not finish, after its sent results land."""
        self._abandon(chunk.chunk_id, keep_results=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.outbox.wait_chunk_settled(chunk.chunk_id), SETTLE_BEFORE_RELEASE_SECONDS
            )
        await self._release(chunk.chunk_id, reason)

    async def _hand_back_queue(self) -> None:
        """Queued chunks were never tried: released without a reason, so they cost nothing."""
        while not self.queue.empty():
            queued = self.queue.get_nowait()
            if queued.chunk_id not in self.abandoned:
                self._abandon(queued.chunk_id)
                await self._release(queued.chunk_id, "")

    async def _back_off(self, why: str) -> None:
        """Ask for no work until the back-off ends (or the worker stops)."""
        log.warning(
            "chunk stopped (%s); failure %d in a row, asking for work again in %.1f s",
            why[:200],
            self.backoff.failures,
            self.backoff.remaining(),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), self.backoff.remaining())
        self.backoff.until = 0.0

    def _job(self) -> ModelConfig:
        assert self.job is not None
        return self.job

    async def _emit(self, chunk_id: str, items: list[ItemResult], model: str) -> None:
        await self.outbox.wait_below()
        message = self.outbox.add(chunk_id, items, model)
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode(message))
