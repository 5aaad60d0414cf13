"""Chunk bookkeeping as pure logic: examples first, then a hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from caption_flow.errors import NotLeasedError
from caption_flow.orchestrator.leases import ChunkBook, ChunkStatus


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
    assert book.accept("w1", "s:0", [0, 2]) == [0, 2]
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
    assert book.accept("w1", "s:0", [0, 1]) == [0, 1]
    assert book.accept("w1", "s:0", [1, 2]) == [2]  # 1 is in flight
    book.commit("s:0", [0, 1, 2])
    assert book.accept("w1", "s:0", [0, 3]) == [3]
    assert book.commit("s:0", [3]) is True
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
    book = make_book(chunks=1)
    book.lease("old", 1, now=0.0)
    lease = book.claim("new", "s:0", now=1.0)
    assert lease is not None and lease.item_ids == [0, 1, 2, 3]
    with pytest.raises(NotLeasedError):
        book.accept("old", "s:0", [0])
    assert book.accept("new", "s:0", [0]) == [0]
    assert book.held_by("old") == set()
    # A chunk that a connected session holds is not taken from it.
    assert book.claim("third", "s:0", now=2.0, live={"new"}) is None
    assert book.held_by("new") == {"s:0"}


def test_loading_completed_items_from_the_database() -> None:
    book = ChunkBook(10.0, 3)
    book.add_chunk("s:0", "s", 0, 3, done_ids=[0, 1, 2])
    book.add_chunk("s:1", "s", 3, 3, done_ids=[4])
    assert book.items_done == 4
    assert book.chunks["s:0"].status is ChunkStatus.DONE
    assert book.lease("w", 5, now=0.0)[0].item_ids == [3, 5]


class BookMachine(RuleBasedStateMachine):
    """Random interleavings of every operation; invariants checked after each step."""

    SESSIONS = ("a", "b", "c")

    def __init__(self) -> None:
        super().__init__()
        self.book = make_book(chunks=4, size=5, lease=10.0, attempts=3)
        self.now = 0.0
        self.committed: set[int] = set()

    @rule(session=st.sampled_from(SESSIONS), count=st.integers(1, 3))
    def lease(self, session: str, count: int) -> None:
        for lease in self.book.lease(session, count, self.now):
            assert lease.item_ids, "a lease always carries work"
            assert not set(lease.item_ids) & self.committed, "finished items are never re-leased"

    @rule(session=st.sampled_from(SESSIONS), data=st.data())
    def submit(self, session: str, data: st.DataObject) -> None:
        held = sorted(self.book.held_by(session))
        if not held:
            return
        chunk_id = data.draw(st.sampled_from(held))
        chunk = self.book.chunks[chunk_id]
        ids = data.draw(st.lists(st.sampled_from(list(chunk.item_ids())), max_size=5))
        fresh = self.book.accept(session, chunk_id, ids)
        assert not set(fresh) & self.committed
        if data.draw(st.booleans()):
            self.book.commit(chunk_id, fresh)
            self.committed.update(fresh)
        else:
            self.book.abort(chunk_id, fresh)

    @rule(session=st.sampled_from(SESSIONS))
    def heartbeat(self, session: str) -> None:
        self.book.heartbeat(session, self.now)

    @rule(session=st.sampled_from(SESSIONS))
    def disconnect_cleanly(self, session: str) -> None:
        self.book.release_all(session)

    @rule(seconds=st.floats(0.0, 15.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.book.expire(self.now)

    @invariant()
    def each_chunk_has_at_most_one_holder(self) -> None:
        holders: dict[str, str] = {}
        for session in self.SESSIONS:
            for chunk_id in self.book.held_by(session):
                assert chunk_id not in holders
                holders[chunk_id] = session
                assert self.book.chunks[chunk_id].status is ChunkStatus.LEASED

    @invariant()
    def done_count_matches_commits(self) -> None:
        assert self.book.items_done == len(self.committed)

    @invariant()
    def finished_means_nothing_left_to_hand_out(self) -> None:
        if self.book.finished:
            for chunk in self.book.chunks.values():
                assert chunk.status in (ChunkStatus.DONE, ChunkStatus.FAILED)

    @precondition(lambda self: True)
    @rule()
    def everything_eventually_completes(self) -> None:
        """Drain: one session leases and finishes all remaining work."""
        while True:
            leases = self.book.lease("drain", 10, self.now)
            if not leases:
                break
            for lease in leases:
                fresh = self.book.accept("drain", lease.chunk_id, lease.item_ids)
                self.book.commit(lease.chunk_id, fresh)
                self.committed.update(fresh)
        for chunk in self.book.chunks.values():
            if chunk.status is ChunkStatus.DONE:
                assert set(chunk.item_ids()) <= self.committed


TestBookMachine = BookMachine.TestCase
TestBookMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_chunks_leased_before_a_restart_wait_for_their_worker() -> None:
    import tempfile
    from pathlib import Path

    from caption_flow.orchestrator.dataset_index import build_book
    from caption_flow.storage.state import ChunkState, StateDB

    with tempfile.TemporaryDirectory() as tmp:
        db = StateDB(Path(tmp) / "state.db")
        db.add_chunks([("s:0", "s", ["a", "b"]), ("s:1", "s", ["c"])])
        db.commit([], [ChunkState("s:0", "leased", holder="old-session", deadline=1.0)])
        book = build_book(db, lease_seconds=10.0, max_attempts=1, now=100.0)
        db.close()
    # A newcomer gets only the chunk nobody held ...
    assert [lease.chunk_id for lease in book.lease("newcomer", 5, now=100.0)] == ["s:1"]
    # ... the reconnecting worker reclaims its chunk ...
    lease = book.claim("returning", "s:0", now=101.0, live={"newcomer"})
    assert lease is not None and lease.item_ids == [0, 1]
    # ... and had it never come back, the chunk returns to the queue without a lost attempt.
    book2 = ChunkBook(10.0, 1)
    book2.add_chunk("s:0", "s", 0, 2)
    book2.hold_for_reclaim("s:0", now=0.0)
    assert book2.expire(now=11.0)[0].failed is False
    assert book2.lease("w", 1, now=12.0)[0].item_ids == [0, 1]
