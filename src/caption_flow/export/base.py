"""The one interface every export format implements, and what they share.

A writer receives record batches of one schema (see :class:`~.reader.CommittedOutput`) and
writes them out as it goes; nothing holds more than one batch. ``close`` finishes the last
file and says what was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import pyarrow as pa

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError

CaptionChoice = Literal["first", "longest", "all"]


@dataclass
class ExportResult:
    """Rows written, files made, and rows left out with why (counted, not lost silently)."""

    rows: int = 0
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


@dataclass(frozen=True)
class WriterOptions:
    """Format options; each writer reads the ones that concern it."""

    output: Path | None
    rows_per_file: int = 100_000
    shard_size: int = 1000
    field: str | None = None  # txt, webdataset .txt: the output field (default: the first)
    caption: CaptionChoice = "first"
    overwrite: bool = False
    dataset: DatasetConfig | None = None
    # jsonl: fields whose captions are JSON text (a job's output_schema), written as parsed
    # JSON values; a caption that is no JSON stays a string.
    json_fields: tuple[str, ...] = ()


class Writer(Protocol):
    #: Whether rows must come sorted by (shard, item_key): a sort costs time, so only a
    #: writer that reads the dataset shard by shard asks for it.
    ordered: bool

    def write(self, batch: pa.RecordBatch) -> None: ...

    def close(self) -> ExportResult: ...


def pick_caption(texts: list[str] | None, choice: CaptionChoice) -> str | None:
    """One text from an item's field: the first non-empty entry, the longest, or all
    non-empty ones joined by a blank line; None when it holds no text."""
    entries = [t for t in texts or () if t.strip()]
    if not entries:
        return None
    if choice == "first":
        return entries[0]
    if choice == "longest":
        return max(entries, key=len)
    return "\n\n".join(entries)


def caption_field(schema: pa.Schema, wanted: str | None) -> str:
    """The output field a caption is taken from: ``wanted``, else ``captions`` when present,
    else the first output field."""
    fields = [f.name for f in schema if pa.types.is_list(f.type)]
    if wanted is not None:
        if wanted not in fields:
            raise ConfigError(f"--field {wanted!r}: not among the exported fields {fields}")
        return wanted
    if not fields:
        raise ConfigError("the output has no caption field to write")
    return "captions" if "captions" in fields else fields[0]


def require_output(options: WriterOptions, fmt: str) -> Path:
    if options.output is None:
        raise ConfigError(f"--format {fmt} needs --output")
    return options.output
