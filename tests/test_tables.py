"""The original tool's contributors and jobs tables beside captions/, and the captions'
quality_score column: written from the state database after compactions and at stop."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import TIME_UNIT, eventually, orchestrator_config, read_rows, running, worker_config

from caption_flow.storage.reader import output_dataset
from caption_flow.storage.state import ChunkState, StateDB
from caption_flow.storage.tables import (
    CONTRIBUTORS_FILE,
    DATASET_NAME_KEY,
    JOBS_FILE,
    write_tables,
)
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(120)

CONTRIBUTOR_COLUMNS = ["contributor_id", "name", "total_captions", "trust_level"]
JOB_COLUMNS = ["job_id", "dataset", "shard", "status", "assigned_to", "timestamp"]


def table(path: Path) -> pa.Table:
    return pq.read_table(path)


def chunk_rows(data_dir: Path) -> dict[str, str]:
    """chunk_id -> shard, from the state database."""
    db = StateDB(data_dir / "state.db", read_only=True)
    try:
        return {c.chunk_id: c.shard for c in db.load_chunks()}
    finally:
        db.close()


def tables_match_output(data_dir: Path) -> bool:
    """Both tables exist and agree with the stored rows and chunks (for eventually())."""
    if not (data_dir / CONTRIBUTORS_FILE).exists() or not (data_dir / JOBS_FILE).exists():
        return False
    per = collections.Counter(r["contributor_id"] for r in read_rows(data_dir))
    totals = {
        r["contributor_id"]: r["total_captions"]
        for r in table(data_dir / CONTRIBUTORS_FILE).to_pylist()
    }
    jobs = table(data_dir / JOBS_FILE).to_pylist()
    return totals == dict(per) and bool(jobs) and all(j["status"] == "done" for j in jobs)


async def run_to_end(config: Any, names: tuple[str, ...], before_stop: Any = None) -> float:
    """Caption everything with one worker per token; ``before_stop(data_dir)`` is awaited
    while the orchestrator still runs. Returns the time the run started."""
    started = time.time()
    async with running(config) as orch:
        workers = [Worker(worker_config(orch.port, n)) for n in names]
        await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), 120 * TIME_UNIT)
        if before_stop is not None:
            await before_stop(config.storage.data_dir)
    return started


def check_tables(data_dir: Path, started: float, dataset: str) -> None:
    """Exactly the original columns, totals per contributor equal to the stored rows, every
    chunk once and done, nobody assigned, written after the run started."""
    rows = read_rows(data_dir)
    contributors = table(data_dir / CONTRIBUTORS_FILE)
    assert contributors.column_names == CONTRIBUTOR_COLUMNS
    assert contributors.schema.field("total_captions").type == pa.int64()
    assert contributors.schema.field("trust_level").type == pa.int32()
    per = collections.Counter(r["contributor_id"] for r in rows)
    found = contributors.to_pylist()
    assert {r["contributor_id"]: r["total_captions"] for r in found} == dict(per)
    assert all(r["name"] == r["contributor_id"] and r["trust_level"] == 1 for r in found)

    jobs = table(data_dir / JOBS_FILE)
    assert jobs.column_names == JOB_COLUMNS
    job_rows = jobs.to_pylist()
    chunks = chunk_rows(data_dir)
    assert sorted(j["job_id"] for j in job_rows) == sorted(chunks)  # each chunk exactly once
    for j in job_rows:
        assert j["status"] == "done" and j["assigned_to"] is None
        assert j["shard"] == chunks[j["job_id"]] and j["dataset"] == dataset
        assert j["timestamp"].timestamp() >= started - 1
    assert {r["chunk_id"] for r in rows} == set(chunks)
    assert not list(data_dir.glob(".*.tmp")), "a temporary table file was left behind"


async def test_tables_follow_compactions_and_match_the_rows(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(6)
    data_dir = tmp_path / "data"
    config = orchestrator_config(data_dir, images[0].parent, tiny_model_dir, chunk_size=2)

    async def written_by_compaction(folder: Path) -> None:
        # The orchestrator still runs: only a compaction can have written them.
        await eventually(lambda: tables_match_output(folder), 20, "tables after a compaction")

    started = await run_to_end(config, ("alice", "bob"), before_stop=written_by_compaction)
    check_tables(data_dir, started, dataset="test")
    rows = read_rows(data_dir)
    assert len(rows) == 6
    schema = output_dataset(data_dir / "captions").schema
    assert schema.field("quality_score").type == pa.float32()
    assert all(r["quality_score"] is None for r in rows)


async def test_a_clean_stop_brings_the_tables_up_to_date(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(6)
    data_dir = tmp_path / "data"
    config = orchestrator_config(data_dir, images[0].parent, tiny_model_dir, chunk_size=2)
    storage = config.storage.model_copy(update={"compact_seconds": 3600, "compact_rows": 10**6})
    config = config.model_copy(update={"storage": storage})  # no compaction before the stop

    async def not_yet(folder: Path) -> None:
        assert not (folder / JOBS_FILE).exists() and not read_rows(folder)

    started = await run_to_end(config, ("alice", "bob"), before_stop=not_yet)
    check_tables(data_dir, started, dataset="test")
    assert len(read_rows(data_dir)) == 6


def test_jobs_show_who_holds_a_lease_and_stream_in_batches(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.set_meta(DATASET_NAME_KEY, "photos")
    db.add_chunks([(f"s:{i}", "s", [f"k{i}a", f"k{i}b"]) for i in range(5)])
    db.commit(
        [],
        [
            ChunkState("s:1", "leased", holder="alice/worker-1", deadline=time.time() + 60),
            ChunkState("s:3", "failed", attempts=3, reason="bad images"),
        ],
    )
    db.close()
    assert write_tables(tmp_path, batch_rows=2) == (0, 5)  # three batches of at most two
    jobs = {j["job_id"]: j for j in table(tmp_path / JOBS_FILE).to_pylist()}
    assert list(jobs) == [f"s:{i}" for i in range(5)]
    assert jobs["s:1"]["status"] == "leased" and jobs["s:1"]["assigned_to"] == "alice"
    assert jobs["s:3"]["status"] == "failed" and jobs["s:3"]["assigned_to"] is None
    assert {j["status"] for k, j in jobs.items() if k not in ("s:1", "s:3")} == {"pending"}
    assert {j["dataset"] for j in jobs.values()} == {"photos"}
    assert table(tmp_path / CONTRIBUTORS_FILE).column_names == CONTRIBUTOR_COLUMNS
    assert table(tmp_path / CONTRIBUTORS_FILE).num_rows == 0
