"""What the orchestrator does with a worker's messages: lease, reclaim, results, release.

Work leaves only through :meth:`WorkerDesk.on_request` (and reclaims in :meth:`resume`) and
comes back only through :meth:`WorkerDesk.on_results`, which acknowledges after the store has
committed. Every decision about who may hold what is the chunk book's; this module checks
the job-dependent limits, talks to the store and answers the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

from caption_flow import faults
from caption_flow.errors import NotLeasedError, StorageError
from caption_flow.orchestrator.activity import ActivityLog
from caption_flow.orchestrator.leases import RECLAIM_HOLDER, ChunkBook, ChunkStatus, Expiry, Lease
from caption_flow.orchestrator.results import JobRules, build_batch, check_items, first_per_id
from caption_flow.orchestrator.sessions import Session
from caption_flow.orchestrator.stats import RateMeter
from caption_flow.protocol.messages import (
    Ack,
    Assign,
    ChunkLease,
    Heartbeat,
    ItemRef,
    ItemResult,
    Reject,
    Results,
)
from caption_flow.storage.rows import NO_TEXT, is_failure
from caption_flow.storage.state import ChunkState
from caption_flow.storage.store import CaptionStore

if TYPE_CHECKING:
    from caption_flow.config.models import OrchestratorConfig

log = logging.getLogger(__name__)

# How often a result waits for an earlier, still uncommitted copy of the same items before
# the worker is told to resend later.
PENDING_ROUNDS = 3


def owner_of(session: Session) -> str:
    """Who may reclaim a session's chunks after a reconnect: same token, same worker name."""
    return f"{session.identity.contributor}/{session.name}"


class WorkerDesk:
    def __init__(
        self,
        config: OrchestratorConfig,
        book: ChunkBook,
        store: CaptionStore,
        rules: Callable[[], JobRules],
        live_sessions: Callable[[], Container[str]],
        on_change: Callable[[], None],
        activity: ActivityLog,
    ) -> None:
        self.config = config
        self.book = book
        self.store = store
        self.rules = rules  # what results may contain under the current job
        self.live_sessions = live_sessions
        self.on_change = on_change  # the book may have finished
        self.rate = RateMeter()
        self.activity = activity
        self._lease_keys: dict[str, dict[int, str]] = {}

    # -- chunk states for the database --------------------------------------------------
    def state(self, chunk_id: str) -> ChunkState:
        """A chunk as the book sees it; the deadline as wall-clock time, for people."""
        c = self.book.chunks[chunk_id]
        deadline = time.time() + (c.deadline - time.monotonic()) if c.deadline else None
        holder = c.owner if c.status is ChunkStatus.LEASED else None
        return ChunkState(chunk_id, c.status.value, c.attempts, c.reason, holder, deadline)

    async def save(self, chunk_ids: list[str]) -> None:
        if chunk_ids:
            await self.store.commit(chunk_states=[self.state(c) for c in chunk_ids])

    # -- work out -------------------------------------------------------------------------
    async def on_request(self, session: Session, count: int) -> None:
        count = max(1, min(count, self.config.chunks_per_request))
        leases = self.book.lease(session.session_id, count, time.monotonic(), owner_of(session))
        if not leases:
            await session.send(Assign(finished=self.book.finished, retry_after=1.0))
            return
        chunks = [self._chunk_payload(lease) for lease in leases]
        await self.save([c.chunk_id for c in chunks])
        await session.send(Assign(chunks=chunks))

    def _keys_for(self, lease: Lease) -> dict[int, str]:
        """The leased items' keys, kept while the chunk is leased: result rows take their keys
        from here, never from what a worker sends."""
        keys = self._lease_keys.get(lease.chunk_id)
        if keys is None or any(i not in keys for i in lease.item_ids):
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
            deadline=time.time() + (lease.deadline - time.monotonic()),
        )

    def leased_keys(self, session: Session, chunk_id: str) -> tuple[str, set[str]] | None:
        """A chunk's shard and the keys of its items still leased to ``session`` (what it
        may fetch over the connection), or None when the chunk is not leased to it."""
        chunk = self.book.leased_to(session.session_id, chunk_id)
        if chunk is None:
            return None
        keys = self._lease_keys.get(chunk_id)
        return (chunk.shard, set(keys.values())) if keys is not None else None

    async def resume(self, session: Session, held: list[str]) -> list[str]:
        """Give a reconnecting worker back the chunks it held, where that is still its own."""
        resumed = []
        for chunk_id in held:
            lease = self.book.claim(
                session.session_id,
                chunk_id,
                time.monotonic(),
                live=self.live_sessions(),
                owner=owner_of(session),
            )
            if lease is not None:
                self._keys_for(lease)
                resumed.append(chunk_id)
        await self.save(resumed)
        return resumed

    async def on_release(self, session: Session, chunk_id: str, reason: str) -> None:
        expiry = self.book.release(session.session_id, chunk_id, reason)
        if expiry is None:
            return
        if reason:
            log.warning("%s gave back %s: %s", session.name, chunk_id, reason[:200])
            self._note("failure", f"{session.name} gave back {chunk_id}: {reason}")
        self._forget(expiry)
        await self.save([chunk_id])
        self.on_change()

    def on_heartbeat(self, session: Session, message: Heartbeat) -> None:
        """Extend the session's leases and keep what it reports for monitors; the chunk it
        names is shown only while it is leased to this very session."""
        now = time.monotonic()
        session.stats = dict(message.stats)
        session.last_heartbeat = now
        ours = self.book.leased_to(session.session_id, message.chunk) is not None
        session.current_chunk = message.chunk if ours else ""
        self.book.heartbeat(session.session_id, now)

    def _note(self, kind: str, text: str) -> None:
        self.activity.add(kind, text, time.time())

    def disconnected(self, session: Session) -> None:
        self.book.disconnected(session.session_id, time.monotonic())

    async def expire(self) -> None:
        expired = self.book.expire(time.monotonic())
        for e in expired:
            self._forget(e)
            if e.holder != RECLAIM_HOLDER or e.failed:
                log.warning(
                    "lease of %s %s (attempt %d%s)",
                    e.chunk_id,
                    "revoked: no progress" if e.stalled else "expired",
                    e.attempts,
                    ", chunk failed" if e.failed else "",
                )
                self._note(
                    "failure" if e.failed else "lease",
                    f"lease of {e.chunk_id} {'revoked: no progress' if e.stalled else 'expired'}"
                    f" (attempt {e.attempts}{', chunk failed' if e.failed else ''})",
                )
        await self.save([e.chunk_id for e in expired])
        if expired:
            self.on_change()

    def _forget(self, expiry: Expiry) -> None:
        chunk = self.book.chunks[expiry.chunk_id]
        if chunk.status is not ChunkStatus.LEASED:
            self._lease_keys.pop(expiry.chunk_id, None)

    def requeue(self, chunk_id: str, item_ids: list[int], reason: str) -> None:
        """The store set these items aside (quarantine): they are missing again."""
        log.error("%d items of %s set aside (%s); re-queued", len(item_ids), chunk_id, reason)
        self._note("failure", f"{len(item_ids)} items of {chunk_id} set aside: {reason}")
        self.book.requeue_items(chunk_id, item_ids)
        self._lease_keys.pop(chunk_id, None)

    # -- results in -----------------------------------------------------------------------
    async def on_results(self, session: Session, results: Results) -> None:
        """Store what is new, then acknowledge; refuse what is not this session's to send."""
        by_id = first_per_id(results.items)
        reason = check_items(by_id.values(), self.rules())
        if reason is None:
            try:
                accepted, duplicates = await self._store_results(session, results, by_id)
            except NotLeasedError as exc:
                reason = str(exc)
        if reason is not None:
            self._note("failure", f"results of {session.name} for {results.chunk_id}: {reason}")
            await session.send(Reject(seq=results.seq, reason=reason))
            return
        faults.reach(faults.RESULTS_COMMITTED)
        await session.send(Ack(seq=results.seq, accepted=accepted, duplicates=duplicates))
        self.on_change()

    async def _store_results(
        self, session: Session, results: Results, by_id: dict[int, ItemResult]
    ) -> tuple[int, int]:
        """Commit the new items; wait for copies already on their way to the store, so that a
        duplicate is acknowledged only once its original is durable."""
        ids = list(by_id)
        accepted = duplicates = 0
        for _ in range(PENDING_ROUNDS):
            decision = self.book.accept(session.session_id, results.chunk_id, ids, time.monotonic())
            duplicates += decision.duplicates
            if decision.fresh:
                accepted += await self._commit(session, results, by_id, decision.fresh)
            if not decision.pending:
                return accepted, duplicates
            await self.store.commit()  # a barrier: every earlier group has finished
            ids = decision.pending
        raise StorageError("earlier copies of these results are still not stored")

    async def _commit(
        self, session: Session, results: Results, by_id: dict[int, ItemResult], fresh: list[int]
    ) -> int:
        chunk = self.book.chunks[results.chunk_id]
        batch = build_batch(
            results,
            by_id,
            fresh,
            final_failure=lambda item_id: self.book.final_failure(results.chunk_id, item_id),
            keys=self._lease_keys.get(results.chunk_id, {}),
            dataset=self.config.dataset.label,
            shard=chunk.shard,
            contributor=session.identity.contributor,
            worker=session.name,
        )
        try:
            await self.store.commit([batch])
        except Exception:
            if self.book.abort(results.chunk_id, fresh) is not None:
                await self.save([results.chunk_id])
            raise
        keys = self._lease_keys.get(results.chunk_id, {})
        if batch.failed:
            self._note("failure", f"{batch.failed} items of {results.chunk_id} failed")
        for item_id in batch.item_ids if batch.failed else ():  # stored failures, named at -v
            item = by_id[item_id]
            if is_failure(item.error, item.outputs):
                log.info("item %s failed: %s", keys.get(item_id, item.key), item.error or NO_TEXT)
        changed = self.book.commit(results.chunk_id, batch.item_ids, batch.retry_ids)
        if changed is ChunkStatus.DONE:  # the results' own transaction marked it done
            self._lease_keys.pop(results.chunk_id, None)
        elif changed is not None:
            await self.save([results.chunk_id])
        session.items_done += len(batch.item_ids)
        self.rate.add(len(batch.item_ids))
        return len(batch.item_ids)
