"""Sans-I/O state machines for both ends of a connection.

They take frames in and give messages (or frames to send) out; the asyncio drivers in
``orchestrator.server`` and ``worker.client`` only move bytes. The server side enforces the
handshake (hello first, a valid token) and what each role may send.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from caption_flow.errors import AuthError, ProtocolError
from caption_flow.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    AddToken,
    AdminResult,
    Assign,
    ConfigUpdate,
    ErrorMsg,
    Fetch,
    GetStats,
    Heartbeat,
    Hello,
    Items,
    ListTokens,
    Message,
    Prepared,
    PrepAssign,
    PrepRequest,
    Reject,
    Release,
    ReloadConfig,
    Request,
    Requeue,
    Results,
    RevokeToken,
    SetConfig,
    Stats,
    Welcome,
    decode,
)

CLOSE_BAD_TOKEN = 4001
CLOSE_WRONG_ROLE = 4003
CLOSE_MALFORMED = 4400
CLOSE_VERSION = 4426
CLOSE_TRY_AGAIN = 1013  # the server is busy: come back later

# What each role may send once the handshake is done.
ALLOWED_FROM: dict[str, tuple[type, ...]] = {
    "worker": (Request, Results, Heartbeat, Release, Fetch),
    "dataworker": (PrepRequest, Prepared, Heartbeat, Release),
    "monitor": (Heartbeat, GetStats),
    "admin": (
        SetConfig,
        Requeue,
        Heartbeat,
        GetStats,
        ReloadConfig,
        AddToken,
        RevokeToken,
        ListTokens,
    ),
}

# What a client expects to receive once welcomed.
ALLOWED_TO_CLIENT: tuple[type, ...] = (
    Assign,
    Ack,
    Reject,
    ConfigUpdate,
    Stats,
    ErrorMsg,
    AdminResult,
    Items,
    PrepAssign,
)


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Identity:
    """Who a session is: its role and the contributor the token belongs to."""

    role: str
    contributor: str


Authenticator = Callable[[str, str], Identity | None]


class ServerConnection:
    """Server side of one connection.

    Call :meth:`receive` with every frame. It returns the decoded message, or raises
    ProtocolError whose ``close_code`` the driver must close with.
    """

    def __init__(self, authenticate: Authenticator) -> None:
        self._authenticate = authenticate
        self.state = State.AWAITING_HELLO
        self.identity: Identity | None = None
        self.hello: Hello | None = None

    def receive(self, frame: bytes | str) -> Message:
        if self.state is State.CLOSED:
            raise ProtocolError("connection is closed", close_code=CLOSE_MALFORMED)
        try:
            message = decode(frame)
        except ProtocolError:
            self.state = State.CLOSED
            raise
        if self.state is State.AWAITING_HELLO:
            return self._receive_hello(message)
        assert self.identity is not None
        if not isinstance(message, ALLOWED_FROM.get(self.identity.role, ())):
            self.state = State.CLOSED
            raise ProtocolError(
                f"a {self.identity.role} may not send {type(message).__name__}",
                close_code=CLOSE_WRONG_ROLE,
            )
        return message

    def _receive_hello(self, message: Message) -> Hello:
        if not isinstance(message, Hello):
            self.state = State.CLOSED
            raise ProtocolError("the first frame must be a hello", close_code=CLOSE_MALFORMED)
        if message.version != PROTOCOL_VERSION:
            self.state = State.CLOSED
            raise ProtocolError(
                f"protocol version {message.version} not supported (server speaks "
                f"{PROTOCOL_VERSION})",
                close_code=CLOSE_VERSION,
            )
        identity = self._authenticate(message.role, message.token)
        if identity is None:
            self.state = State.CLOSED
            raise AuthError(f"token refused for role {message.role!r}")
        self.identity = identity
        self.hello = message
        self.state = State.OPEN
        return message

    def close(self) -> None:
        self.state = State.CLOSED


class ClientConnection:
    """Client side: expects a welcome first, then only server-to-client messages."""

    def __init__(self) -> None:
        self.state = State.AWAITING_HELLO
        self.welcome: Welcome | None = None

    def receive(self, frame: bytes | str) -> Message:
        message = decode(frame)
        if self.state is State.AWAITING_HELLO:
            if isinstance(message, ErrorMsg):
                self.state = State.CLOSED
                raise ProtocolError(message.message, close_code=message.code)
            if not isinstance(message, Welcome):
                self.state = State.CLOSED
                raise ProtocolError("expected a welcome", close_code=CLOSE_MALFORMED)
            self.welcome = message
            self.state = State.OPEN
            return message
        if not isinstance(message, ALLOWED_TO_CLIENT):
            raise ProtocolError(f"unexpected {type(message).__name__} from server")
        return message
