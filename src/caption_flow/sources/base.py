"""The dataset interface: cheap listing for the orchestrator, item reads for workers.

A dataset is a list of shards; a shard holds items with stable keys. The orchestrator only
lists (keys, never pixels); a worker reads the items of one chunk of one shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ShardListing:
    """A shard's identifier and its item keys in their natural order."""

    shard: str
    keys: list[str]


@dataclass
class SourceItem:
    """Raw bytes of one item (or why they could not be read) and its extra columns."""

    key: str
    data: bytes | None
    columns: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # The original's size when ``data`` was shrunk before it reached the worker (0: not).
    width: int = 0
    height: int = 0


def take_items(reader: Iterator[SourceItem], count: int) -> list[SourceItem]:
    """Up to ``count`` items from ``reader`` (run in a thread: reading may block)."""
    taken: list[SourceItem] = []
    for item in reader:
        taken.append(item)
        if len(taken) >= count:
            break
    return taken


def close_reader(reader: Iterator[SourceItem] | None) -> None:
    """End a reader early: a generator closes the shard it holds open (a plain iterator,
    or None for a reader that never opened, has nothing to close)."""
    close = getattr(reader, "close", None)
    if close is not None:
        close()


class Source(Protocol):
    """A dataset. ``list_shards`` runs on the orchestrator, ``read`` on workers."""

    def list_shards(self) -> Iterator[ShardListing]: ...

    def read(self, shard: str, keys: Sequence[str]) -> Iterator[SourceItem]:
        """Yield one SourceItem per key, in the given order; a bad item carries ``error``."""
        ...
