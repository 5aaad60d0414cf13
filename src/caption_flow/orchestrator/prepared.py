"""The buffer of prepared items between dataworkers and GPU workers without the dataset.

Items wait here, per chunk and key, until a worker fetches them (each is taken once) or
their chunk is finished. Memory holds up to ``memory_limit`` bytes; past it items spill to
one append-only file per chunk in ``DATA_DIR/prepared/``, up to ``disk_limit``; past both,
:meth:`put` refuses and dataworkers are made to wait (:meth:`wait_for_room`).

It is a cache, not state: nothing in it is needed for exactly-once (an item missing from it
is read again), so the directory is emptied when the orchestrator starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from caption_flow.protocol.messages import ItemData

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(ItemData).decode


class BufferFull(Exception):
    """Neither memory nor disk has room for an item."""


@dataclass(slots=True)
class _Entry:
    data: bytes | None  # the encoded ItemData while in memory
    offset: int = 0  # else where it is in the chunk's spill file
    length: int = 0


class PreparedBuffer:
    def __init__(self, directory: Path, memory_limit: int, disk_limit: int) -> None:
        self.directory = directory
        self.memory_limit = memory_limit
        self.disk_limit = disk_limit
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.items = 0
        self.relayed = 0  # items taken by workers
        self.served = 0  # items the orchestrator read itself (counted by the item server)
        self._chunks: dict[str, dict[str, _Entry]] = {}
        self._files: dict[str, tuple[Path, int]] = {}  # chunk -> spill file and its size
        self._refused = 0  # size of the last item that did not fit (0: none since)
        self._room = asyncio.Event()
        self._room.set()

    def clear(self) -> None:
        """Empty the spill directory (what a previous run left there is of no use)."""
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    # -- filling --------------------------------------------------------------------------
    def has_room(self) -> bool:
        """Whether an item may fit: one as large as the last refused, or any at all."""
        need = max(self._refused, 1)
        return (
            self.memory_bytes + need <= self.memory_limit
            or self.disk_bytes + need <= self.disk_limit
        )

    async def wait_for_room(self, timeout: float) -> bool:
        """Wait until an item may fit; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._room.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def has(self, chunk_id: str, key: str) -> bool:
        return key in self._chunks.get(chunk_id, {})

    def put(self, chunk_id: str, item: ItemData) -> None:
        """Keep one item (an older copy of the same key is replaced); BufferFull when
        there is no room."""
        encoded = _encode(item)
        size = len(encoded)
        self._pop(chunk_id, item.key)  # an older copy, unread (its disk bytes go with the file)
        if self.memory_bytes + size <= self.memory_limit:
            entry = _Entry(encoded)
            self.memory_bytes += size
        elif self.disk_bytes + size <= self.disk_limit:
            entry = self._spill(chunk_id, encoded)
        else:
            self._refused = size
            self._update_room()
            raise BufferFull(f"no room for {size} bytes")
        self._refused = 0
        self._chunks.setdefault(chunk_id, {})[item.key] = entry
        self.items += 1
        self._update_room()

    def _spill(self, chunk_id: str, encoded: bytes) -> _Entry:
        path, size = self._files.get(chunk_id, (self._spill_path(chunk_id), 0))
        with path.open("ab") as f:
            f.write(encoded)
        self._files[chunk_id] = (path, size + len(encoded))
        self.disk_bytes += len(encoded)
        return _Entry(None, size, len(encoded))

    def _spill_path(self, chunk_id: str) -> Path:
        digest = hashlib.sha256(chunk_id.encode()).hexdigest()[:32]
        return self.directory / f"{digest}.bin"

    # -- emptying -------------------------------------------------------------------------
    def take(self, chunk_id: str, key: str) -> ItemData | None:
        """Remove and return one item (relayed to a worker), None when it is not here."""
        entry = self._pop(chunk_id, key)
        if entry is None:
            return None
        encoded = entry.data
        if encoded is None:
            path, _ = self._files[chunk_id]
            with path.open("rb") as f:
                f.seek(entry.offset)
                encoded = f.read(entry.length)
        if not self._chunks.get(chunk_id):
            self.drop_chunk(chunk_id)  # its last item: the spill file goes too
        self._update_room()
        self.relayed += 1
        return _decode(encoded)

    def _pop(self, chunk_id: str, key: str) -> _Entry | None:
        """Forget one entry and the memory it held; its bytes are not read."""
        entries = self._chunks.get(chunk_id)
        entry = entries.pop(key, None) if entries is not None else None
        if entry is not None:
            self.items -= 1
            if entry.data is not None:
                self.memory_bytes -= len(entry.data)
        return entry

    def drop_chunk(self, chunk_id: str) -> None:
        """Forget a chunk's items (it is finished, or failed): frees its memory and file."""
        for entry in self._chunks.pop(chunk_id, {}).values():
            self.items -= 1
            if entry.data is not None:
                self.memory_bytes -= len(entry.data)
        spilled = self._files.pop(chunk_id, None)
        if spilled is not None:
            path, size = spilled
            self.disk_bytes -= size
            path.unlink(missing_ok=True)
        self._update_room()

    def chunk_ids(self) -> list[str]:
        return list(self._chunks)

    def _update_room(self) -> None:
        if self.has_room():
            self._room.set()
        else:
            self._room.clear()

    def stats(self) -> dict[str, Any]:
        """What monitors show of the buffer."""
        return {
            "items": self.items,
            "memory_bytes": self.memory_bytes,
            "memory_limit": self.memory_limit,
            "disk_bytes": self.disk_bytes,
            "disk_limit": self.disk_limit,
            "relayed": self.relayed,
            "served": self.served,
        }
