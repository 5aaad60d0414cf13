"""A worker whose engine or reader fails hands its chunks back and waits; it never turns them
into error rows. A real orchestrator and real workers over websockets on 127.0.0.1; the
engine is a stub only where a GPU would be needed (CUDA running out of memory cannot happen
on this machine), elsewhere the tiny model runs for real."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from typing import Any

import pytest
from support import (
    PROMPTS,
    TIME_UNIT,
    StubEngine,
    cuda_out_of_memory,
    eventually,
    orchestrator_config,
    read_rows,
    running,
    stub_loader,
    worker_config,
)

from caption_flow.config.models import DatasetConfig, WorkerConfig
from caption_flow.engines.captioner import Captioner
from caption_flow.sources import open_source
from caption_flow.storage.state import StateDB
from caption_flow.worker.client import Worker
from caption_flow.worker.pipeline import Backoff, BatchLimit

pytestmark = pytest.mark.timeout(120)


def lingering(port: int, name: str, **overrides: Any) -> WorkerConfig:
    """A worker that keeps running when the dataset is done (the test stops it)."""
    settings = {**worker_config(port, name).model_dump(), **overrides, "exit_when_done": False}
    return WorkerConfig.model_validate(settings)


def stub_worker(config: WorkerConfig, engines: list[StubEngine], **stub: Any) -> Worker:
    return Worker(config, Captioner(config.engine, loader=stub_loader(engines, **stub)))


def test_batch_limit_halves_for_good_and_backoff_doubles_up_to_its_cap() -> None:
    limit = BatchLimit()
    assert limit.cap(16) == 16
    assert [limit.shrink(16), limit.shrink(8), limit.shrink(4), limit.shrink(2)] == [8, 4, 2, 1]
    assert limit.shrink(1) == 1 and limit.cap(16) == 1  # sticky, never below one
    backoff = Backoff(first_s=5.0, max_s=300.0)
    waits = [backoff.begin() for _ in range(8)]
    for n, wait in enumerate(waits):
        assert min(0.75 * 5.0 * 2**n, 300.0) <= wait <= min(1.25 * 5.0 * 2**n, 300.0)
    assert waits[-1] == 300.0 and backoff.active()
    backoff.reset()
    assert not backoff.active() and 3.75 <= backoff.begin() <= 6.25


async def test_out_of_memory_worker_hands_chunks_back_backs_off_and_writes_no_error_rows(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(10)
    config = orchestrator_config(tmp_path / "data", images[0].parent, tiny_model_dir)
    async with running(config) as orch:
        engines: list[StubEngine] = []
        oom = stub_worker(
            lingering(
                orch.port,
                "alice",
                batch_size=4,
                engine_backoff_seconds=60 * TIME_UNIT,  # one failure is all this test needs
            ),
            engines,
            fail=cuda_out_of_memory,
        )
        oom_task = asyncio.create_task(oom.run())
        await eventually(
            lambda: oom.backoff.failures == 1, 30, "the out-of-memory worker to give up"
        )
        # Both chunks are back in the queue: the one it tried (with a reason), the one it held.
        await eventually(
            lambda: orch.snapshot()["chunks"]["leased"] == 0, 5, "its chunks to be released"
        )
        # Halved down to one image (two prompts: 8, 4, 2 requests), then it stopped.
        assert engines[0].calls == [8, 4, 2]
        assert oom.limit.limit == 1
        assert oom.backoff.active()
        snapshot = orch.snapshot()
        assert snapshot["items_done"] == 0 and snapshot["items_failed"] == 0
        assert orch.book is not None
        attempts = {cid: c.attempts for cid, c in orch.book.chunks.items()}
        assert sorted(attempts.values()) == [0, 1], "only the chunk it tried counts an attempt"
        # Backing off, it asks for nothing: the chunks stay in the queue.
        await asyncio.sleep(1.5 * TIME_UNIT)
        assert orch.snapshot()["chunks"]["pending"] == 2 and engines[0].calls == [8, 4, 2]
        oom.stop()
        await asyncio.wait_for(oom_task, 10 * TIME_UNIT)

        ack_log = tmp_path / "acks.jsonl"
        honest = Worker(worker_config(orch.port, "bob", ack_log=ack_log))
        await asyncio.wait_for(honest.run(), 120 * TIME_UNIT)

    rows = read_rows(tmp_path / "data")
    keys = collections.Counter(r["item_key"] for r in rows)
    assert set(keys) == {p.name for p in images} and max(keys.values()) == 1
    assert all(r["error"] is None and len(r["captions"]) == len(PROMPTS) for r in rows)
    assert {r["contributor_id"] for r in rows} == {"bob"}
    db = StateDB(tmp_path / "data" / "state.db")
    try:
        assert {c.status for c in db.load_chunks()} == {"done"}
    finally:
        db.close()
    # Every acknowledged item is in the output exactly as the worker sent it.
    lines = [json.loads(line) for line in ack_log.read_text().splitlines()]
    assert {line["key"] for line in lines} == set(keys)
    by_key = {r["item_key"]: r for r in rows}
    for line in lines:
        assert set(line) == {"item_id", "key", "outputs", "error"}
        row = by_key[line["key"]]
        assert line["outputs"] == {"captions": row["captions"]} and line["error"] is None


async def test_a_reader_failure_releases_the_chunk_at_once(tmp_path: Path, image_folder) -> None:
    images = image_folder(5)
    folder = images[0].parent
    # A symlink loop: listed as a file, but reading it raises RuntimeError in Path.resolve()
    # (Python 3.11), an exception the folder reader does not turn into an item error.
    (folder / "loop.jpg").symlink_to("loop.jpg")
    with pytest.raises(RuntimeError):  # the premise; if the reader learns this, pick another
        list(
            open_source(DatasetConfig(type="local_folder", path=str(folder))).read(
                ".", ["loop.jpg"]
            )
        )
    config = orchestrator_config(
        tmp_path / "data",
        folder,
        tmp_path / "stub-model",
        chunk_size=3,
        lease_seconds=600 * TIME_UNIT,  # neither expiry nor a stall can explain a quick return
        stall_seconds=600 * TIME_UNIT,
        heartbeat_seconds=0.25 * TIME_UNIT,
    )
    async with running(config) as orch:
        engines: list[StubEngine] = []
        worker = stub_worker(
            lingering(
                orch.port,
                "alice",
                batch_size=1,
                prefetch_chunks=0,
                engine_backoff_seconds=60 * TIME_UNIT,
            ),
            engines,
        )
        task = asyncio.create_task(worker.run())
        await eventually(lambda: worker.session_id is not None, 10, "the worker to connect")
        assert worker.heartbeat_interval() == 0.25 * TIME_UNIT  # the orchestrator's wish wins
        # The chunk with the loop: img_0003, img_0004, loop.jpg. Its two good items are sent
        # and acknowledged, then the read fails and the chunk goes straight back.
        await eventually(lambda: worker.backoff.failures == 1, 20, "the read to fail")
        await eventually(
            lambda: orch.snapshot()["chunks"]["leased"] == 0, 5, "the chunk to be released"
        )
        snapshot = orch.snapshot()
        assert snapshot["items_done"] == 5 and snapshot["items_failed"] == 0
        assert snapshot["chunks"]["pending"] == 1 and snapshot["chunks"]["done"] == 1
        worker.stop()
        await asyncio.wait_for(task, 10 * TIME_UNIT)
    rows = read_rows(tmp_path / "data")
    assert sorted(r["item_key"] for r in rows) == sorted(p.name for p in images)


async def test_the_worker_vetoes_remote_code_unless_it_allows_it(
    tmp_path: Path, image_folder
) -> None:
    images = image_folder(8)
    config = orchestrator_config(
        tmp_path / "data", images[0].parent, tmp_path / "stub-model", chunk_size=2
    )
    secret = config.dataset.model_copy(update={"storage_options": {"token": "orchestrator's"}})
    config = config.model_copy(update={"dataset": secret})
    async with running(config) as orch:
        engines: list[StubEngine] = []
        careful = stub_worker(
            worker_config(orch.port, "alice", batch_size=1, dataset_storage_options={"anon": True}),
            engines,
            delay_s=0.05,
        )
        task = asyncio.create_task(careful.run())
        await eventually(lambda: orch.snapshot()["items_done"] >= 2, 20, "the first results")
        # An admin's change reaches the worker (the prompts change) but not its veto.
        await orch.update_job({"trust_remote_code": True, "inference_prompts": ["one prompt"]})
        await asyncio.wait_for(task, 60 * TIME_UNIT)
        assert {e.spec.trust_remote_code for e in engines} == {False}
        assert careful.job is not None and careful.job.inference_prompts == ["one prompt"]
        # Credentials stay where they belong: the worker reads with its own.
        assert careful.dataset is not None
        assert careful.dataset.storage_options == {"anon": True}
    per_row = collections.Counter(len(r["captions"]) for r in read_rows(tmp_path / "data"))
    assert per_row[1] >= 1 and sum(per_row.values()) == 8, per_row

    config = orchestrator_config(
        tmp_path / "data2", images[0].parent, tmp_path / "stub-model", chunk_size=4
    )
    config = config.model_copy(
        update={"vllm": config.vllm.model_copy(update={"trust_remote_code": True})}
    )
    async with running(config) as orch:
        engines = []
        trusting = stub_worker(worker_config(orch.port, "bob", allow_remote_code=True), engines)
        await asyncio.wait_for(trusting.run(), 60 * TIME_UNIT)
        assert engines and {e.spec.trust_remote_code for e in engines} == {True}
