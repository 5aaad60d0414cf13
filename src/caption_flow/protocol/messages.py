"""Typed, tagged messages (msgspec) and the one place that encodes and decodes them.

Every frame is a msgpack map with a ``type`` tag; the decoder picks the struct from the tag,
never from which keys happen to be present. Job configuration travels as plain dicts so that
this module needs nothing from the config layer.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from caption_flow.errors import ProtocolError

PROTOCOL_VERSION = 1

Role = Literal["worker", "monitor", "admin", "dataworker"]


class _Msg(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    """Base of every frame. ``gc=False``: messages hold no cycles, and skipping the garbage
    collector's tracking matters at hundreds of thousands of items per second."""


class Hello(_Msg, tag="hello"):
    """First frame of every client. ``held_chunks`` lets a reconnecting worker keep its chunks."""

    role: Role
    token: str
    name: str = ""
    version: int = PROTOCOL_VERSION
    capabilities: dict[str, Any] = {}
    held_chunks: list[str] = []


class Welcome(_Msg, tag="welcome"):
    """Answer to a good hello: only what that role needs (never the auth section)."""

    session_id: str
    contributor: str
    version: int = PROTOCOL_VERSION
    config: dict[str, Any] = {}
    resumed_chunks: list[str] = []


class ItemRef(msgspec.Struct, array_like=True, gc=False):
    """One item of a leased chunk: its durable id and its stable key in the shard."""

    item_id: int
    key: str


class ChunkLease(msgspec.Struct, omit_defaults=True, gc=False):
    """A chunk leased to a session, carrying only the items still missing."""

    chunk_id: str
    shard: str
    items: list[ItemRef]
    deadline: float = 0.0


class Request(_Msg, tag="request"):
    """A worker asks for up to ``count`` more chunks."""

    count: int = 1


class Assign(_Msg, tag="assign"):
    """Chunks leased to the requester. ``finished`` means the whole dataset is done."""

    chunks: list[ChunkLease] = []
    finished: bool = False
    retry_after: float = 0.0


class ItemResult(msgspec.Struct, omit_defaults=True, gc=False):
    """The outcome for one item: outputs per field (one entry per prompt) or an error."""

    item_id: int
    key: str
    outputs: dict[str, list[str]] = {}
    error: str | None = None
    width: int | None = None
    height: int | None = None
    processing_ms: float = 0.0


class Results(_Msg, tag="results"):
    """Results for items of one chunk. ``seq`` is the worker's, echoed in the ack."""

    chunk_id: str
    seq: int
    items: list[ItemResult]
    model: str = ""


class Ack(_Msg, tag="ack"):
    """The results with this ``seq`` are durable; the worker may forget them."""

    seq: int
    accepted: int = 0
    duplicates: int = 0


class Reject(_Msg, tag="reject"):
    """The results with this ``seq`` were refused (e.g. chunk not leased to this session)."""

    seq: int
    reason: str


class Heartbeat(_Msg, tag="heartbeat"):
    """Keeps a session's leases alive and reports worker statistics."""

    stats: dict[str, float] = {}


class Release(_Msg, tag="release"):
    """A worker gives a chunk back (clean stop); its missing items are re-leased."""

    chunk_id: str


class ConfigUpdate(_Msg, tag="config"):
    """Orchestrator to worker: new job configuration, applied from the next batch."""

    config: dict[str, Any]


class SetConfig(_Msg, tag="set_config"):
    """Admin to orchestrator: a partial job configuration to merge and broadcast."""

    config: dict[str, Any]


class Stats(_Msg, tag="stats"):
    """Orchestrator to monitors (and answer to admins): a live snapshot."""

    snapshot: dict[str, Any]


class ErrorMsg(_Msg, tag="error"):
    """A refusal that does not close the connection."""

    code: int
    message: str


Message = (
    Hello
    | Welcome
    | Request
    | Assign
    | Results
    | Ack
    | Reject
    | Heartbeat
    | Release
    | ConfigUpdate
    | SetConfig
    | Stats
    | ErrorMsg
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """Serialise one message to a binary frame."""
    return _encoder.encode(message)


def decode(frame: bytes | str) -> Message:
    """Parse one frame; anything malformed or of an unknown type is a ProtocolError(4400)."""
    if isinstance(frame, str):
        raise ProtocolError("text frames are not part of the protocol", close_code=4400)
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed message: {exc}", close_code=4400) from exc
