"""Hugging Face datasets (a hub id or a local folder of parquet/arrow files) as a Source.

Shard = one table file (its path inside the repository or folder). Item key = the configured
``id_column`` value, else the row's index within its file: both stable when files are added.
The image is the ``image_column`` (bytes, or the ``Image`` feature's ``{"bytes", "path"}``
struct) or, with ``url_column``, a URL the worker downloads. Other plain columns (text,
numbers) go to prompts.

The orchestrator counts rows from parquet footers (and reads the id column, where one is
configured), caching the result; a worker reads only the row groups, and only the columns,
that its chunk needs, one row group at a time.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError, SourceError
from caption_flow.sources.base import ShardListing, SourceItem
from caption_flow.sources.cache import IndexCache
from caption_flow.sources.fetch import FetchPolicy, fetch_url
from caption_flow.sources.hf_resolve import (
    SplitFiles,
    hub_repo_id,
    hub_root,
    is_commit_sha,
    is_local_dataset,
    local_root,
    pin_revision,
    resolve_hub,
    resolve_local,
)
from caption_flow.sources.parallel import ordered_map
from caption_flow.sources.shards import is_remote
from caption_flow.sources.tables import TableShard

logger = logging.getLogger(__name__)

# (key, row values or None, error)
_Record = tuple[str, dict[str, Any] | None, str | None]


def unique_keys(values: Sequence[Any]) -> list[str]:
    """Id column values as keys: a null id becomes ``#row<index>``, a repeated one gets
    ``#<n>`` appended, so keys stay unique within a file and deterministic."""
    keys: list[str] = []
    seen: collections.Counter[str] = collections.Counter()
    for row, value in enumerate(values):
        key = f"#row{row}" if value is None else str(value)
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key] - 1}")
    return keys


def _is_plain(dtype: pa.DataType) -> bool:
    """Types a prompt can use: text, numbers, booleans, dates, and lists of those."""
    if pa.types.is_dictionary(dtype):
        return _is_plain(dtype.value_type)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _is_plain(dtype.value_type)
    return (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_integer(dtype)
        or pa.types.is_floating(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_temporal(dtype)
        or pa.types.is_decimal(dtype)
    )


def _plain_value(value: Any) -> Any:
    """Dates and decimals as strings, so columns stay JSON- and msgpack-friendly."""
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    if isinstance(value, datetime.date | datetime.time | datetime.timedelta | decimal.Decimal):
        return str(value)
    return value


class HuggingFaceSource:
    """A split of a Hugging Face dataset. ``revision`` is the pinned commit once listed;
    send ``pinned_config()`` to workers so that they read the same commit."""

    def __init__(
        self,
        config: DatasetConfig,
        path_override: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.override = path_override
        self.local = path_override is not None or is_local_dataset(config.path)
        self.repo_id = hub_repo_id(config.path)
        self.revision: str | None = config.revision if is_commit_sha(config.revision) else None
        self.storage_options = dict(config.storage_options)
        self.policy = FetchPolicy(
            timeout=config.url_timeout, retries=config.url_retries, max_bytes=config.url_max_bytes
        )
        self._pins = IndexCache(cache_dir, "hf")
        self._counts = IndexCache(cache_dir, "table_index")
        self._split: SplitFiles | None = None
        self._root: str | None = None
        self._id_maps: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        self.skipped: list[str] = []
        self.blocks_read = 0  # row groups / record batches read by ``read`` (for logs, tests)
        self._lock = threading.Lock()  # a worker may read several chunks at once

    def pinned_config(self) -> DatasetConfig:
        """The config with ``revision`` set to the pinned commit (after ``list_shards``)."""
        if self.local or self.revision is None:
            return self.config
        return self.config.model_copy(update={"revision": self.revision})

    # -- locations ---------------------------------------------------------------------

    def _resolve(self) -> SplitFiles:
        if self._split is None:
            cfg = self.config
            if self.local:
                self._split = resolve_local(self.override or cfg.path, cfg.subset, cfg.split)
            else:
                self._split = resolve_hub(
                    self.repo_id, cfg.subset, cfg.split, cfg.revision, self._pins
                )
                self.revision = self._split.revision
            self._root = self._split.root
        return self._split

    def _location(self, shard: str) -> str:
        if self._root is None:
            if self.local:
                self._root = local_root(self.override or self.config.path, self.config.split)
            else:
                if self.revision is None:
                    logger.warning(
                        "dataset revision %r is not a commit; pinning it here, which may differ "
                        "from the orchestrator's pin",
                        self.config.revision,
                    )
                    self.revision = pin_revision(self.repo_id, self.config.revision)
                self._root = hub_root(self.repo_id, self.revision)
        return self._root + shard

    def _fingerprint(self, location: str) -> dict[str, Any]:
        if is_remote(location):
            return {}  # a file at a pinned commit never changes
        try:
            st = os.stat(location)
        except OSError as exc:
            raise SourceError(f"cannot stat {location}: {exc}") from exc
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    # -- orchestrator side -------------------------------------------------------------

    def list_shards(self) -> Iterator[ShardListing]:
        files = self._resolve().files
        concurrency = 1 if self.local else self.config.list_concurrency
        self.skipped = []
        for shard, keys in ordered_map(self._list_one, files, concurrency):
            if keys is None:
                self.skipped.append(shard)
            elif keys:
                yield ShardListing(shard=shard, keys=keys)
        if self.skipped:
            logger.error("%d of %d files could not be listed", len(self.skipped), len(files))

    def _list_one(self, shard: str) -> tuple[str, list[str] | None]:
        location = self._location(shard)
        id_column = self.config.id_column
        name = f"{location}|{id_column or ''}"
        try:
            fingerprint = self._fingerprint(location)
            cached = self._counts.load(name, fingerprint)
            if isinstance(cached, dict):
                if id_column:
                    return shard, list(cached["keys"])
                return shard, [str(i) for i in range(int(cached["num_rows"]))]
            table = TableShard(location, self.storage_options)
        except SourceError as exc:
            logger.error("skipping %s: %s", shard, exc)
            return shard, None
        try:
            self._check_schema(table.schema, shard)
            if id_column:
                keys = unique_keys(table.read_column(id_column))
                self._counts.store(name, fingerprint, {"keys": keys})
                return shard, keys
            self._counts.store(name, fingerprint, {"num_rows": table.num_rows})
            return shard, [str(i) for i in range(table.num_rows)]
        except SourceError as exc:
            logger.error("skipping %s: %s", shard, exc)
            return shard, None
        finally:
            table.close()

    def _check_schema(self, schema: pa.Schema, shard: str) -> None:
        cfg = self.config
        needed = [cfg.url_column or cfg.image_column] + ([cfg.id_column] if cfg.id_column else [])
        missing = [c for c in needed if c not in schema.names]
        if missing:
            raise ConfigError(
                f"dataset file {shard} has no column {missing[0]!r} (columns: {schema.names}); "
                "set dataset.image_column, url_column or id_column"
            )

    # -- worker side -------------------------------------------------------------------

    def read(self, shard: str, keys: Sequence[str]) -> Iterator[SourceItem]:
        location = self._location(shard)
        try:
            table = TableShard(location, self.storage_options)
        except SourceError as exc:
            for key in keys:
                yield SourceItem(key=key, data=None, error=f"file unreadable: {exc}")
            return
        try:
            rows = self._rows(table, location, keys)
            records = self._records(table, keys, rows)
            if self.config.url_column:
                yield from ordered_map(
                    self._download_item,
                    records,
                    self.config.url_concurrency,
                    window=2 * self.config.url_concurrency,
                )
            else:
                for record in records:
                    yield self._item(record, location)
        finally:
            table.close()

    def _rows(self, table: TableShard, location: str, keys: Sequence[str]) -> list[int | None]:
        if not self.config.id_column:
            return [int(k) if k.isdigit() and int(k) < table.num_rows else None for k in keys]
        with self._lock:
            by_id = self._id_maps.get(location)
        if by_id is None:
            ids = unique_keys(table.read_column(self.config.id_column))
            by_id = {key: row for row, key in enumerate(ids)}
            with self._lock:
                self._id_maps[location] = by_id
                while len(self._id_maps) > 4:
                    self._id_maps.popitem(last=False)
        return [by_id.get(k) for k in keys]

    def _wanted_columns(self, schema: pa.Schema) -> tuple[str, list[str]]:
        """(image or url column, extra columns for prompts)."""
        cfg = self.config
        image = cfg.url_column or cfg.image_column
        if cfg.columns is not None:
            extra = [c for c in cfg.columns if c in schema.names and c != image]
        else:
            extra = [f.name for f in schema if f.name != image and _is_plain(f.type)]
        return image, extra

    def _records(
        self, table: TableShard, keys: Sequence[str], rows: list[int | None]
    ) -> Iterator[_Record]:
        """Row values in key order; blocks load lazily, the last two stay loaded."""
        image, extra = self._wanted_columns(table.schema)
        columns = [image, *extra] if image in table.schema.names else extra
        blocks: collections.OrderedDict[int, pa.Table | SourceError] = collections.OrderedDict()
        for key, row in zip(keys, rows, strict=True):
            if row is None:
                yield key, None, "no such row in file"
                continue
            index = table.block_of(row)
            if index not in blocks:
                try:
                    blocks[index] = table.read_block(index, columns)
                    self.blocks_read += 1
                except SourceError as exc:
                    blocks[index] = exc
                while len(blocks) > 2:
                    blocks.popitem(last=False)
            block = blocks[index]
            if isinstance(block, SourceError):
                yield key, None, str(block)
                continue
            values = block.slice(row - table.block_starts[index], 1).to_pylist()[0]
            yield key, values, None

    def _columns_of(self, values: dict[str, Any]) -> dict[str, Any]:
        image = self.config.url_column or self.config.image_column
        return {k: _plain_value(v) for k, v in values.items() if k != image}

    def _download_item(self, record: _Record) -> SourceItem:
        key, values, error = record
        if values is None:
            return SourceItem(key=key, data=None, error=error)
        url = values.get(self.config.url_column or "")
        columns = self._columns_of(values)
        if not isinstance(url, str) or not url:
            return SourceItem(key=key, data=None, columns=columns, error="url is empty")
        data, error = fetch_url(url, self.policy)
        return SourceItem(key=key, data=data, columns=columns, error=error)

    def _item(self, record: _Record, location: str) -> SourceItem:
        key, values, error = record
        if values is None:
            return SourceItem(key=key, data=None, error=error)
        data, error = self._image_bytes(values.get(self.config.image_column), location)
        return SourceItem(key=key, data=data, columns=self._columns_of(values), error=error)

    def _image_bytes(self, value: Any, location: str) -> tuple[bytes | None, str | None]:
        """Bytes of an image cell: raw bytes, an ``Image`` struct, or a path or URL."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"]), None
            value = value.get("path")
        if isinstance(value, bytes | bytearray | memoryview):
            return (bytes(value), None) if len(value) else (None, "image is empty")
        if value is None:
            return None, "image is null"
        if not isinstance(value, str):
            return None, f"unsupported image value of type {type(value).__name__}"
        if value.startswith(("http://", "https://")):
            return fetch_url(value, self.policy)
        return self._read_path(value, location)

    def _read_path(self, path: str, location: str) -> tuple[bytes | None, str | None]:
        """An image stored by path: as given if it exists here, else beside its table file."""
        candidates = [path] if os.path.isabs(path) and os.path.exists(path) else []
        candidates.append(location.rsplit("/", 1)[0] + "/" + path.lstrip("/"))
        for candidate in candidates:
            try:
                with fsspec.open(candidate, "rb", **self.storage_options) as handle:
                    return handle.read(), None
            except (OSError, ValueError):
                continue
        return None, f"image file not found: {path}"
