"""What every client that takes work from the orchestrator shares: how it connects, which
failures mean "stop retrying" (and which are worth another try after a back-off), and how it
reads the dataset with its own credentials."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import AuthError, ProtocolError
from caption_flow.protocol.connection import CLOSE_BAD_TOKEN, CLOSE_VERSION, CLOSE_WRONG_ROLE
from caption_flow.security.client_tls import client_ssl_context

# A refused token, a role that may not do this, a protocol this client does not speak:
# reconnecting would only be refused again.
FATAL_CLOSE_CODES = {CLOSE_BAD_TOKEN, CLOSE_WRONG_ROLE, CLOSE_VERSION}

# What a connection attempt or a session may end with; see :func:`give_up_or_log`.
CONNECTION_FAILURES = (ConnectionClosed, OSError, TimeoutError, InvalidHandshake, InvalidURI)

log = logging.getLogger(__name__)


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


def give_up_or_log(exc: Exception, who: str, server: str) -> None:
    """Raise the error to stop with when reconnecting cannot help (a refusal for good, a
    certificate nobody trusts, a bad URL); otherwise log the failure, to be retried."""
    if isinstance(exc, ConnectionClosed):
        refused = refusal(exc, who)
        if refused is not None:
            raise refused from None
        log.warning("connection lost (%s); reconnecting", exc)
        return
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Not transient: retrying would wait forever on a certificate nobody trusts.
        raise ProtocolError(
            f"the orchestrator's certificate at {server} is not trusted "
            f"({exc.verify_message}): use one a CA signed (generate-cert --domain NAME "
            f"--email ADDR), or accept a self-signed one with {who}.verify_ssl: false "
            "(--no-verify-ssl)"
        ) from None
    if isinstance(exc, InvalidURI):
        raise ProtocolError(f"bad server URL: {exc}") from None
    if isinstance(exc, AuthError):
        raise exc
    log.warning("cannot reach orchestrator at %s: %s", server, exc)


async def wait_to_reconnect(stopped: asyncio.Event, delay: float, maximum: float) -> float:
    """Wait ``delay`` seconds with jitter (so a fleet that lost its orchestrator together does
    not come back together), or until ``stopped``; the next, doubled delay."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopped.wait(), delay * (0.8 + 0.4 * random.random()))
    return min(delay * 2, maximum)


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
