"""Turn a dataset listing into durable chunks, and the database into a ChunkBook.

Chunks are slices of one shard's keys in listing order. Chunk ids and item ids, once written,
never change: a later listing only appends chunks for keys the database has not seen, so
adding files or shards never remaps finished work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

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


def build_book(
    db: StateDB, lease_seconds: float, max_attempts: int, now: float | None = None
) -> ChunkBook:
    """The in-memory book, with every item the database already holds as done.

    Chunks that were leased when the last process stopped are held for one lease time, so
    the workers that had them can reclaim them when they reconnect.
    """
    now = time.time() if now is None else now
    book = ChunkBook(lease_seconds, max_attempts)
    for row in db.load_chunks():
        done: Iterable[int] = (
            range(row.first_item, row.first_item + row.count)
            if row.status == "done"
            else db.done_items(row.chunk_id)
        )
        book.add_chunk(
            row.chunk_id,
            row.shard,
            row.first_item,
            row.count,
            done_ids=done,
            attempts=row.attempts,
            failed_reason=row.reason if row.status == "failed" else None,
        )
        if row.status == "leased":
            book.hold_for_reclaim(row.chunk_id, now)
    return book
