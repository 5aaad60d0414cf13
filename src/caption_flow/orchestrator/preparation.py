"""What the orchestrator does with dataworkers: hand out chunks to prepare, check and keep
what they send, and take chunks back from those that go quiet.

A dataworker holds chunks *for preparation* only: it never holds a caption lease and cannot
send results (its role may not send them at all). Which chunks: first those leased to workers
that fetch their items over the connection, then the next ones the queue will lease, never
more than the buffer has room for. What it sends is checked before it is kept: the chunk
must be held by that very session, each key one it was given, each item a JPEG or WebP no
larger than the job's image size and ``max_item_bytes``. A refused message also ends the
session's hold on that chunk, so a faulty dataworker cannot sit on it.

Losing a dataworker loses nothing: its holds end with its connection (or after
``lease_seconds`` without progress), and whatever it had not sent is prepared again by
another dataworker or read by the orchestrator itself when a worker asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from caption_flow.config.models import PrepareConfig
from caption_flow.images.prepare import PrepareSettings, check_prepared
from caption_flow.orchestrator.leases import ChunkBook, ChunkStatus
from caption_flow.orchestrator.prepared import BufferFull, PreparedBuffer
from caption_flow.orchestrator.sessions import Session
from caption_flow.protocol.messages import (
    Ack,
    Heartbeat,
    ItemData,
    Message,
    Prepared,
    PrepAssign,
    PrepLease,
    PrepRequest,
    Reject,
    Release,
)

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


@dataclass
class PrepHold:
    """A chunk held by one dataworker: the keys it was given and those still to come."""

    session_id: str
    chunk_id: str
    given: set[str]
    remaining: set[str]
    deadline: float  # monotonic; moved on by every accepted message


class PrepDesk:
    def __init__(
        self,
        config: PrepareConfig,
        book: ChunkBook,
        buffer: PreparedBuffer,
        item_keys: Callable[[int, int], dict[int, str]],
        settings: Callable[[], PrepareSettings],
        fetching_sessions: Callable[[], Iterable[str]],
    ) -> None:
        self.config = config
        self.book = book
        self.buffer = buffer
        self.item_keys = item_keys  # keys by item id, for an id range (the state database)
        self.settings = settings
        self.fetching_sessions = fetching_sessions  # workers that fetch over the connection
        self.max_item_bytes = int(config.max_item_mb * 1024 * 1024)
        self.holds: dict[str, PrepHold] = {}
        # Keys already sent to the worker holding the chunk (from the buffer or read here):
        # not to be prepared again while that worker holds it. chunk -> (session, keys)
        self._delivered: dict[str, tuple[str, set[str]]] = {}
        self._by_session: dict[str, set[str]] = {}
        self._changed = asyncio.Event()
        self.refused = 0  # prepared messages refused

    def chunk_keys(self, chunk_id: str) -> list[str]:
        """Keys of a chunk's items neither stored nor on their way to the store, in order."""
        ids = self.book.chunks[chunk_id].missing()
        if not ids:
            return []
        keys = self.item_keys(ids[0], ids[-1])
        return [keys[i] for i in ids if i in keys]

    async def dispatch(self, session: Session, message: Message) -> None:
        """A dataworker's messages (its role can send nothing else: protocol.connection).
        ``prepared`` is handled before the next frame is read: a full buffer stops reading."""
        if isinstance(message, PrepRequest):
            await self.on_request(session, message.count)
        elif isinstance(message, Prepared):
            await self.on_prepared(session, message)
        elif isinstance(message, Release):
            self.on_release(session, message.chunk_id)
        elif isinstance(message, Heartbeat):
            session.stats = dict(message.stats)
            session.last_heartbeat = time.monotonic()
            session.current_chunk = self.describe(session.session_id)

    # -- chunks out -----------------------------------------------------------------------
    async def on_request(self, session: Session, count: int) -> None:
        await session.send(self._assign(session.session_id, count))

    def _assign(self, session_id: str, count: int) -> PrepAssign:
        image = self.settings().to_wire()
        if self.book.finished:
            return PrepAssign(finished=True)
        # A full buffer still takes what a worker waits for now (read-ahead makes room).
        candidates = self._candidates(urgent_only=not self.buffer.has_room())
        if not candidates:
            return PrepAssign(image=image, retry_after=RETRY_SECONDS)
        now = time.monotonic()
        leases: list[PrepLease] = []
        for chunk_id in candidates:
            if len(leases) >= count:
                break
            sent = self._sent_to_holder(chunk_id)
            keys = [
                k
                for k in self.chunk_keys(chunk_id)
                if k not in sent and not self.buffer.has(chunk_id, k)
            ]
            if not keys:
                continue
            log.debug("%d items of %s to prepare by %s", len(keys), chunk_id, session_id)
            hold = PrepHold(
                session_id, chunk_id, set(keys), set(keys), now + self.config.lease_seconds
            )
            self.holds[chunk_id] = hold
            self._by_session.setdefault(session_id, set()).add(chunk_id)
            shard = self.book.chunks[chunk_id].shard
            leases.append(PrepLease(chunk_id, shard, keys, time.time() + self.config.lease_seconds))
        return PrepAssign(chunks=leases, image=image, retry_after=0.0 if leases else RETRY_SECONDS)

    def _candidates(self, urgent_only: bool = False) -> list[str]:
        """Chunks worth preparing, most urgent (leased to a worker that fetches) first, then
        the queue's next ones; none held by a dataworker already."""
        urgent = self._urgent()
        ahead = [] if urgent_only else self.book.upcoming(self.config.ahead_chunks)
        seen: set[str] = set()
        out = []
        for chunk_id in [*urgent, *ahead]:
            if chunk_id in seen or chunk_id in self.holds:
                continue
            seen.add(chunk_id)
            status = self.book.chunks[chunk_id].status
            if status in (ChunkStatus.PENDING, ChunkStatus.LEASED):
                out.append(chunk_id)
        return out

    def _urgent(self) -> list[str]:
        urgent: list[str] = []
        for session_id in self.fetching_sessions():
            held = self.book.held_by(session_id)
            urgent.extend(sorted(held, key=lambda c: self.book.chunks[c].first_item))
        return urgent

    def _make_room(self, chunk_id: str) -> bool:
        """Drop read-ahead items (chunks no worker holds) to make room for ``chunk_id``,
        which a worker holds; False when there is nothing to drop."""
        if self.book.chunks[chunk_id].status is not ChunkStatus.LEASED:
            return False
        dropped = False
        for other in self.buffer.chunk_ids():
            if self.book.chunks[other].status is ChunkStatus.PENDING:
                log.debug("dropping read-ahead items of %s for %s", other, chunk_id)
                self.buffer.drop_chunk(other)
                dropped = True
        return dropped

    # -- items in -------------------------------------------------------------------------
    async def on_prepared(self, session: Session, message: Prepared) -> None:
        reason = self._refusal(session, message)
        if reason is not None:
            self.refused += 1
            log.warning("prepared items of %s refused: %s", session.name, reason)
            self._end_hold(message.chunk_id, session.session_id)
            await session.send(Reject(seq=message.seq, reason=reason))
            return
        hold = self.holds[message.chunk_id]
        accepted = 0
        for item in message.items:
            if item.key not in hold.remaining:
                continue  # sent twice, or served meanwhile: nothing to keep
            # An item unreadable there is left for the orchestrator to read if asked.
            if item.error is None and item.data is not None:
                accepted += await self._keep(session, message.chunk_id, item)
            hold.remaining.discard(item.key)  # after the put: a waiting fetch finds it
            self._notify()
        hold.deadline = time.monotonic() + self.config.lease_seconds
        if message.last or not hold.remaining:
            self._end_hold(message.chunk_id, session.session_id)
        self._notify()
        await session.send(Ack(seq=message.seq, accepted=accepted))

    async def _keep(self, session: Session, chunk_id: str, item: ItemData) -> bool:
        """Put one item in the buffer; while it is full, stop reading this dataworker (TCP
        pushes back) until workers take items, for at most ``lease_seconds``, and no longer
        than its connection lasts (a gone dataworker's holds must end at once)."""
        deadline = time.monotonic() + self.config.lease_seconds
        while True:
            try:
                self.buffer.put(chunk_id, item)
                return True
            except BufferFull:
                if self._make_room(chunk_id):
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                room = asyncio.ensure_future(self.buffer.wait_for_room(left))
                closed = asyncio.ensure_future(session.websocket.wait_closed())
                done, _ = await asyncio.wait({room, closed}, return_when=asyncio.FIRST_COMPLETED)
                room.cancel()
                closed.cancel()
                if room not in done or not room.result():
                    return False

    def _refusal(self, session: Session, message: Prepared) -> str | None:
        hold = self.holds.get(message.chunk_id)
        if hold is None or hold.session_id != session.session_id:
            return f"chunk {message.chunk_id} is not held by you for preparation"
        settings = self.settings()
        for item in message.items:
            if item.key not in hold.given:
                return f"{item.key!r} is not an item you were given of {message.chunk_id}"
            if item.data is None:
                continue
            if len(item.data) > self.max_item_bytes:
                return f"{item.key!r}: {len(item.data)} bytes is over {self.max_item_bytes}"
            bad = check_prepared(item.data, settings.image)
            if bad is not None:
                return f"{item.key!r}: {bad}"
        return None

    # -- holds ending ---------------------------------------------------------------------
    def on_release(self, session: Session, chunk_id: str) -> None:
        self._end_hold(chunk_id, session.session_id)

    def disconnected(self, session: Session) -> None:
        for chunk_id in list(self._by_session.get(session.session_id, ())):
            self._end_hold(chunk_id, session.session_id)
        self._by_session.pop(session.session_id, None)

    def _end_hold(self, chunk_id: str, session_id: str) -> None:
        hold = self.holds.get(chunk_id)
        if hold is None or hold.session_id != session_id:
            return
        del self.holds[chunk_id]
        log.debug(
            "hold of %s by %s ended (%d items not sent)", chunk_id, session_id, len(hold.remaining)
        )
        held = self._by_session.get(session_id)
        if held is not None:
            held.discard(chunk_id)
        self._notify()  # waiting fetches re-check: nobody prepares these keys any more

    def sweep(self) -> None:
        """End holds without progress; drop buffered items of chunks no longer to do."""
        now = time.monotonic()
        for hold in list(self.holds.values()):
            if hold.deadline <= now:
                log.warning("dataworker hold of %s ended: no items for a while", hold.chunk_id)
                self._end_hold(hold.chunk_id, hold.session_id)
        for chunk_id in self.buffer.chunk_ids():
            chunk = self.book.chunks.get(chunk_id)
            if chunk is None or chunk.status in (ChunkStatus.DONE, ChunkStatus.FAILED):
                self.buffer.drop_chunk(chunk_id)
        for chunk_id in list(self._delivered):
            chunk = self.book.chunks.get(chunk_id)
            if chunk is None or chunk.status is not ChunkStatus.LEASED:
                del self._delivered[chunk_id]

    # -- for the item server ---------------------------------------------------------------
    def preparing(self, chunk_id: str, key: str) -> bool:
        """Whether a connected dataworker still owes this item."""
        hold = self.holds.get(chunk_id)
        return hold is not None and key in hold.remaining

    def delivered(self, chunk_id: str, session_id: str, keys: Iterable[str]) -> None:
        """These items were sent to ``session_id``, which holds the chunk."""
        holder, sent = self._delivered.get(chunk_id, (session_id, set()))
        if holder != session_id:
            sent = set()
        sent.update(keys)
        self._delivered[chunk_id] = (session_id, sent)

    def _sent_to_holder(self, chunk_id: str) -> set[str]:
        """Keys the chunk's current holder already has (none once it changed hands)."""
        entry = self._delivered.get(chunk_id)
        if entry is None or self.book.leased_to(entry[0], chunk_id) is None:
            return set()
        return entry[1]

    def forget(self, chunk_id: str, keys: Iterable[str]) -> None:
        """The orchestrator served these items itself: no dataworker needs to send them."""
        hold = self.holds.get(chunk_id)
        if hold is not None:
            hold.remaining.difference_update(keys)

    async def wait_prepared(self, chunk_id: str, keys: list[str], timeout: float) -> None:
        """Wait until no dataworker owes any of ``keys`` (sent, or given up), at most
        ``timeout`` seconds."""

        deadline = time.monotonic() + timeout
        while any(self.preparing(chunk_id, k) for k in keys):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    def _notify(self) -> None:
        """Wake every waiting fetch (each re-checks what it waits for)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def describe(self, session_id: str) -> str:
        """The chunk a dataworker prepares now, for monitors."""
        held = self._by_session.get(session_id)
        return min(held) if held else ""
