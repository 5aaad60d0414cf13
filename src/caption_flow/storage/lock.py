"""One orchestrator per data directory: an exclusive lock on a file inside it.

The lock is ``flock`` on ``captionflow.lock``, so the kernel drops it when the holding process
ends in any way (SIGKILL included): a lock file whose holder is gone is simply taken over. The
file holds the holder's pid, host and port as JSON, only so that a refused second process can
say who holds the directory. Forked children close their copy of the descriptor, so a child
that outlives its parent (an engine subprocess) never keeps the directory locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any

from caption_flow.errors import StorageError

log = logging.getLogger(__name__)

LOCK_NAME = "captionflow.lock"

# Locks held by this process, closed in forked children (see the module docstring).
_held: weakref.WeakSet[DataDirLock] = weakref.WeakSet()


def _close_in_child() -> None:
    for lock in list(_held):
        lock.forget()


os.register_at_fork(after_in_child=_close_in_child)


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 123 on host box, port 8765`` from a lock file's JSON (what is known of it)."""
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("port"):
        parts.append(f"port {info['port']}")
    return ", ".join(parts)


def _read_info(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class DataDirLock:
    """The exclusive lock of one data directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None
        self.info: dict[str, Any] = {}

    @classmethod
    def acquire(cls, data_dir: Path, port: int | None = None) -> DataDirLock:
        """Lock ``data_dir`` (created if missing) or raise StorageError naming the holder."""
        lock = cls(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create the lock file {lock.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = describe_holder(_read_info(fd))
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise StorageError(
                    f"cannot lock {lock.path} ({exc.strerror}): the data directory must be on "
                    "a file system that supports flock"
                ) from None
            raise StorageError(
                f"data directory {data_dir} is in use by another captionflow orchestrator "
                f"({holder}): stop it first, or use another --data-dir"
            ) from None
        previous = _read_info(fd)
        if previous:
            log.warning(
                "took over the lock of %s from %s, which no longer holds it (stopped or killed)",
                lock.path,
                describe_holder(previous),
            )
        lock._fd = fd
        _held.add(lock)
        lock.update(port=port)
        return lock

    def update(self, port: int | None = None) -> None:
        """Rewrite who holds the lock (the port is known only once the server listens)."""
        if self._fd is None:
            return
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "port": port,
            "since": round(time.time(), 3),
        }
        data = json.dumps(self.info).encode("utf-8")
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as exc:  # the lock still holds; only the description is missing
            log.warning("cannot write %s: %s", self.path, exc)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock and leave the file empty, so the next holder does not report a dead one.
        Calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held.discard(self)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor of the open file releases the flock

    def forget(self) -> None:
        """In a forked child: close this copy of the descriptor without touching the file."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.forget()
