"""A worker token proves who connects, not good intent. Each test here is one attack, sent as
raw msgpack frames (not through our client) by a holder of a valid token, against a real
orchestrator on 127.0.0.1. Each ends with an honest worker (the real client, the real
transformers engine on the tiny model) finishing the run, and exactly one row per item."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support import (
    ADMIN_TOKEN,
    TIME_UNIT,
    WORKER_TOKENS,
    RawClient,
    eventually,
    orchestrator_config,
    read_rows,
    worker_config,
)
from websockets.asyncio.client import connect

from caption_flow.orchestrator.server import Orchestrator
from caption_flow.protocol.messages import ItemResult
from caption_flow.storage.rows import JournalRecord, encode_record
from caption_flow.storage.state import JournalBatch, StateDB
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(180)

IMAGES = 8
CHUNK = 2


@asynccontextmanager
async def raw_worker(
    orch: Orchestrator, who: str = "alice", **hello: Any
) -> AsyncIterator[tuple[RawClient, dict[str, Any]]]:
    async with connect(f"ws://127.0.0.1:{orch.port}", max_size=None) as ws:
        raw = RawClient(ws)
        await raw.send({"type": "hello", "role": "worker", "token": WORKER_TOKENS[who], **hello})
        welcome = await raw.recv()
        assert welcome["type"] == "welcome", welcome
        yield raw, welcome


@pytest.fixture
async def make_orch(tmp_path: Path, tiny_model_dir: Path, image_folder):  # type: ignore[no-untyped-def]
    images = image_folder(IMAGES)
    started: list[Orchestrator] = []

    async def make(**overrides: Any) -> Orchestrator:
        config = orchestrator_config(
            tmp_path / "data",
            images[0].parent,
            tiny_model_dir,
            **{"chunk_size": CHUNK, "reconnect_seconds": 1.0 * TIME_UNIT, **overrides},
        )
        orch = Orchestrator(config)
        await orch.start()
        started.append(orch)
        return orch

    yield make
    for orch in started:  # stopping twice is harmless; a failed test leaves one running
        await orch.stop()


async def finish_honestly(orch: Orchestrator, data_dir: Path) -> list[dict[str, Any]]:
    """Bob's real worker captions whatever is left; then exactly one row per item."""
    worker = Worker(worker_config(orch.port, "bob"))
    await asyncio.wait_for(worker.run(), timeout=120 * TIME_UNIT)
    await orch.stop()
    rows = read_rows(data_dir)
    counts = collections.Counter(r["item_key"] for r in rows)
    assert len(counts) == IMAGES, f"{len(counts)} of {IMAGES} items have rows"
    assert max(counts.values()) == 1, f"items written twice: {counts.most_common(3)}"
    return rows


async def heartbeats(raw: RawClient) -> None:
    """Look alive, forever: heartbeats with made-up figures and never a result."""
    while True:
        await raw.send({"type": "heartbeat", "stats": {"items_per_s": 99.0}})
        await asyncio.sleep(0.2)


async def lease_one(raw: RawClient) -> dict[str, Any]:
    await raw.send({"type": "request", "count": 1})
    assign = await raw.recv_type("assign")
    assert assign["chunks"], assign
    chunk: dict[str, Any] = assign["chunks"][0]
    return chunk


def item(ref: list[Any], **fields: Any) -> dict[str, Any]:
    return {"item_id": ref[0], "key": ref[1], **fields}


async def test_a_huge_width_is_refused_and_the_store_keeps_writing(
    make_orch, tmp_path: Path
) -> None:
    orch = await make_orch()
    async with raw_worker(orch) as (raw, _):
        chunk = await lease_one(raw)
        bad = item(chunk["items"][0], outputs={"captions": ["x"]}, width=2**40)
        await raw.send({"type": "results", "chunk_id": chunk["chunk_id"], "seq": 1, "items": [bad]})
        assert await raw.closed_with() == 4400
    rows = await finish_honestly(orch, tmp_path / "data")
    assert all(r["width"] < 2**31 for r in rows)
    db = StateDB(tmp_path / "data" / "state.db")
    assert db.journal_size() == 0, "every caption reached Parquet"
    db.close()


async def test_the_same_item_twice_in_one_message_is_one_row(make_orch, tmp_path: Path) -> None:
    orch = await make_orch()
    async with raw_worker(orch) as (raw, _):
        chunk = await lease_one(raw)
        ref = chunk["items"][0]
        twice = [item(ref, outputs={"captions": [f"copy {n}"]}) for n in (1, 2)]
        await raw.send({"type": "results", "chunk_id": chunk["chunk_id"], "seq": 1, "items": twice})
        ack = await raw.recv_type("ack")
        assert (ack["accepted"], ack.get("duplicates", 0)) == (1, 0)
    rows = await finish_honestly(orch, tmp_path / "data")
    assert [r["captions"] for r in rows if r["item_key"] == ref[1]] == [["copy 1"]]


async def test_a_resend_is_acknowledged_only_once_its_original_is_durable(
    make_orch, tmp_path: Path
) -> None:
    orch = await make_orch()
    db = StateDB(tmp_path / "data" / "state.db", read_only=True)
    try:
        async with raw_worker(orch) as (raw, _):
            chunk = await lease_one(raw)
            ref = chunk["items"][0]
            result = item(ref, outputs={"captions": ["once"]})
            for seq in (1, 2):  # back to back: the second arrives while the first commits
                await raw.send(
                    {
                        "type": "results",
                        "chunk_id": chunk["chunk_id"],
                        "seq": seq,
                        "items": [result],
                    }
                )
            for _ in range(2):
                ack = await raw.recv_type("ack")
                done = db.conn.execute("SELECT done FROM items WHERE item_id=?", (ref[0],))
                assert done.fetchone()[0] == 1, f"ack {ack['seq']} came before the commit"
    finally:
        db.close()
    rows = await finish_honestly(orch, tmp_path / "data")
    assert [r["captions"] for r in rows if r["item_key"] == ref[1]] == [["once"]]


@pytest.mark.parametrize(
    ("outputs", "refusal"),
    [
        ({"evil_column": ["x"]}, "reject"),
        ({"captions": ["y" * 20_000]}, "reject"),  # more than max_tokens can produce
        ({"captions": ["a", "b", "c"]}, "reject"),  # the job has two prompts
        ({"captions": ["z" * (4 * 1024 * 1024)]}, 4400),  # beyond the wire's own bound
    ],
    ids=["unknown-field", "caption-beyond-max-tokens", "too-many-entries", "4MB-caption"],
)
async def test_outputs_the_job_does_not_have_are_refused(
    make_orch, tmp_path: Path, outputs: dict[str, list[str]], refusal: str | int
) -> None:
    orch = await make_orch()
    async with raw_worker(orch) as (raw, _):
        chunk = await lease_one(raw)
        bad = item(chunk["items"][0], outputs=outputs)
        await raw.send({"type": "results", "chunk_id": chunk["chunk_id"], "seq": 7, "items": [bad]})
        if refusal == "reject":
            assert (await raw.recv_type("reject"))["seq"] == 7
        else:
            assert await raw.closed_with() == refusal
    rows = await finish_honestly(orch, tmp_path / "data")
    assert all("evil_column" not in r for r in rows)
    assert max(len(c) for r in rows for c in r["captions"]) < 10_000


async def test_one_session_cannot_hold_every_chunk(make_orch, tmp_path: Path) -> None:
    orch = await make_orch(max_chunks_per_session=2)
    async with raw_worker(orch) as (greedy, _):
        held = []
        for _ in range(5):
            await greedy.send({"type": "request", "count": 64})
            held += (await greedy.recv_type("assign")).get("chunks", [])
        assert len(held) == 2
        async with raw_worker(orch, "bob") as (honest, _):
            assert (await lease_one(honest))["chunk_id"] not in {c["chunk_id"] for c in held}
        # A count beyond the protocol's bound does not even decode.
        await greedy.send({"type": "request", "count": 10**6})
        assert await greedy.closed_with() == 4400
    await finish_honestly(orch, tmp_path / "data")


async def test_another_contributor_cannot_reclaim_a_gone_workers_chunks(
    make_orch, tmp_path: Path
) -> None:
    orch = await make_orch(reconnect_seconds=30.0 * TIME_UNIT)
    async with raw_worker(orch, name="w1") as (alice, _):
        chunk = await lease_one(alice)
    # Bob names alice's chunk (and an unheld one) in his hello: he gets neither.
    async with raw_worker(orch, "bob", name="w1", held_chunks=[chunk["chunk_id"], "x:0"]) as (
        _,
        welcome,
    ):
        assert welcome.get("resumed_chunks", []) == []
    # Alice, same contributor and worker name, does get hers back.
    async with raw_worker(orch, name="w1", held_chunks=[chunk["chunk_id"]]) as (alice, welcome):
        assert welcome["resumed_chunks"] == [chunk["chunk_id"]]
        await alice.send({"type": "release", "chunk_id": chunk["chunk_id"]})
        # An unbounded held_chunks list does not decode.
    async with connect(f"ws://127.0.0.1:{orch.port}") as ws:
        raw = RawClient(ws)
        hello = {"type": "hello", "role": "worker", "token": WORKER_TOKENS["alice"]}
        await raw.send({**hello, "held_chunks": [f"s:{i}" for i in range(1000)]})
        assert await raw.closed_with() == 4400
    await finish_honestly(orch, tmp_path / "data")


async def test_heartbeats_without_results_lose_the_lease(make_orch, tmp_path: Path) -> None:
    orch = await make_orch(stall_seconds=1.5 * TIME_UNIT, lease_seconds=60 * TIME_UNIT)
    async with raw_worker(orch) as (raw, _):
        chunk = await lease_one(raw)
        beating = asyncio.create_task(heartbeats(raw))
        try:
            holder = lambda: orch.book.chunks[chunk["chunk_id"]].holder  # type: ignore[union-attr]  # noqa: E731
            await eventually(lambda: holder() is None, 20, "the stalled lease to be revoked")
        finally:
            beating.cancel()
        # Its late results are refused: the chunk is no longer its own.
        late = item(chunk["items"][0], outputs={"captions": ["late"]})
        await raw.send(
            {"type": "results", "chunk_id": chunk["chunk_id"], "seq": 1, "items": [late]}
        )
        assert (await raw.recv_type("reject"))["seq"] == 1
    await orch.stop()
    # Only the stall revoked it; finish on a fresh orchestrator with a long stall time (the
    # honest worker's model load must not count as a stall on a slow machine).
    orch = await make_orch()
    rows = await finish_honestly(orch, tmp_path / "data")
    assert all(r["captions"] != ["late"] for r in rows)


async def test_a_message_flood_is_slowed_not_served(make_orch, tmp_path: Path) -> None:
    orch = await make_orch()
    orch.config.limits.messages_per_second = 50.0
    orch.config.limits.message_burst = 10
    async with raw_worker(orch) as (raw, _):
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(40):
            await raw.send({"type": "request", "count": 1})
        replies = [await raw.recv_type("assign", timeout=30) for _ in range(40)]
        # 30 messages beyond the burst at 50/s take at least 0.6 s to be read.
        assert loop.time() - started >= 0.5
        assert sum(len(r.get("chunks", [])) for r in replies) <= orch.config.max_chunks_per_session
    await finish_honestly(orch, tmp_path / "data")


async def test_an_oversized_hello_is_refused_before_it_is_buffered(
    make_orch, tmp_path: Path
) -> None:
    orch = await make_orch()
    async with connect(f"ws://127.0.0.1:{orch.port}", max_size=None) as ws:
        padding = "p" * (orch.config.limits.hello_max_bytes + 1)
        await ws.send(msgspec.msgpack.encode({"type": "hello", "role": "worker", "token": padding}))
        assert await RawClient(ws).closed_with() == 1009
    await finish_honestly(orch, tmp_path / "data")


async def test_an_admin_cannot_push_a_broken_stage_graph(make_orch, tmp_path: Path) -> None:
    orch = await make_orch()
    before = orch.job
    async with connect(f"ws://127.0.0.1:{orch.port}") as ws:
        admin = RawClient(ws)
        await admin.send({"type": "hello", "role": "admin", "token": ADMIN_TOKEN})
        assert (await admin.recv())["type"] == "welcome"
        cycle = [
            {"name": "a", "prompts": ["x"], "requires": ["b"]},
            {"name": "b", "prompts": ["y"], "requires": ["a"]},
        ]
        await admin.send({"type": "set_config", "config": {"stages": cycle}})
        error = await admin.recv_type("error")
        assert error["code"] == 4422 and "cycle" in error["message"]
    assert orch.job == before
    await finish_honestly(orch, tmp_path / "data")


async def test_a_record_the_store_cannot_write_is_set_aside_and_its_items_redone(
    make_orch, tmp_path: Path
) -> None:
    """Defence in depth: a record that passed the wire's bounds (here: written by an older
    version) but that Parquet refuses is quarantined, and its items are captioned again."""
    orch = await make_orch()
    await orch.stop()
    db = StateDB(tmp_path / "data" / "state.db")
    first = next(db.load_chunks())
    keys = db.item_keys(first.first_item, first.first_item)
    ((item_id, key),) = keys.items()
    record = JournalRecord(
        dataset="test",
        shard=first.shard,
        chunk_id=first.chunk_id,
        model="m",
        contributor_id="alice",
        worker="w",
        timestamp=0.0,
        items=[ItemResult(item_id, key, outputs={"captions": ["x"]}, width=2**40)],
    )
    db.commit(
        [JournalBatch([item_id], encode_record(record), "alice", chunk_id=first.chunk_id)], []
    )
    db.close()

    orch = await make_orch()  # the compactor meets the record and sets it aside
    rows = await finish_honestly(orch, tmp_path / "data")
    assert next(r for r in rows if r["item_key"] == key)["width"] < 2**31
    db = StateDB(tmp_path / "data" / "state.db")
    assert [q[2] for q in db.quarantined()] == [[item_id]]
    db.close()
