"""The original tool's two side tables, kept beside ``captions/`` for its users' scripts.

- ``contributors.parquet``: ``contributor_id, name, total_captions, trust_level``. A
  contributor is a worker token's name, so ``contributor_id`` and ``name`` are both that name;
  ``total_captions`` counts the rows stored for it (failed items included: a failed item has
  a row with ``error`` set); ``trust_level`` is 1 for everyone until quality checks grade
  contributors.
- ``jobs.parquet``: ``job_id, dataset, shard, status, assigned_to, timestamp``, one row per
  chunk. ``job_id`` is the chunk id, ``status`` its state (pending, leased, done, failed),
  ``assigned_to`` the contributor holding a leased chunk (null otherwise) and ``timestamp``
  when the table was written.

Both are snapshots of the state database (the truth; these are for reading), rewritten after
compactions and at stop. Each is streamed from one query into a temporary file in record
batches, fsynced and renamed over the old one: a reader sees the old table or the new one,
never half of one, and millions of chunks never sit in memory as Python objects at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from caption_flow.storage.state import StateDB

log = logging.getLogger(__name__)

CONTRIBUTORS_FILE = "contributors.parquet"
JOBS_FILE = "jobs.parquet"
# Meta key of the dataset name the jobs table shows (the name rows carry in their
# ``dataset`` column), recorded by the store that knows the config.
DATASET_NAME_KEY = "dataset_name"
TRUST_LEVEL = 1
BATCH_ROWS = 65_536

CONTRIBUTORS_SCHEMA = pa.schema(
    [
        pa.field("contributor_id", pa.string()),
        pa.field("name", pa.string()),
        pa.field("total_captions", pa.int64()),
        pa.field("trust_level", pa.int32()),
    ]
)
JOBS_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("status", pa.string()),
        pa.field("assigned_to", pa.string()),
        pa.field("timestamp", pa.timestamp("ms", tz="UTC")),
    ]
)


def assigned_to(holder: str | None) -> str | None:
    """The contributor part of a lease holder ``contributor/worker`` (token names hold no
    slash); None for a chunk nobody holds."""
    return None if holder is None else holder.partition("/")[0]


def _contributor_batches(db: StateDB, size: int) -> Iterator[pa.RecordBatch]:
    for rows in db.contributor_batches(size):
        names = [r[0] for r in rows]
        yield pa.record_batch(
            [
                pa.array(names, pa.string()),
                pa.array(names, pa.string()),
                pa.array([r[1] for r in rows], pa.int64()),
                pa.array([TRUST_LEVEL] * len(rows), pa.int32()),
            ],
            schema=CONTRIBUTORS_SCHEMA,
        )


def _job_batches(db: StateDB, dataset: str, now_ms: int, size: int) -> Iterator[pa.RecordBatch]:
    for rows in db.chunk_batches(size):
        n = len(rows)
        yield pa.record_batch(
            [
                pa.array([r[0] for r in rows], pa.string()),
                pa.repeat(pa.scalar(dataset, pa.string()), n),
                pa.array([r[1] for r in rows], pa.string()),
                pa.array([r[2] for r in rows], pa.string()),
                pa.array([assigned_to(r[3]) for r in rows], pa.string()),
                pa.repeat(pa.scalar(now_ms, JOBS_SCHEMA.field("timestamp").type), n),
            ],
            schema=JOBS_SCHEMA,
        )


def write_atomically(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    """Stream ``batches`` into ``path`` through a temporary file, fsync, rename, fsync the
    folder. Returns the rows written. On failure the old file stays as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return rows


def write_tables(data_dir: Path, batch_rows: int = BATCH_ROWS) -> tuple[int, int]:
    """Rewrite both tables from ``data_dir/state.db`` through a read-only connection of their
    own (safe on any thread). Returns (contributors, jobs) rows written."""
    db = StateDB(data_dir / "state.db", read_only=True)
    try:
        dataset = db.get_meta(DATASET_NAME_KEY) or ""
        now_ms = int(time.time() * 1000)
        contributors = write_atomically(
            data_dir / CONTRIBUTORS_FILE, CONTRIBUTORS_SCHEMA, _contributor_batches(db, batch_rows)
        )
        jobs = write_atomically(
            data_dir / JOBS_FILE, JOBS_SCHEMA, _job_batches(db, dataset, now_ms, batch_rows)
        )
    finally:
        db.close()
    return contributors, jobs
