"""Chunk bookkeeping as pure logic: examples first, then a hypothesis state machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from caption_flow.config.models import OrchestratorConfig
from caption_flow.errors import NotLeasedError
from caption_flow.orchestrator.dataset_index import build_book
from caption_flow.orchestrator.leases import RECLAIM_HOLDER, ChunkBook, ChunkStatus
from caption_flow.storage.state import ChunkState, StateDB


def make_book(chunks: int = 3, size: int = 4, lease: float = 10.0, attempts: int = 3) -> ChunkBook:
    book = ChunkBook(lease_seconds=lease, max_attempts=attempts)
    for c in range(chunks):
        book.add_chunk(f"s:{c}", "s", c * size, size)
    return book


def test_lease_gives_oldest_chunks_with_deadlines() -> None:
    book = make_book()
    leases = book.lease("w1", 2, now=100.0)
    assert [lease.chunk_id for lease in leases] == ["s:0", "s:1"]
    assert leases[0].item_ids == [0, 1, 2, 3]
    assert leases[0].deadline == 110.0
    assert book.lease("w2", 5, now=100.0)[0].chunk_id == "s:2"
    assert book.lease("w3", 1, now=100.0) == []


def test_partial_completion_then_expiry_re_leases_only_missing_items() -> None:
    book = make_book(chunks=1)
    book.lease("w1", 1, now=0.0)
    assert book.accept("w1", "s:0", [0, 2]).fresh == [0, 2]
    book.commit("s:0", [0, 2])
    expired = book.expire(now=11.0)
    assert [(e.chunk_id, e.failed) for e in expired] == [("s:0", False)]
    lease = book.lease("w2", 1, now=12.0)[0]
    assert lease.item_ids == [1, 3]
    with pytest.raises(NotLeasedError):
        book.accept("w1", "s:0", [1])


def test_heartbeat_extends_leases() -> None:
    book = make_book(chunks=1)
    book.lease("w1", 1, now=0.0)
    book.heartbeat("w1", now=8.0)
    assert book.expire(now=12.0) == []
    assert len(book.expire(now=18.1)) == 1


def test_duplicate_results_are_not_fresh() -> None:
    book = make_book(chunks=1)
    book.lease("w1", 1, now=0.0)
    assert book.accept("w1", "s:0", [0, 1]).fresh == [0, 1]
    second = book.accept("w1", "s:0", [1, 2, 2])  # 1 is in flight; 2 repeated counts once
    assert (second.fresh, second.pending) == ([2], [1])
    book.commit("s:0", [0, 1, 2])
    third = book.accept("w1", "s:0", [0, 3])
    assert (third.fresh, third.duplicates) == ([3], 1)
    assert book.commit("s:0", [3]) is ChunkStatus.DONE
    assert book.chunks["s:0"].status is ChunkStatus.DONE
    assert book.finished


def test_items_outside_the_chunk_are_rejected() -> None:
    book = make_book(chunks=2)
    book.lease("w1", 1, now=0.0)
    with pytest.raises(NotLeasedError):
        book.accept("w1", "s:0", [4])  # belongs to s:1
    with pytest.raises(NotLeasedError):
        book.accept("w1", "s:1", [4])  # not leased to w1


def test_chunk_fails_after_max_attempts() -> None:
    book = make_book(chunks=1, attempts=2)
    book.lease("w1", 1, now=0.0)
    book.expire(now=20.0)
    book.lease("w2", 1, now=20.0)
    expired = book.expire(now=40.0)
    assert expired[0].failed
    assert book.chunks["s:0"].status is ChunkStatus.FAILED
    assert book.lease("w3", 1, now=41.0) == []
    assert book.finished


def test_release_puts_chunk_first_without_counting_an_attempt() -> None:
    book = make_book(chunks=2)
    book.lease("w1", 2, now=0.0)
    assert book.release("w1", "s:1")
    assert book.chunks["s:1"].attempts == 0
    assert book.lease("w2", 1, now=1.0)[0].chunk_id == "s:1"


def test_claim_moves_a_held_chunk_to_the_reconnected_session() -> None:
    book = make_book(chunks=2)
    book.lease("old", 1, now=0.0, owner="alice/w")
    # Another contributor (or another worker name) cannot take it, nor a pending chunk.
    assert book.claim("mallory", "s:0", now=1.0, owner="mallory/w") is None
    assert book.claim("mallory", "s:0", now=1.0, owner="alice/other") is None
    assert book.claim("new", "s:1", now=1.0, owner="alice/w") is None
    lease = book.claim("new", "s:0", now=1.0, owner="alice/w")
    assert lease is not None and lease.item_ids == [0, 1, 2, 3]
    with pytest.raises(NotLeasedError):
        book.accept("old", "s:0", [0])
    assert book.accept("new", "s:0", [0]).fresh == [0]
    assert book.held_by("old") == set()
    # A chunk that a connected session holds is not taken from it.
    assert book.claim("third", "s:0", now=2.0, live={"new"}, owner="alice/w") is None
    assert book.held_by("new") == {"s:0"}


def test_loading_completed_items_from_the_database() -> None:
    book = ChunkBook(10.0, 3)
    book.add_chunk("s:0", "s", 0, 3, done_ids=[0, 1, 2])
    book.add_chunk("s:1", "s", 3, 3, done_ids=[4])
    assert book.items_done == 4
    assert book.chunks["s:0"].status is ChunkStatus.DONE
    assert book.lease("w", 5, now=0.0)[0].item_ids == [3, 5]


class BookMachine(RuleBasedStateMachine):
    """Random interleavings of every operation, with accept, commit, commit failure, expiry,
    stall, claim and re-queue as separate steps; invariants checked after each step."""

    SESSIONS = ("a", "b", "c")
    OWNERS = {"a": "alice/1", "b": "alice/2", "c": "bob/1"}

    def __init__(self) -> None:
        super().__init__()
        self.book = ChunkBook(
            10.0,
            3,
            stall_seconds=25.0,
            max_chunks_per_session=2,
            reconnect_seconds=5.0,
            max_item_attempts=2,
        )
        for c in range(4):
            self.book.add_chunk(f"s:{c}", "s", c * 5, 5)
        self.now = 0.0
        self.committed: set[int] = set()
        self.in_flight: list[tuple[str, list[int]]] = []

    @rule(session=st.sampled_from(SESSIONS), count=st.integers(1, 3))
    def lease(self, session: str, count: int) -> None:
        for lease in self.book.lease(session, count, self.now, self.OWNERS[session]):
            assert lease.item_ids, "a lease always carries work"
            assert not set(lease.item_ids) & self.committed, "finished items are never re-leased"
            in_flight = {i for _, ids in self.in_flight for i in ids}
            assert not set(lease.item_ids) & in_flight, "items on their way are not re-leased"

    @rule(session=st.sampled_from(SESSIONS), data=st.data())
    def accept(self, session: str, data: st.DataObject) -> None:
        held = sorted(self.book.held_by(session))
        if not held:
            return
        chunk_id = data.draw(st.sampled_from(held))
        chunk = self.book.chunks[chunk_id]
        ids = data.draw(st.lists(st.sampled_from(list(chunk.item_ids())), max_size=6))
        decision = self.book.accept(session, chunk_id, ids, self.now)
        assert not set(decision.fresh) & self.committed
        assert len(set(decision.fresh)) == len(decision.fresh)
        self.in_flight.append((chunk_id, decision.fresh))

    @rule(data=st.data())
    def store_answers(self, data: st.DataObject) -> None:
        """The store finishes one in-flight commit: durable, failed items retried, or failed."""
        if not self.in_flight:
            return
        chunk_id, ids = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        outcome = data.draw(st.sampled_from(["commit", "retry", "abort"]))
        if outcome == "abort":
            self.book.abort(chunk_id, ids)
            return
        retry = [i for i in ids if outcome == "retry" and not self.book.final_failure(chunk_id, i)]
        done = [i for i in ids if i not in retry]
        self.book.commit(chunk_id, done, retry)
        self.committed.update(done)

    @rule(session=st.sampled_from(SESSIONS))
    def heartbeat(self, session: str) -> None:
        self.book.heartbeat(session, self.now)

    @rule(session=st.sampled_from(SESSIONS))
    def disconnect_cleanly(self, session: str) -> None:
        self.book.release_all(session)

    @rule(session=st.sampled_from(SESSIONS))
    def connection_drops(self, session: str) -> None:
        self.book.disconnected(session, self.now)

    @rule(session=st.sampled_from(SESSIONS), data=st.data())
    def give_back_with_reason(self, session: str, data: st.DataObject) -> None:
        held = sorted(self.book.held_by(session))
        if held:
            self.book.release(session, data.draw(st.sampled_from(held)), "reader failed")

    @rule(session=st.sampled_from(SESSIONS), data=st.data())
    def reconnect_and_claim(self, session: str, data: st.DataObject) -> None:
        chunk_id = data.draw(st.sampled_from(sorted(self.book.chunks)))
        chunk = self.book.chunks[chunk_id]
        before = (chunk.status, chunk.holder, chunk.owner)
        live = data.draw(st.sets(st.sampled_from(self.SESSIONS)))
        new = f"{session}'"
        lease = self.book.claim(new, chunk_id, self.now, live=live, owner=self.OWNERS[session])
        if lease is not None:
            assert before[0] is ChunkStatus.LEASED and before[1] not in live
            assert before[2] == self.OWNERS[session], "only the same owner reclaims"
            self.book.release_all(new)  # the reconnected session stops at once

    @rule(data=st.data())
    def quarantine(self, data: st.DataObject) -> None:
        """The store set committed items aside: they must be captioned again."""
        if not self.committed:
            return
        item = data.draw(st.sampled_from(sorted(self.committed)))
        chunk_id = f"s:{item // 5}"
        if any(item in ids for _, ids in self.in_flight):
            return
        self.book.requeue_items(chunk_id, [item])
        self.committed.discard(item)

    @rule(seconds=st.floats(0.0, 15.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.book.expire(self.now)
        for chunk in self.book.chunks.values():
            if chunk.status is ChunkStatus.LEASED and chunk.holder != RECLAIM_HOLDER:
                assert chunk.deadline > self.now, "an expired lease was left in place"
                assert not self.book._stalled(chunk, self.now), "a stalled lease was kept"

    @invariant()
    def each_chunk_has_at_most_one_holder(self) -> None:
        holders: dict[str, str] = {}
        for session in (*self.SESSIONS, RECLAIM_HOLDER):
            held = self.book.held_by(session)
            assert len(held) <= self.book.max_chunks_per_session
            for chunk_id in held:
                assert chunk_id not in holders
                holders[chunk_id] = session
                assert self.book.chunks[chunk_id].status is ChunkStatus.LEASED

    @invariant()
    def done_count_matches_commits(self) -> None:
        assert self.book.items_done == len(self.committed)

    @invariant()
    def deadlines_are_at_most_one_lease_away(self) -> None:
        for chunk in self.book.chunks.values():
            if chunk.status is ChunkStatus.LEASED:
                assert chunk.deadline <= self.now + self.book.lease_seconds

    @invariant()
    def finished_means_nothing_left_to_hand_out(self) -> None:
        if self.book.finished:
            for chunk in self.book.chunks.values():
                assert chunk.status in (ChunkStatus.DONE, ChunkStatus.FAILED)

    @rule()
    def everything_eventually_completes(self) -> None:
        """Drain: the store answers everything, time passes, one session finishes the rest.
        No item is ever stranded: every chunk ends done or failed."""
        for chunk_id, ids in self.in_flight:
            self.book.commit(chunk_id, ids)
            self.committed.update(ids)
        self.in_flight = []
        for session in self.SESSIONS:
            self.book.release_all(session)
        self.now += 100.0
        self.book.expire(self.now)
        for _ in range(50):
            leases = self.book.lease("drain", 2, self.now)
            if not leases:
                break
            for lease in leases:
                fresh = self.book.accept("drain", lease.chunk_id, lease.item_ids, self.now).fresh
                self.book.commit(lease.chunk_id, fresh)
                self.committed.update(fresh)
        assert self.book.finished
        for chunk in self.book.chunks.values():
            assert chunk.status in (ChunkStatus.DONE, ChunkStatus.FAILED)
            if chunk.status is ChunkStatus.DONE:
                assert set(chunk.item_ids()) <= self.committed


TestBookMachine = BookMachine.TestCase
TestBookMachine.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)


def test_chunks_leased_before_a_restart_wait_for_their_worker(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.add_chunks([("s:0", "s", ["a", "b"]), ("s:1", "s", ["c"])])
    db.commit([], [ChunkState("s:0", "leased", holder="alice/w1", deadline=1.0)])
    config = OrchestratorConfig(lease_seconds=60.0, max_chunk_attempts=1, reconnect_seconds=5.0)
    book = build_book(db, config, now=100.0)
    db.close()
    # A newcomer gets only the chunk nobody held ...
    assert [lease.chunk_id for lease in book.lease("newcomer", 5, now=100.0)] == ["s:1"]
    # ... another worker cannot take it ...
    assert book.claim("thief", "s:0", now=101.0, owner="mallory/w1") is None
    # ... the reconnecting worker reclaims its chunk ...
    lease = book.claim("returning", "s:0", now=101.0, live={"newcomer"}, owner="alice/w1")
    assert lease is not None and lease.item_ids == [0, 1]


def test_chunks_held_for_a_restart_return_after_the_reconnect_window() -> None:
    """Had the worker never come back, the chunk is queued after the reconnect window (not
    a whole lease time), without a lost attempt."""
    book = ChunkBook(120.0, 1, reconnect_seconds=5.0)
    book.add_chunk("s:0", "s", 0, 2)
    book.hold_for_reclaim("s:0", "alice/w1", now=0.0)
    assert book.lease("w", 1, now=1.0) == []
    assert book.expire(now=4.0) == []
    assert book.expire(now=5.5)[0].failed is False
    assert book.lease("w", 1, now=6.0)[0].item_ids == [0, 1]


def test_a_disconnected_sessions_leases_last_only_the_reconnect_window() -> None:
    book = ChunkBook(120.0, 3, reconnect_seconds=5.0)
    book.add_chunk("s:0", "s", 0, 2)
    book.lease("w1", 1, now=0.0, owner="alice/w1")
    book.disconnected("w1", now=10.0)
    assert book.expire(now=14.0) == []
    assert [e.chunk_id for e in book.expire(now=15.5)] == ["s:0"]


def test_one_session_cannot_hoard_chunks() -> None:
    book = ChunkBook(10.0, 3, max_chunks_per_session=2)
    for c in range(5):
        book.add_chunk(f"s:{c}", "s", c, 1)
    assert len(book.lease("greedy", 100, now=0.0)) == 2
    assert book.lease("greedy", 100, now=0.0) == []
    assert [lease.chunk_id for lease in book.lease("honest", 1, now=0.0)] == ["s:2"]


def test_heartbeats_without_results_do_not_keep_a_lease() -> None:
    book = ChunkBook(6.0, 3, stall_seconds=20.0)
    book.add_chunk("s:0", "s", 0, 4)
    book.add_chunk("s:1", "s", 4, 40)
    book.lease("idle", 1, now=0.0)
    book.lease("busy", 1, now=0.0)
    t = 0.0
    revoked: list[str] = []
    while t < 40.0:
        t += 2.0
        book.heartbeat("idle", t)
        book.heartbeat("busy", t)
        if t % 4 == 0:  # the busy worker delivers an item now and then
            fresh = book.accept("busy", "s:1", book.chunks["s:1"].missing()[:1], t).fresh
            book.commit("s:1", fresh)
        revoked += [e.chunk_id for e in book.expire(t) if e.stalled]
    assert revoked == ["s:0"]
    assert book.chunks["s:0"].attempts == 1


def test_failed_items_are_retried_until_their_last_attempt() -> None:
    book = ChunkBook(10.0, 3, max_item_attempts=2)
    book.add_chunk("s:0", "s", 0, 2)
    lease = book.lease("w1", 1, now=0.0)[0]
    book.accept("w1", "s:0", lease.item_ids, 0.0)
    assert not book.final_failure("s:0", 1)
    # Item 0 captioned, item 1 failed once: the lease is used up, the chunk comes back
    # with only item 1.
    assert book.commit("s:0", [0], retry_ids=[1]) is ChunkStatus.PENDING
    lease = book.lease("w2", 1, now=1.0)[0]
    assert lease.item_ids == [1]
    assert book.final_failure("s:0", 1)  # its next failure is stored as final
    book.accept("w2", "s:0", [1], 1.0)
    assert book.commit("s:0", [1]) is ChunkStatus.DONE


def test_a_failed_commit_after_a_re_lease_strands_nothing() -> None:
    book = ChunkBook(10.0, 5)
    book.add_chunk("s:0", "s", 0, 3)
    book.lease("w1", 1, now=0.0)
    fresh = book.accept("w1", "s:0", [0, 1], 0.0).fresh
    book.expire(now=11.0)  # the lease expires while the commit runs
    relet = book.lease("w2", 1, now=11.0)[0]
    assert relet.item_ids == [2]
    book.abort("s:0", fresh)  # ... and the commit fails
    book.accept("w2", "s:0", [2], 12.0)
    assert book.commit("s:0", [2]) is ChunkStatus.PENDING  # used up, items 0 and 1 missing
    assert book.lease("w3", 1, now=12.0)[0].item_ids == [0, 1]


def test_quarantined_items_of_a_done_chunk_are_captioned_again() -> None:
    book = ChunkBook(10.0, 3)
    book.add_chunk("s:0", "s", 0, 2, done_ids=[0, 1])
    assert book.items_done == 2
    book.requeue_items("s:0", [1])
    assert book.items_done == 1 and not book.finished
    assert book.lease("w", 1, now=0.0)[0].item_ids == [1]


def test_a_release_with_a_reason_counts_an_attempt() -> None:
    book = ChunkBook(10.0, 2)
    book.add_chunk("s:0", "s", 0, 2)
    book.lease("w1", 1, now=0.0)
    assert book.release("w1", "s:0").attempts == 0  # clean hand-back: free
    book.lease("w1", 1, now=0.0)
    assert book.release("w1", "s:0", "shard unreadable").failed is False
    book.lease("w1", 1, now=0.0)
    expiry = book.release("w1", "s:0", "shard unreadable")
    assert expiry.failed and book.chunks["s:0"].status is ChunkStatus.FAILED
