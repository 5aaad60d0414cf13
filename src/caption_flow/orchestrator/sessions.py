"""One connected client: its identity, its socket and what it reported."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from caption_flow.protocol.connection import Identity, ServerConnection
from caption_flow.protocol.messages import Message, encode

CAPABILITY_CHARS = 128  # longest engine, model or gpu text shown to monitors
SHOWN_CAPABILITIES = ("engine", "model", "gpu", "gpu_id")


def shown_capabilities(
    capabilities: dict[str, str | int | float | bool],
) -> dict[str, str | int | float | bool]:
    """The part of a hello's capabilities a session keeps: what monitors show, cut short
    (memory per connection matters at 10k)."""
    return {
        k: v[:CAPABILITY_CHARS] if isinstance(v, str) else v
        for k, v in capabilities.items()
        if k in SHOWN_CAPABILITIES
    }


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
    # What the hello said this client is (engine, model, gpu): see shown_capabilities.
    capabilities: dict[str, str | int | float | bool] = field(default_factory=dict)
    last_heartbeat: float | None = None  # monotonic
    current_chunk: str = ""  # the chunk the worker says it captions, if leased to it
    items_done: int = 0
    reads_remote: bool = False  # a worker that fetches its items over the connection
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Told the size of every frame sent (the orchestrator's bytes-out metric).
    count_sent: Callable[[int], object] | None = None

    @property
    def role(self) -> str:
        return self.identity.role

    async def send(self, message: Message) -> bool:
        """Send one message; False when the peer is already gone."""
        frame = encode(message)
        if self.count_sent is not None:
            self.count_sent(len(frame))
        try:
            await self.websocket.send(frame)
        except Exception:  # websockets raises ConnectionClosed subclasses; the peer is gone
            return False
        return True

    def describe(self) -> dict[str, Any]:
        """For monitors. The worker's own figures come first so that none of its stat names
        can overwrite who it is."""
        caps = self.capabilities
        described: dict[str, Any] = {
            **self.stats,
            "session": self.session_id,
            "name": self.name,
            "role": self.role,
            "contributor": self.identity.contributor,
            "connected_s": round(time.time() - self.connected_at, 1),
            "items_done": self.items_done,
            "engine": str(caps.get("engine", "")),
            "model": str(caps.get("model", "")),
            "gpu": str(caps.get("gpu", "")),
            "current_chunk": self.current_chunk,
            "heartbeat_age_s": (
                None
                if self.last_heartbeat is None
                else round(time.monotonic() - self.last_heartbeat, 1)
            ),
        }
        return described
