"""Which files hold a Hugging Face dataset's split, and at which commit.

A hub dataset is pinned to a commit when the orchestrator first lists it
(``HfApi().dataset_info(...).sha``); the pin and the file list are kept in the cache
directory, so a restart sees the same files at the same commit even after the repository
moved on (chunks in the state database name rows of those files). Data files are resolved by
the ``datasets`` library itself (README ``configs``, split naming conventions), the same code
for a hub id and a local folder; repositories without parquet or arrow data fall back to the
hub's parquet export (``refs/convert/parquet``). A folder written by ``save_to_disk`` is read
from its ``state.json``.

Only the orchestrator resolves; workers receive the pinned revision and build
``hf://datasets/{repo}@{sha}/{file}`` URLs without asking the hub anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from caption_flow.errors import ConfigError, SourceError
from caption_flow.sources.cache import IndexCache

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".parquet", ".arrow")
PARQUET_EXPORT = "refs/convert/parquet"
_SHA_RE = re.compile(r"[0-9a-f]{40}")


def is_commit_sha(revision: str | None) -> bool:
    return bool(revision) and _SHA_RE.fullmatch(str(revision)) is not None


def hub_root(repo_id: str, revision: str) -> str:
    """The fsspec URL prefix of a repository at a revision (quoted: refs contain slashes)."""
    return f"hf://datasets/{repo_id}@{quote(revision, safe='')}/"


@dataclass(frozen=True)
class SplitFiles:
    """A split's table files: ``root + file`` is each one's location; ``files`` are the
    shard ids (relative, so they do not change with the revision or the host)."""

    root: str
    files: list[str]
    revision: str | None = None


def is_local_dataset(path: str) -> bool:
    """A folder or file path rather than a hub id (``name`` or ``org/name``). Decided from the
    text too, so a worker without the orchestrator's folder does not ask the hub for it."""
    if path.startswith("hf://"):
        return False
    return (
        os.path.exists(os.path.expanduser(path))
        or path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or path.endswith(TABLE_SUFFIXES)
    )


def hub_repo_id(path: str) -> str:
    """``org/name`` from ``org/name`` or ``hf://datasets/org/name``."""
    return path[len("hf://datasets/") :].strip("/") if path.startswith("hf://datasets/") else path


def local_root(path: str, split: str) -> str:
    """The folder that local shard ids are relative to, with a trailing slash: a file's
    parent, a ``DatasetDict.save_to_disk`` folder's split folder, or the folder itself.
    Cheap (no listing), so a worker finds it without resolving the split again."""
    root = Path(path).expanduser().resolve()
    if root.is_file():
        return f"{root.parent}/"
    if (root / "dataset_dict.json").is_file():
        return f"{root / split}/"
    return f"{root}/"


def resolve_local(path: str, subset: str | None, split: str) -> SplitFiles:
    """A local folder (parquet or arrow files, or a ``save_to_disk`` folder) or one file."""
    root = Path(path).expanduser().resolve()
    if root.is_file():
        if not root.name.endswith(TABLE_SUFFIXES):
            raise ConfigError(f"dataset.path {path!r} is not a parquet or arrow file")
        return SplitFiles(root=local_root(path, split), files=[root.name])
    saved = _saved_to_disk(root, split)
    if saved is not None:
        return saved
    try:
        files = _datasets_resolution(str(root), subset, split, None)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        logger.info("datasets found no split layout in %s (%s); taking every table file", root, exc)
        files = sorted(str(p) for p in root.rglob("*") if p.name.endswith(TABLE_SUFFIXES))
    relative = [
        Path(f).resolve().relative_to(root).as_posix()
        for f in files
        if f.endswith(TABLE_SUFFIXES)  # an image folder resolves to images: not tables
    ]
    if not relative:
        raise ConfigError(f"no parquet or arrow files for split {split!r} under {root}")
    return SplitFiles(root=f"{root}/", files=relative)


def _saved_to_disk(root: Path, split: str) -> SplitFiles | None:
    """Folders from ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``
    (``dataset_dict.json`` and a folder per split)."""
    if (root / "dataset_dict.json").is_file():
        if not (root / split / "state.json").is_file():
            raise ConfigError(f"split {split!r} not found in the saved dataset at {root}")
        root = root / split
    state_file = root / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        files = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"unreadable {state_file}: {exc}") from exc
    return SplitFiles(root=f"{root}/", files=files)


def _datasets_resolution(
    path: str, subset: str | None, split: str, revision: str | None
) -> list[str]:
    """Data files of a split as the ``datasets`` library resolves them."""
    import datasets

    builder = datasets.load_dataset_builder(path, name=subset, revision=revision)
    data_files: Any = builder.config.data_files
    if not data_files or split not in data_files:
        available = sorted(data_files) if data_files else []
        raise ConfigError(f"split {split!r} not found in {path} (splits: {available})")
    return [str(f) for f in data_files[split]]


def resolve_hub(
    repo_id: str, subset: str | None, split: str, revision: str | None, cache: IndexCache
) -> SplitFiles:
    """Pin ``revision`` (default: main) to a commit and list the split's table files there;
    reuses the pin and list stored in ``cache`` by an earlier run."""
    name = f"hf-split:{repo_id}:{subset or ''}:{split}@{revision or 'main'}"
    stored = cache.load(name, {})
    if isinstance(stored, dict) and is_commit_sha(stored.get("revision")):
        logger.info("dataset %s pinned earlier at %s", repo_id, stored["revision"])
        sha = stored["revision"]
        return SplitFiles(hub_root(repo_id, sha), list(stored["files"]), sha)
    resolved = _resolve_hub_now(repo_id, subset, split, revision)
    cache.store(name, {}, {"revision": resolved.revision, "files": resolved.files})
    logger.info(
        "dataset %s split %s pinned at %s: %d files",
        repo_id,
        split,
        resolved.revision,
        len(resolved.files),
    )
    return resolved


def pin_revision(repo_id: str, revision: str | None) -> str:
    """The commit sha that ``revision`` (a branch, tag or sha) names now."""
    if is_commit_sha(revision):
        return str(revision)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        sha = HfApi().dataset_info(repo_id, revision=revision).sha
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
        raise SourceError(f"cannot resolve dataset {repo_id}@{revision or 'main'}: {exc}") from exc
    if not sha:
        raise SourceError(f"the hub gave no commit for {repo_id}@{revision or 'main'}")
    return sha


def _resolve_hub_now(
    repo_id: str, subset: str | None, split: str, revision: str | None
) -> SplitFiles:
    sha = pin_revision(repo_id, revision)
    root = hub_root(repo_id, sha)
    try:
        urls = _datasets_resolution(repo_id, subset, split, sha)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        logger.info("no data files resolved in %s (%s); trying the parquet export", repo_id, exc)
        urls = []
    prefix = f"hf://datasets/{repo_id}@{sha}/"
    files = [u[len(prefix) :] for u in urls if u.startswith(prefix)]
    if files and all(f.endswith(TABLE_SUFFIXES) for f in files):
        return SplitFiles(root, files, sha)
    return _parquet_export(repo_id, subset, split)


def _parquet_export(repo_id: str, subset: str | None, split: str) -> SplitFiles:
    """The hub's automatic parquet conversion: ``{config}/{split}/NNNN.parquet`` on the
    ``refs/convert/parquet`` branch (``partial-{split}`` for very large splits)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    sha = pin_revision(repo_id, PARQUET_EXPORT)
    config_name = subset or "default"
    try:
        names = HfApi().list_repo_files(repo_id, repo_type="dataset", revision=sha)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
        raise SourceError(f"cannot list the parquet export of {repo_id}: {exc}") from exc
    for folder in (f"{config_name}/{split}/", f"{config_name}/partial-{split}/"):
        files = sorted(n for n in names if n.startswith(folder) and n.endswith(".parquet"))
        if files:
            return SplitFiles(hub_root(repo_id, sha), files, sha)
    raise ConfigError(
        f"{repo_id} has no parquet or arrow data for config {config_name!r} split {split!r}"
    )
