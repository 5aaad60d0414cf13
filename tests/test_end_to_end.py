"""The whole pipeline in one process: a real orchestrator, real workers over websockets on
127.0.0.1, real inference on the tiny model, real SQLite and Parquet."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest
from support import (
    PROMPTS,
    TIME_UNIT,
    caption_all,
    eventually,
    orchestrator_config,
    read_rows,
    running,
    worker_config,
)

from caption_flow.orchestrator.server import Orchestrator
from caption_flow.storage.state import StateDB
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(240)


async def test_two_workers_caption_every_item_exactly_once(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(23)
    config = orchestrator_config(tmp_path / "data", images[0].parent, tiny_model_dir)
    _, snapshot = await caption_all(config, ["alice", "bob"])

    rows = read_rows(tmp_path / "data")
    keys = collections.Counter(r["item_key"] for r in rows)
    assert set(keys) == {p.name for p in images}
    assert max(keys.values()) == 1, "no item may have two rows"
    for row in rows:
        assert row["error"] is None
        assert len(row["captions"]) == len(PROMPTS), row
        assert all(c.strip() for c in row["captions"])
        assert row["contributor_id"] in {"alice", "bob"}
        assert row["width"] > 0 and row["height"] > 0
        assert row["model"] == str(tiny_model_dir)
    assert snapshot["items_done"] == 23 and snapshot["chunks"]["done"] == 5
    db = StateDB(tmp_path / "data" / "state.db")
    assert {c.status for c in db.load_chunks()} == {"done"}
    assert sum(n for _, n, _ in db.contributors()) == 23
    db.close()


async def test_corrupt_and_empty_images_fail_with_a_reason_and_the_rest_goes_on(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(8)
    folder = images[0].parent
    (folder / "broken.jpg").write_bytes(images[0].read_bytes()[:200])  # truncated JPEG
    (folder / "empty.png").write_bytes(b"")
    (folder / "not-an-image.webp").write_bytes(b"this is text, not pixels")
    config = orchestrator_config(tmp_path / "data", folder, tiny_model_dir, chunk_size=4)
    await caption_all(config)
    rows = {r["item_key"]: r for r in read_rows(tmp_path / "data")}
    assert len(rows) == 11
    for bad in ("broken.jpg", "empty.png", "not-an-image.webp"):
        assert rows[bad]["error"], bad
        assert rows[bad]["captions"] == []
    assert "empty" in rows["empty.png"]["error"]
    good = [r for k, r in rows.items() if k.startswith("img_")]
    assert len(good) == 8 and all(r["error"] is None and r["captions"] for r in good)


async def test_restart_resumes_and_adding_files_keeps_keys(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(6)
    folder = images[0].parent
    config = orchestrator_config(tmp_path / "data", folder, tiny_model_dir, chunk_size=4)
    await caption_all(config)
    first = {r["item_key"]: r["chunk_id"] for r in read_rows(tmp_path / "data")}

    more = image_folder(3, seed=1)  # new files, some sorting before the old ones
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.jpg").write_bytes(images[0].read_bytes())
    async with running(config) as orch:
        assert orch.snapshot()["items_done"] == 6
        await asyncio.wait_for(
            Worker(worker_config(orch.port, "bob")).run(), timeout=180 * TIME_UNIT
        )
    rows = read_rows(tmp_path / "data")
    by_key = collections.Counter(r["item_key"] for r in rows)
    assert max(by_key.values()) == 1
    assert set(by_key) == {p.name for p in images + more} | {"sub/deep.jpg"}
    for row in rows:
        if row["item_key"] in first:
            assert row["chunk_id"] == first[row["item_key"]]
            assert row["contributor_id"] == "alice"
        else:
            assert row["contributor_id"] == "bob"


async def test_job_update_reaches_running_workers_without_reload(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(12)
    config = orchestrator_config(tmp_path / "data", images[0].parent, tiny_model_dir, chunk_size=2)
    orch = Orchestrator(config)
    await orch.start()
    worker = Worker(worker_config(orch.port, "alice", batch_size=1))
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: orch.snapshot()["items_done"] >= 2, 60, "two items")
        engines_before = list(worker.captioner.engines.values())
        await orch.update_job({"inference_prompts": ["only one prompt now"]})
        target = orch.snapshot()["items_done"] + 3
        await eventually(lambda: orch.snapshot()["items_done"] >= target, 60, "three more")
        engines_after = list(worker.captioner.engines.values())
        # Heartbeats (every second in these tests) report the engine's figures.
        await eventually(
            lambda: task.done() or any("engine_busy" in s.stats for s in orch.sessions.values()),
            30,
            "a heartbeat with the engine's figures",
        )
        stats = next((s.stats for s in orch.sessions.values() if "engine_busy" in s.stats), None)
        assert stats is not None, "no heartbeat with the engine's figures arrived"
        assert 0.0 < stats["engine_busy"] <= 1.0 and stats["items_per_s"] >= 0.0
        await asyncio.wait_for(task, 120 * TIME_UNIT)
    finally:
        await orch.stop()
    assert len(engines_before) == 1
    assert engines_after[0] is engines_before[0], "a prompt change must not reload the model"
    rows = read_rows(tmp_path / "data")
    per_row = collections.Counter(len(r["captions"]) for r in rows)
    assert per_row[2] >= 2 and per_row[1] >= 1, per_row
    assert sum(per_row.values()) == 12


async def test_a_worker_whose_model_cannot_load_hands_its_chunks_back_and_stops(
    tmp_path: Path, image_folder
) -> None:
    from caption_flow.errors import EngineError

    images = image_folder(4)
    config = orchestrator_config(
        tmp_path / "data", images[0].parent, tmp_path / "no-such-model", chunk_size=2
    )
    async with running(config) as orch:
        worker = Worker(worker_config(orch.port, "alice"))
        with pytest.raises(EngineError):
            await asyncio.wait_for(worker.run(), 60 * TIME_UNIT)
        for _ in range(100):  # the release is processed after the worker's last frame
            if orch.snapshot()["chunks"]["leased"] == 0:
                break
            await asyncio.sleep(0.05)
        assert orch.snapshot()["chunks"] == {"pending": 2, "leased": 0, "done": 0, "failed": 0}
