"""What every client that takes work from the orchestrator shares: how it connects, which
close codes mean "stop retrying", and how it reads the dataset with its own credentials."""

from __future__ import annotations

from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import AuthError
from caption_flow.protocol.connection import CLOSE_BAD_TOKEN, CLOSE_VERSION, CLOSE_WRONG_ROLE
from caption_flow.security.client_tls import client_ssl_context

# A refused token, a role that may not do this, a protocol this client does not speak:
# reconnecting would only be refused again.
FATAL_CLOSE_CODES = {CLOSE_BAD_TOKEN, CLOSE_WRONG_ROLE, CLOSE_VERSION}


def dial(server: str, verify_ssl: bool) -> connect:
    """The websocket connection (an async context manager) to the orchestrator."""
    return connect(
        server,
        max_size=None,
        compression=None,
        ping_interval=20,
        ping_timeout=60,
        ssl=client_ssl_context(server, verify_ssl),
        open_timeout=10,
    )


def refusal(exc: ConnectionClosed, who: str) -> AuthError | None:
    """The error to stop with when the orchestrator closed for good, else None."""
    code = exc.rcvd.code if exc.rcvd is not None else None
    if code not in FATAL_CLOSE_CODES:
        return None
    reason = exc.rcvd.reason if exc.rcvd is not None else ""
    return AuthError(f"orchestrator refused this {who} ({code}): {reason}")


def dataset_with_credentials(
    settings: dict[str, Any], storage_options: dict[str, Any]
) -> DatasetConfig:
    """The orchestrator's dataset section with this host's own fsspec options laid over it
    (the orchestrator never sends its credentials)."""
    settings = dict(settings)
    if storage_options:
        settings["storage_options"] = {
            **(settings.get("storage_options") or {}),
            **storage_options,
        }
    return DatasetConfig.model_validate(settings)
