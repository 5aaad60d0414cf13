"""A small on-disk cache for dataset metadata (tar member indexes, parquet row counts).

Building a tar's index means reading every member header, once per shard; the orchestrator
keeps the result in its data directory so that a restart lists thousands of shards in
seconds. An entry carries the shard's fingerprint (size and mtime, or ETag) and is ignored
when the shard changed. Entries are written to a temporary file and renamed, so a crash
mid-write leaves the old entry or none, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


class IndexCache:
    """JSON entries under ``root/namespace``; a cache without a root stores nothing."""

    def __init__(self, root: Path | None, namespace: str) -> None:
        self.directory = Path(root) / namespace if root is not None else None
        self.hits = 0
        self.misses = 0
        self.stores = 0

    def path_for(self, name: str) -> Path | None:
        """Where the entry for ``name`` lives (None without a cache directory)."""
        if self.directory is None:
            return None
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:40]
        return self.directory / f"{digest}.json"

    def load(self, name: str, fingerprint: dict[str, Any]) -> Any | None:
        """The payload stored for ``name`` if its fingerprint still matches, else None."""
        path = self.path_for(name)
        if path is None:
            return None
        try:
            with path.open("rb") as handle:
                entry = json.load(handle)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable index cache entry %s: %s", path, exc)
            self.misses += 1
            return None
        if (
            not isinstance(entry, dict)
            or entry.get("version") != CACHE_VERSION
            or entry.get("name") != name
            or entry.get("fingerprint") != fingerprint
        ):
            self.misses += 1
            return None
        self.hits += 1
        return entry.get("payload")

    def store(self, name: str, fingerprint: dict[str, Any], payload: Any) -> None:
        """Write an entry atomically; a failure to write is logged, never raised (the cache
        only saves time)."""
        path = self.path_for(name)
        if path is None:
            return
        entry = {
            "version": CACHE_VERSION,
            "name": name,
            "fingerprint": fingerprint,
            "payload": payload,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(entry, handle, separators=(",", ":"))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            logger.warning("cannot write index cache entry %s: %s", path, exc)
            return
        self.stores += 1
