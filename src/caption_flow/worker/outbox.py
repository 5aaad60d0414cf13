"""Results kept until the orchestrator acknowledges them, and resent after a reconnect."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TextIO

from caption_flow.protocol.messages import Results


class Outbox:
    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._pending: dict[int, Results] = {}
        self._seq = 0
        self._changed = asyncio.Event()

    def add(self, chunk_id: str, items: list, model: str) -> Results:  # type: ignore[type-arg]
        self._seq += 1
        message = Results(chunk_id=chunk_id, seq=self._seq, items=items, model=model)
        self._pending[self._seq] = message
        return message

    def settle(self, seq: int) -> Results | None:
        """An ack or reject arrived: forget the message."""
        message = self._pending.pop(seq, None)
        self._changed.set()
        return message

    def drop_chunk(self, chunk_id: str) -> None:
        for seq in [s for s, m in self._pending.items() if m.chunk_id == chunk_id]:
            del self._pending[seq]
        self._changed.set()

    async def wait_chunk_settled(self, chunk_id: str) -> None:
        """Wait until no message for ``chunk_id`` is unacknowledged."""
        while any(m.chunk_id == chunk_id for m in self._pending.values()):
            self._changed.clear()
            await self._changed.wait()

    def unacked(self) -> list[Results]:
        return [self._pending[s] for s in sorted(self._pending)]

    def chunks(self) -> set[str]:
        return {m.chunk_id for m in self._pending.values()}

    def __len__(self) -> int:
        return len(self._pending)

    async def wait_below(self, limit: int | None = None) -> None:
        """Back-pressure: wait while more than ``limit`` messages are unacknowledged."""
        limit = self.limit if limit is None else limit
        while len(self._pending) >= limit:
            self._changed.clear()
            await self._changed.wait()

    async def wait_empty(self) -> None:
        await self.wait_below(1)


class AckLog:
    """One JSON line per acknowledged item, appended as each ack arrives.

    A record of what the orchestrator promised is durable, for crash tests and audits: every
    line must match a row of the final output. Line-buffered, so a killed worker loses at
    most the line being written.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = path.open("a", buffering=1, encoding="utf-8")

    def write(self, message: Results) -> None:
        if self._file is None:
            return
        for item in message.items:
            line = {
                "item_id": item.item_id,
                "key": item.key,
                "outputs": item.outputs,
                "error": item.error,
            }
            self._file.write(json.dumps(line, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
