"""Throughput over a sliding window, for the status line, monitors and metrics."""

from __future__ import annotations

import time
from collections import deque


class RateMeter:
    """Items per second over roughly the last ``window`` seconds."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.total = 0
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])

    def add(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.total += count
        self._samples.append((now, self.total))
        self._trim(now)

    def _trim(self, now: float) -> None:
        # Keep one sample at or before the window's start as the baseline.
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        base_t, base_total = self._samples[0]
        span = now - base_t
        return (self.total - base_total) / span if span > 0 else 0.0
