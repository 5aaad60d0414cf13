"""A local folder of images, searched recursively. Each directory is a shard; keys are paths."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from caption_flow.errors import SourceError
from caption_flow.sources.base import ShardListing, SourceItem


class FolderSource:
    """Item key = the file's path relative to the root (POSIX separators): stable when files
    are added, unlike a position in a sorted list."""

    def __init__(self, root: str | os.PathLike[str], extensions: Iterable[str]) -> None:
        self.root = Path(root).expanduser()
        self.extensions = {"." + e.lower().lstrip(".") for e in extensions}

    def list_shards(self) -> Iterator[ShardListing]:
        if self.root.is_file():
            raise SourceError(f"dataset path {self.root} is a file, not a folder of images")
        if not self.root.is_dir():
            raise SourceError(f"dataset folder not found: {self.root}")
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            keys = sorted(
                (Path(rel_dir) / name).as_posix() if rel_dir != "." else name
                for name in filenames
                if Path(name).suffix.lower() in self.extensions
            )
            if keys:
                yield ShardListing(shard=rel_dir, keys=keys)

    def read(self, shard: str, keys: Sequence[str]) -> Iterator[SourceItem]:
        root = self.root.resolve()
        for key in keys:
            path = (root / key).resolve()
            if not path.is_relative_to(root):
                yield SourceItem(key=key, data=None, error="key escapes the dataset folder")
                continue
            try:
                yield SourceItem(key=key, data=path.read_bytes())
            except OSError as exc:
                yield SourceItem(key=key, data=None, error=f"unreadable: {exc.strerror or exc}")
