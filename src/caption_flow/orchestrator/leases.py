"""Chunk bookkeeping as plain logic: lease, progress, complete, stall, expire, re-lease.

No I/O and no clock of its own (callers pass ``now``, a monotonic time), so it is tested with
property tests. The server mirrors every change it makes here into the state database.

Item ids of a chunk are contiguous (``first_item .. first_item + count``). Completion is per
item; a re-leased chunk carries only its missing items. A result is checked against the lease
when it arrives (:meth:`ChunkBook.accept`), its new items are held as in flight until the store
has committed them (:meth:`commit`) or failed to (:meth:`abort`), so the same item is never
written twice.

What a worker cannot do here, whatever it sends: hold more than ``max_chunks_per_session``
chunks; keep a lease without making progress for ``stall_seconds``; take a chunk that another
contributor (or another worker name) held; submit items outside its own lease.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Container, Iterable

from caption_flow.errors import NotLeasedError
from caption_flow.orchestrator.chunks import (
    RECLAIM_HOLDER,
    Accepted,
    Chunk,
    ChunkStatus,
    Expiry,
    Lease,
    owner_contributor,
)

__all__ = ["RECLAIM_HOLDER", "Accepted", "Chunk", "ChunkBook", "ChunkStatus", "Expiry", "Lease"]


class ChunkBook:
    """Every chunk of a dataset and who holds which. One instance per orchestrator."""

    def __init__(
        self,
        lease_seconds: float,
        max_attempts: int,
        *,
        stall_seconds: float = math.inf,
        max_chunks_per_session: int = 4,
        reconnect_seconds: float = 30.0,
        max_item_attempts: int = 3,
        attempts_per_contributor: int | None = None,
    ) -> None:
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.stall_seconds = stall_seconds
        self.max_chunks_per_session = max_chunks_per_session
        self.reconnect_seconds = min(reconnect_seconds, lease_seconds)
        self.max_item_attempts = max_item_attempts
        self.attempts_per_contributor = attempts_per_contributor or max_attempts
        self.chunks: dict[str, Chunk] = {}
        # The lease queue: a deque with lazy deletion (an id popped that is no longer in
        # ``_queued`` is skipped), so leasing and releasing stay O(1) at any dataset size.
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._held: dict[str, set[str]] = {}  # session -> chunk ids
        # Pending chunks left out of the queue because every missing item is on its way to
        # the store: the run is not finished until those commits are answered.
        self._settling: set[str] = set()
        self._progress: dict[str, float] = {}  # session -> last time it made progress
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
        item_attempts: dict[int, int] | None = None,
    ) -> Chunk:
        chunk = Chunk(chunk_id, shard, first_item, count, done=set(done_ids), attempts=attempts)
        chunk.item_attempts = dict(item_attempts or {})
        self.chunks[chunk_id] = chunk
        self.items_total += count
        self.items_done += len(chunk.done)
        if chunk.complete:
            self._mark_done(chunk)
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
    def lease(self, session: str, count: int, now: float, owner: str | None = None) -> list[Lease]:
        """Lease up to ``count`` pending chunks to ``session``, oldest first, never more than
        the per-session cap in all."""
        room = self.max_chunks_per_session - len(self._held.get(session, ()))
        leases: list[Lease] = []
        while self._queue and len(leases) < min(count, room):
            chunk_id = self._queue.popleft()
            if chunk_id not in self._queued:
                continue  # taken by a claim or finished since it was queued
            self._queued.discard(chunk_id)
            chunk = self.chunks[chunk_id]
            missing = chunk.missing()
            if not missing:  # everything is in flight; the commit will finish it
                self._settling.add(chunk_id)
                continue
            chunk.progress_at = now
            leases.append(self._grant(chunk, session, owner, now, missing))
        return leases

    def upcoming(self, count: int) -> list[str]:
        """The next ``count`` chunks the queue will lease (to prepare their items ahead)."""
        ahead: list[str] = []
        for chunk_id in self._queue:
            if len(ahead) >= count:
                break
            if chunk_id in self._queued:
                ahead.append(chunk_id)
        return ahead

    def claim(
        self,
        session: str,
        chunk_id: str,
        now: float,
        live: Container[str] = (),
        owner: str | None = None,
    ) -> Lease | None:
        """A reconnecting worker takes back a chunk it held.

        Only a chunk still leased (to a session now gone, or held for reconnects after a
        restart), only by the same ``owner`` (contributor and worker name), and never from
        a session in ``live``. The chunk keeps its progress clock: reconnecting does not
        reset a stall.
        """
        chunk = self.chunks.get(chunk_id)
        if chunk is None or chunk.status is not ChunkStatus.LEASED:
            return None
        if chunk.owner is None or chunk.owner != owner or chunk.holder in live:
            return None
        if len(self._held.get(session, ())) >= self.max_chunks_per_session:
            return None
        assert chunk.holder is not None
        self._drop_holding(chunk.holder, chunk_id)
        return self._grant(chunk, session, owner, now, chunk.missing())

    def _grant(
        self, chunk: Chunk, session: str, owner: str | None, now: float, missing: list[int]
    ) -> Lease:
        chunk.status = ChunkStatus.LEASED
        chunk.holder = session
        chunk.owner = owner
        chunk.deadline = now + self.lease_seconds
        chunk.granted = set(missing)
        self._held.setdefault(session, set()).add(chunk.chunk_id)
        return Lease(chunk.chunk_id, chunk.shard, missing, chunk.deadline)

    def hold_for_reclaim(self, chunk_id: str, owner: str | None, now: float) -> None:
        """Keep a chunk that was leased before a restart for its worker, for the reconnect
        window only: a fleet must not idle for a whole lease time after a crash."""
        chunk = self.chunks[chunk_id]
        if chunk.status is ChunkStatus.PENDING:
            self._queued.discard(chunk_id)
            self._grant(chunk, RECLAIM_HOLDER, owner, now, [])
            chunk.deadline = now + self.reconnect_seconds
            chunk.progress_at = now

    def disconnected(self, session: str, now: float) -> None:
        """The session's connection is gone: its leases last only the reconnect window."""
        self._progress.pop(session, None)
        for chunk_id in self._held.get(session, ()):
            chunk = self.chunks[chunk_id]
            chunk.deadline = min(chunk.deadline, now + self.reconnect_seconds)

    def heartbeat(self, session: str, now: float) -> None:
        """Extend the session's leases, but only those that are making progress."""
        for chunk_id in self._held.get(session, ()):
            chunk = self.chunks[chunk_id]
            if not self._stalled(chunk, now):
                chunk.deadline = now + self.lease_seconds

    def _stalled(self, chunk: Chunk, now: float) -> bool:
        """No result for the chunk, nor from its holder for any chunk, for stall_seconds. (A
        worker's prefetched chunk waits while it works on another: that is not a stall.)"""
        last = chunk.progress_at
        if chunk.holder is not None:
            last = max(last, self._progress.get(chunk.holder, last))
        return now - last > self.stall_seconds

    def held_by(self, session: str) -> set[str]:
        return set(self._held.get(session, ()))

    # -- results --------------------------------------------------------------------------
    def accept(
        self, session: str, chunk_id: str, item_ids: Iterable[int], now: float = 0.0
    ) -> Accepted:
        """Check a result against the lease and sort its item ids.

        Raises NotLeasedError when the chunk is not leased to ``session`` or an id is not in
        it. An id repeated within one message counts once.
        """
        chunk = self.chunks.get(chunk_id)
        if chunk is None:
            raise NotLeasedError(f"unknown chunk {chunk_id!r}")
        if chunk.status is not ChunkStatus.LEASED or chunk.holder != session:
            raise NotLeasedError(f"chunk {chunk_id!r} is not leased to this session")
        end = chunk.first_item + chunk.count
        ids = list(dict.fromkeys(item_ids))
        for item_id in ids:
            if not chunk.first_item <= item_id < end:
                raise NotLeasedError(f"item {item_id} is not part of chunk {chunk_id!r}")
        fresh: list[int] = []
        pending: list[int] = []
        duplicates = 0
        for item_id in ids:
            if item_id in chunk.done:
                duplicates += 1
            elif item_id in chunk.inflight:
                pending.append(item_id)
            else:
                chunk.inflight.add(item_id)
                fresh.append(item_id)
        if fresh:
            chunk.progress_at = now
            self._progress[session] = now
        return Accepted(fresh, pending, duplicates)

    def item_attempts(self, chunk_id: str, item_id: int) -> int:
        """Failed tries of one item so far, across workers."""
        return self.chunks[chunk_id].item_attempts.get(item_id, 0)

    def final_failure(self, chunk_id: str, item_id: int) -> bool:
        """Whether one more failure of this item makes it final (stored with its error)."""
        return self.item_attempts(chunk_id, item_id) + 1 >= self.max_item_attempts

    def commit(
        self, chunk_id: str, item_ids: Iterable[int], retry_ids: Iterable[int] = ()
    ) -> ChunkStatus | None:
        """The store made ``item_ids`` durable and counted a failed try of ``retry_ids``.

        Returns the chunk's new status when this changed it: DONE when it became complete,
        PENDING when its lease is used up but items are still missing (failed tries to retry,
        or a commit that failed), so it is queued again with only those items.
        """
        chunk = self.chunks[chunk_id]
        ids = list(item_ids)
        retries = list(retry_ids)
        chunk.inflight.difference_update(ids)
        chunk.inflight.difference_update(retries)
        chunk.granted.difference_update(ids)
        chunk.granted.difference_update(retries)
        for item_id in retries:
            chunk.item_attempts[item_id] = chunk.item_attempts.get(item_id, 0) + 1
        if chunk.status is ChunkStatus.DONE:
            return None
        before = len(chunk.done)
        chunk.done.update(ids)
        self.items_done += len(chunk.done) - before
        if chunk.complete:
            if chunk.holder is not None:
                self._drop_holding(chunk.holder, chunk_id)
            self._queued.discard(chunk_id)
            self._settling.discard(chunk_id)
            self._mark_done(chunk)
            return ChunkStatus.DONE
        self._settle_pending(chunk)
        return self._requeue_if_used_up(chunk)

    def abort(self, chunk_id: str, item_ids: Iterable[int]) -> ChunkStatus | None:
        """The store failed to commit these items; they are missing again, whatever state the
        chunk is in now (it may have been re-leased while the commit ran)."""
        chunk = self.chunks[chunk_id]
        chunk.inflight.difference_update(item_ids)
        self._settle_pending(chunk)
        return self._requeue_if_used_up(chunk)

    def requeue_items(self, chunk_id: str, item_ids: Iterable[int]) -> ChunkStatus | None:
        """Items the store set aside (quarantined) are missing again: caption them anew."""
        chunk = self.chunks.get(chunk_id)
        if chunk is None:
            return None
        ids = [i for i in item_ids if chunk.first_item <= i < chunk.first_item + chunk.count]
        for item_id in ids:
            chunk.item_attempts.pop(item_id, None)
        if chunk.status is ChunkStatus.DONE:
            chunk.done = set(chunk.item_ids())
            chunk.status = ChunkStatus.PENDING
        before = len(chunk.done)
        chunk.done.difference_update(ids)
        self.items_done -= before - len(chunk.done)
        if chunk.status is ChunkStatus.PENDING:
            self._enqueue(chunk_id, front=True)
            return ChunkStatus.PENDING
        return self._requeue_if_used_up(chunk)

    def _settle_pending(self, chunk: Chunk) -> None:
        """A pending chunk out of the queue (its last items were in flight) goes back in
        once something is missing again."""
        if chunk.status is ChunkStatus.PENDING:
            if chunk.missing():
                self._settling.discard(chunk.chunk_id)
                self._enqueue(chunk.chunk_id)
            elif not chunk.inflight:
                self._settling.discard(chunk.chunk_id)

    def revive(self, chunk_id: str) -> bool:
        """A failed chunk gets a clean slate of attempts and goes back to the queue."""
        chunk = self.chunks.get(chunk_id)
        if chunk is None or chunk.status is not ChunkStatus.FAILED:
            return False
        chunk.status = ChunkStatus.PENDING
        chunk.attempts = 0
        chunk.failures = {}
        chunk.reason = None
        self._settle_pending(chunk)
        return True

    def _requeue_if_used_up(self, chunk: Chunk) -> ChunkStatus | None:
        if chunk.status is ChunkStatus.LEASED and not chunk.granted and not chunk.inflight:
            self._unlease(chunk)
            self._enqueue(chunk.chunk_id, front=True)
            return ChunkStatus.PENDING
        return None

    def _mark_done(self, chunk: Chunk) -> None:
        chunk.status = ChunkStatus.DONE
        chunk.holder = None
        chunk.owner = None
        chunk.done = set()  # a done chunk's items are all done: no need to keep them
        chunk.inflight = set()
        chunk.granted = set()
        chunk.item_attempts = {}

    def leased_to(self, session: str, chunk_id: str) -> Chunk | None:
        """The chunk, while it is leased to ``session``; None otherwise."""
        chunk = self.chunks.get(chunk_id)
        if chunk is None or chunk.status is not ChunkStatus.LEASED or chunk.holder != session:
            return None
        return chunk

    # -- giving back ----------------------------------------------------------------------
    def release(self, session: str, chunk_id: str, reason: str = "") -> Expiry | None:
        """The holder gives a chunk back. Without a reason (a clean stop) it goes to the front
        of the queue at no cost; with one it counts as an attempt, and fails the chunk after
        ``max_attempts``."""
        chunk = self.leased_to(session, chunk_id)
        if chunk is None:
            return None
        self._unlease(chunk)
        if not reason:
            self._enqueue(chunk_id, front=True)
            return Expiry(chunk_id, session, False, chunk.attempts)
        return self._count_attempt(chunk, session, f"released: {reason}")

    def release_all(self, session: str) -> list[str]:
        released = [c for c in sorted(self.held_by(session)) if self.release(session, c)]
        self._held.pop(session, None)
        self._progress.pop(session, None)
        return released

    def expire(self, now: float) -> list[Expiry]:
        """Leases past their deadline, or stalled, go back to the queue (or fail after
        max_attempts)."""
        expired: list[Expiry] = []
        for session, chunk_ids in list(self._held.items()):
            for chunk_id in list(chunk_ids):
                chunk = self.chunks[chunk_id]
                stalled = session != RECLAIM_HOLDER and self._stalled(chunk, now)
                if chunk.deadline > now and not stalled:
                    continue
                self._unlease(chunk)
                if session == RECLAIM_HOLDER:  # a restart is not the chunk's fault
                    self._enqueue(chunk_id)
                    expired.append(Expiry(chunk_id, session, False, chunk.attempts))
                    continue
                why = "no progress" if stalled else "lease expired"
                expiry = self._count_attempt(chunk, session, why)
                expired.append(
                    Expiry(chunk_id, session, expiry.failed, expiry.attempts, stalled=stalled)
                )
            if not self._held.get(session):
                self._held.pop(session, None)
        return expired

    def _count_attempt(self, chunk: Chunk, session: str, why: str) -> Expiry:
        """One more failed lease; only ``attempts_per_contributor`` of them per contributor
        count towards failing the chunk."""
        contributor = owner_contributor(chunk.owner)
        failures = chunk.failures.get(contributor, 0) + 1
        chunk.failures[contributor] = failures
        if failures <= self.attempts_per_contributor:
            chunk.attempts += 1
        failed = chunk.attempts >= self.max_attempts
        if failed:
            chunk.status = ChunkStatus.FAILED
            chunk.reason = f"{why} ({chunk.attempts} attempts)"
        else:
            self._enqueue(chunk.chunk_id)
        return Expiry(chunk.chunk_id, session, failed, chunk.attempts)

    def _unlease(self, chunk: Chunk) -> None:
        if chunk.holder is not None:
            self._drop_holding(chunk.holder, chunk.chunk_id)
        chunk.status = ChunkStatus.PENDING
        chunk.holder = None
        chunk.deadline = 0.0
        chunk.granted = set()

    def _drop_holding(self, session: str, chunk_id: str) -> None:
        held = self._held.get(session)
        if held is not None:
            held.discard(chunk_id)
            if not held:
                del self._held[session]

    # -- views ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        by_status = {s.value: 0 for s in ChunkStatus}
        for chunk in self.chunks.values():
            by_status[chunk.status.value] += 1
        return by_status

    @property
    def finished(self) -> bool:
        """No chunk is pending or leased: nothing left to hand out or wait for."""
        return not self._queued and not self._held and not self._settling
