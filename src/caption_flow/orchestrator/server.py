"""The orchestrator process: a websocket server that drives the chunk book and the store.

Every connection is a :class:`ServerConnection` (Sans-I/O) fed by this driver, which also
enforces what a connection may cost (frame size before and after the hello, a message rate,
results being stored at once, one byte budget for all). Worker messages are handled in
:mod:`caption_flow.orchestrator.workers`.
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
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed

from caption_flow.config.discovery import deep_merge
from caption_flow.config.models import DatasetConfig, ModelConfig, OrchestratorConfig
from caption_flow.errors import ConfigError, ProtocolError
from caption_flow.export.publish import Publisher
from caption_flow.images.prepare import PrepareSettings
from caption_flow.orchestrator import live
from caption_flow.orchestrator.activity import ActivityLog, ThroughputHistory
from caption_flow.orchestrator.admin import AdminDesk
from caption_flow.orchestrator.auth import Authenticator, check_exposure
from caption_flow.orchestrator.dataset_index import build_book, sync_chunks
from caption_flow.orchestrator.http import answer_http
from caption_flow.orchestrator.items import ItemServer
from caption_flow.orchestrator.leaderboard import Leaderboard
from caption_flow.orchestrator.leases import ChunkBook
from caption_flow.orchestrator.limits import ByteBudget, TokenBucket
from caption_flow.orchestrator.metrics import Metrics
from caption_flow.orchestrator.preparation import PrepDesk
from caption_flow.orchestrator.prepared import PreparedBuffer
from caption_flow.orchestrator.results import JobRules
from caption_flow.orchestrator.sessions import Session, shown_capabilities
from caption_flow.orchestrator.supervise import supervise
from caption_flow.orchestrator.web import Dashboard, is_live_feed, serve_live
from caption_flow.orchestrator.workers import WorkerDesk
from caption_flow.protocol.connection import CLOSE_TRY_AGAIN, ServerConnection
from caption_flow.protocol.messages import (
    ConfigUpdate,
    Fetch,
    Heartbeat,
    Message,
    Release,
    Request,
    Requeue,
    Results,
    Stats,
    Welcome,
)
from caption_flow.sources import open_source
from caption_flow.storage.identity import record_commit
from caption_flow.storage.store import CaptionStore

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
CLOSE_INTERNAL = 1011
# Largest frame an authenticated monitor or admin may send (their messages are small).
CONTROL_MAX_BYTES = 1024 * 1024


class Orchestrator:
    def __init__(self, config: OrchestratorConfig) -> None:
        check_exposure(config)
        self.config = config
        self.job: ModelConfig = config.vllm
        self.dataset: DatasetConfig = config.dataset
        self._rules = JobRules.of(self.job)
        self.store = CaptionStore(
            config.storage.data_dir,
            compact_rows=config.storage.compact_rows,
            compact_seconds=config.storage.compact_seconds,
            group_commit_ms=config.storage.group_commit_ms,
            dataset=config.dataset,
            force_new_dataset=config.storage.force_new_dataset,
        )
        self.store.output_fields = set(self._rules.fields)
        self.authenticate = Authenticator(config.auth)
        self.metrics = Metrics(self)
        self.admin = AdminDesk(self)
        self.leaderboard = Leaderboard(self.store)
        self.dashboard = Dashboard(self)
        self.book: ChunkBook | None = None
        self.desk: WorkerDesk | None = None
        self.items: ItemServer | None = None  # items over the connection
        self.prep: PrepDesk | None = None  # dataworkers
        prepare = config.prepare
        self.buffer = PreparedBuffer(
            config.storage.data_dir / "prepared",
            memory_limit=int(prepare.buffer_memory_mb * 1024 * 1024),
            disk_limit=int(prepare.buffer_disk_mb * 1024 * 1024),
        )
        self.sessions: dict[str, Session] = {}
        self.started_at = time.time()
        self.activity = ActivityLog()  # what monitors show of the recent past
        self.history = ThroughputHistory()
        self.budget = ByteBudget(config.limits.max_inflight_bytes)
        self._handshakes = 0
        self._frozen_at = 0  # sessions at the last gc.freeze()
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.finished = asyncio.Event()
        self._stopped = False
        self.publisher: Publisher | None = None
        self.fatal: str | None = None  # why the process must stop, when it must
        self.failed = asyncio.Event()

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store, list the dataset into chunks, then accept connections."""
        await self.store.start()
        self._start_publishing()
        self.authenticate.load(await self.store.run_db(self.store.db.tokens))
        source = open_source(self.config.dataset, cache_dir=self.config.storage.data_dir)
        t0 = time.monotonic()
        added = await self.store.run_db(
            sync_chunks, self.store.db, source.list_shards(), self.config.chunk_size
        )
        pinned = getattr(source, "pinned_config", None)
        if pinned is not None:  # hub datasets: workers read the very commit listed here
            self.dataset = pinned()
            await self.store.run_db(record_commit, self.store.db, self.dataset.revision)
        self.book = await self.store.run_db(build_book, self.store.db, self.config)
        self.history.record(self.book.items_done, time.time())
        self.desk = WorkerDesk(
            self.config,
            self.book,
            self.store,
            rules=lambda: self._rules,
            live_sessions=lambda: self.sessions,
            on_change=self._check_finished,
            activity=self.activity,
        )
        self.store.on_quarantine = self.desk.requeue
        self.buffer.clear()
        self.prep = PrepDesk(
            self.config.prepare,
            self.book,
            self.buffer,
            item_keys=self.store.reader.item_keys,
            settings=self.prepare_settings,
            fetching_sessions=lambda: [
                s.session_id for s in self.sessions.values() if s.reads_remote
            ],
        )
        self.items = ItemServer(
            lambda: self.dataset,
            self.config.storage.data_dir,
            self.desk.leased_keys,
            self.buffer,
            self.prep,
            settings=lambda: (
                self.prepare_settings() if self.config.prepare.on_orchestrator else None
            ),
            wait_seconds=self.config.prepare.wait_seconds,
        )
        log.info(
            "dataset %s: %d items in %d chunks (%d new) listed in %.2fs",
            self.config.dataset.path,
            self.book.items_total,
            len(self.book.chunks),
            added,
            time.monotonic() - t0,
        )
        if self.book.items_total == 0:
            log.warning(
                "dataset %s has no items: nothing to caption (check dataset.path, "
                "dataset.type and dataset.image_extensions)",
                self.config.dataset.path,
            )
        elif self.book.finished:
            log.info(
                "nothing left to do: all %d items are done (%d failed)",
                self.book.items_total,
                self.store.items_failed,
            )
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            max_size=self.config.limits.hello_max_bytes,
            max_queue=self.config.limits.max_queue,
            compression=None,
            ping_interval=20,
            ping_timeout=60,
            ssl=self._ssl_context(),
            process_request=lambda conn, req: answer_http(self, conn, req),
        )
        self._tasks = [
            supervise("lease-expiry", self._expiry_loop, self._fail),
            supervise("status-line", lambda: live.status_loop(self), self._fail),
            supervise("monitor-push", lambda: live.monitor_loop(self), self._fail),
            supervise("leaderboard", self.leaderboard.loop, self._fail),
        ]
        self._check_finished()
        # Everything built so far (the chunk book above all) lives as long as the process:
        # keep the garbage collector from walking it again and again.
        gc.collect()
        gc.freeze()
        self.store.lock.update(port=self.port)
        log.info("orchestrator listening on %s:%d", self.config.host, self.port)

    def prepare_settings(self) -> PrepareSettings:
        """How items are prepared for workers without the dataset: the current job's size."""
        prepare = self.config.prepare
        return PrepareSettings(self.job.image, prepare.format, prepare.quality)

    def _fail(self, reason: str) -> None:
        log.critical("stopping: %s", reason)
        self.fatal = reason
        self.failed.set()

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
        """Stop serving and flush the journal to Parquet. Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.store.close(flush=True)
        if self.items is not None:
            self.items.close()
        if self.publisher is not None:  # a last round, so the target has the final output
            self.publisher.stop()
            await asyncio.to_thread(self.publisher.publish_once)

    def _start_publishing(self) -> None:
        """storage.publish: the output leaves the machine while the run grows."""
        publish = self.config.storage.publish
        if publish is None:
            return
        self.publisher = Publisher(
            self.config.storage.data_dir,
            publish.to,
            repo=publish.repo,
            every_s=publish.every,
            storage_options=publish.storage_options,  # the hub token: from the environment
        )
        self.publisher.start()
        log.info(
            "publishing the output to %s every %.0f s", publish.repo or publish.to, publish.every
        )

    # -- connections ------------------------------------------------------------------------
    async def _handle(self, websocket: WSConnection) -> None:
        if is_live_feed(websocket):  # the web dashboard's JSON feed, not our protocol
            return await serve_live(self, websocket)
        if self._handshakes >= self.config.limits.max_pending_handshakes:
            await websocket.close(CLOSE_TRY_AGAIN, "too many connections are saying hello")
            return
        connection = ServerConnection(self.authenticate)
        self._handshakes += 1
        try:
            frame = await asyncio.wait_for(websocket.recv(), HELLO_TIMEOUT)
            hello = connection.receive(frame)
        except ProtocolError as exc:
            log.warning("refused %s: %s", websocket.remote_address, exc)
            self.note("refused", f"refused {websocket.remote_address}: {exc}")
            await websocket.close(exc.close_code, str(exc)[:120])
            return
        except (TimeoutError, ConnectionClosed):
            return
        finally:
            self._handshakes -= 1
        assert connection.identity is not None and connection.hello is not None
        hello = connection.hello
        # Memory per connection matters at 10k+: keep nothing of the handshake but who it is.
        connection.hello = None
        # (websockets tells a finished handshake by ``request`` being set: keep the object,
        # drop its headers.)
        if websocket.request is not None:
            websocket.request.headers = Headers()
        websocket.response = None
        session = Session(
            session_id=uuid.uuid4().hex[:12],
            identity=connection.identity,
            name=hello.name or connection.identity.contributor,
            websocket=websocket,
            connection=connection,
            outstanding=asyncio.Semaphore(self.config.limits.max_outstanding_results),
            capabilities=shown_capabilities(hello.capabilities),
            count_sent=self.metrics.bytes_out.inc,
            # Said in the hello: dataworkers prepare its chunks before its first fetch.
            reads_remote=hello.capabilities.get("reads_dataset") is False,
        )
        websocket.protocol.max_message_size = (
            self.config.max_message_bytes
            if session.role in ("worker", "dataworker")
            else CONTROL_MAX_BYTES
        )
        resumed: list[str] = []
        if session.role == "worker" and hello.held_chunks and self.desk is not None:
            resumed = await self.desk.resume(session, hello.held_chunks)
        self.sessions[session.session_id] = session
        self._freeze_when_grown()
        log.info("%s %s connected (%s)", session.role, session.name, session.session_id)
        self.note("connect", f"{session.role} {session.name} ({session.identity.contributor})")
        await session.send(
            Welcome(
                session_id=session.session_id,
                contributor=session.identity.contributor,
                config=self._welcome_config(session.role),
                resumed_chunks=resumed,
            )
        )
        try:
            await self._serve(session)
        finally:
            self.sessions.pop(session.session_id, None)
            if session.role == "worker" and self.desk is not None:
                # Leases wait the reconnect window: a worker that comes back keeps them.
                self.desk.disconnected(session)
            if session.role == "dataworker" and self.prep is not None:
                self.prep.disconnected(session)  # nothing to wait for: preparing is cheap
            log.info("%s %s disconnected", session.role, session.name)
            self.note("disconnect", f"{session.role} {session.name}")

    def _freeze_when_grown(self) -> None:
        """Move long-lived objects out of the garbage collector's sight as connections pile
        up: a full collection walking 10k sessions stalls the loop for tens of ms."""
        if len(self.sessions) >= self._frozen_at * 5 // 4 + 256:
            self._frozen_at = len(self.sessions)
            gc.freeze()

    async def _serve(self, session: Session) -> None:
        limits = self.config.limits
        bucket = TokenBucket(limits.messages_per_second, limits.message_burst, time.monotonic())
        websocket = session.websocket
        try:
            async for frame in websocket:
                wait = bucket.take(time.monotonic())
                if wait > 0:  # over the rate: stop reading for a while (TCP pushes back)
                    await asyncio.sleep(wait)
                self.metrics.bytes_in.inc(len(frame))
                message = session.connection.receive(frame)
                await self._dispatch(session, message, len(frame))
        except ProtocolError as exc:
            log.warning("closing %s: %s", session.name, exc)
            await websocket.close(exc.close_code, str(exc)[:120])
        except ConnectionClosed:
            pass
        except Exception:  # a bug of ours: this connection ends, the server goes on
            log.exception("closing %s after an internal error", session.name)
            await websocket.close(CLOSE_INTERNAL, "internal error")

    async def _dispatch(self, session: Session, message: Message, size: int) -> None:
        assert self.desk is not None and self.book is not None
        if isinstance(message, Results):
            # Back-pressure: stop reading while this connection, or all of them together,
            # have too much being stored.
            await session.outstanding.acquire()
            held = await self.budget.acquire(size)
            task = asyncio.create_task(self._results_task(session, message, held))
            session.tasks.add(task)
            task.add_done_callback(session.tasks.discard)
        elif isinstance(message, Request):
            with self.metrics.lease_seconds.time():
                await self.desk.on_request(session, message.count)
        elif session.role == "dataworker" and self.prep is not None:
            await self.prep.dispatch(session, message)
        elif isinstance(message, Heartbeat):
            self.desk.on_heartbeat(session, message)
        elif isinstance(message, Release):
            await self.desk.on_release(session, message.chunk_id, message.reason)
        elif isinstance(message, Fetch) and self.items is not None:
            await self.items.on_fetch(session, message)
        elif await self.admin.dispatch(session, message):
            pass
        elif isinstance(message, Requeue):
            await self.requeue_failed()
            await session.send(Stats(snapshot=self.snapshot()))

    async def _results_task(self, session: Session, message: Results, held: int) -> None:
        """Store one results message; anything unexpected is logged and the worker told to
        reconnect and resend, never dropped silently."""
        assert self.desk is not None
        t0 = time.perf_counter()
        try:
            await self.desk.on_results(session, message)
            self.metrics.commit_seconds.observe(time.perf_counter() - t0)
            self.metrics.commit_error = None
        except Exception as exc:
            log.exception("results %d of %s not stored", message.seq, session.name)
            self.metrics.commit_error = f"{type(exc).__name__}: {exc}"[:200]
            await session.websocket.close(CLOSE_INTERNAL, f"not stored: {exc}"[:120])
        finally:
            session.outstanding.release()
            await self.budget.release(held)

    def _check_finished(self) -> None:
        if self.book is not None and self.book.finished and not self.finished.is_set():
            log.info("all chunks are done or failed")
            self.note("done", "all chunks are done or failed")
            self.finished.set()

    # -- admin --------------------------------------------------------------------------------
    def _welcome_config(self, role: str) -> dict[str, Any]:
        """What each role is told on arrival: workers the job, dataworkers the dataset."""
        if role == "worker":
            return self.job_payload()
        if role == "dataworker":
            return {"dataset": self.job_payload()["dataset"]}
        return {}

    def job_payload(self) -> dict[str, Any]:
        """What a worker needs: the job and where the data is. Never the auth section, and
        never the dataset's credentials: a worker that reads remote shards brings its own."""
        return {
            "vllm": self.job.model_dump(mode="json"),
            "dataset": self.dataset.model_dump(mode="json", exclude={"storage_options"}),
            "lease_seconds": self.config.lease_seconds,
            "heartbeat_seconds": self.config.heartbeat_seconds,
        }

    async def update_job(self, patch: dict[str, Any]) -> ModelConfig:
        """Merge a partial ``vllm`` section, validate it (the stage graph included, so a
        cycle or a typo never reaches the workers), and push it to every worker."""
        merged = deep_merge(self.job.model_dump(mode="python"), patch)
        try:
            job = ModelConfig.model_validate(merged)
            rules = JobRules.of(job)
        except Exception as exc:  # pydantic's ValidationError or our ConfigError
            raise ConfigError(f"invalid job update: {exc}") from None
        # Results of batches started on the old job still pass while workers switch.
        self._rules = rules.merged(JobRules.of(self.job))
        self.job = job
        self.store.output_fields |= set(rules.fields)
        update = ConfigUpdate(config=self.job_payload())
        workers = [s for s in self.sessions.values() if s.role == "worker"]
        await asyncio.gather(*(s.send(update) for s in workers))
        log.info("job updated and sent to %d workers", len(workers))
        self.note(
            "config",
            f"job updated ({', '.join(sorted(patch)) or 'nothing'}), sent to "
            f"{len(workers)} workers",
        )
        return job

    async def requeue_failed(self) -> int:
        """Caption failed items and chunks again: their error rows leave the output."""
        assert self.book is not None
        reopened = await self.store.requeue_failed()
        for chunk_id, ids in reopened.items.items():
            self.book.requeue_items(chunk_id, ids)
        for chunk_id in reopened.chunks:
            self.book.revive(chunk_id)
        if reopened.item_count or reopened.chunks:
            self.finished.clear()
        self.note(
            "config",
            f"requeued {reopened.item_count} failed items, {len(reopened.chunks)} failed chunks",
        )
        log.info(
            "requeued %d failed items and %d failed chunks",
            reopened.item_count,
            len(reopened.chunks),
        )
        return reopened.item_count

    # -- background loops -----------------------------------------------------------------
    async def _expiry_loop(self) -> None:
        interval = min(1.0, self.config.lease_seconds / 4, self.config.reconnect_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            assert self.desk is not None and self.prep is not None
            await self.desk.expire()
            self.prep.sweep()

    def note(self, kind: str, text: str) -> None:
        """Add an entry to the activity log monitors show (kinds: activity.KINDS)."""
        self.activity.add(kind, text, time.time())

    def snapshot(self) -> dict[str, Any]:
        """Live figures for monitors, the dashboard, /metrics and the run summary."""
        return live.snapshot(self)
