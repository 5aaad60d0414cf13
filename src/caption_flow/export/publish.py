"""Continuous publishing: each recorded part (and the contributors and jobs tables) copied to
a Hugging Face dataset repo or any fsspec location (``s3://``, ``gs://``, a local path) as the
run grows, on a thread of its own.

What is already published is read from the target itself (its file list), so a restart, a
crash or a failed upload resumes with what is missing, and a part that a repair replaced is
removed there. A failed round is logged and retried with back-off; it never touches the
store (parts are read, never locked or written).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from caption_flow.errors import CaptionFlowError, ConfigError
from caption_flow.export.reader import recorded_parts
from caption_flow.storage.identity import PARTS_DIR
from caption_flow.storage.tables import CONTRIBUTORS_FILE, JOBS_FILE

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 600.0


@dataclass
class PublishRound:
    copied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class _Target(Protocol):
    """Where files go: names are relative (``captions/part-....parquet``)."""

    def names(self) -> set[str]: ...

    def put(self, files: dict[str, Path], remove: list[str]) -> None: ...


class _FsspecTarget:
    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = str(root).rstrip("/")

    def names(self) -> set[str]:
        base = self.root
        paths = self.fs.glob(f"{base}/{PARTS_DIR}/part-*.parquet") + self.fs.glob(
            f"{base}/*.parquet"
        )
        return {str(p)[len(base) + 1 :] for p in paths}

    def put(self, files: dict[str, Path], remove: list[str]) -> None:
        for name, path in files.items():
            final = f"{self.root}/{name}"
            tmp = f"{final}.uploading"
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), tmp)
            self.fs.mv(tmp, final)  # a reader never sees half a file under the final name
        for name in remove:
            self.fs.rm(f"{self.root}/{name}")


class _HubTarget:
    def __init__(self, repo: str, token: str | None, endpoint: str | None) -> None:
        from huggingface_hub import HfApi

        from caption_flow.export.hub import hub_token

        self.repo = repo
        self.api = HfApi(endpoint=endpoint, token=token or hub_token())
        self._created = False

    def names(self) -> set[str]:
        if not self._created:
            self.api.create_repo(self.repo, repo_type="dataset", private=True, exist_ok=True)
            self._created = True
        return set(self.api.list_repo_files(self.repo, repo_type="dataset"))

    def put(self, files: dict[str, Path], remove: list[str]) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list[Any] = [
            CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(p)) for n, p in files.items()
        ]
        ops += [CommitOperationDelete(path_in_repo=n) for n in remove]
        self.api.create_commit(
            self.repo, ops, commit_message="captionflow: publish", repo_type="dataset"
        )


class Publisher:
    """Publishes ``data_dir``'s output to ``to`` (``huggingface`` with ``repo``, or an fsspec
    URL or path) every ``every_s`` seconds. ``publish_once`` does one round in the caller's
    thread; ``start``/``stop`` run rounds on a daemon thread."""

    def __init__(
        self,
        data_dir: Path,
        to: str,
        repo: str | None = None,
        every_s: float = 600.0,
        storage_options: dict[str, Any] | None = None,
        token: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.every_s = every_s
        if to == "huggingface":
            if not repo or "/" not in repo:
                raise ConfigError("storage.publish: to: huggingface needs repo: org/name")
            self.target: _Target = _HubTarget(repo, token, endpoint)
        else:
            self.target = _FsspecTarget(to, storage_options or {})
        self._tables: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) published
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.on_round: Callable[[PublishRound], None] | None = None

    def publish_once(self) -> PublishRound:
        """Copy the recorded parts the target lacks, remove those no longer recorded, and
        copy the tables that changed since the last round."""
        parts = {f"{PARTS_DIR}/{p.name}": p for p in recorded_parts(self.data_dir)}
        there = self.target.names()
        new = {n: p for n, p in parts.items() if n not in there}
        stale = sorted(n for n in there if n.startswith(f"{PARTS_DIR}/") and n not in parts)
        tables: dict[str, Path] = {}
        for name in (CONTRIBUTORS_FILE, JOBS_FILE):
            path = self.data_dir / name
            if path.is_file():
                stat = path.stat()
                if self._tables.get(name) != (stat.st_mtime_ns, stat.st_size) or name not in there:
                    tables[name] = path
        files = {**new, **tables}
        if files or stale:
            self.target.put(files, stale)
        for name, path in tables.items():
            stat = path.stat()
            self._tables[name] = (stat.st_mtime_ns, stat.st_size)
        return PublishRound(copied=sorted(files), removed=stale)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="publish", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                done = self.publish_once()
            except (CaptionFlowError, OSError, ValueError, RuntimeError) as exc:
                # Hub and fsspec errors derive from these; the store goes on regardless.
                self.failures += 1
                base = min(self.every_s, 5.0)
                wait = min(MAX_BACKOFF_S, base * 2 ** min(self.failures, 10))
                log.warning("publishing failed (%s); retrying in %.0f s", exc, wait)
                continue
            self.failures = 0
            wait = self.every_s
            if done.copied or done.removed:
                log.info("published %d file(s), removed %d", len(done.copied), len(done.removed))
            if self.on_round is not None:
                self.on_round(done)
