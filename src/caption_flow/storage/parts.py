"""Parquet part files written atomically: temporary name, fsync, rename, fsync the folder.

A part exists for readers only once renamed; it counts as output only once the state database
records it. Its name is recorded as *intended* before it is written, so start-up can tell a
part that a crash left between rename and record (removed: its rows are still in the journal)
from a file the database never knew (moved aside to ``unrecognised/``, never deleted).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
TMP_GLOB = ".part-*.parquet.tmp"
UNRECOGNISED = "unrecognised"


def part_name(seq: int) -> str:
    return f"part-{seq:08d}.parquet"


def _tmp_path(folder: Path, name: str) -> Path:
    return folder / f".{name}.tmp"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(folder: Path, name: str, table: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = _tmp_path(folder, name)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(folder)
    return final


def check_part(table: pa.Table) -> None:
    """Encode ``table`` as :func:`write_part` would, in memory: raises what writing would."""
    pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


def remove_part(folder: Path, name: str) -> bool:
    """Delete an intended part and its temporary file. True if a file was there."""
    found = False
    for path in (folder / name, _tmp_path(folder, name)):
        if path.exists():
            path.unlink()
            found = True
    return found


def remove_stray_tmp(folder: Path) -> list[str]:
    """Delete temporary part files (never renamed, so never output). Returns their names."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.glob(TMP_GLOB)):
        path.unlink()
        removed.append(path.name)
        log.warning("removed unfinished temporary part %s", path)
    return removed


def move_unrecognised(folder: Path, recorded: set[str]) -> list[Path]:
    """Move every part file the database does not record to ``unrecognised/``, keeping
    each one (renamed if that folder already has its name). Returns the new paths."""
    if not folder.is_dir():
        return []
    strays = sorted(p for p in folder.glob(PART_GLOB) if p.name not in recorded)
    if not strays:
        return []
    aside = folder / UNRECOGNISED
    aside.mkdir(exist_ok=True)
    moved = []
    for path in strays:
        target = aside / path.name
        n = 1
        while target.exists():
            target = aside / f"{path.stem}.{n}{path.suffix}"
            n += 1
        os.replace(path, target)
        moved.append(target)
        log.error(
            "%s is not recorded in state.db: moved it to %s (not deleted); check where it "
            "came from before using or removing it",
            path.name,
            aside,
        )
    _fsync_dir(aside)
    _fsync_dir(folder)
    return moved
