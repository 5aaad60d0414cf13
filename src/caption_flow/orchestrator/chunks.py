"""What the chunk book keeps per chunk, and what its operations hand back.

Plain data: :mod:`caption_flow.orchestrator.leases` holds the logic.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Holds chunks that were leased when the previous orchestrator process stopped, so that
# their workers can reclaim them after reconnecting instead of racing newcomers for them.
RECLAIM_HOLDER = "(awaiting reconnect)"


class ChunkStatus(enum.StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


def owner_contributor(owner: str | None) -> str:
    """The contributor part of an owner label ``contributor/worker`` (contributor names hold
    no slash; worker names may)."""
    return (owner or "").partition("/")[0]


@dataclass
class Chunk:
    chunk_id: str
    shard: str
    first_item: int
    count: int
    done: set[int] = field(default_factory=set)
    inflight: set[int] = field(default_factory=set)
    # Ids of the current lease that its holder has not settled yet. When it empties and the
    # chunk is still incomplete (failed items to retry, a commit that failed), the chunk goes
    # back to the queue with only what is missing.
    granted: set[int] = field(default_factory=set)
    item_attempts: dict[int, int] = field(default_factory=dict)
    status: ChunkStatus = ChunkStatus.PENDING
    holder: str | None = None  # the session holding the lease
    owner: str | None = None  # who may reclaim it after a reconnect: "contributor/worker"
    # Failed leases per contributor; each contributor counts at most ``per_contributor``
    # of them, so one token cannot fail chunks on its own.
    failures: dict[str, int] = field(default_factory=dict)
    deadline: float = 0.0
    progress_at: float = 0.0
    attempts: int = 0
    reason: str | None = None

    def item_ids(self) -> range:
        return range(self.first_item, self.first_item + self.count)

    def missing(self) -> list[int]:
        """Items neither committed nor on their way to the store."""
        if not self.done and not self.inflight:
            return list(self.item_ids())
        taken = self.done | self.inflight
        return [i for i in self.item_ids() if i not in taken]

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.count


@dataclass(frozen=True)
class Lease:
    chunk_id: str
    shard: str
    item_ids: list[int]
    deadline: float


@dataclass(frozen=True)
class Expiry:
    chunk_id: str
    holder: str
    failed: bool
    attempts: int
    stalled: bool = False


@dataclass(frozen=True)
class Accepted:
    """What :meth:`ChunkBook.accept` made of a result's item ids.

    ``fresh``: new, now in flight until committed or aborted. ``pending``: already in flight
    from an earlier message, not yet durable (ack them only after that commit). The rest
    (``duplicates``) are done already.
    """

    fresh: list[int]
    pending: list[int]
    duplicates: int
