"""Turn a worker's results message into one journal batch.

The item key comes from the orchestrator's own record of the lease, never from the message,
and the contributor from the session's token. Items already done are left out.
"""

from __future__ import annotations

import time

import msgspec

from caption_flow.protocol.messages import Results
from caption_flow.storage.rows import JournalRecord, encode_record
from caption_flow.storage.state import JournalBatch


def build_batch(
    results: Results,
    fresh: list[int],
    *,
    keys: dict[int, str],
    dataset: str,
    shard: str,
    contributor: str,
    worker: str,
) -> JournalBatch:
    wanted = set(fresh)
    items = [
        item
        if keys.get(item.item_id, item.key) == item.key
        else msgspec.structs.replace(item, key=keys[item.item_id])
        for item in results.items
        if item.item_id in wanted
    ]
    record = JournalRecord(
        dataset=dataset,
        shard=shard,
        chunk_id=results.chunk_id,
        model=results.model,
        contributor_id=contributor,
        worker=worker,
        timestamp=time.time(),
        items=items,
    )
    failed = sum(1 for item in items if item.error is not None)
    return JournalBatch([i.item_id for i in items], encode_record(record), contributor, failed)
