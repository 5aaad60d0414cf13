"""One dataset per data directory: the dataset's identity, recorded in ``state.db``.

An item's identity is its key within the dataset (a relative path, a tar member's key), so the
same data directory used for another dataset would take that dataset's items for done ones
wherever their keys match. The first start records the dataset (type, absolute path or URL or
hub id, subset, split, revision); a later start with another one is refused before anything
is changed. ``--force-new-dataset`` moves the earlier run (``state.db`` and ``captions/``)
aside into ``replaced/<time>/`` and starts a new one: nothing is mixed, nothing deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import StorageError
from caption_flow.sources.hf_resolve import hub_repo_id, is_local_dataset
from caption_flow.storage.parts import PART_GLOB
from caption_flow.storage.state import StateDB

log = logging.getLogger(__name__)

META_KEY = "dataset_identity"
COMMIT_KEY = "dataset_commit"
REPLACED_DIR = "replaced"
DB_NAME = "state.db"
PARTS_DIR = "captions"


@dataclass(frozen=True)
class DatasetIdentity:
    """What makes two dataset configs the same dataset (not its name or reading options)."""

    type: str
    location: str
    subset: str | None = None
    split: str | None = None
    revision: str | None = None

    @classmethod
    def of(cls, config: DatasetConfig) -> DatasetIdentity:
        path = config.path
        if config.type == "huggingface":
            if is_local_dataset(path):
                return cls(config.type, _local(path), config.subset, config.split)
            revision = config.revision or "main"  # what the hub serves without one
            return cls(config.type, hub_repo_id(path), config.subset, config.split, revision)
        location = path.rstrip("/") if "://" in path else _local(path)
        return cls(config.type, location)

    def describe(self) -> str:
        extra = [
            f"{name} {value}"
            for name, value in (
                ("subset", self.subset),
                ("split", self.split),
                ("revision", self.revision),
            )
            if value
        ]
        return f"{self.type} {self.location}" + (f" ({', '.join(extra)})" if extra else "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetIdentity | None:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError):
            return None


def _local(path: str) -> str:
    """An absolute path with symlinks resolved (a glob or brace pattern stays as text)."""
    return str(Path(path).expanduser().resolve())


def stored_identity(db_path: Path) -> tuple[DatasetIdentity | None, str | None, bool]:
    """(identity, its raw text, whether the database lists any chunk) as recorded in
    ``db_path``, read without changing the file; no identity when there is no database or
    no record (or it cannot be read: opening it for real reports that)."""
    if not db_path.is_file():
        return None, None, False
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key=?", (META_KEY,)).fetchone()
            chunks = conn.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return None, None, False
    if row is None:
        return None, None, chunks
    return DatasetIdentity.from_json(str(row[0])), str(row[0]), chunks


def claim(data_dir: Path, identity: DatasetIdentity, force: bool) -> None:
    """Refuse a data directory that belongs to another dataset, or with ``force`` move that
    dataset's run aside. Call with the directory locked and before ``state.db`` is opened."""
    stored, raw, has_chunks = stored_identity(data_dir / DB_NAME)
    if raw is None or stored == identity:
        if force:
            _force_without_record(data_dir, identity)
        return
    theirs = stored.describe() if stored is not None else f"an unreadable record ({raw!r})"
    if not has_chunks and not _has_parts(data_dir):
        # Nothing was ever listed (an empty or mistyped dataset): nothing can mix.
        log.info(
            "data directory %s held no items of %s: now used for %s",
            data_dir,
            theirs,
            identity.describe(),
        )
        return
    if not force:
        raise StorageError(
            f"data directory {data_dir} belongs to {theirs}, not to {identity.describe()}: "
            "use another --data-dir for this dataset, or --force-new-dataset to move the "
            f"earlier run aside (into {data_dir / REPLACED_DIR}/) and start a new one; "
            "nothing was changed"
        )
    moved = replace_run(data_dir)
    log.warning(
        "--force-new-dataset: the run of %s moved to %s; starting a new run of %s",
        theirs,
        moved,
        identity.describe(),
    )


def _force_without_record(data_dir: Path, identity: DatasetIdentity) -> None:
    """``force`` where no other dataset is recorded: only parts without a database (a run
    nothing can resume) are moved aside; a run of this very dataset is kept."""
    db_exists = (data_dir / DB_NAME).exists()
    if not db_exists and _has_parts(data_dir):
        moved = replace_run(data_dir)
        log.warning(
            "--force-new-dataset: caption parts without state.db moved to %s; starting a new "
            "run of %s",
            moved,
            identity.describe(),
        )
    elif db_exists:
        log.info(
            "--force-new-dataset has no effect: %s already belongs to %s",
            data_dir,
            identity.describe(),
        )


def _has_parts(data_dir: Path) -> bool:
    parts = data_dir / PARTS_DIR
    return parts.is_dir() and any(parts.rglob(PART_GLOB))


def replace_run(data_dir: Path) -> Path:
    """Move ``state.db`` (with its WAL files) and ``captions/`` into a new folder
    ``replaced/<time>/`` of ``data_dir``. Returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = data_dir / REPLACED_DIR / stamp
    n = 1
    while target.exists():
        target = data_dir / REPLACED_DIR / f"{stamp}.{n}"
        n += 1
    target.mkdir(parents=True)
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", PARTS_DIR):
        source = data_dir / name
        if source.exists():
            try:
                shutil.move(str(source), str(target / name))
            except OSError as exc:
                raise StorageError(f"cannot move {source} to {target}: {exc}") from exc
    return target


def record(db: StateDB, identity: DatasetIdentity) -> None:
    """Write the identity, after :func:`claim` allowed it: into a new database, one that
    never listed an item, or one an earlier release wrote (which adopts this dataset)."""
    before = db.get_meta(META_KEY)
    if before == identity.to_json():
        return
    has_items = db.conn.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is not None
    if before is None and has_items:
        log.warning(
            "%s records no dataset (written by an earlier release): it now belongs to %s",
            db.path,
            identity.describe(),
        )
    db.set_meta(META_KEY, identity.to_json())


def record_commit(db: StateDB, commit: str | None) -> None:
    """Record the commit a hub dataset was listed at; say so when it moved since."""
    if not commit:
        return
    before = db.get_meta(COMMIT_KEY)
    if before is not None and before != commit:
        log.warning(
            "the dataset was listed at commit %s before and at %s now: items already done "
            "keep their captions from the earlier commit",
            before,
            commit,
        )
    if before != commit:
        db.set_meta(COMMIT_KEY, commit)
