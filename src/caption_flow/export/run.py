"""One export: committed rows, selected, streamed into one format's writer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError
from caption_flow.export.base import ExportResult, Writer, WriterOptions
from caption_flow.export.reader import BATCH_ROWS, CommittedOutput, Selection
from caption_flow.storage.identity import DB_NAME, stored_identity

log = logging.getLogger(__name__)

FORMATS = ("parquet", "jsonl", "txt", "webdataset")

#: Called with (rows done, rows in all) after each batch.
Progress = Callable[[int, int], None]


def open_writer(fmt: str, options: WriterOptions) -> Writer:
    if fmt == "parquet":
        from caption_flow.export.parquet import ParquetWriter

        return ParquetWriter(options)
    if fmt == "jsonl":
        from caption_flow.export.jsonl import JsonlWriter

        return JsonlWriter(options)
    if fmt == "txt":
        from caption_flow.export.txt import TxtWriter

        return TxtWriter(options)
    if fmt == "webdataset":
        from caption_flow.export.webdataset import WebDatasetWriter

        return WebDatasetWriter(options)
    raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def recorded_dataset(data_dir: Path) -> DatasetConfig | None:
    """The dataset ``state.db`` was made for (type and location), or None when unrecorded."""
    identity, _, _ = stored_identity(data_dir / DB_NAME)
    if identity is None:
        return None
    return DatasetConfig(type=identity.type, path=identity.location)  # type: ignore[arg-type]


def export(
    data_dir: Path,
    fmt: str,
    selection: Selection,
    options: WriterOptions,
    progress: Progress | None = None,
    batch_rows: int = BATCH_ROWS,
) -> ExportResult:
    """Write the committed rows that ``selection`` picks in format ``fmt``. The parts are
    those recorded when the export starts; later ones are left for the next export."""
    if options.dataset is None:
        options = replace(options, dataset=recorded_dataset(data_dir))
    with CommittedOutput(data_dir) as output:
        # Counting is a pass over every part of its own: only a progress bar needs it.
        total = output.count(selection) if progress is not None else 0
        output.schema(selection)  # an unknown --fields fails before any file is made
        writer = open_writer(fmt, options)
        done = 0
        if progress is not None:
            progress(0, total)
        for batch in output.batches(selection, batch_rows, order=writer.ordered):
            writer.write(batch)
            done += batch.num_rows
            if progress is not None:
                progress(done, total)
        result = writer.close()
    for reason, n in result.skipped.items():
        log.warning("%d row(s) not exported: %s", n, reason)
    return result
