"""Parquet part files written atomically: temporary name, fsync, rename, fsync the folder.

A part exists for readers only once renamed; it counts as output only once the state database
records it. :func:`remove_unrecorded` deletes what a crash left between those two steps (its
rows are still in the journal).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"


def part_name(seq: int) -> str:
    return f"part-{seq:08d}.parquet"


def next_part_seq(folder: Path) -> int:
    seqs = [int(p.stem.split("-")[1]) for p in folder.glob(PART_GLOB) if p.stem[5:].isdigit()]
    return max(seqs, default=0) + 1


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(folder: Path, name: str, table: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".{name}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(folder)
    return final


def remove_unrecorded(folder: Path, recorded: set[str]) -> list[str]:
    """Delete temporary files and parts the database does not know. Returns their names."""
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if path.name.endswith(".tmp") or (path.match(PART_GLOB) and path.name not in recorded):
            path.unlink()
            removed.append(path.name)
            log.warning("removed unrecorded output file %s (its rows are in the journal)", path)
    return removed
