"""Member offset indexes of tar shards, so that nobody reads a tar from the start.

Scanning a tar's headers (512 bytes each, skipping over the data by seeking) gives every
member's offset and size. The orchestrator builds the index once per shard and caches it in
its data directory (listing needs only the keys); a worker builds its own the same way, or
finds it in its own cache, and then reads just its chunk's byte ranges. Compressed tars
(``.tar.gz``) cannot be seeked; they are indexed and read as streams.

Grouping follows webdataset: a member ``dir/name.ext1.ext2`` belongs to the sample with key
``dir/name`` (the basename up to its first dot, within its directory) under the extension
``ext1.ext2``. Members of one key are grouped even when not adjacent, so a key is unique in
its shard.
"""

from __future__ import annotations

import collections
import logging
import re
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from caption_flow.errors import SourceError
from caption_flow.sources.cache import IndexCache
from caption_flow.sources.shards import ShardFile
from caption_flow.sources.tar_headers import scan_headers

logger = logging.getLogger(__name__)

COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
TAR_SUFFIXES = (".tar", *COMPRESSED_SUFFIXES)
# webdataset's rule: key = everything up to the first dot of the basename.
_KEY_RE = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]*)$")
# webdataset skips meta members such as __index__ or __meta__/...
_META_RE = re.compile(r"(^|/)__[^/]*__($|/)")

# (extension, data offset, size)
MemberEntry = tuple[str, int, int]


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, or None for members that are not sample data
    (no extension, hidden files, webdataset meta files)."""
    if name.startswith("./"):
        name = name[2:]
    if _META_RE.search(name):
        return None
    match = _KEY_RE.match(name)
    if not match:
        return None
    return match.group(1), match.group(2)


@dataclass
class TarIndex:
    """Samples of one shard in tar order: key -> its members."""

    shard: str
    samples: dict[str, list[MemberEntry]]
    seekable: bool

    def keys(self) -> list[str]:
        return list(self.samples)

    def to_payload(self) -> dict[str, Any]:
        return {
            "seekable": self.seekable,
            "samples": [[key, members] for key, members in self.samples.items()],
        }

    @classmethod
    def from_payload(cls, shard: str, payload: dict[str, Any]) -> TarIndex:
        samples = {
            key: [(str(ext), int(offset), int(size)) for ext, offset, size in members]
            for key, members in payload["samples"]
        }
        return cls(shard=shard, samples=samples, seekable=bool(payload["seekable"]))


def is_compressed(location: str) -> bool:
    return location.lower().endswith(COMPRESSED_SUFFIXES)


def scan_members(fileobj: BinaryIO, stream: bool, shard: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file. A tar damaged part-way keeps the
    members before the damage (logged); one unreadable from the start raises SourceError."""
    found: list[tuple[str, int, int]] = []
    error: str | None = None
    try:
        if stream:
            with tarfile.open(fileobj=fileobj, mode="r|*") as archive:
                for member in archive:
                    if member.isfile():
                        found.append((member.name, member.offset_data, member.size))
        else:
            found, error = scan_headers(fileobj)
    except (tarfile.TarError, OSError, EOFError) as exc:
        error = str(exc)
    if error is not None:
        if not found:
            raise SourceError(f"not a readable tar: {shard}: {error}")
        logger.warning(
            "tar %s is damaged after %d members (%s); indexing those", shard, len(found), error
        )
    return found


def group_samples(members: list[tuple[str, int, int]]) -> dict[str, list[MemberEntry]]:
    samples: dict[str, list[MemberEntry]] = {}
    for name, offset, size in members:
        parts = split_member_name(name)
        if parts is None:
            continue
        key, ext = parts
        samples.setdefault(key, []).append((ext, offset, size))
    return samples


class TarIndexStore:
    """Indexes by shard: a few in memory, all in the cache directory, built when missing.

    ``builds`` counts indexes built by scanning a tar in this process (tests and logs use it
    to show that a second listing reuses the cache).
    """

    def __init__(
        self, cache_dir: Path | None, storage_options: dict[str, Any], memory_slots: int = 8
    ) -> None:
        self.cache = IndexCache(cache_dir, "tar_index")
        self.storage_options = storage_options
        self.memory_slots = memory_slots
        self._memory: collections.OrderedDict[str, tuple[dict[str, Any], TarIndex]] = (
            collections.OrderedDict()
        )
        self.builds = 0
        self._lock = threading.Lock()  # listing indexes remote shards from several threads

    def get(self, shard: str, location: str) -> TarIndex:
        """The index of ``shard`` read at ``location``; raises SourceError if unreadable."""
        file = ShardFile(location, self.storage_options)
        fingerprint = file.fingerprint()
        with self._lock:
            remembered = self._memory.get(location)
            if remembered is not None and remembered[0] == fingerprint:
                self._memory.move_to_end(location)
                return remembered[1]
        payload = self.cache.load(location, fingerprint)
        index: TarIndex | None = None
        if payload is not None:
            try:
                index = TarIndex.from_payload(shard, payload)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("rebuilding malformed cached index of %s: %s", shard, exc)
        if index is None:
            index = self._build(shard, file)
            self.cache.store(location, fingerprint, index.to_payload())
        with self._lock:
            self._memory[location] = (fingerprint, index)
            while len(self._memory) > self.memory_slots:
                self._memory.popitem(last=False)
        return index

    def _build(self, shard: str, file: ShardFile) -> TarIndex:
        started = time.perf_counter()
        stream = is_compressed(file.location)
        # Remote: small readahead blocks, so scanning fetches headers, not whole images.
        with file.open(block_size=32 * 1024 if file.remote else 64 * 1024) as handle:
            members = scan_members(handle, stream, shard)
        with self._lock:
            self.builds += 1
        index = TarIndex(shard=shard, samples=group_samples(members), seekable=not stream)
        logger.info(
            "indexed %s: %d samples, %d members in %.2fs",
            shard,
            len(index.samples),
            len(members),
            time.perf_counter() - started,
        )
        return index
