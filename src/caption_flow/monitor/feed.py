"""The stats feed: a monitor's connection to the orchestrator, kept up across restarts.

It says hello with the monitor token, then hands every ``stats`` snapshot to a callback.
A lost connection is retried with exponential back-off (the status callback says so); a
refused token is not retried, since no retry can fix it. No Textual here: the CLI's
``--once`` uses :func:`fetch_snapshot` from the same module.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from caption_flow.config.models import MonitorConfig
from caption_flow.dial import FATAL_CLOSE_CODES, wait_to_reconnect
from caption_flow.errors import ProtocolError
from caption_flow.monitor.model import Link
from caption_flow.orchestrator_client import CONNECT_TIMEOUT_S, request
from caption_flow.protocol.connection import CLOSE_BAD_TOKEN, ClientConnection
from caption_flow.protocol.messages import GetStats, Hello, Stats, encode
from caption_flow.security.client_tls import client_ssl_context

log = logging.getLogger(__name__)


def refusal(exc: ConnectionClosed) -> str | None:
    """Why the orchestrator refused us for good, or None for a connection merely lost."""
    if exc.rcvd is None or exc.rcvd.code not in FATAL_CLOSE_CODES:
        return None
    reason = exc.rcvd.reason or "refused"
    hint = " (check monitor.token or --token)" if exc.rcvd.code == CLOSE_BAD_TOKEN else ""
    return f"{reason} ({exc.rcvd.code}){hint}"


class StatsFeed:
    """Connect, receive snapshots, reconnect; ``run`` returns only once refused."""

    def __init__(
        self,
        config: MonitorConfig,
        on_snapshot: Callable[[dict[str, Any]], object],
        on_link: Callable[[str, str], object],
        first_delay: float = 0.5,
        max_delay: float = 10.0,
    ) -> None:
        self.config = config
        self.on_snapshot = on_snapshot
        self.on_link = on_link  # (Link state, detail)
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._wake = asyncio.Event()
        self._connected = False

    def retry_now(self) -> None:
        """Cut the current back-off short."""
        self._wake.set()

    async def run(self) -> None:
        delay = self.first_delay
        while True:
            self._connected = False
            try:
                await self._session()
                why = "connection closed"
            except ConnectionClosed as exc:
                refused = refusal(exc)
                if refused is not None:
                    self.on_link(Link.REFUSED, refused)
                    return
                why = "connection lost"
            except InvalidURI as exc:
                self.on_link(Link.REFUSED, f"bad server URL: {exc}")
                return
            except ssl.SSLCertVerificationError as exc:
                self.on_link(
                    Link.REFUSED,
                    f"certificate not trusted ({exc.verify_message}); a self-signed one needs "
                    "monitor.verify_ssl: false (--no-verify-ssl)",
                )
                return
            except (OSError, TimeoutError, InvalidHandshake, ProtocolError) as exc:
                why = str(exc) or type(exc).__name__
            if self._connected:  # it worked a while: start the back-off afresh
                delay = self.first_delay
            self.on_link(Link.RECONNECTING, f"{why}; next try in about {delay:.1f}s")
            self._wake.clear()
            delay = await wait_to_reconnect(self._wake, delay, self.max_delay)

    async def _session(self) -> None:
        async with connect(
            self.config.server,
            ssl=client_ssl_context(self.config.server, self.config.verify_ssl),
            open_timeout=CONNECT_TIMEOUT_S,
            compression=None,
        ) as ws:
            protocol = ClientConnection()
            await ws.send(encode(Hello(role="monitor", token=self.config.token, name="monitor")))
            protocol.receive(await ws.recv())  # the welcome; a refusal closes the socket
            log.info("connected to %s as a monitor", self.config.server)
            self._connected = True
            self.on_link(Link.CONNECTED, "")
            async for frame in ws:
                message = protocol.receive(frame)
                if isinstance(message, Stats):
                    self.on_snapshot(message.snapshot)


async def fetch_snapshot(config: MonitorConfig, role: str = "monitor") -> dict[str, Any]:
    """One snapshot, for scripts, asked for as ``role`` (monitor or admin); raises AuthError
    when refused, ProtocolError when the orchestrator cannot be reached."""
    answer = await request(config, role, GetStats())
    if not isinstance(answer, Stats):
        raise ProtocolError(f"expected a snapshot, got {type(answer).__name__}")
    return answer.snapshot
