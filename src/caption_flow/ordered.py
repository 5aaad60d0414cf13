"""Ordered results from a stream of submitted work, with a bound on work in flight."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_in_order(
    submit: Callable[[T], Future[R]], items: Iterable[T], limit: int
) -> Iterator[R]:
    """Submit ``items`` one by one and yield their results in input order, never holding more
    than ``limit`` unconsumed futures; whatever is still pending when the consumer stops is
    cancelled."""
    pending: collections.deque[Future[R]] = collections.deque()
    try:
        for item in items:
            pending.append(submit(item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
