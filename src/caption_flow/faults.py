"""Fault injection for crash tests: kill this process at a named point.

Only tests set ``CAPTIONFLOW_FAULT`` (``point`` or ``point:N`` for the N-th time the point is
reached). Unset, :func:`reach` is one dictionary lookup. The points sit where a crash is most
dangerous: between a side effect and the record of it.
"""

from __future__ import annotations

import os
import signal

ENV = "CAPTIONFLOW_FAULT"

# Named points, so a typo in a test is an error rather than a fault that never fires.
PART_RENAMED = "part-renamed"  # a Parquet part is on disk, not yet recorded
RESULTS_COMMITTED = "results-committed"  # results are durable, the ack is not yet sent
POINTS = frozenset({PART_RENAMED, RESULTS_COMMITTED})

_hits: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point (known: {sorted(POINTS)})")
    return point, int(nth or 1)


def reach(point: str) -> None:
    """SIGKILL this process if a test armed ``point`` and this is the chosen hit."""
    armed = _armed()
    if armed is None or armed[0] != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
