"""Failed items and chunks get another chance: offline with `caption-flow requeue --failed`,
live with the admin's `requeue` message. Their error rows leave the output, and once they are
captioned again every item still has exactly one row."""

from __future__ import annotations

import asyncio
import collections
import sys
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path

import msgspec
import pytest
from support import (
    ADMIN_TOKEN,
    TIME_UNIT,
    WORKER_TOKENS,
    caption_all,
    eventually,
    orchestrator_config,
    read_rows,
    running,
    worker_config,
)
from websockets.asyncio.client import connect

from caption_flow.demo.tiny_model import generate_images
from caption_flow.orchestrator.leases import ChunkStatus
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.storage.state import StateDB
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(180)


def one_row_each(data_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    rows = read_rows(data_dir)
    counts = collections.Counter(r["item_key"] for r in rows)
    assert max(counts.values()) == 1, counts.most_common(3)
    return {r["item_key"]: r for r in rows}


async def test_requeue_failed_offline_captions_the_repaired_images(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(6)
    folder = images[0].parent
    broken = folder / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])  # truncated: fails to decode
    data = tmp_path / "data"
    config = orchestrator_config(data, folder, tiny_model_dir, chunk_size=3, max_item_attempts=1)
    await caption_all(config)
    assert one_row_each(data)["broken.jpg"]["error"]

    # The user repairs the file, then asks for the failures to be done again.
    generate_images(tmp_path / "fixed", 1, seed=9)[0].replace(broken)
    (tmp_path / "x.yaml").write_text("orchestrator: {}\n")
    args = ["requeue", "--failed", "--data-dir", str(data), "--config", str(tmp_path / "x.yaml")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "caption_flow", *args, stdout=PIPE, stderr=STDOUT
    )
    output = (await asyncio.wait_for(proc.communicate(), 60 * TIME_UNIT))[0].decode()
    assert proc.returncode == 0, output
    assert "1 failed items" in output
    assert "broken.jpg" not in one_row_each(data), "its error row left the output"

    await caption_all(config)
    rows = one_row_each(data)
    assert len(rows) == 7
    assert rows["broken.jpg"]["error"] is None and rows["broken.jpg"]["captions"]


async def test_an_admin_requeues_failed_items_and_chunks_while_the_run_goes_on(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(4)
    folder = images[0].parent
    broken = folder / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    data = tmp_path / "data"
    config = orchestrator_config(
        data, folder, tiny_model_dir, chunk_size=5, max_item_attempts=1, max_chunk_attempts=1
    )
    async with running(config) as orch:
        url = f"ws://127.0.0.1:{orch.port}"
        # First everything fails once: an honest run stores broken.jpg's error ...
        await asyncio.wait_for(Worker(worker_config(orch.port)).run(), 60 * TIME_UNIT)
        await orch.store.compact()
        assert one_row_each(data)["broken.jpg"]["error"]
        generate_images(tmp_path / "fixed", 1, seed=9)[0].replace(broken)
        # ... and a second, single-item chunk fails as a whole (a worker gave it back).
        (folder / "late.jpg").write_bytes(images[0].read_bytes())
        await orch.stop()
        orch = Orchestrator(config)
        await orch.start()
        async with connect(url.rsplit(":", 1)[0] + f":{orch.port}") as ws:
            hello = {"type": "hello", "role": "worker", "token": WORKER_TOKENS["bob"]}
            await ws.send(msgspec.msgpack.encode(hello))
            await ws.recv()
            await ws.send(msgspec.msgpack.encode({"type": "request", "count": 1}))
            chunk = msgspec.msgpack.decode(await ws.recv())["chunks"][0]
            release = {"type": "release", "chunk_id": chunk["chunk_id"], "reason": "no disk"}
            await ws.send(msgspec.msgpack.encode(release))
            await ws.send(msgspec.msgpack.encode({"type": "heartbeat"}))  # ordered after it
        assert orch.book is not None
        book = orch.book
        await eventually(
            lambda: book.chunks[chunk["chunk_id"]].status is ChunkStatus.FAILED,
            10,
            "the release with a reason to fail the chunk",
        )

        async with connect(f"ws://127.0.0.1:{orch.port}") as ws:
            await ws.send(
                msgspec.msgpack.encode({"type": "hello", "role": "admin", "token": ADMIN_TOKEN})
            )
            await ws.recv()
            await ws.send(msgspec.msgpack.encode({"type": "requeue"}))
            stats = msgspec.msgpack.decode(await ws.recv())
        assert stats["type"] == "stats"
        assert stats["snapshot"]["chunks"]["failed"] == 0

        await asyncio.wait_for(Worker(worker_config(orch.port)).run(), 60 * TIME_UNIT)
    rows = one_row_each(data)
    assert len(rows) == 6
    assert all(r["error"] is None for r in rows.values()), rows["broken.jpg"]
    db = StateDB(data / "state.db")
    assert {c.status for c in db.load_chunks()} == {"done"}
    db.close()
