"""What a connection may cost: a message rate per connection and one byte budget for all.

Both slow a client down instead of dropping it: the server stops reading its socket, and TCP
back-pressure does the rest. :class:`TokenBucket` is plain logic (callers pass ``now``);
:class:`ByteBudget` is the one shared asyncio piece.
"""

from __future__ import annotations

import asyncio


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` saved up. One token per message."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Spend a token; return how long to wait first (0 when one was there)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class ByteBudget:
    """Bytes held for results being stored, across every connection: the memory ceiling.

    A frame larger than the whole budget still gets through alone (it passed the size limit
    already), so nothing can wait forever.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    async def acquire(self, size: int) -> int:
        size = min(size, self.limit)
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + size <= self.limit)
            self.used += size
        return size

    async def release(self, size: int) -> None:
        async with self._freed:
            self.used -= size
            self._freed.notify_all()
