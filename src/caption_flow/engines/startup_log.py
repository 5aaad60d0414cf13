"""vLLM's start-up output, kept out of sight unless asked for, and searched for the cause
when start-up fails.

vLLM starts its engine in child processes whose logs, tracebacks and progress bars go
straight to file descriptors 1 and 2; when they fail, the parent only learns "see root cause
above", under some fifty lines of traceback. While a vLLM engine starts (and only then),
both descriptors point at a temporary file, which child processes inherit. On failure the
first real exception line in it becomes the error's cause; on success it is dropped. With
``-v`` (vLLM's logger at INFO) nothing is captured and everything shows as it happens.

Whatever else this process writes to stdout or stderr during those seconds lands in the same
file. Engine processes keep writing to it after start-up (it is deleted, so nothing piles up
on disk); run with ``-v`` to see their later output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from types import TracebackType
from typing import IO

#: ``ValueError: ...`` at the start of a line or after a vLLM log prefix ``[file.py:12] ``.
_EXCEPTION_LINE = re.compile(
    r"(?:^|\] )((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$"
)
#: Messages that only point elsewhere ("see root cause above"): never the cause.
_POINTERS = ("see root cause", "see stack trace", "initialization failed", "background process")
_MAX_READ = 4 * 1024 * 1024
#: pydantic's ``[type=value_error, input_value=..., input_type=...]`` after each error.
_PYDANTIC_DETAIL = re.compile(r"\s*\[type=[^\]]*\]")


def root_cause(text: str) -> str | None:
    """The first exception line in ``text`` that names a cause rather than pointing to one.

    The earliest is the deepest: a child process fails first, its parents report after it.
    """
    for line in text.splitlines():
        match = _EXCEPTION_LINE.search(line.strip())
        if match and not any(p in match.group(2).lower() for p in _POINTERS):
            return f"{match.group(1)}: {match.group(2).strip()}"
    return None


def one_line(message: str) -> str:
    """A multi-line message (pydantic's, say) as one line, without its reference links."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith("For further information")]
    return _PYDANTIC_DETAIL.sub("", " ".join(kept))


def is_pointer(message: str) -> bool:
    """Whether an exception message only points at a cause logged elsewhere."""
    return any(p in message.lower() for p in _POINTERS)


class StartupLog:
    """Context manager: fds 1 and 2 to a temporary file (unless vLLM logs at INFO)."""

    def __init__(self, logger_name: str = "vllm") -> None:
        self.active = not logging.getLogger(logger_name).isEnabledFor(logging.INFO)
        self._file: IO[bytes] | None = None
        self._saved: list[int] = []

    def __enter__(self) -> StartupLog:
        if not self.active:
            return self
        self._file = tempfile.TemporaryFile(prefix="captionflow-vllm-")
        _flush()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._saved:
            return
        _flush()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = []

    def text(self) -> str:
        """What was captured (the last few MiB), or "" when nothing was."""
        if self._file is None:
            return ""
        size = self._file.seek(0, os.SEEK_END)
        self._file.seek(max(0, size - _MAX_READ))
        return self._file.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed or replaced
            stream.flush()
