"""Items over the connection (issue 13): a worker that cannot read the dataset gets each
chunk's item bytes from the orchestrator over its own authenticated websocket. A real
orchestrator, the real worker and the tiny model; raw frames for the refusals."""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any

import msgspec
import pytest
from PIL import Image
from support import (
    WORKER_TOKENS,
    RawClient,
    caption_all,
    orchestrator_config,
    read_rows,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from caption_flow.config.models import PrepareConfig
from caption_flow.orchestrator.server import Orchestrator

pytestmark = pytest.mark.timeout(180)

IMAGES = 7


def by_key(data_dir: Path) -> dict[str, list[str]]:
    rows = read_rows(data_dir)
    counts = collections.Counter(r["item_key"] for r in rows)
    assert max(counts.values()) == 1, f"items written twice: {counts.most_common(3)}"
    assert all(r["error"] is None for r in rows), rows
    return {r["item_key"]: list(r["captions"]) for r in rows}


async def test_a_worker_without_the_dataset_captions_everything_through_the_orchestrator(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(IMAGES)
    folder = images[0].parent
    nowhere = str(tmp_path / "not-here")
    # The orchestrator sends the dataset's bytes as they are (prepare.on_orchestrator off).
    config = orchestrator_config(
        tmp_path / "remote",
        folder,
        tiny_model_dir,
        chunk_size=3,
        prepare=PrepareConfig(on_orchestrator=False),
    )
    workers, snapshot = await caption_all(config, read_dataset="no", dataset_path=nowhere)
    assert workers[0].remote is not None, "the worker read through the orchestrator"
    assert snapshot["items_done"] == IMAGES
    remote = by_key(tmp_path / "remote")
    assert set(remote) == {p.name for p in images}

    # The same run with a worker reading the folder itself gives the same (greedy) captions.
    config = orchestrator_config(tmp_path / "local", folder, tiny_model_dir, chunk_size=3)
    workers, _ = await caption_all(config)
    assert workers[0].remote is None
    assert by_key(tmp_path / "local") == remote


async def test_auto_reads_through_the_orchestrator_when_the_path_is_not_here(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    from caption_flow.config.models import DatasetConfig
    from caption_flow.worker.remote_source import reads_dataset

    folder = image_folder(1)[0].parent
    dataset = DatasetConfig(type="local_folder", path=str(folder))
    assert reads_dataset(dataset, None)
    assert not reads_dataset(dataset, str(tmp_path / "missing"))
    assert reads_dataset(dataset, "s3://bucket/images")
    # Shards named by a brace pattern are read here when they are here (the orchestrator's
    # own start-up check decides), and fetched when they are not.
    (tmp_path / "shard-0.tar").write_bytes(b"")
    (tmp_path / "shard-1.tar").write_bytes(b"")
    shards = DatasetConfig(type="webdataset", path=str(tmp_path / "shard-{0..1}.tar"))
    assert reads_dataset(shards, None)
    assert not reads_dataset(shards, str(tmp_path / "elsewhere-{0..1}.tar"))
    assert reads_dataset(DatasetConfig(type="huggingface", path="org/name"), None)
    missing_parquet = DatasetConfig(type="huggingface", path=str(tmp_path / "no.parquet"))
    assert not reads_dataset(missing_parquet, None)


async def hello(orch: Orchestrator, ws: Any, who: str) -> RawClient:
    raw = RawClient(ws)
    await raw.send(
        {
            "type": "hello",
            "role": "worker",
            "token": WORKER_TOKENS[who],
            "capabilities": {"reads_dataset": False},
        }
    )
    assert (await raw.recv_type("welcome"))["type"] == "welcome"
    return raw


async def lease(raw: RawClient) -> dict[str, Any]:
    await raw.send({"type": "request", "count": 1})
    chunk: dict[str, Any] = (await raw.recv_type("assign"))["chunks"][0]
    return chunk


async def test_fetches_outside_a_sessions_own_lease_are_refused(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(IMAGES)
    config = orchestrator_config(tmp_path / "data", images[0].parent, tiny_model_dir, chunk_size=3)
    orch = Orchestrator(config)
    await orch.start()
    url = f"ws://127.0.0.1:{orch.port}"
    try:
        async with connect(url, max_size=None) as a, connect(url, max_size=None) as b:
            alice, bob = await hello(orch, a, "alice"), await hello(orch, b, "bob")
            mine, theirs = await lease(alice), await lease(bob)
            my_keys = [ref[1] for ref in mine["items"]]

            # Its own lease: every item, in order. A JPEG already within the job's size goes
            # as it is; anything else is re-encoded as a JPEG, its original size given.
            await alice.send({"type": "fetch", "chunk_id": mine["chunk_id"], "keys": my_keys})
            reply = await alice.recv_type("items")
            assert reply.get("error") is None and reply.get("last", True)
            assert [i["key"] for i in reply["items"]] == my_keys
            folder = images[0].parent
            for item in reply["items"]:
                original = (folder / item["key"]).read_bytes()
                with Image.open(io.BytesIO(original)) as im:
                    size = im.size
                if original[:2] == b"\xff\xd8":
                    assert item["data"] == original
                else:
                    assert item["data"][:2] == b"\xff\xd8"
                    assert (item["width"], item["height"]) == size

            # Another session's chunk, and keys outside its own lease: refused, nothing read.
            their_keys = [ref[1] for ref in theirs["items"]]
            await alice.send({"type": "fetch", "chunk_id": theirs["chunk_id"], "keys": their_keys})
            reply = await alice.recv_type("items")
            assert "not leased" in reply["error"] and not reply.get("items")
            await alice.send({"type": "fetch", "chunk_id": mine["chunk_id"], "keys": their_keys})
            reply = await alice.recv_type("items")
            assert "not items of" in reply["error"] and not reply.get("items")

            # A second fetch while the first is being answered: refused; the first completes.
            fetch = {"type": "fetch", "chunk_id": mine["chunk_id"], "keys": my_keys}
            await alice.ws.send(msgspec.msgpack.encode(fetch))
            await alice.ws.send(msgspec.msgpack.encode(fetch))
            replies = [await alice.recv_type("items") for _ in range(2)]
            assert sorted(bool(r.get("error")) for r in replies) == [False, True], replies
            refused = next(r for r in replies if r.get("error"))
            assert "already" in refused["error"]

            # Too many keys in one fetch is outside the protocol's bounds: the connection ends.
            await alice.send({"type": "fetch", "chunk_id": mine["chunk_id"], "keys": ["k"] * 257})
            with pytest.raises(ConnectionClosed) as closed:
                await alice.recv_type("items")
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4400
    finally:
        await orch.stop()
