"""One-shot exchanges with a running orchestrator: say hello, send one message, read the answer.

Used by the admin commands, ``status``, ``contributors`` and ``monitor --once``. Foreign
errors become ours here: a refused token is an AuthError, anything unreachable a ProtocolError.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from caption_flow.config.models import MonitorConfig
from caption_flow.errors import AuthError, ProtocolError
from caption_flow.protocol.connection import CLOSE_BAD_TOKEN, CLOSE_WRONG_ROLE, ClientConnection
from caption_flow.protocol.messages import AdminResult, ErrorMsg, Hello, Message, Stats, encode
from caption_flow.security.client_tls import client_ssl_context

CONNECT_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 60.0


async def request(config: MonitorConfig, role: str, message: Message) -> Message:
    """Say hello as ``role``, send ``message`` and return the answer (an AdminResult, Stats
    or ErrorMsg). Raises AuthError for a refused token, ProtocolError when unreachable."""
    try:
        async with connect(
            config.server,
            ssl=client_ssl_context(config.server, config.verify_ssl),
            open_timeout=CONNECT_TIMEOUT_S,
            compression=None,
            max_size=64 * 1024 * 1024,
        ) as ws:
            protocol = ClientConnection()
            await ws.send(encode(Hello(role=role, token=config.token, name=f"cli-{role}")))  # type: ignore[arg-type]
            protocol.receive(await ws.recv())
            await ws.send(encode(message))
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                while True:
                    answer = protocol.receive(await ws.recv())
                    if isinstance(answer, AdminResult | Stats | ErrorMsg):
                        return answer
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
        if code in (CLOSE_BAD_TOKEN, CLOSE_WRONG_ROLE):
            raise AuthError(f"orchestrator refused the {role} token ({code}): {reason}") from None
        raise ProtocolError(f"connection to {config.server} closed: {reason}") from None
    except InvalidURI as exc:
        raise ProtocolError(f"bad server URL: {exc}") from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise ProtocolError(f"cannot reach the orchestrator at {config.server}: {exc}") from None
