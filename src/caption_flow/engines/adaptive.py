"""Adaptive concurrency for one endpoint: plain logic, no I/O, time passed in.

Until the first overload the limit doubles per round of successes (``+1`` each: slow start,
so a worker reaches a big server's capacity in a few rounds, not dozens); after that it
grows by about one per round (``+1/limit`` each). It shrinks by :data:`DECREASE` on an
overload signal (429, 5xx, a time-out), at most once per round: a failure of a request that
started before the last cut says nothing new about the cut limit. A cut of a tenth, not a
half, keeps the sawtooth between 90 % and 100 % of what the server takes (measured: 91-92 %
of a stand-in's capacity, where halving gave 73 % and a fifth 87 %; benchmarks/
bench_openai.py), for about twice the 429s of a cut by a fifth; a server really overloaded
still sees the limit fall every round (to half in seven). ``Retry-After`` blocks new starts until it
has passed, and ``requests_per_minute`` caps starts in any 60-second window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_SECONDS = 60.0
DECREASE = 0.9  # the limit after an overload, as a fraction of the limit before


@dataclass(frozen=True)
class Ticket:
    """Handed out by :meth:`AdaptiveLimit.start`; give it back to ``succeeded``/``failed``."""

    started: float


class AdaptiveLimit:
    """How many requests one endpoint may have in flight now, and when the next may start."""

    def __init__(
        self,
        initial: int,
        maximum: int,
        *,
        minimum: int = 1,
        requests_per_minute: float | None = None,
    ) -> None:
        self.minimum = max(1, minimum)
        self.maximum = max(self.minimum, maximum)
        self.limit = float(min(max(initial, self.minimum), self.maximum))
        self.requests_per_minute = requests_per_minute
        self.in_flight = 0
        self.max_in_flight = 0  # the most ever in flight at once, for tests and stats
        self.peak = self.limit  # the highest limit reached
        self.cuts = 0  # how often the limit was cut
        self.blocked_until = float("-inf")
        self._last_cut = float("-inf")
        self._starts: deque[float] = deque()

    @property
    def slots(self) -> int:
        """Requests that may start now, ignoring time (Retry-After, rate)."""
        return max(0, int(self.limit) - self.in_flight)

    def delay(self, now: float) -> float:
        """Seconds until a start is allowed by time (0: now); slots are not considered."""
        wait = max(0.0, self.blocked_until - now)
        if self.requests_per_minute is not None:
            self._forget(now)
            if len(self._starts) >= self.requests_per_minute:
                wait = max(wait, self._starts[0] + WINDOW_SECONDS - now)
        return wait

    def can_start(self, now: float) -> bool:
        return self.slots > 0 and self.delay(now) == 0.0

    def start(self, now: float) -> Ticket:
        """Record a request going out; the caller checked :meth:`can_start`."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.requests_per_minute is not None:  # only a rate reads (and trims) the starts
            self._starts.append(now)
        return Ticket(now)

    def succeeded(self, ticket: Ticket, now: float) -> None:
        self.in_flight -= 1
        step = 1.0 if self.cuts == 0 else 1.0 / self.limit  # slow start until the first cut
        self.limit = min(float(self.maximum), self.limit + step)
        self.peak = max(self.peak, self.limit)

    def failed(
        self, ticket: Ticket, now: float, *, overloaded: bool, retry_after: float | None = None
    ) -> None:
        """``overloaded``: the endpoint said (or showed) it has too much to do."""
        self.in_flight -= 1
        if retry_after is not None and retry_after > 0:
            self.blocked_until = max(self.blocked_until, now + retry_after)
        if overloaded and ticket.started >= self._last_cut:
            self.limit = max(float(self.minimum), self.limit * DECREASE)
            self._last_cut = now
            self.cuts += 1

    def _forget(self, now: float) -> None:
        while self._starts and self._starts[0] <= now - WINDOW_SECONDS:
            self._starts.popleft()


def parse_retry_after(value: str | None, *, cap: float = 300.0) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds only; dates are rare from model servers)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, cap)
