"""Refusals over a real websocket: wrong token, malformed or oversized frames, results for
chunks the session does not hold. The orchestrator keeps serving everyone else."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from support import ADMIN_TOKEN, MONITOR_TOKEN, WORKER_TOKENS, orchestrator_config
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from caption_flow.orchestrator.server import Orchestrator
from caption_flow.protocol.messages import (
    Ack,
    Assign,
    Hello,
    ItemResult,
    Reject,
    Request,
    Results,
    SetConfig,
    Stats,
    Welcome,
    decode,
    encode,
)


@pytest.fixture
async def orch(tmp_path: Path, image_folder) -> AsyncIterator[Orchestrator]:
    images = image_folder(10)
    # The model is never loaded here: no worker runs an engine in these tests.
    config = orchestrator_config(
        tmp_path / "data",
        images[0].parent,
        tmp_path / "no-model",
        chunk_size=5,
        max_message_bytes=64 * 1024,
    )
    orchestrator = Orchestrator(config)
    await orchestrator.start()
    yield orchestrator
    await orchestrator.stop()


def url(orch: Orchestrator) -> str:
    return f"ws://127.0.0.1:{orch.port}"


async def hello(ws, role: str = "worker", token: str = WORKER_TOKENS["alice"]) -> Welcome:  # type: ignore[no-untyped-def]
    await ws.send(encode(Hello(role=role, token=token, name="t")))  # type: ignore[arg-type]
    welcome = decode(await ws.recv())
    assert isinstance(welcome, Welcome)
    return welcome


async def closed_with(ws) -> int | None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(10):
            await ws.recv()
    return info.value.rcvd.code if info.value.rcvd else None


async def test_wrong_token_is_refused_with_4001(orch: Orchestrator) -> None:
    async with connect(url(orch)) as ws:
        await ws.send(encode(Hello(role="worker", token="guess")))
        assert await closed_with(ws) == 4001
    async with connect(url(orch)) as ws:  # a worker token is not an admin token
        await ws.send(encode(Hello(role="admin", token=WORKER_TOKENS["alice"])))
        assert await closed_with(ws) == 4001


async def test_welcome_carries_the_job_but_never_auth(orch: Orchestrator) -> None:
    async with connect(url(orch)) as ws:
        welcome = await hello(ws)
    assert welcome.contributor == "alice"
    assert set(welcome.config) == {"vllm", "dataset", "lease_seconds", "heartbeat_seconds"}
    assert "secret" not in msgspec.json.encode(welcome.config).decode()
    assert "storage_options" not in welcome.config["dataset"]  # credentials stay here


async def test_malformed_frame_closes_only_that_connection(orch: Orchestrator) -> None:
    async with connect(url(orch)) as good, connect(url(orch)) as bad:
        await hello(good)
        await hello(bad, token=WORKER_TOKENS["bob"])
        await bad.send(b"\x93\x01\x02")  # msgpack, but not a message
        assert await closed_with(bad) == 4400
        await good.send(encode(Request(count=1)))
        assign = decode(await good.recv())
        assert isinstance(assign, Assign) and len(assign.chunks) == 1


async def test_unknown_type_and_text_frames_are_refused(orch: Orchestrator) -> None:
    async with connect(url(orch)) as ws:
        await hello(ws)
        await ws.send(msgspec.msgpack.encode({"type": "launch_missiles"}))
        assert await closed_with(ws) == 4400
    async with connect(url(orch)) as ws:
        await ws.send('{"type": "hello"}')
        assert await closed_with(ws) == 4400


async def test_oversized_frame_is_refused(orch: Orchestrator) -> None:
    async with connect(url(orch), max_size=None) as ws:
        await hello(ws)
        await ws.send(b"\x00" * (128 * 1024))
        assert await closed_with(ws) == 1009  # "message too big", before it is buffered
    async with connect(url(orch)) as ws:
        await hello(ws)  # the server is still serving


async def test_role_may_not_send_other_roles_messages(orch: Orchestrator) -> None:
    async with connect(url(orch)) as ws:
        await hello(ws)
        await ws.send(encode(SetConfig(config={"inference_prompts": ["x"]})))
        assert await closed_with(ws) == 4003


async def test_results_for_a_chunk_not_leased_to_the_session_are_rejected(
    orch: Orchestrator,
) -> None:
    async with connect(url(orch)) as alice, connect(url(orch)) as bob:
        await hello(alice)
        await hello(bob, token=WORKER_TOKENS["bob"])
        await alice.send(encode(Request(count=1)))
        lease = decode(await alice.recv())
        assert isinstance(lease, Assign)
        chunk = lease.chunks[0]
        item = chunk.items[0]
        forged = Results(
            chunk_id=chunk.chunk_id,
            seq=1,
            items=[ItemResult(item.item_id, item.key, outputs={"captions": ["forged"]})],
        )
        await bob.send(encode(forged))
        reply = decode(await bob.recv())
        assert isinstance(reply, Reject) and "not leased" in reply.reason
        # An item id outside the leased chunk is rejected too, even for the holder.
        stray = Results(chunk_id=chunk.chunk_id, seq=2, items=[ItemResult(10_000, "x")])
        await alice.send(encode(stray))
        reply = decode(await alice.recv())
        assert isinstance(reply, Reject)
        # The holder's real result is accepted; a resend is acknowledged as a duplicate.
        real = Results(
            chunk_id=chunk.chunk_id,
            seq=3,
            items=[ItemResult(item.item_id, item.key, outputs={"captions": ["ok"]})],
        )
        await alice.send(encode(real))
        assert decode(await alice.recv()) == Ack(seq=3, accepted=1, duplicates=0)
        await alice.send(encode(real))
        assert decode(await alice.recv()) == Ack(seq=3, accepted=0, duplicates=1)
    assert orch.snapshot()["items_done"] == 1


async def test_admin_changes_the_job_and_monitor_sees_stats(orch: Orchestrator) -> None:
    async with connect(url(orch)) as admin, connect(url(orch)) as monitor:
        await hello(admin, role="admin", token=ADMIN_TOKEN)
        await hello(monitor, role="monitor", token=MONITOR_TOKEN)
        await admin.send(encode(SetConfig(config={"sampling": {"temperature": 0.1}})))
        reply = decode(await admin.recv())
        assert isinstance(reply, Stats)
        assert orch.job.sampling.temperature == 0.1
        await admin.send(encode(SetConfig(config={"batch_size": -3})))
        error = decode(await admin.recv())
        assert getattr(error, "code", None) == 4422 and "batch_size" in error.message  # type: ignore[union-attr]
        stats = decode(await monitor.recv())
        assert isinstance(stats, Stats) and stats.snapshot["items_total"] == 10


async def test_health_and_metrics_over_plain_http(orch: Orchestrator) -> None:
    import asyncio

    def get(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{orch.port}{path}", timeout=5) as r:
            return r.read().decode()

    assert await asyncio.to_thread(get, "/health") == "ok\n"
    metrics = await asyncio.to_thread(get, "/metrics")
    assert "captionflow_items_total 10" in metrics
