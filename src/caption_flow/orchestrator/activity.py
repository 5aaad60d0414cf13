"""What monitors show of the past: throughput history and a log of notable events.

Both are kept by the orchestrator, bounded, so that a monitor connecting late still sees the
last hours and a flood of connections cannot grow memory. Plain logic: every call takes
``now`` (unix seconds), nothing here reads a clock or does I/O.
"""

from __future__ import annotations

from collections import deque
from typing import Any

BUCKET_S = 10.0
KEEP_S = 2 * 3600.0  # two hours of 10 s buckets: 720 points
ACTIVITY_KEEP = 200
MAX_TEXT_CHARS = 240

# What an activity entry may be about; monitors colour by kind.
KINDS = ("connect", "disconnect", "refused", "failure", "lease", "config", "revoked", "done")


class ThroughputHistory:
    """Items done (a running total) sampled into fixed buckets of ``bucket_s`` seconds.

    ``record`` is called often (every second); a bucket keeps the last sample taken in it,
    so a point is ``[time of that sample, items done then]``, at most one per bucket. Only
    the newest ``keep_s`` seconds are kept.
    """

    def __init__(self, bucket_s: float = BUCKET_S, keep_s: float = KEEP_S) -> None:
        if bucket_s <= 0 or keep_s < bucket_s:
            raise ValueError("bucket_s must be > 0 and keep_s at least one bucket")
        self.bucket_s = bucket_s
        self._points: deque[list[float]] = deque(maxlen=int(keep_s // bucket_s))

    def record(self, items_done: int, now: float) -> None:
        last = self._points[-1] if self._points else None
        if last is None or self._bucket(now) > self._bucket(last[0]):
            self._points.append([now, items_done])
        elif self._bucket(now) == self._bucket(last[0]):
            last[0], last[1] = now, items_done
        else:  # a clock that went back: the newest total stays in the newest bucket
            last[1] = items_done

    def _bucket(self, t: float) -> int:
        return int(t // self.bucket_s)

    def points(self) -> list[list[float]]:
        """``[[bucket start, items done], ...]``, oldest first (copies)."""
        return [list(p) for p in self._points]

    def average_rate(self, items_done: int, now: float) -> float:
        """Items per second since the oldest point kept (0.0 with too little history)."""
        if not self._points:
            return 0.0
        t0, done0 = self._points[0]
        span = now - t0
        return max(0.0, (items_done - done0) / span) if span >= self.bucket_s / 2 else 0.0


def eta_seconds(remaining: int, rate: float) -> float | None:
    """Seconds until ``remaining`` items are done at ``rate`` items/s; None when unknown."""
    if remaining <= 0:
        return 0.0
    if rate <= 0:
        return None
    return round(remaining / rate, 1)


class ActivityLog:
    """The newest ``keep`` notable events, each ``{"t": unix time, "kind", "text"}``."""

    def __init__(self, keep: int = ACTIVITY_KEEP) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=keep)

    def add(self, kind: str, text: str, now: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown activity kind {kind!r}")
        self._entries.append({"t": round(now, 3), "kind": kind, "text": text[:MAX_TEXT_CHARS]})

    def recent(self, count: int | None = None) -> list[dict[str, Any]]:
        """The newest ``count`` entries (all when None), oldest first (copies)."""
        entries = list(self._entries)
        if count is not None:
            entries = entries[-count:] if count > 0 else []
        return [dict(e) for e in entries]

    def __len__(self) -> int:
        return len(self._entries)
