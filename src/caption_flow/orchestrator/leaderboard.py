"""The contributors leaderboard the snapshot carries, read from the state database.

Read on the database thread every few seconds by a supervised loop and kept here, so
monitors (one snapshot per second each) never cost a database read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from caption_flow.storage.state import StateDB
from caption_flow.storage.store import CaptionStore

REFRESH_S = 2.0
# Rows in the snapshot: every monitor receives it every second.
MAX_ROWS = 200


def read_leaderboard(db: StateDB, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """The ``limit`` contributors with most items stored; ``share`` is of all their items."""
    total = db.contributor_items()
    return [
        {
            "contributor": name,
            "items": items,
            "failed": failed,
            "captions": captions,
            "first_seen": first_seen,
            "last_seen": last_seen,
            "trust_level": max(0, min(5, trust)),
            "share": round(items / total, 4) if total else 0.0,
        }
        for name, items, failed, captions, first_seen, last_seen, trust in db.leaderboard(limit)
    ]


class Leaderboard:
    """The cached rows, and the loop that refreshes them."""

    def __init__(self, store: CaptionStore) -> None:
        self._store = store
        self.rows: list[dict[str, Any]] = []

    async def refresh(self) -> None:
        self.rows = await self._store.run_db(read_leaderboard, self._store.db)

    async def loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_S)
