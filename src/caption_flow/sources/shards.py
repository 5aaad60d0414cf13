"""Where shard files live: expanding a shard pattern, mapping a shard id to this host's copy,
and reading bytes from a local file or any fsspec URL (http(s), s3, hf, ...).

A shard id is the path or URL exactly as the pattern expands on the orchestrator, so adding
shards never changes an existing id. A worker that sees the data elsewhere (``dataset_path``)
maps an id by swapping the pattern's fixed leading directory for its own.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable
from typing import Any, BinaryIO, cast

import braceexpand
import fsspec

from caption_flow.errors import SourceError

logger = logging.getLogger(__name__)

_PATTERN_CHARS = "{*?["
_FINGERPRINT_KEYS = ("ETag", "etag", "Last-Modified", "LastModified", "last_modified", "mtime")


def is_remote(path: str) -> bool:
    """True for URLs that fsspec must open (``file://`` is local)."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def expand_shards(
    pattern: str, suffixes: Iterable[str], storage_options: dict[str, Any]
) -> list[str]:
    """Shard paths for a path, a directory, a glob or a brace pattern, in a stable order:
    brace expansion order, each glob's matches sorted. Duplicates are dropped."""
    wanted = tuple(s.lower() for s in suffixes)
    found: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        # http(s) cannot be listed, and "?" starts a query there (signed URLs): no globbing.
        is_http = part.startswith(("http://", "https://"))
        if not is_http and any(ch in part for ch in "*?["):
            found.extend(_glob(part, storage_options))
        elif not is_remote(part) and os.path.isdir(local_path(part)):
            root = local_path(part).rstrip("/")
            found.extend(
                f"{root}/{name}"
                for name in sorted(os.listdir(root))
                if name.lower().endswith(wanted) and os.path.isfile(os.path.join(root, name))
            )
        else:
            found.append(part)
    return list(dict.fromkeys(found))


def _glob(pattern: str, storage_options: dict[str, Any]) -> list[str]:
    if not is_remote(pattern):
        return sorted(glob.glob(local_path(pattern), recursive=True))
    try:
        fs, path = fsspec.core.url_to_fs(pattern, **storage_options)
        return sorted(fs.unstrip_protocol(match) for match in fs.glob(path))
    except (OSError, ValueError, NotImplementedError) as exc:
        raise SourceError(f"cannot list shards matching {pattern}: {exc}") from exc


def _has_pattern(path: str) -> bool:
    return any(ch in path for ch in _PATTERN_CHARS)


def _root(path: str, file_suffixes: tuple[str, ...]) -> str:
    """The leading directory of a shard spec, with a trailing slash: the part before any
    pattern character, the parent of a single shard file, or a directory itself. Decided from
    the text alone, so a worker computes the orchestrator's root without seeing its disk."""
    if _has_pattern(path):
        head = path[: min(path.find(ch) for ch in _PATTERN_CHARS if ch in path)]
        return head[: head.rfind("/") + 1]
    if path.lower().endswith(file_suffixes):
        return path[: path.rfind("/") + 1]
    return path.rstrip("/") + "/"


class ShardLocator:
    """Maps shard ids (paths as the orchestrator's pattern expands) to where this host reads
    them: ``override`` is this host's pattern, directory or file for the same shards."""

    def __init__(self, pattern: str, override: str | None, file_suffixes: Iterable[str]) -> None:
        suffixes = tuple(s.lower() for s in file_suffixes)
        self.pattern = pattern
        self.override = override
        self._single = not _has_pattern(pattern) and pattern.lower().endswith(suffixes)
        self._override_is_file = bool(override) and str(override).lower().endswith(suffixes)
        self._from = _root(pattern, suffixes)
        self._to = _root(override, suffixes) if override else self._from

    def locate(self, shard: str) -> str:
        if not self.override:
            return shard
        if self._single and shard == self.pattern and self._override_is_file:
            return self.override
        if shard.startswith(self._from):
            return self._to + shard[len(self._from) :]
        return shard


class ShardFile:
    """Byte access to one shard: ranged reads for indexed tars and parquet, or a stream."""

    def __init__(self, location: str, storage_options: dict[str, Any]) -> None:
        self.location = location
        self.remote = is_remote(location)
        self._fd: int | None = None
        if self.remote:
            try:
                self._fs, self._path = fsspec.core.url_to_fs(location, **storage_options)
            except (ValueError, ImportError) as exc:
                raise SourceError(f"cannot open {location}: {exc}") from exc
        else:
            self._path = local_path(location)

    def fingerprint(self) -> dict[str, Any]:
        """Size plus mtime or ETag: enough to tell that a cached index is stale."""
        try:
            if not self.remote:
                st = os.stat(self._path)
                return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            info = self._fs.info(self._path)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot stat shard {self.location}: {exc}") from exc
        found = {"size": info.get("size")}
        for key in _FINGERPRINT_KEYS:
            if info.get(key) is not None:
                found[key] = str(info[key])
        return found

    def open(self, block_size: int = 64 * 1024) -> BinaryIO:
        """A seekable file object; remote ones fetch ``block_size`` bytes per request."""
        try:
            if not self.remote:
                # Unbuffered: a header scan seeks every 512 bytes read; a buffer would read
                # (and throw away) 8 KiB of image data each time.
                return open(self._path, "rb", buffering=0)
            return cast(
                BinaryIO,
                self._fs.open(self._path, "rb", block_size=block_size, cache_type="readahead"),
            )
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot open shard {self.location}: {exc}") from exc

    def read_range(self, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` in one request (fewer at end of file)."""
        try:
            if not self.remote:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDONLY)
                return os.pread(self._fd, length, start)
            return cast(bytes, self._fs.cat_file(self._path, start=start, end=start + length))
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read {self.location} at {start}: {exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
