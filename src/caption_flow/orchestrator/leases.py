"""Chunk bookkeeping as plain logic: lease, heartbeat, complete, expire, re-lease.

No I/O and no clock of its own (callers pass ``now``), so it is tested with property tests.
The server mirrors every change it makes here into the state database.

Item ids of a chunk are contiguous (``first_item .. first_item + count``). Completion is per
item; a re-leased chunk carries only its missing items. A result is checked against the lease
when it arrives (:meth:`ChunkBook.accept`), its new items are held as in flight until the store
has committed them (:meth:`commit`), so the same item is never written twice.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from caption_flow.errors import NotLeasedError

# Holds chunks that were leased when the previous orchestrator process stopped, so that
# their workers can reclaim them after reconnecting instead of racing newcomers for them.
RECLAIM_HOLDER = "(awaiting reconnect)"


class ChunkStatus(str, enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Chunk:
    chunk_id: str
    shard: str
    first_item: int
    count: int
    done: set[int] = field(default_factory=set)
    inflight: set[int] = field(default_factory=set)
    status: ChunkStatus = ChunkStatus.PENDING
    holder: str | None = None
    deadline: float = 0.0
    attempts: int = 0
    reason: str | None = None

    def item_ids(self) -> range:
        return range(self.first_item, self.first_item + self.count)

    def missing(self) -> list[int]:
        """Items neither committed nor on their way to the store."""
        if not self.done and not self.inflight:
            return list(self.item_ids())
        taken = self.done | self.inflight
        return [i for i in self.item_ids() if i not in taken]

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.count


@dataclass(frozen=True)
class Lease:
    chunk_id: str
    shard: str
    item_ids: list[int]
    deadline: float


@dataclass(frozen=True)
class Expiry:
    chunk_id: str
    holder: str
    failed: bool
    attempts: int


class ChunkBook:
    """Every chunk of a dataset and who holds which. One instance per orchestrator."""

    def __init__(self, lease_seconds: float, max_attempts: int) -> None:
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.chunks: dict[str, Chunk] = {}
        # The lease queue: a deque with lazy deletion (an id popped that is no longer in
        # ``_queued`` is skipped), so leasing and releasing stay O(1) at any dataset size.
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._held: dict[str, set[str]] = {}  # session -> chunk ids
        self.items_total = 0
        self.items_done = 0

    # -- building -----------------------------------------------------------------------
    def add_chunk(
        self,
        chunk_id: str,
        shard: str,
        first_item: int,
        count: int,
        done_ids: Iterable[int] = (),
        attempts: int = 0,
        failed_reason: str | None = None,
    ) -> Chunk:
        chunk = Chunk(chunk_id, shard, first_item, count, done=set(done_ids), attempts=attempts)
        self.chunks[chunk_id] = chunk
        self.items_total += count
        self.items_done += len(chunk.done)
        if chunk.complete:
            chunk.status = ChunkStatus.DONE
            chunk.done = set()
        elif failed_reason is not None:
            chunk.status = ChunkStatus.FAILED
            chunk.reason = failed_reason
        else:
            self._enqueue(chunk_id)
        return chunk

    def _enqueue(self, chunk_id: str, front: bool = False) -> None:
        if chunk_id not in self._queued:
            self._queued.add(chunk_id)
            if front:
                self._queue.appendleft(chunk_id)
            else:
                self._queue.append(chunk_id)

    # -- leasing --------------------------------------------------------------------------
    def lease(self, session: str, count: int, now: float) -> list[Lease]:
        """Lease up to ``count`` pending chunks to ``session``, oldest first."""
        leases: list[Lease] = []
        while self._queue and len(leases) < count:
            chunk_id = self._queue.popleft()
            if chunk_id not in self._queued:
                continue  # taken by a claim or finished since it was queued
            self._queued.discard(chunk_id)
            chunk = self.chunks[chunk_id]
            missing = chunk.missing()
            if not missing:  # everything is in flight; the commit will finish it
                continue
            leases.append(self._grant(chunk, session, now, missing))
        return leases

    def claim(
        self, session: str, chunk_id: str, now: float, live: Container[str] = ()
    ) -> Lease | None:
        """A reconnecting worker takes back a chunk it held, unless a live session has it.

        ``live`` are the sessions still connected; a chunk leased to one of them stays there.
        """
        chunk = self.chunks.get(chunk_id)
        if chunk is None or chunk.status in (ChunkStatus.DONE, ChunkStatus.FAILED):
            return None
        if chunk.status is ChunkStatus.LEASED:
            assert chunk.holder is not None
            if chunk.holder in live:
                return None
            self._held.get(chunk.holder, set()).discard(chunk_id)
        else:
            self._queued.discard(chunk_id)
        missing = chunk.missing()
        return self._grant(chunk, session, now, missing)

    def _grant(self, chunk: Chunk, session: str, now: float, missing: list[int]) -> Lease:
        chunk.status = ChunkStatus.LEASED
        chunk.holder = session
        chunk.deadline = now + self.lease_seconds
        self._held.setdefault(session, set()).add(chunk.chunk_id)
        return Lease(chunk.chunk_id, chunk.shard, missing, chunk.deadline)

    def hold_for_reclaim(self, chunk_id: str, now: float) -> None:
        """Keep a chunk that was leased before a restart for its worker, for one lease time."""
        chunk = self.chunks[chunk_id]
        if chunk.status is ChunkStatus.PENDING:
            self._queued.discard(chunk_id)
            self._grant(chunk, RECLAIM_HOLDER, now, [])

    def heartbeat(self, session: str, now: float) -> None:
        """Extend every lease the session holds."""
        for chunk_id in self._held.get(session, ()):
            self.chunks[chunk_id].deadline = now + self.lease_seconds

    def held_by(self, session: str) -> set[str]:
        return set(self._held.get(session, ()))

    # -- results --------------------------------------------------------------------------
    def accept(self, session: str, chunk_id: str, item_ids: Iterable[int]) -> list[int]:
        """Check a result against the lease; return the item ids that are new.

        New ids become in flight until :meth:`commit` or :meth:`abort`. Raises
        NotLeasedError when the chunk is not leased to ``session`` or an id is not in it.
        """
        chunk = self.chunks.get(chunk_id)
        if chunk is None:
            raise NotLeasedError(f"unknown chunk {chunk_id!r}")
        if chunk.status is not ChunkStatus.LEASED or chunk.holder != session:
            raise NotLeasedError(f"chunk {chunk_id!r} is not leased to this session")
        end = chunk.first_item + chunk.count
        fresh: list[int] = []
        for item_id in item_ids:
            if not chunk.first_item <= item_id < end:
                raise NotLeasedError(f"item {item_id} is not part of chunk {chunk_id!r}")
            if item_id not in chunk.done and item_id not in chunk.inflight:
                chunk.inflight.add(item_id)
                fresh.append(item_id)
        return fresh

    def commit(self, chunk_id: str, item_ids: Iterable[int]) -> bool:
        """The store made these items durable. Returns True when the chunk became complete."""
        chunk = self.chunks[chunk_id]
        ids = list(item_ids)
        chunk.inflight.difference_update(ids)
        before = len(chunk.done)
        chunk.done.update(ids)
        self.items_done += len(chunk.done) - before
        if chunk.complete and chunk.status is not ChunkStatus.DONE:
            if chunk.holder is not None:
                self._held.get(chunk.holder, set()).discard(chunk_id)
            self._queued.discard(chunk_id)
            chunk.status = ChunkStatus.DONE
            chunk.holder = None
            chunk.done = set()
            chunk.inflight = set()
            return True
        return False

    def abort(self, chunk_id: str, item_ids: Iterable[int]) -> None:
        """The store failed to commit these items; they are missing again."""
        chunk = self.chunks[chunk_id]
        chunk.inflight.difference_update(item_ids)
        if chunk.status is ChunkStatus.PENDING:
            self._enqueue(chunk_id)

    # -- giving back ----------------------------------------------------------------------
    def release(self, session: str, chunk_id: str) -> bool:
        """A clean hand-back: the chunk goes to the front of the queue, no attempt counted."""
        chunk = self.chunks.get(chunk_id)
        if chunk is None or chunk.holder != session or chunk.status is not ChunkStatus.LEASED:
            return False
        self._unlease(chunk)
        self._enqueue(chunk_id, front=True)
        return True

    def release_all(self, session: str) -> list[str]:
        released = [c for c in sorted(self.held_by(session)) if self.release(session, c)]
        self._held.pop(session, None)
        return released

    def expire(self, now: float) -> list[Expiry]:
        """Leases past their deadline go back to the queue, or fail after max_attempts."""
        expired: list[Expiry] = []
        for session, chunk_ids in list(self._held.items()):
            for chunk_id in list(chunk_ids):
                chunk = self.chunks[chunk_id]
                if chunk.deadline > now:
                    continue
                self._unlease(chunk)
                if session != RECLAIM_HOLDER:  # a restart is not the chunk's fault
                    chunk.attempts += 1
                failed = chunk.attempts >= self.max_attempts
                if failed:
                    chunk.status = ChunkStatus.FAILED
                    chunk.reason = f"lease expired {chunk.attempts} times"
                else:
                    self._enqueue(chunk_id)
                expired.append(Expiry(chunk_id, session, failed, chunk.attempts))
            if not chunk_ids:
                self._held.pop(session, None)
        return expired

    def _unlease(self, chunk: Chunk) -> None:
        if chunk.holder is not None:
            self._held.get(chunk.holder, set()).discard(chunk.chunk_id)
        chunk.status = ChunkStatus.PENDING
        chunk.holder = None
        chunk.deadline = 0.0

    # -- views ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        by_status = {s.value: 0 for s in ChunkStatus}
        for chunk in self.chunks.values():
            by_status[chunk.status.value] += 1
        return by_status

    @property
    def finished(self) -> bool:
        """No chunk is pending or leased: nothing left to hand out or wait for."""
        return not self._queued and not any(self._held.values())
