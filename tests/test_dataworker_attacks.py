"""Dataworkers (issue 13) as the orchestrator meets them: raw msgpack frames, not our client,
against a real orchestrator on 127.0.0.1. A dataworker token proves who connects, not good
intent: every attack here is refused and nothing it sent reaches a GPU worker. An honest
dataworker's items are relayed as they were sent. And neither a GPU worker that stops
reading nor a dataworker faster than the workers can make the orchestrator hold more than
its configuration allows."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support import (
    TIME_UNIT,
    WORKER_TOKENS,
    RawClient,
    close_code,
    eventually,
    job,
    orchestrator_config,
    raw_hello,
)
from websockets.asyncio.client import connect

from caption_flow.config.models import ImageConfig, PrepareConfig, TokenEntry
from caption_flow.images.prepare import PrepareSettings, prepare_image
from caption_flow.orchestrator.items import REPLY_BYTES
from caption_flow.orchestrator.server import Orchestrator

pytestmark = pytest.mark.timeout(60)

DATAWORKER_TOKENS = {"mallory": "mallory-data-secret", "dora": "dora-data-secret"}
SERVER_WRITE_LIMIT = 2**15  # websockets' default high-water mark (serve() sets none)

Start = Callable[..., Awaitable[Orchestrator]]


# -- images ------------------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, quality=quality)
    return out.getvalue()


def noise_jpeg(width: int, height: int, quality: int = 90) -> bytes:
    """Random pixels: a JPEG that does not compress, so its size is predictable."""
    return encoded(
        Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)), quality=quality
    )


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


# -- raw clients -------------------------------------------------------------------------------
@asynccontextmanager
async def client(
    orch: Orchestrator, role: str, token: str, name: str, **connect_kw: Any
) -> AsyncIterator[RawClient]:
    """A welcomed connection of ``role``."""
    kw = {"max_size": None, "compression": None, **connect_kw}
    async with connect(f"ws://127.0.0.1:{orch.port}", **kw) as ws:
        raw = RawClient(ws)
        await raw.send({"type": "hello", "role": role, "token": token, "name": name})
        assert (await raw.recv_type("welcome"))["type"] == "welcome"
        yield raw


def dataworker(orch: Orchestrator, who: str) -> Any:
    return client(orch, "dataworker", DATAWORKER_TOKENS[who], who)


def worker(orch: Orchestrator, who: str = "alice", **connect_kw: Any) -> Any:
    return client(orch, "worker", WORKER_TOKENS[who], who, **connect_kw)


async def prep_request(
    dw: RawClient, count: int = 1
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Chunks to prepare and the image settings that came with them."""
    await dw.send({"type": "prep_request", "count": count})
    assign = await dw.recv_type("prep_assign")
    return assign.get("chunks", []), assign["image"]


async def prepared(
    dw: RawClient, chunk_id: str, seq: int, items: list[dict[str, Any]]
) -> dict[str, Any]:
    """Send one ``prepared`` message; the ack or reject that answers it."""
    await dw.send({"type": "prepared", "chunk_id": chunk_id, "seq": seq, "items": items})
    for _ in range(100):
        answer = await dw.recv()
        if answer["type"] in ("ack", "reject"):
            assert answer["seq"] == seq, answer
            return answer
    raise AssertionError("no answer to prepared")


async def lease_all(w: RawClient) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    for _ in range(20):
        await w.send({"type": "request", "count": 4})
        got = (await w.recv_type("assign")).get("chunks", [])
        if not got:
            return chunks
        chunks += got
    raise AssertionError("the chunks never ran out")


async def fetch(
    w: RawClient, chunk_id: str, keys: list[str], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Every item of one fetch, over however many replies it takes."""
    await w.send({"type": "fetch", "chunk_id": chunk_id, "keys": keys})
    return await replies(w, timeout)


async def replies(w: RawClient, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The items of the fetch being answered, up to its last reply."""
    items: list[dict[str, Any]] = []
    while True:
        reply = await w.recv_type("items", timeout)
        assert reply.get("error") is None, reply["error"]
        items += reply.get("items", [])
        if reply.get("last", True):
            return items


def keys_of(chunk: dict[str, Any]) -> list[str]:
    return [ref[1] for ref in chunk["items"]]


async def acks_until_quiet(dw: RawClient, acked: list[int], quiet: float) -> None:
    """Read acks into ``acked`` (in order, one item accepted each) until none comes for
    ``quiet`` seconds."""
    while True:
        try:
            ack = await dw.recv_type("ack", quiet)
        except TimeoutError:
            return
        assert ack["seq"] == len(acked) and ack.get("accepted", 0) == 1, ack
        acked.append(ack["seq"])


@pytest.fixture
async def start(tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[Start]:
    """``start(folder, **overrides)``: a started orchestrator over ``folder`` that knows the
    dataworker tokens; stopped at the end."""
    started: list[Orchestrator] = []

    async def make(folder: Path, **overrides: Any) -> Orchestrator:
        config = orchestrator_config(tmp_path / "data", folder, tiny_model_dir, **overrides)
        dataworkers = [TokenEntry(name=n, token=t) for n, t in DATAWORKER_TOKENS.items()]
        auth = config.auth.model_copy(update={"dataworker_tokens": dataworkers})
        orch = Orchestrator(config.model_copy(update={"auth": auth}))
        await orch.start()
        started.append(orch)
        return orch

    yield make
    for orch in started:
        await orch.stop()


# -- 1. a hostile dataworker -------------------------------------------------------------------
async def test_every_attack_of_a_dataworker_is_refused_and_workers_get_true_items(
    start: Start, tmp_path: Path, image_folder: Any
) -> None:
    images = image_folder(8)
    folder = images[0].parent
    orch = await start(
        folder,
        chunk_size=2,
        max_chunks_per_session=8,
        max_message_bytes=2 * 1024 * 1024,
        prepare=PrepareConfig(max_item_mb=0.05, wait_seconds=5 * TIME_UNIT),
    )
    assert orch.book is not None and orch.prep is not None
    holds = orch.prep.holds
    settings = orch.prepare_settings()
    first = orch.book.upcoming(1)[0]
    evil = encoded(Image.new("RGB", (20, 20), (255, 0, 0)))  # passes check_prepared
    attacks = {
        "oversized": noise_jpeg(300, 300, quality=95),  # a JPEG, but over max_item_mb
        "not-an-image": b"definitely not an image " * 8,
        "png": encoded(Image.new("RGB", (16, 16), (0, 255, 0)), "PNG"),
        "too-large": encoded(Image.new("RGB", (1100, 16), (0, 0, 255))),  # over max_side
    }
    assert len(attacks["oversized"]) > 0.05 * 1024 * 1024
    sent_by_attacker = {evil, *attacks.values()}

    def honest(key: str) -> dict[str, Any]:
        p = prepare_image((folder / key).read_bytes(), settings)
        return {"key": key, "data": p.data, "width": p.width, "height": p.height}

    async with dataworker(orch, "mallory") as mallory, dataworker(orch, "dora") as dora:
        mallory_id = next(s for s in orch.sessions.values() if s.name == "mallory").session_id
        # A chunk nobody was given, and one that does not exist: not held by you.
        for seq, chunk_id in enumerate([first, "no-such-shard:0"], start=1):
            answer = await prepared(mallory, chunk_id, seq, [{"key": "x", "data": evil}])
            assert answer["type"] == "reject" and "not held by you" in answer["reason"]

        # A chunk another dataworker holds: refused, and the other's hold stays.
        (held_by_dora,), _ = await prep_request(dora)
        assert held_by_dora["chunk_id"] == first
        item = {"key": held_by_dora["keys"][0], "data": evil}
        answer = await prepared(mallory, first, 3, [item])
        assert answer["type"] == "reject" and "not held by you" in answer["reason"]
        assert holds[first].session_id != mallory_id

        # A key it was not given (behind a good one: the whole message is refused) ends its
        # hold; another dataworker's next request gets that chunk.
        (mine,), _ = await prep_request(mallory)
        good = {"key": mine["keys"][0], "data": evil}
        for seq, stranger in enumerate([held_by_dora["keys"][0], "../../etc/passwd"], start=4):
            answer = await prepared(
                mallory, mine["chunk_id"], seq, [good, {"key": stranger, "data": evil}]
            )
            assert answer["type"] == "reject" and "not an item you were given" in answer["reason"]
            assert mine["chunk_id"] not in holds
            assert not orch.buffer.has(mine["chunk_id"], mine["keys"][0])
            if seq == 4:
                (again,), _ = await prep_request(mallory)
                assert again["chunk_id"] == mine["chunk_id"]
        (taken_over,), _ = await prep_request(dora)
        assert taken_over["chunk_id"] == mine["chunk_id"]

        # Bytes the orchestrator must not keep: each refused with its reason, hold ended.
        reasons = {
            "oversized": "is over",
            "not-an-image": "not an image",
            "png": "JPEG or WebP, not PNG",
            "too-large": "larger than the job's image size",
        }
        for seq, (name, data) in enumerate(attacks.items(), start=10):
            (chunk,), _ = await prep_request(mallory)
            item = {"key": chunk["keys"][0], "data": data, "width": 1, "height": 1}
            answer = await prepared(mallory, chunk["chunk_id"], seq, [item])
            assert answer["type"] == "reject", (name, answer)
            assert reasons[name] in answer["reason"], (name, answer["reason"])
            assert chunk["chunk_id"] not in holds
        assert orch.prep.refused == 9
        assert orch.buffer.items == 0, "nothing refused was kept"

        # A frame over max_message_bytes is not even read.
        (chunk,), _ = await prep_request(mallory)
        huge = {"key": chunk["keys"][0], "data": b"\xff\xd8" + b"\0" * (3 * 1024 * 1024)}
        await mallory.send(
            {"type": "prepared", "chunk_id": chunk["chunk_id"], "seq": 20, "items": [huge]}
        )
        assert await mallory.closed_with() == 1009
        gone = chunk["chunk_id"]
        await eventually(lambda: gone not in holds, 5, "the closed dataworker's hold to end")

        # What a dataworker's role may not send closes the connection (4003).
        ref = [0, held_by_dora["keys"][0]]
        forbidden: list[dict[str, Any]] = [
            {
                "type": "results",
                "chunk_id": first,
                "seq": 1,
                "items": [{"item_id": ref[0], "key": ref[1], "outputs": {"captions": ["x", "y"]}}],
            },
            {"type": "request", "count": 1},
            {"type": "fetch", "chunk_id": first, "keys": [ref[1]]},
        ]
        for message in forbidden:
            async with dataworker(orch, "mallory") as again_mallory:
                await again_mallory.send(message)
                assert await again_mallory.closed_with() == 4003, message["type"]

        # Roles do not mix: a GPU worker may not send prepared items, and neither kind of
        # token opens the other role.
        async with worker(orch, "bob") as gpu:
            item = {"key": held_by_dora["keys"][0], "data": evil}
            await gpu.send({"type": "prepared", "chunk_id": first, "seq": 1, "items": [item]})
            assert await gpu.closed_with() == 4003
        for role, token in [
            ("worker", DATAWORKER_TOKENS["mallory"]),
            ("dataworker", WORKER_TOKENS["alice"]),
        ]:
            ws = await raw_hello(orch.port, role, token)
            assert await close_code(ws, 10) == 4001, role
        assert orch.book.items_done == 0

        # The honest dataworker still delivers its two chunks.
        for seq, chunk in enumerate([held_by_dora, taken_over], start=1):
            answer = await prepared(
                dora, chunk["chunk_id"], seq, [honest(k) for k in chunk["keys"]]
            )
            assert answer == {"type": "ack", "seq": seq, "accepted": len(chunk["keys"])}
        assert holds == {}

    # A GPU worker without the dataset gets every item as the job wants it: relayed from the
    # honest dataworker, or read and prepared by the orchestrator; never the attacker's bytes.
    async with worker(orch) as w:
        chunks = await lease_all(w)
        assert len(chunks) == 4
        for chunk in chunks:
            keys = keys_of(chunk)
            items = await fetch(w, chunk["chunk_id"], keys)
            assert [i["key"] for i in items] == keys
            for got in items:
                assert got["data"] not in sent_by_attacker
                want = honest(got["key"])
                assert got["data"] == want["data"], got["key"]
                assert (got["width"], got["height"]) == size_of((folder / got["key"]).read_bytes())
    stats = orch.snapshot()["prepared"]
    assert (stats["relayed"], stats["served"]) == (4, 4)


async def test_a_prepared_item_within_the_configured_limits_is_read(
    start: Start, image_folder: Any
) -> None:
    orch = await start(image_folder(4)[0].parent, chunk_size=2)
    big = noise_jpeg(1024, 1000, quality=95)  # a valid prepared image of about 1.2 MB
    assert 1024 * 1024 < len(big) < orch.config.prepare.max_item_mb * 1024 * 1024
    async with dataworker(orch, "dora") as dora:
        (chunk,), _ = await prep_request(dora)
        item = {"key": chunk["keys"][0], "data": big, "width": 1024, "height": 1000}
        answer = await prepared(dora, chunk["chunk_id"], 1, [item])
        assert answer["type"] == "ack" and answer["accepted"] == 1


# -- 2. an honest dataworker -------------------------------------------------------------------
async def test_a_dataworkers_prepared_items_are_relayed_to_the_worker_as_sent(
    start: Start, image_folder: Any, tiny_model_dir: Path
) -> None:
    folder = image_folder(6)[0].parent
    orch = await start(
        folder,
        chunk_size=3,
        vllm=job(tiny_model_dir).model_copy(update={"image": ImageConfig(max_side=48)}),
    )
    async with dataworker(orch, "dora") as dora:
        (lease,), image = await prep_request(dora)
        settings = PrepareSettings.from_wire(image)
        assert settings == orch.prepare_settings()
        made = {k: prepare_image((folder / k).read_bytes(), settings) for k in lease["keys"]}
        items = [
            {"key": k, "data": p.data, "width": p.width, "height": p.height}
            for k, p in made.items()
        ]
        answer = await prepared(dora, lease["chunk_id"], 1, items)
        assert answer == {"type": "ack", "seq": 1, "accepted": len(items)}
    assert orch.snapshot()["prepared"]["items"] == len(items)

    async with worker(orch) as w:
        await w.send({"type": "request", "count": 1})
        (chunk,) = (await w.recv_type("assign"))["chunks"]
        assert chunk["chunk_id"] == lease["chunk_id"] and keys_of(chunk) == lease["keys"]
        got = await fetch(w, chunk["chunk_id"], lease["keys"])
    assert [g["key"] for g in got] == lease["keys"]
    for g in got:
        original = size_of((folder / g["key"]).read_bytes())
        assert g["data"] == made[g["key"]].data
        assert max(size_of(g["data"])) <= 48 < max(original), "shrunk on the dataworker"
        assert (g["width"], g["height"]) == original
    stats = orch.snapshot()["prepared"]
    assert (stats["relayed"], stats["served"], stats["items"]) == (len(items), 0, 0)


# -- 3. what a slow worker and a fast dataworker may cost ---------------------------------------
async def test_a_worker_that_stops_reading_holds_at_most_one_reply_of_memory(
    start: Start, tmp_path: Path
) -> None:
    count = 28
    folder = tmp_path / "big"
    folder.mkdir()
    originals = {}
    for i in range(count):  # ~700 KB each, within the job's size: sent as they are
        originals[f"big_{i:03d}.jpg"] = data = noise_jpeg(1000, 800)
        (folder / f"big_{i:03d}.jpg").write_bytes(data)
    largest = max(len(d) for d in originals.values())
    assert sum(len(d) for d in originals.values()) > 2 * REPLY_BYTES
    orch = await start(folder, chunk_size=count, prepare=PrepareConfig(buffer_memory_mb=1))
    # What the orchestrator may hold for one fetch: the reply being sent (at most
    # REPLY_BYTES plus the item that crossed it, and framing), websockets' write buffer,
    # and the prepared buffer's memory ceiling.
    bound = REPLY_BYTES + largest + 64 * 1024 + SERVER_WRITE_LIMIT + orch.buffer.memory_limit

    # A small receive buffer, and the client stops reading before it asks: what is not
    # read stays on the orchestrator's side of the connection.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", orch.port))
    async with worker(orch, sock=sock) as w:
        await w.send({"type": "request", "count": 1})
        (chunk,) = (await w.recv_type("assign"))["chunks"]
        keys = keys_of(chunk)
        assert sorted(keys) == sorted(originals)
        w.ws.transport.pause_reading()
        await w.send({"type": "fetch", "chunk_id": chunk["chunk_id"], "keys": keys})

        peak = 0
        served, since = -1, time.monotonic()
        deadline = time.monotonic() + 15 * TIME_UNIT
        while True:  # until the orchestrator has stopped reading items for a while
            held = orch.buffer.memory_bytes + sum(
                s.websocket.transport.get_write_buffer_size() for s in orch.sessions.values()
            )
            peak = max(peak, held)
            assert held <= bound, f"{held} bytes held for a worker that does not read"
            now = time.monotonic()
            if orch.buffer.served != served:
                served, since = orch.buffer.served, now
            elif served > 0 and now - since >= 1.0 * TIME_UNIT:
                break
            assert now < deadline, "the orchestrator kept reading items"
            await asyncio.sleep(0.01)
        assert 0 < served < count, f"{served} of {count} items read for a worker not reading"
        assert peak > 0, "nothing was ever waiting to be sent: the measure saw nothing"

        # Once it reads again, every item arrives, in order and intact.
        w.ws.transport.resume_reading()
        items = await replies(w)
    assert [i["key"] for i in items] == keys
    assert all(i["data"] == originals[i["key"]] for i in items)
    assert orch.buffer.served == count


async def test_a_full_buffer_stops_acknowledging_a_dataworker_until_workers_take_items(
    start: Start, tmp_path: Path, image_folder: Any
) -> None:
    folder = image_folder(25)[0].parent
    orch = await start(
        folder,
        chunk_size=5,
        prepare=PrepareConfig(
            buffer_memory_mb=0.2,
            buffer_disk_mb=0.5,
            wait_seconds=2 * TIME_UNIT,
            lease_seconds=30 * TIME_UNIT,
        ),
    )
    buffer = orch.buffer
    spill = tmp_path / "data" / "prepared"
    worst = {"memory": 0, "disk": 0}
    stop = asyncio.Event()

    async def watch() -> None:  # the limits hold at every moment, not just at the end
        while not stop.is_set():
            worst["memory"] = max(worst["memory"], buffer.memory_bytes)
            worst["disk"] = max(worst["disk"], buffer.disk_bytes)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        async with dataworker(orch, "dora") as dora:
            chunks, _ = await prep_request(dora, 8)
            assert len(chunks) == 5
            sent = [(c["chunk_id"], k, noise_jpeg(240, 200)) for c in chunks for k in c["keys"]]
            per_item = len(sent[0][2])
            capacity = buffer.memory_limit // per_item + buffer.disk_limit // per_item
            assert capacity + 3 < len(sent), "the test must overfill the buffer"

            async def send_all() -> None:
                for seq, (chunk_id, key, data) in enumerate(sent):
                    item = {"key": key, "data": data, "width": 240, "height": 200}
                    await dora.send(
                        {"type": "prepared", "chunk_id": chunk_id, "seq": seq, "items": [item]}
                    )

            sender = asyncio.create_task(send_all())
            acked: list[int] = []
            # Full: the dataworker's messages are no longer read, so no longer acknowledged.
            await acks_until_quiet(dora, acked, 1.5)
            assert capacity - 2 <= len(acked) <= capacity + 2 < len(sent), (len(acked), capacity)
            assert buffer.disk_bytes > 0, "memory full: items went to disk"
            files = list(spill.glob("*"))
            assert files and sum(f.stat().st_size for f in files) == buffer.disk_bytes
            stalled = len(acked)

            # A worker takes the first chunks: room again, and the acks resume.
            async with worker(orch) as w:
                for n in range(2):
                    await w.send({"type": "request", "count": 1})
                    (chunk,) = (await w.recv_type("assign"))["chunks"]
                    assert chunk["chunk_id"] == chunks[n]["chunk_id"]
                    got = await fetch(w, chunk["chunk_id"], keys_of(chunk))
                    mine = {k: d for c, k, d in sent if c == chunk["chunk_id"]}
                    assert {g["key"]: g["data"] for g in got} == mine
            await acks_until_quiet(dora, acked, 3.0)
            assert len(acked) == len(sent) > stalled, "acks resumed once items were taken"
            await sender
    finally:
        stop.set()
        await watcher
    assert worst["memory"] <= buffer.memory_limit, worst
    assert worst["disk"] <= buffer.disk_limit, worst
    assert orch.snapshot()["prepared"]["relayed"] == 10


async def fill_until_stalled(dw: RawClient, count: int) -> dict[str, Any]:
    """Send ``count`` prepared items of the first chunk handed out (one per message, each
    about 44 KB) and read acks until none comes for a while. Returns that chunk."""
    (chunk,), _ = await prep_request(dw)
    assert len(chunk["keys"]) >= count
    for seq, key in enumerate(chunk["keys"][:count]):
        item = {"key": key, "data": noise_jpeg(240, 200), "width": 240, "height": 200}
        await dw.send(
            {"type": "prepared", "chunk_id": chunk["chunk_id"], "seq": seq, "items": [item]}
        )
    acked: list[int] = []
    await acks_until_quiet(dw, acked, 1.0)
    assert 0 < len(acked) < count, f"{len(acked)} of {count} acknowledged: never full"
    return chunk


# Memory holds two ~44 KB items, disk one: the fourth waits for room.
SMALL_BUFFER = {"buffer_memory_mb": 0.1, "buffer_disk_mb": 0.05}


async def test_a_full_buffer_hands_out_no_more_chunks_to_prepare(
    start: Start, image_folder: Any
) -> None:
    orch = await start(
        image_folder(10)[0].parent,
        chunk_size=5,
        prepare=PrepareConfig(**SMALL_BUFFER, lease_seconds=5 * TIME_UNIT),
    )
    async with dataworker(orch, "dora") as dora, dataworker(orch, "mallory") as other:
        await fill_until_stalled(dora, 4)
        chunks, _ = await prep_request(other)
        assert chunks == [], "a full buffer gave out another chunk to prepare"


async def test_a_dataworker_that_leaves_while_waiting_for_room_loses_its_holds_at_once(
    start: Start, image_folder: Any
) -> None:
    orch = await start(
        image_folder(10)[0].parent,
        chunk_size=5,
        prepare=PrepareConfig(**SMALL_BUFFER, lease_seconds=10 * TIME_UNIT),
    )
    assert orch.prep is not None
    holds = orch.prep.holds
    async with dataworker(orch, "dora") as dora:
        chunk = await fill_until_stalled(dora, 4)
        assert chunk["chunk_id"] in holds
    # Gone: it owes nothing any more, and its chunk is free for another dataworker.
    await eventually(lambda: not holds, 4, "the gone dataworker's holds to end")
