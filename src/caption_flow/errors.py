"""The project's exception tree, drawn once.

Foreign exceptions (websockets, sqlite3, PIL, torch) are turned into these at the boundary
of the module that meets them, so callers only ever catch our own types.
"""

from __future__ import annotations


class CaptionFlowError(Exception):
    """Base of every error captionflow raises on purpose."""


class ConfigError(CaptionFlowError):
    """A configuration file or flag is invalid; the message names the key and the file."""


class ProtocolError(CaptionFlowError):
    """A peer sent something the protocol does not allow.

    ``close_code`` is the websocket close code the server answers with.
    """

    def __init__(self, message: str, close_code: int = 4400) -> None:
        super().__init__(message)
        self.close_code = close_code


class AuthError(ProtocolError):
    """A hello carried a token that no role accepts."""

    def __init__(self, message: str = "invalid token") -> None:
        super().__init__(message, close_code=4001)


class NotLeasedError(CaptionFlowError):
    """A result names a chunk that is not leased to the sending session."""


class SourceError(CaptionFlowError):
    """A dataset cannot be listed or an item cannot be read."""


class ImageError(CaptionFlowError):
    """An image cannot be decoded (corrupt, truncated, huge): the item fails, not the worker."""


class EngineError(CaptionFlowError):
    """The inference engine failed on a batch or could not load a model."""


class StorageError(CaptionFlowError):
    """The state database or the Parquet output is inconsistent or unwritable."""


class EngineUnavailableError(EngineError):
    """The engine cannot run right now: out of memory, lost CUDA context, dead engine process.

    Not the items' fault: the worker shrinks its batch, then hands the chunk back and waits.
    """
