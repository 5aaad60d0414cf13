"""Random and mutated frames against a live orchestrator (hypothesis).

The orchestrator runs in its own thread and event loop; hypothesis drives a plain
synchronous websocket client, one connection per example. Whatever arrives, the server keeps
serving, its lease book stays consistent, and in the end an honest worker finishes the run
with exactly one row per item.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from support import TIME_UNIT, WORKER_TOKENS, orchestrator_config, read_rows, worker_config
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import connect

from caption_flow.orchestrator.leases import ChunkStatus
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(240)

IMAGES = 6


class ServerThread:
    """An orchestrator on its own event loop, so synchronous code can talk to it."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout * TIME_UNIT)

    def close(self) -> None:
        self.call(self.orch.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ServerThread]:
    from caption_flow.demo.tiny_model import generate_images

    root = tmp_path_factory.mktemp("fuzz")
    images = generate_images(root / "images", IMAGES, size=(64, 48), seed=3)
    config = orchestrator_config(
        root / "data", images[0].parent, tiny_model_dir, chunk_size=2, reconnect_seconds=0.5
    )
    thread = ServerThread(Orchestrator(config))
    thread.call(thread.orch.start())
    yield thread
    thread.close()


HELLO = msgspec.msgpack.encode({"type": "hello", "role": "worker", "token": WORKER_TOKENS["alice"]})
VALID = [
    {"type": "request", "count": 2},
    {"type": "heartbeat", "stats": {"items_per_s": 1.0}},
    {"type": "release", "chunk_id": "images:0", "reason": "x"},
    {
        "type": "results",
        "chunk_id": "images:0",
        "seq": 1,
        "items": [{"item_id": 0, "key": "k", "outputs": {"captions": ["a", "b"]}}],
    },
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
tags = st.sampled_from(
    ["hello", "request", "results", "heartbeat", "release", "set_config", "ack", "nope"]
)
random_messages = st.builds(
    lambda tag, fields: msgspec.msgpack.encode({**fields, "type": tag}),
    tags,
    st.dictionaries(
        st.sampled_from(["chunk_id", "seq", "items", "count", "stats", "reason", "held_chunks"]),
        values,
    ),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame with bytes flipped, cut short or spliced."""
    frame = bytearray(msgspec.msgpack.encode(draw(st.sampled_from(VALID))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(frame) - 1))
        frame[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        frame = frame[: draw(st.integers(0, len(frame)))]
    return bytes(frame)


frames = st.lists(st.one_of(random_messages, mutated(), st.binary(max_size=64)), max_size=6)


def check_book(orch: Orchestrator) -> None:
    book = orch.book
    assert book is not None
    holders = collections.Counter()  # type: ignore[var-annotated]
    for chunk in book.chunks.values():
        if chunk.status is ChunkStatus.LEASED:
            holders[chunk.chunk_id] += 1
            assert chunk.holder is not None
    assert all(n == 1 for n in holders.values())
    assert 0 <= book.items_done <= book.items_total == IMAGES


@seed(20261127)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=frames)
def test_random_and_mutated_frames_never_hurt_the_server(
    server: ServerThread, batch: list[bytes]
) -> None:
    url = f"ws://127.0.0.1:{server.orch.port}"
    # A short close time-out: after the server has closed, frames the client still sent
    # fill its read buffer, and the closing handshake then waits for its time-out.
    with connect(url, max_size=None, open_timeout=10 * TIME_UNIT, close_timeout=0.2) as ws:
        try:
            ws.send(HELLO)
            ws.recv(timeout=10 * TIME_UNIT)
            for frame in batch:
                ws.send(frame)
            ws.recv(timeout=0.05)  # whatever it answers (or its close), it answers
        except (ConnectionClosed, TimeoutError):
            pass
        except WebSocketException as exc:  # the server may close mid-send
            assert "close" in str(exc).lower()
    assert server.call(_still_serving(url)) == "welcome"
    check_book(server.orch)


async def _still_serving(url: str) -> str:
    from websockets.asyncio.client import connect as aconnect

    async with aconnect(url) as ws:
        hello = {"type": "hello", "role": "worker", "token": WORKER_TOKENS["bob"]}
        await ws.send(msgspec.msgpack.encode(hello))
        reply: dict[str, Any] = msgspec.msgpack.decode(await ws.recv())
    return str(reply["type"])


def test_after_the_fuzz_an_honest_worker_finishes_the_run(server: ServerThread) -> None:
    """Runs after the fuzz test (same module-scoped server)."""

    async def finish() -> None:
        worker = Worker(worker_config(server.orch.port, "bob"))
        await asyncio.wait_for(worker.run(), 120 * TIME_UNIT)

    server.call(finish(), timeout=150)
    server.call(server.orch.store.compact())
    rows = read_rows(server.orch.config.storage.data_dir)
    counts = collections.Counter(r["item_key"] for r in rows)
    assert len(counts) == IMAGES and max(counts.values()) == 1
