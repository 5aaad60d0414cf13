"""The orchestrator process: a websocket server that drives the chunk book and the store.

Every connection is a :class:`ServerConnection` (Sans-I/O) fed by this driver. Work leaves
only through :meth:`Orchestrator._on_request` and comes back only through
:meth:`Orchestrator._on_results`, which acknowledges after the store has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import time
import uuid
from typing import Any

from websockets.asyncio.server import Server, serve
from websockets.asyncio.server import ServerConnection as WSConnection
from websockets.exceptions import ConnectionClosed

from caption_flow.config.discovery import deep_merge
from caption_flow.config.models import DatasetConfig, ModelConfig, OrchestratorConfig
from caption_flow.errors import ConfigError, NotLeasedError, ProtocolError
from caption_flow.orchestrator.auth import Authenticator
from caption_flow.orchestrator.dataset_index import build_book, sync_chunks
from caption_flow.orchestrator.http import answer_http
from caption_flow.orchestrator.leases import ChunkBook, Lease
from caption_flow.orchestrator.results import build_batch
from caption_flow.orchestrator.sessions import Session
from caption_flow.orchestrator.stats import RateMeter
from caption_flow.protocol.connection import ServerConnection
from caption_flow.protocol.messages import (
    Ack,
    Assign,
    ChunkLease,
    ConfigUpdate,
    ErrorMsg,
    Heartbeat,
    ItemRef,
    Message,
    Reject,
    Release,
    Request,
    Results,
    SetConfig,
    Stats,
    Welcome,
)
from caption_flow.sources import open_source
from caption_flow.storage.state import ChunkState
from caption_flow.storage.store import CaptionStore

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0


class Orchestrator:
    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.job: ModelConfig = config.vllm
        self.dataset: DatasetConfig = config.dataset
        self.store = CaptionStore(
            config.storage.data_dir,
            compact_rows=config.storage.compact_rows,
            compact_seconds=config.storage.compact_seconds,
            group_commit_ms=config.storage.group_commit_ms,
        )
        self.authenticate = Authenticator(config.auth)
        self.book: ChunkBook | None = None
        self.sessions: dict[str, Session] = {}
        self.rate = RateMeter()
        self.items_failed = 0
        self.started_at = time.time()
        self._lease_keys: dict[str, dict[int, str]] = {}
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.finished = asyncio.Event()

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store, list the dataset into chunks, then accept connections."""
        await self.store.start()
        source = open_source(self.config.dataset, cache_dir=self.config.storage.data_dir)
        t0 = time.monotonic()
        added = await self.store.run_db(
            sync_chunks, self.store.db, source.list_shards(), self.config.chunk_size
        )
        pinned = getattr(source, "pinned_config", None)
        if pinned is not None:  # hub datasets: workers read the very commit listed here
            self.dataset = pinned()
        self.book = await self.store.run_db(
            build_book, self.store.db, self.config.lease_seconds, self.config.max_chunk_attempts
        )
        log.info(
            "dataset %s: %d items in %d chunks (%d new) listed in %.2fs",
            self.config.dataset.path,
            self.book.items_total,
            len(self.book.chunks),
            added,
            time.monotonic() - t0,
        )
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            max_size=self.config.max_message_bytes,
            compression=None,
            ping_interval=20,
            ping_timeout=60,
            ssl=self._ssl_context(),
            process_request=lambda conn, req: answer_http(self, conn, req),
        )
        self._tasks = [
            asyncio.create_task(self._expiry_loop(), name="lease-expiry"),
            asyncio.create_task(self._status_loop(), name="status-line"),
            asyncio.create_task(self._monitor_loop(), name="monitor-push"),
        ]
        self._check_finished()
        # Everything built so far (the chunk book above all) lives as long as the process:
        # keep the garbage collector from walking it again and again.
        gc.collect()
        gc.freeze()
        log.info("orchestrator listening on %s:%d", self.config.host, self.port)

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.ssl
        if tls.cert is None:
            return None
        if tls.key is None:
            raise ConfigError("orchestrator.ssl.cert is set but orchestrator.ssl.key is not")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        return context

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.store.close(flush=True)

    # -- connections ------------------------------------------------------------------------
    async def _handle(self, websocket: WSConnection) -> None:
        connection = ServerConnection(self.authenticate)
        try:
            frame = await asyncio.wait_for(websocket.recv(), HELLO_TIMEOUT)
            hello = connection.receive(frame)
        except ProtocolError as exc:
            log.warning("refused %s: %s", websocket.remote_address, exc)
            await websocket.close(exc.close_code, str(exc)[:120])
            return
        except (TimeoutError, ConnectionClosed):
            return
        assert connection.identity is not None and hello is not None
        session = Session(
            session_id=uuid.uuid4().hex[:12],
            identity=connection.identity,
            name=getattr(hello, "name", "") or connection.identity.contributor,
            websocket=websocket,
            connection=connection,
        )
        resumed = await self._resume(session, getattr(hello, "held_chunks", []))
        self.sessions[session.session_id] = session
        log.info("%s %s connected (%s)", session.role, session.name, session.session_id)
        await session.send(
            Welcome(
                session_id=session.session_id,
                contributor=session.identity.contributor,
                config=self.job_payload() if session.role == "worker" else {},
                resumed_chunks=resumed,
            )
        )
        try:
            async for frame in websocket:
                message = connection.receive(frame)
                await self._dispatch(session, message)
        except ProtocolError as exc:
            log.warning("closing %s: %s", session.name, exc)
            await websocket.close(exc.close_code, str(exc)[:120])
        except ConnectionClosed:
            pass
        finally:
            self.sessions.pop(session.session_id, None)
            # Leases stay until their deadline: a worker that reconnects in time keeps them.
            log.info("%s %s disconnected", session.role, session.name)

    async def _dispatch(self, session: Session, message: Message) -> None:
        if isinstance(message, Results):
            await session.in_flight.acquire()  # back-pressure: stop reading when too many
            task = asyncio.create_task(self._on_results(session, message))
            task.add_done_callback(lambda _: session.in_flight.release())
        elif isinstance(message, Request):
            await self._on_request(session, message)
        elif isinstance(message, Heartbeat):
            session.stats = dict(message.stats)
            assert self.book is not None
            self.book.heartbeat(session.session_id, time.time())
        elif isinstance(message, Release):
            await self._on_release(session, message.chunk_id)
        elif isinstance(message, SetConfig):
            await self._on_set_config(session, message)

    # -- work out ---------------------------------------------------------------------------
    async def _on_request(self, session: Session, request: Request) -> None:
        assert self.book is not None
        count = max(1, min(request.count, self.config.chunks_per_request))
        leases = self.book.lease(session.session_id, count, time.time())
        if not leases:
            await session.send(Assign(finished=self.book.finished, retry_after=1.0))
            return
        chunks = [self._chunk_payload(lease) for lease in leases]
        await self.store.commit(chunk_states=[self._state(c.chunk_id) for c in chunks])
        await session.send(Assign(chunks=chunks))

    def _keys_for(self, lease: Lease) -> dict[int, str]:
        """The leased items' keys, kept while the chunk is leased: result rows take their keys
        from here, never from what a worker sends."""
        keys = self._lease_keys.get(lease.chunk_id)
        if keys is None:
            ids = lease.item_ids
            keys = self.store.read_keys(ids[0], ids[-1]) if ids else {}
            self._lease_keys[lease.chunk_id] = keys
        return keys

    def _chunk_payload(self, lease: Lease) -> ChunkLease:
        keys = self._keys_for(lease)
        return ChunkLease(
            chunk_id=lease.chunk_id,
            shard=lease.shard,
            items=[ItemRef(i, keys[i]) for i in lease.item_ids],
            deadline=lease.deadline,
        )

    async def _resume(self, session: Session, held: list[str]) -> list[str]:
        """Give a reconnecting worker back the chunks it still holds, where nobody took them."""
        if session.role != "worker" or not held or self.book is None:
            return []
        resumed = []
        for chunk_id in held:
            lease = self.book.claim(session.session_id, chunk_id, time.time(), self.sessions)
            if lease is not None:
                self._keys_for(lease)
                resumed.append(chunk_id)
        if resumed:
            await self.store.commit(chunk_states=[self._state(c) for c in resumed])
        return resumed

    async def _on_release(self, session: Session, chunk_id: str) -> None:
        assert self.book is not None
        if self.book.release(session.session_id, chunk_id):
            await self.store.commit(chunk_states=[self._state(chunk_id)])

    def _state(self, chunk_id: str) -> ChunkState:
        assert self.book is not None
        c = self.book.chunks[chunk_id]
        return ChunkState(chunk_id, c.status.value, c.attempts, c.reason, c.holder, c.deadline)

    # -- results in -------------------------------------------------------------------------
    async def _on_results(self, session: Session, results: Results) -> None:
        assert self.book is not None
        try:
            fresh = self.book.accept(
                session.session_id, results.chunk_id, [r.item_id for r in results.items]
            )
        except NotLeasedError as exc:
            await session.send(Reject(seq=results.seq, reason=str(exc)))
            return
        chunk = self.book.chunks[results.chunk_id]
        batch = build_batch(
            results,
            fresh,
            keys=self._lease_keys.get(results.chunk_id, {}),
            dataset=self.config.dataset.name or self.config.dataset.path,
            shard=chunk.shard,
            contributor=session.identity.contributor,
            worker=session.name,
        )
        try:
            await self.store.commit([batch])
        except Exception:
            self.book.abort(results.chunk_id, fresh)
            await session.websocket.close(1011, "storage failure; resend later")
            return
        completed = self.book.commit(results.chunk_id, fresh)
        if completed:
            self._lease_keys.pop(results.chunk_id, None)
            await self.store.commit(chunk_states=[self._state(results.chunk_id)])
        self.items_failed += batch.failed
        session.items_done += len(fresh)
        self.rate.add(len(fresh))
        await session.send(
            Ack(seq=results.seq, accepted=len(fresh), duplicates=len(results.items) - len(fresh))
        )
        self._check_finished()

    def _check_finished(self) -> None:
        if self.book is not None and self.book.finished and not self.finished.is_set():
            log.info("all chunks are done or failed")
            self.finished.set()

    # -- admin --------------------------------------------------------------------------------
    def job_payload(self) -> dict[str, Any]:
        """What a worker needs: the job and where the data is. Never the auth section."""
        return {
            "vllm": self.job.model_dump(mode="json"),
            "dataset": self.dataset.model_dump(mode="json"),
            "lease_seconds": self.config.lease_seconds,
        }

    async def update_job(self, patch: dict[str, Any]) -> ModelConfig:
        """Merge a partial ``vllm`` section, validate it, and push it to every worker."""
        merged = deep_merge(self.job.model_dump(mode="python"), patch)
        try:
            job = ModelConfig.model_validate(merged)
        except Exception as exc:
            raise ConfigError(f"invalid job update: {exc}") from None
        self.job = job
        update = ConfigUpdate(config=self.job_payload())
        workers = [s for s in self.sessions.values() if s.role == "worker"]
        await asyncio.gather(*(s.send(update) for s in workers))
        log.info("job updated and sent to %d workers", len(workers))
        return job

    async def _on_set_config(self, session: Session, message: SetConfig) -> None:
        try:
            await self.update_job(message.config)
        except ConfigError as exc:
            await session.send(ErrorMsg(code=4422, message=str(exc)))
            return
        await session.send(Stats(snapshot=self.snapshot()))

    # -- background loops -----------------------------------------------------------------
    async def _expiry_loop(self) -> None:
        interval = min(1.0, self.config.lease_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            assert self.book is not None
            expired = self.book.expire(time.time())
            if expired:
                for e in expired:
                    self._lease_keys.pop(e.chunk_id, None)
                    log.warning(
                        "lease of %s expired (attempt %d%s)",
                        e.chunk_id,
                        e.attempts,
                        ", chunk failed" if e.failed else "",
                    )
                await self.store.commit(chunk_states=[self._state(e.chunk_id) for e in expired])
                self._check_finished()

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            s = self.snapshot()
            log.info(
                "status: %d/%d items (%.1f/s), chunks %s, %d workers",
                s["items_done"],
                s["items_total"],
                s["rate"],
                s["chunks"],
                s["workers"],
            )

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            monitors = [s for s in self.sessions.values() if s.role == "monitor"]
            if monitors:
                stats = Stats(snapshot=self.snapshot())
                await asyncio.gather(*(m.send(stats) for m in monitors))

    def snapshot(self) -> dict[str, Any]:
        assert self.book is not None
        return {
            "items_total": self.book.items_total,
            "items_done": self.book.items_done,
            "items_failed": self.items_failed,
            "rate": round(self.rate.rate(), 2),
            "chunks": self.book.counts(),
            "workers": sum(1 for s in self.sessions.values() if s.role == "worker"),
            "sessions": [s.describe() for s in self.sessions.values()],
            "uptime_s": round(time.time() - self.started_at, 1),
            "model": self.job.model,
            "prompts": list(self.job.inference_prompts),
        }
