"""Turn a dataset listing into durable chunks, and the database into a ChunkBook.

Chunks are slices of one shard's keys in listing order. Chunk ids and item ids, once written,
never change: a later listing only appends chunks for keys the database has not seen, so
adding files or shards never remaps finished work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from caption_flow.config.models import OrchestratorConfig
from caption_flow.orchestrator.leases import ChunkBook
from caption_flow.sources.base import ShardListing
from caption_flow.storage.state import StateDB

log = logging.getLogger(__name__)


def chunk_id_for(shard: str, seq: int) -> str:
    return f"{shard}:{seq}"


def sync_chunks(
    db: StateDB,
    listings: Iterable[ShardListing],
    chunk_size: int,
) -> int:
    """Append chunks for keys not yet in the database. Returns how many items were added."""
    added = 0
    for listing in listings:
        known = db.known_keys(listing.shard)
        fresh = [k for k in listing.keys if k not in known]
        if fresh:
            seq = db.next_chunk_seq(listing.shard)
            chunks = []
            for start in range(0, len(fresh), chunk_size):
                keys = fresh[start : start + chunk_size]
                chunks.append((chunk_id_for(listing.shard, seq), listing.shard, keys))
                seq += 1
            db.add_chunks(chunks)
            added += len(fresh)
    return added


def build_book(db: StateDB, config: OrchestratorConfig, now: float | None = None) -> ChunkBook:
    """The in-memory book, with every item the database already holds as done.

    Chunks that were leased when the last process stopped are held for the reconnect window
    only, for the worker (same contributor and name) that had them; then they are queued.
    ``now`` is a monotonic time.
    """
    now = time.monotonic() if now is None else now
    book = ChunkBook(
        config.lease_seconds,
        config.max_chunk_attempts,
        stall_seconds=config.stall_seconds,
        max_chunks_per_session=config.max_chunks_per_session,
        reconnect_seconds=config.reconnect_seconds,
        max_item_attempts=config.max_item_attempts,
        attempts_per_contributor=config.max_attempts_per_contributor
        or (config.max_chunk_attempts if len(config.auth.worker_tokens) <= 1 else 1),
    )
    repaired = db.finish_chunks()  # databases from before results and states shared a commit
    if repaired:
        log.info("%d finished chunks were still marked leased or pending; marked done", repaired)
    for row in db.load_chunks():
        finished = row.status == "done"
        book.add_chunk(
            row.chunk_id,
            row.shard,
            row.first_item,
            row.count,
            done_ids=(
                range(row.first_item, row.first_item + row.count)
                if finished
                else db.done_items(row.chunk_id)
            ),
            attempts=row.attempts,
            failed_reason=row.reason if row.status == "failed" else None,
            item_attempts=None if finished else db.item_attempts(row.chunk_id),
        )
        if row.status == "leased":
            book.hold_for_reclaim(row.chunk_id, row.holder, now)
    return book
