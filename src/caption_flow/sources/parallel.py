"""Ordered, bounded concurrency for I/O-bound steps (remote listing, URL downloads).

Results come back in input order, and at most ``window`` calls are in flight or finished but
not yet consumed, so a slow consumer bounds memory and a slow call delays only its own result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from caption_flow.ordered import bounded_in_order

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], concurrency: int, window: int = 0
) -> Iterator[R]:
    """``map(fn, items)`` on ``concurrency`` threads. ``fn`` should return failures as values:
    an exception it raises propagates when its result is reached, and stops the map."""
    if concurrency <= 1:
        yield from map(fn, items)
        return
    limit = max(window, concurrency)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="source-io") as executor:
        yield from bounded_in_order(lambda item: executor.submit(fn, item), items, limit)
