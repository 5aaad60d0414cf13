"""Dataworkers (issue 13): GPU workers without the dataset are fed prepared items, by two
dataworkers through the orchestrator's buffer, or by the orchestrator itself when none is
connected. A real orchestrator, real dataworkers and workers on 127.0.0.1; the engine is a
stub whose captions name the image size it was given (so the test sees what the GPU saw)."""

from __future__ import annotations

import asyncio
import collections
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps
from support import (
    TIME_UNIT,
    WORKER_TOKENS,
    StubEngine,
    eventually,
    orchestrator_config,
    read_rows,
    running,
    stub_loader,
    worker_config,
)
from websockets.asyncio.client import connect

from caption_flow.config.models import (
    AuthConfig,
    DataWorkerConfig,
    ImageConfig,
    PrepareConfig,
    TokenEntry,
)
from caption_flow.dataworker.client import DataWorker
from caption_flow.engines.captioner import Captioner
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.protocol.messages import (
    Ack,
    Assign,
    Fetch,
    Hello,
    Items,
    Prepared,
    PrepAssign,
    PrepRequest,
    Request,
    decode,
    encode,
)
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(180)

IMAGES = 24
SIZE = (240, 180)  # the originals
MAX_SIDE = 64  # what the job asks: prepared images are at most 64 pixels wide
DATAWORKER_TOKENS = {"feeder-1": "dataworker-token-one", "feeder-2": "dataworker-token-two"}


# A GPU worker that says it cannot read the dataset (its chunks are prepared first).
FETCHING_WORKER_HELLO = Hello(
    role="worker", token=WORKER_TOKENS["alice"], capabilities={"reads_dataset": False}
)


async def next_of(ws: Any, kind: type) -> Any:
    """The next message of ``kind`` on a raw connection, skipping others."""
    async with asyncio.timeout(10 * TIME_UNIT):
        while not isinstance(message := decode(await ws.recv()), kind):
            pass
    return message


def config_for(tmp_path: Path, folder: Path, model: Path) -> Any:
    config = orchestrator_config(tmp_path / "data", folder, model, chunk_size=4)
    auth = config.auth.model_copy(
        update={
            "dataworker_tokens": [TokenEntry(name=n, token=t) for n, t in DATAWORKER_TOKENS.items()]
        }
    )
    job = config.vllm.model_copy(update={"image": ImageConfig(max_side=MAX_SIDE)})
    return config.model_copy(
        update={"auth": auth, "vllm": job, "prepare": PrepareConfig(wait_seconds=10)}
    )


def dataworker(port: int, name: str) -> DataWorker:
    return DataWorker(
        DataWorkerConfig(
            server=f"ws://127.0.0.1:{port}",
            token=DATAWORKER_TOKENS[name],
            name=name,
            threads=1,
            heartbeat_seconds=0.5,
            reconnect_max_seconds=1.0,
            exit_when_done=True,
        )
    )


def stub_worker(port: int, nowhere: Path) -> Worker:
    engines: list[StubEngine] = []
    config = worker_config(port, read_dataset="no", dataset_path=str(nowhere))
    return Worker(config, Captioner("transformers", loader=stub_loader(engines)))


def check_rows(data_dir: Path, images: list[Path]) -> list[dict[str, Any]]:
    """One row per item; the engine saw a shrunk image; the row keeps the original size."""
    rows = read_rows(data_dir)
    counts = collections.Counter(r["item_key"] for r in rows)
    assert set(counts) == {p.name for p in images}
    assert max(counts.values()) == 1, counts.most_common(2)
    for row in rows:
        assert row["error"] is None, row
        seen = re.search(r"(\d+)x(\d+)$", row["captions"][0])
        assert seen is not None, row["captions"]
        assert max(int(seen.group(1)), int(seen.group(2))) <= MAX_SIDE, row["captions"]
        assert (row["width"], row["height"]) == shown_size(images[0].parent / row["item_key"])
    return rows


def shown_size(path: Path) -> tuple[int, int]:
    """The original's size as displayed (its EXIF orientation applied)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


async def test_two_dataworkers_feed_a_worker_that_has_no_dataset(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(IMAGES, size=SIZE)
    async with running(config_for(tmp_path, images[0].parent, tiny_model_dir)) as orch:
        feeders = [dataworker(orch.port, n) for n in DATAWORKER_TOKENS]
        feeding = [asyncio.create_task(d.run()) for d in feeders]
        # The dataworkers prepare ahead before any GPU worker is there.
        await eventually(
            lambda: orch.snapshot()["prepared"]["items"] >= 8, 30, "items prepared ahead"
        )
        snapshot = orch.snapshot()
        assert snapshot["prepared"]["dataworkers"] == 2
        assert snapshot["prepared"]["memory_bytes"] > 0
        roles = collections.Counter(s["role"] for s in snapshot["sessions"])
        assert roles["dataworker"] == 2

        worker = stub_worker(orch.port, tmp_path / "not-here")
        await asyncio.wait_for(worker.run(), 120 * TIME_UNIT)
        assert worker.remote is not None, "the worker read through the orchestrator"
        await asyncio.wait_for(asyncio.gather(*feeding), 30 * TIME_UNIT)
        prepared = orch.snapshot()["prepared"]

    check_rows(tmp_path / "data", images)
    # Most items came from the dataworkers; whatever they had not prepared when asked for
    # was read by the orchestrator itself. Every item was sent to the worker once.
    assert prepared["relayed"] >= 8
    assert prepared["relayed"] + prepared["served"] == IMAGES
    assert sum(d.prepared for d in feeders) >= prepared["relayed"]
    assert all(d.prepared > 0 for d in feeders), "both dataworkers prepared items"
    # Nothing is left behind: finished chunks take their prepared items with them.
    assert prepared["items"] == 0 and prepared["memory_bytes"] == 0


async def test_without_dataworkers_the_orchestrator_prepares_items_itself(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(IMAGES, size=SIZE)
    async with running(config_for(tmp_path, images[0].parent, tiny_model_dir)) as orch:
        worker = stub_worker(orch.port, tmp_path / "not-here")
        await asyncio.wait_for(worker.run(), 120 * TIME_UNIT)
        prepared = orch.snapshot()["prepared"]
    check_rows(tmp_path / "data", images)
    assert prepared["served"] == IMAGES and prepared["relayed"] == 0


async def test_a_dataworker_that_dies_loses_nothing(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    """A dataworker whose connection drops mid-chunk: its holds end at once, and the worker's
    fetches are answered by the orchestrator instead of waiting for it."""
    images = image_folder(IMAGES, size=SIZE)
    config = config_for(tmp_path, images[0].parent, tiny_model_dir)
    async with running(config) as orch:
        feeder = dataworker(orch.port, "feeder-1")
        feeding = asyncio.create_task(feeder.run())
        await eventually(lambda: orch.prep is not None and bool(orch.prep.holds), 30, "a hold")
        feeding.cancel()  # gone without a word, holding chunks
        await asyncio.gather(feeding, return_exceptions=True)
        await eventually(lambda: orch.prep is not None and not orch.prep.holds, 10, "holds end")
        worker = stub_worker(orch.port, tmp_path / "not-here")
        await asyncio.wait_for(worker.run(), 60 * TIME_UNIT)
    check_rows(tmp_path / "data", images)


def test_prepared_images_keep_orientation_and_shrink(tmp_path: Path) -> None:
    """What a dataworker sends: upright (EXIF applied), within the job's size, original size
    reported as displayed; a small upright JPEG passes through untouched."""
    import io

    from caption_flow.images.prepare import PrepareSettings, check_prepared, prepare_image

    settings = PrepareSettings(ImageConfig(max_side=MAX_SIDE), "webp", 80)
    sideways = Image.new("RGB", (300, 100), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    out = io.BytesIO()
    sideways.save(out, "JPEG", exif=exif.tobytes())
    prepared = prepare_image(out.getvalue(), settings)
    assert (prepared.width, prepared.height) == (100, 300)
    with Image.open(io.BytesIO(prepared.data)) as im:
        assert im.format == "WEBP" and im.size == (21, 64)
    assert check_prepared(prepared.data, settings.image) is None

    small = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 90, 0)).save(small, "JPEG")
    assert prepare_image(small.getvalue(), settings).data == small.getvalue()
    # Too big for the job, or not JPEG/WebP: refused without decoding.
    big = io.BytesIO()
    Image.new("RGB", (200, 100)).save(big, "JPEG")
    assert "larger" in (check_prepared(big.getvalue(), settings.image) or "")
    png = io.BytesIO()
    Image.new("RGB", (20, 20)).save(png, "PNG")
    assert "PNG" in (check_prepared(png.getvalue(), settings.image) or "")
    assert "not an image" in (check_prepared(b"\x00" * 64, settings.image) or "")


def test_dataworker_tokens_load_from_the_auth_section() -> None:
    auth = AuthConfig.model_validate(
        {"dataworker_tokens": [{"name": "feeder", "token": "dataworker-token-xyz"}]}
    )
    assert auth.dataworker_tokens[0].name == "feeder"


async def test_chunks_of_a_worker_that_said_it_cannot_read_come_first(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    """A worker's hello says ``reads_dataset: false``: its leased chunk is prepared before the
    queue's next ones, even before its first fetch."""

    images = image_folder(12, size=SIZE)
    orch = Orchestrator(config_for(tmp_path, images[0].parent, tiny_model_dir))
    await orch.start()
    url = f"ws://127.0.0.1:{orch.port}"
    try:
        async with connect(url) as gpu, connect(url) as feeder:
            hello = Hello(
                role="worker",
                token=WORKER_TOKENS["alice"],
                capabilities={"reads_dataset": False},
            )
            await gpu.send(encode(hello))
            await gpu.send(encode(Request(count=1)))
            leased = (await next_of(gpu, Assign)).chunks[0].chunk_id
            await feeder.send(encode(Hello(role="dataworker", token=DATAWORKER_TOKENS["feeder-1"])))
            await feeder.send(encode(PrepRequest(count=1)))
            assign = await next_of(feeder, PrepAssign)
            assert [c.chunk_id for c in assign.chunks] == [leased]
            assert assign.image["max_side"] == MAX_SIDE
    finally:
        await orch.stop()


async def test_items_a_worker_already_has_are_not_prepared_again(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    """Items sent to the worker holding a chunk (here read by the orchestrator itself) are
    not handed to a dataworker to prepare again while that worker holds the chunk."""

    images = image_folder(12, size=SIZE)
    orch = Orchestrator(config_for(tmp_path, images[0].parent, tiny_model_dir))
    await orch.start()
    url = f"ws://127.0.0.1:{orch.port}"
    try:
        async with connect(url, max_size=None) as gpu, connect(url) as feeder:
            await gpu.send(encode(FETCHING_WORKER_HELLO))
            await gpu.send(encode(Request(count=1)))
            lease = (await next_of(gpu, Assign)).chunks[0]
            keys = [ref.key for ref in lease.items]
            await gpu.send(encode(Fetch(chunk_id=lease.chunk_id, keys=keys[:2])))
            got = await next_of(gpu, Items)
            assert [i.key for i in got.items] == keys[:2] and got.last

            await feeder.send(encode(Hello(role="dataworker", token=DATAWORKER_TOKENS["feeder-1"])))
            await feeder.send(encode(PrepRequest(count=1)))
            (prep,) = (await next_of(feeder, PrepAssign)).chunks
            # The worker's own chunk comes first, with only the keys it does not have yet.
            assert prep.chunk_id == lease.chunk_id and prep.keys == keys[2:]
    finally:
        await orch.stop()


async def test_a_full_buffer_makes_room_for_what_a_worker_waits_for(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    """Read-ahead items (a chunk nobody holds) are pushed out by items of a chunk a worker
    holds; and a full buffer still hands out a chunk a worker holds to prepare."""
    import msgspec

    from caption_flow.images.prepare import PrepareSettings
    from caption_flow.sources import open_source
    from caption_flow.sources.wire import prepared_data

    images = image_folder(12, size=SIZE)
    config = config_for(tmp_path, images[0].parent, tiny_model_dir)
    source = open_source(config.dataset)
    settings = PrepareSettings(config.vllm.image, "jpeg", 90)
    # The buffer holds exactly the first chunk's prepared items (as the buffer encodes them).
    first_items = [
        prepared_data(i, settings) for i in source.read(".", [p.name for p in images[:4]])
    ]
    exact = sum(len(msgspec.msgpack.encode(i)) for i in first_items)
    prepare = PrepareConfig(
        ahead_chunks=2, buffer_memory_mb=(exact + 0.5) / 1024 / 1024, buffer_disk_mb=0
    )
    orch = Orchestrator(config.model_copy(update={"prepare": prepare}))
    await orch.start()
    url = f"ws://127.0.0.1:{orch.port}"
    try:
        async with connect(url) as gpu, connect(url) as d1, connect(url) as d2:

            async def send_prepared(ws: Any, seq: int, chunk_id: str, items: list[Any]) -> int:
                await ws.send(encode(Prepared(chunk_id=chunk_id, seq=seq, items=items)))
                return int((await next_of(ws, Ack)).accepted)

            await gpu.send(encode(FETCHING_WORKER_HELLO))
            await gpu.send(encode(Request(count=1)))
            (leased,) = (await next_of(gpu, Assign)).chunks
            for ws, name in ((d1, "feeder-1"), (d2, "feeder-2")):
                await ws.send(encode(Hello(role="dataworker", token=DATAWORKER_TOKENS[name])))
            await d1.send(encode(PrepRequest(count=2)))
            # The worker's chunk first, then the queue's next one (read-ahead).
            first, second = (await next_of(d1, PrepAssign)).chunks
            assert first.chunk_id == leased.chunk_id
            assert first.keys == [p.name for p in images[:4]]
            ahead = [prepared_data(i, settings) for i in source.read(".", second.keys[:2])]
            assert await send_prepared(d1, 1, second.chunk_id, ahead) == 2

            # The worker's chunk goes in whole; the read-ahead makes way for it.
            assert await send_prepared(d1, 2, first.chunk_id, first_items) == 4
            assert not any(orch.buffer.has(second.chunk_id, k) for k in second.keys)
            assert all(orch.buffer.has(first.chunk_id, k) for k in first.keys)
            assert not orch.buffer.has_room(), "the worker's chunk filled the buffer"

            # Full, yet a chunk the worker holds and nobody prepares is still handed out.
            await gpu.send(encode(Request(count=2)))
            more = [c.chunk_id for c in (await next_of(gpu, Assign)).chunks]
            assert more[0] == second.chunk_id  # held by feeder-1 for preparation
            await d2.send(encode(PrepRequest(count=2)))
            assert [c.chunk_id for c in (await next_of(d2, PrepAssign)).chunks] == more[1:]
    finally:
        await orch.stop()


def test_items_on_the_wire_keep_their_columns_within_the_bounds() -> None:
    """Orchestrator and dataworkers make wire items alike: columns travel (prompts may use
    them), cut to the protocol's bounds, and a long read error still decodes on the worker."""
    import io

    from caption_flow.images.prepare import PrepareSettings
    from caption_flow.protocol.messages import MAX_COLUMN_CHARS, MAX_REASON_CHARS, Items
    from caption_flow.sources.base import SourceItem
    from caption_flow.sources.wire import prepared_data

    settings = PrepareSettings(ImageConfig(max_side=MAX_SIDE), "jpeg", 90)
    jpeg = io.BytesIO()
    Image.new("RGB", (200, 100), (10, 200, 10)).save(jpeg, "JPEG")
    columns = {"tags": "x" * (MAX_COLUMN_CHARS + 10), "n": 3, "nested": {"a": 1}}
    item = prepared_data(SourceItem("k", jpeg.getvalue(), columns), settings)
    assert item.columns == {"tags": "x" * MAX_COLUMN_CHARS, "n": 3, "nested": "{'a': 1}"}
    assert (item.width, item.height) == (200, 100) and item.data is not None

    broken = prepared_data(SourceItem("b", None, {}, "e" * 5000), settings)
    assert broken.error is not None and len(broken.error) == MAX_REASON_CHARS
    sent = decode(encode(Items(chunk_id="c", items=[item, broken])))
    assert isinstance(sent, Items) and [i.key for i in sent.items] == ["k", "b"]


def test_a_webp_with_unreadable_exif_is_prepared_not_raised() -> None:
    """EXIF that Pillow cannot parse reads as "upright", as when decoding; it raised out of
    preparation before, which released the whole chunk instead of preparing one image."""
    import io

    from caption_flow.images.prepare import PrepareSettings, prepare_image

    webp = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(webp, "WEBP", exif=b"garbage")
    prepared = prepare_image(webp.getvalue(), PrepareSettings(ImageConfig(max_side=64), "webp", 80))
    assert (prepared.width, prepared.height) == (40, 30)
    assert prepared.data == webp.getvalue()  # small, upright WebP: passed through as it is
