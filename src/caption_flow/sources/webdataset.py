"""webdataset tar shards, local or remote (any fsspec URL), as a Source.

Shards come from a path, a directory, a glob or a brace pattern
(``shards/data-{000000..000999}.tar``); a shard's id is its path or URL as expanded, so
adding shards never renames old ones. Item key = the sample's ``__key__``; the image is its
first member with an image extension (case-insensitive, the last dotted part counts);
other small members are columns (``txt`` decoded, ``json`` parsed) for prompts.

The orchestrator lists keys from tar indexes (headers only, cached in its data directory).
A worker reads only its chunk: the byte ranges of the chunk's members, neighbouring samples
merged into one request of at most ``read_ahead_bytes``.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import SourceError
from caption_flow.sources.base import ShardListing, SourceItem
from caption_flow.sources.parallel import ordered_map
from caption_flow.sources.shards import ShardFile, ShardLocator, expand_shards, is_remote
from caption_flow.sources.tar_index import (
    TAR_SUFFIXES,
    MemberEntry,
    TarIndex,
    TarIndexStore,
    split_member_name,
)

logger = logging.getLogger(__name__)

SIDECAR_MAX_BYTES = 1024 * 1024  # larger non-image members (embeddings, video) are not read
MERGE_GAP_BYTES = 64 * 1024  # read across a gap this small rather than issue a new request


@dataclass
class _Plan:
    """What to read for one key: the image member and the sidecar members."""

    key: str
    image: MemberEntry | None = None
    sidecars: list[MemberEntry] = field(default_factory=list)
    error: str | None = None

    def ranges(self) -> list[MemberEntry]:
        return ([self.image] if self.image else []) + self.sidecars


class WebDatasetSource:
    """Tar shards in webdataset layout. ``skipped`` lists shards that could not be indexed
    during the last listing (logged; they are retried on the next listing)."""

    def __init__(
        self,
        config: DatasetConfig,
        path_override: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.pattern = config.path
        self.locator = ShardLocator(config.path, path_override, TAR_SUFFIXES)
        self.image_extensions = {e.lower().lstrip(".") for e in config.image_extensions}
        self.columns = {c.lower() for c in config.columns} if config.columns is not None else None
        self.storage_options = dict(config.storage_options)
        self.indexes = TarIndexStore(cache_dir, self.storage_options)
        self.skipped: list[str] = []

    # -- orchestrator side -------------------------------------------------------------

    def shard_ids(self) -> list[str]:
        """All shard ids in listing order (expands the pattern; reads no tar)."""
        shards = expand_shards(self.pattern, TAR_SUFFIXES, self.storage_options)
        if not shards:
            raise SourceError(f"no tar shards match {self.pattern!r}")
        return shards

    def list_shards(self) -> Iterator[ShardListing]:
        shards = self.shard_ids()
        remote = any(is_remote(self.locator.locate(s)) for s in shards[:1])
        concurrency = self.config.list_concurrency if remote else 1
        self.skipped = []
        for shard, index in ordered_map(self._index_or_none, shards, concurrency):
            if index is None:
                self.skipped.append(shard)
            elif index.samples:
                yield ShardListing(shard=shard, keys=index.keys())
        if self.skipped:
            logger.error("%d of %d shards could not be indexed", len(self.skipped), len(shards))

    def _index_or_none(self, shard: str) -> tuple[str, TarIndex | None]:
        try:
            return shard, self.indexes.get(shard, self.locator.locate(shard))
        except SourceError as exc:
            logger.error("skipping shard %s: %s", shard, exc)
            return shard, None

    # -- worker side -------------------------------------------------------------------

    def read(self, shard: str, keys: Sequence[str]) -> Iterator[SourceItem]:
        location = self.locator.locate(shard)
        try:
            index = self.indexes.get(shard, location)
        except SourceError as exc:
            for key in keys:
                yield SourceItem(key=key, data=None, error=f"shard unreadable: {exc}")
            return
        plans = [self._plan(index, key) for key in keys]
        if index.seekable:
            yield from self._read_ranges(location, plans)
        else:
            yield from self._read_stream(location, plans)

    def image_member(self, members: Sequence[MemberEntry]) -> MemberEntry | None:
        """A sample's image: its first member with an image extension (None: it has none)."""
        return next((entry for entry in members if self._is_image(entry)), None)

    def _is_image(self, entry: MemberEntry) -> bool:
        return entry[0].lower().rsplit(".", 1)[-1] in self.image_extensions

    def _plan(self, index: TarIndex, key: str) -> _Plan:
        members = index.samples.get(key)
        if members is None:
            return _Plan(key, error="no such sample in shard")
        plan = _Plan(key, image=self.image_member(members))
        plan.sidecars = [
            entry
            for entry in members
            if not self._is_image(entry)
            and self._wants_column(entry[0].lower())
            and entry[2] <= SIDECAR_MAX_BYTES
        ]
        if plan.image is None:
            found = ", ".join(e[0] for e in members) or "nothing"
            plan.error = f"sample has no image member (found: {found})"
        return plan

    def _wants_column(self, ext: str) -> bool:
        return ext.rsplit(".", 1)[-1] not in self.image_extensions and (
            self.columns is None or ext in self.columns
        )

    def _read_ranges(self, location: str, plans: list[_Plan]) -> Iterator[SourceItem]:
        """Reads runs of neighbouring samples in single requests, in the order asked."""
        file = ShardFile(location, self.storage_options)
        try:
            for run in self._runs(plans):
                spans = [r for plan in run for r in plan.ranges()]
                if not spans:
                    yield from (self._item(plan, {}) for plan in run)
                    continue
                start = min(offset for _, offset, _ in spans)
                end = max(offset + size for _, offset, size in spans)
                try:
                    blob = file.read_range(start, end - start)
                except SourceError as exc:
                    for plan in run:
                        yield SourceItem(key=plan.key, data=None, error=str(exc))
                    continue
                for plan in run:
                    chunks: dict[MemberEntry, bytes | None] = {}
                    for entry in plan.ranges():
                        lo = entry[1] - start
                        piece = blob[lo : lo + entry[2]]
                        chunks[entry] = piece if len(piece) == entry[2] else None
                    yield self._item(plan, chunks)
        finally:
            file.close()

    def _runs(self, plans: list[_Plan]) -> Iterator[list[_Plan]]:
        """Consecutive plans whose byte ranges ascend with small gaps, capped in size."""
        limit = self.config.read_ahead_bytes
        run: list[_Plan] = []
        run_start = run_end = 0
        for plan in plans:
            spans = plan.ranges()
            if not spans:
                run.append(plan)  # costs nothing to read
                continue
            lo = min(offset for _, offset, _ in spans)
            hi = max(offset + size for _, offset, size in spans)
            breaks = lo < run_end or lo - run_end > MERGE_GAP_BYTES or hi - run_start > limit
            if run and run_end and breaks:
                yield run
                run, run_end = [], 0
            if not run_end:
                run_start = lo
            run.append(plan)
            run_end = max(run_end, hi)
        if run:
            yield run

    def _read_stream(self, location: str, plans: list[_Plan]) -> Iterator[SourceItem]:
        """Compressed tars: one pass from the start, keeping only the chunk's members, until
        every wanted sample has gone by."""
        wanted: dict[str, set[str]] = {
            p.key: {e[0] for e in p.ranges()} for p in plans if p.error is None
        }
        got: dict[str, dict[str, bytes]] = {key: {} for key in wanted}
        remaining = {key for key, exts in wanted.items() if exts}
        error: str | None = None
        file = ShardFile(location, self.storage_options)
        try:
            with (
                file.open(block_size=1024 * 1024) as handle,
                tarfile.open(fileobj=handle, mode="r|*") as archive,
            ):
                for member in archive:
                    parts = split_member_name(member.name) if member.isfile() else None
                    if parts is None or parts[0] not in wanted or parts[1] not in wanted[parts[0]]:
                        continue
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        got[parts[0]][parts[1]] = extracted.read()
                    if len(got[parts[0]]) == len(wanted[parts[0]]):
                        remaining.discard(parts[0])
                    if not remaining:
                        break
        except (SourceError, tarfile.TarError, OSError, EOFError) as exc:
            error = f"cannot read compressed shard: {exc}"
        for plan in plans:
            members = got.get(plan.key, {})
            chunks = {entry: members.get(entry[0]) for entry in plan.ranges()}
            if error and plan.error is None and plan.key in remaining:
                plan.error = error
            yield self._item(plan, chunks)

    def _item(self, plan: _Plan, chunks: dict[MemberEntry, bytes | None]) -> SourceItem:
        if plan.error is not None:
            return SourceItem(key=plan.key, data=None, error=plan.error)
        assert plan.image is not None
        columns: dict[str, Any] = {}
        for entry in plan.sidecars:
            raw = chunks.get(entry)
            if raw is not None:
                value = decode_sidecar(entry[0], raw)
                if value is not None:
                    columns[entry[0].lower()] = value
        data = chunks.get(plan.image)
        if data is None:
            error = "image member is truncated"
            return SourceItem(key=plan.key, data=None, columns=columns, error=error)
        return SourceItem(key=plan.key, data=data, columns=columns)


def decode_sidecar(ext: str, raw: bytes) -> Any | None:
    """json parsed, anything else decoded as UTF-8 text (stripped); binary members, which
    a prompt cannot use, give None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if ext.lower().rsplit(".", 1)[-1] == "json":
        try:
            return json.loads(text)
        except ValueError:
            logger.debug("sidecar .%s is not valid json; passing it as text", ext)
    return text.strip()
