"""Turn a worker's results message into journal entries (output rows).

The item key comes from the orchestrator's own record of the lease, never from the message,
and the contributor from the session's token.
"""

from __future__ import annotations

import time

from caption_flow.protocol.messages import Results
from caption_flow.storage.rows import OutputRow, encode_row
from caption_flow.storage.state import JournalEntry


def build_entries(
    results: Results,
    fresh: set[int],
    *,
    keys: dict[int, str],
    dataset: str,
    shard: str,
    contributor: str,
    worker: str,
) -> list[JournalEntry]:
    now = time.time()
    entries: list[JournalEntry] = []
    for item in results.items:
        if item.item_id not in fresh:
            continue
        outputs = {
            field: [text for text in texts if text.strip()] for field, texts in item.outputs.items()
        }
        error = item.error
        if error is None and not any(outputs.values()):
            error = "the engine produced no text"
        row = OutputRow(
            dataset=dataset,
            shard=shard,
            item_key=keys.get(item.item_id, item.key),
            chunk_id=results.chunk_id,
            outputs=outputs,
            model=results.model,
            contributor_id=contributor,
            worker=worker,
            timestamp=now,
            processing_ms=item.processing_ms,
            width=item.width,
            height=item.height,
            error=error,
        )
        entries.append(JournalEntry(item.item_id, encode_row(row), contributor, error is not None))
    return entries
