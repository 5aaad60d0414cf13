"""One connected client: its identity, its socket and what it reported."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from caption_flow.protocol.connection import Identity, ServerConnection
from caption_flow.protocol.messages import Message, encode


@dataclass
class Session:
    session_id: str
    identity: Identity
    name: str
    websocket: Any
    connection: ServerConnection
    # Results messages of this connection being stored now (the limit is the config's
    # max_outstanding_results), and their tasks (kept so none is garbage-collected
    # half-way or forgotten).
    outstanding: asyncio.Semaphore
    connected_at: float = field(default_factory=time.time)
    stats: dict[str, float] = field(default_factory=dict)
    items_done: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def role(self) -> str:
        return self.identity.role

    async def send(self, message: Message) -> bool:
        """Send one message; False when the peer is already gone."""
        try:
            await self.websocket.send(encode(message))
        except Exception:  # websockets raises ConnectionClosed subclasses; the peer is gone
            return False
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "session": self.session_id,
            "name": self.name,
            "role": self.role,
            "contributor": self.identity.contributor,
            "connected_s": round(time.time() - self.connected_at, 1),
            "items_done": self.items_done,
            **self.stats,
        }
