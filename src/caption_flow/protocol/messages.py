"""Typed, tagged messages (msgspec) and the one place that encodes and decodes them.

Every frame is a msgpack map with a ``type`` tag; the decoder picks the struct from the tag,
never from which keys happen to be present. Job configuration travels as plain dicts so that
this module needs nothing from the config layer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from caption_flow.errors import ProtocolError

PROTOCOL_VERSION = 1

Role = Literal["worker", "monitor", "admin", "dataworker"]

# Hard bounds on every field a peer sends. A frame outside them does not decode (close 4400).
# They are generous for honest software; job-dependent limits (caption length from the job's
# max_tokens, output fields the job has) are checked by the orchestrator on top of these.
MAX_ITEM_ID = 2**53  # ids are dense from 0; this only keeps them exact in JSON and SQLite
MAX_KEY_CHARS = 1024
MAX_CHUNK_ID_CHARS = 512
MAX_TOKEN_CHARS = 512
MAX_NAME_CHARS = 128
MAX_REASON_CHARS = 2000
MAX_CAPTION_CHARS = 256 * 1024
MAX_OUTPUT_FIELDS = 16
MAX_OUTPUTS_PER_FIELD = 64
MAX_ITEMS_PER_MESSAGE = 10_000
MAX_HELD_CHUNKS = 64
MAX_REQUEST_COUNT = 64
MAX_STATS = 32
MAX_PIXELS_SIDE = 2**31 - 1  # int32, the Parquet column type

ItemId = Annotated[int, msgspec.Meta(ge=0, le=MAX_ITEM_ID)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
Key = Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)]
ChunkId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CHUNK_ID_CHARS)]
ShortText = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)]
FieldName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Caption = Annotated[str, msgspec.Meta(max_length=MAX_CAPTION_CHARS)]
Side = Annotated[int, msgspec.Meta(ge=0, le=MAX_PIXELS_SIDE)]
Millis = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
StatName = Annotated[str, msgspec.Meta(max_length=64)]
Capability = str | int | float | bool


class _Msg(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    """Base of every frame. ``gc=False``: messages hold no cycles, and skipping the garbage
    collector's tracking matters at hundreds of thousands of items per second."""


class Hello(_Msg, tag="hello"):
    """First frame of every client. ``held_chunks`` lets a reconnecting worker keep its chunks."""

    role: Role
    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_CHARS)]
    name: ShortText = ""
    version: Annotated[int, msgspec.Meta(ge=0, le=2**31)] = PROTOCOL_VERSION
    capabilities: Annotated[dict[StatName, Capability], msgspec.Meta(max_length=MAX_STATS)] = {}
    held_chunks: Annotated[list[ChunkId], msgspec.Meta(max_length=MAX_HELD_CHUNKS)] = []


class Welcome(_Msg, tag="welcome"):
    """Answer to a good hello: only what that role needs (never the auth section)."""

    session_id: str
    contributor: str
    version: int = PROTOCOL_VERSION
    config: dict[str, Any] = {}
    resumed_chunks: list[str] = []


class ItemRef(msgspec.Struct, array_like=True, gc=False):
    """One item of a leased chunk: its durable id and its stable key in the shard."""

    item_id: ItemId
    key: Key


class ChunkLease(msgspec.Struct, omit_defaults=True, gc=False):
    """A chunk leased to a session, carrying only the items still missing."""

    chunk_id: str
    shard: str
    items: list[ItemRef]
    deadline: float = 0.0


class Request(_Msg, tag="request"):
    """A worker asks for up to ``count`` more chunks."""

    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUEST_COUNT)] = 1


class Assign(_Msg, tag="assign"):
    """Chunks leased to the requester. ``finished`` means the whole dataset is done."""

    chunks: list[ChunkLease] = []
    finished: bool = False
    retry_after: float = 0.0


class ItemResult(msgspec.Struct, omit_defaults=True, gc=False):
    """The outcome for one item: outputs per field (one entry per prompt) or an error."""

    item_id: ItemId
    key: Key
    outputs: Annotated[
        dict[FieldName, Annotated[list[Caption], msgspec.Meta(max_length=MAX_OUTPUTS_PER_FIELD)]],
        msgspec.Meta(max_length=MAX_OUTPUT_FIELDS),
    ] = {}
    error: Reason | None = None
    width: Side | None = None
    height: Side | None = None
    processing_ms: Millis = 0.0


class Results(_Msg, tag="results"):
    """Results for items of one chunk. ``seq`` is the worker's, echoed in the ack."""

    chunk_id: ChunkId
    seq: Seq
    items: Annotated[list[ItemResult], msgspec.Meta(max_length=MAX_ITEMS_PER_MESSAGE)]
    model: Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)] = ""


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

    stats: Annotated[dict[StatName, float], msgspec.Meta(max_length=MAX_STATS)] = {}
    chunk: Annotated[str, msgspec.Meta(max_length=MAX_CHUNK_ID_CHARS)] = ""  # being captioned


class Release(_Msg, tag="release"):
    """A worker gives a chunk back; its missing items are re-leased.

    An empty ``reason`` is a clean hand-back (the worker is stopping) and costs the chunk
    nothing; a reason says the worker could not do it (unreadable shard, engine out of memory,
    results refused) and counts as one of the chunk's attempts."""

    chunk_id: ChunkId
    reason: Reason = ""


class ConfigUpdate(_Msg, tag="config"):
    """Orchestrator to worker: new job configuration, applied from the next batch."""

    config: dict[str, Any]


class SetConfig(_Msg, tag="set_config"):
    """Admin to orchestrator: a partial job configuration to merge and broadcast."""

    config: dict[str, Any]


class Requeue(_Msg, tag="requeue"):
    """Admin to orchestrator: caption failed items and failed chunks again."""

    failed: bool = True


TokenHash = Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
TokenName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"^[^/]+$")
]
MAX_ADMIN_LIST = 10_000


class ReloadConfig(_Msg, tag="reload_config"):
    """Admin to orchestrator: a whole ``orchestrator`` section to validate and apply what
    can change live. A section without ``auth`` keeps the running tokens."""

    config: Annotated[dict[StatName, Any], msgspec.Meta(max_length=64)]


class AddToken(_Msg, tag="add_token"):
    """Admin to orchestrator: store a token by its hash (the token never crosses the wire)."""

    role: Role
    name: TokenName
    token_hash: TokenHash


class RevokeToken(_Msg, tag="revoke_token"):
    """Admin to orchestrator: refuse ``name``'s token (of ``role``, or of every role) from
    now on and close its sessions."""

    name: TokenName
    role: Role | None = None


class ListTokens(_Msg, tag="list_tokens"):
    """Admin to orchestrator: names, roles, sources and revocations of every token."""


class GetStats(_Msg, tag="get_stats"):
    """Monitor or admin to orchestrator: answer with one ``stats`` snapshot now."""


class AdminResult(_Msg, tag="admin_result"):
    """Orchestrator to admin: what a command did. ``ok`` false: nothing changed, and
    ``message`` says why."""

    ok: bool
    message: str = ""
    changed: Annotated[list[str], msgspec.Meta(max_length=MAX_ADMIN_LIST)] = []
    restart_needed: Annotated[list[str], msgspec.Meta(max_length=MAX_ADMIN_LIST)] = []
    data: dict[str, Any] = {}


class Stats(_Msg, tag="stats"):
    """Orchestrator to monitors (and answer to admins): a live snapshot."""

    snapshot: dict[str, Any]


MAX_FETCH_KEYS = 256
MAX_ITEM_BYTES = 512 * 1024 * 1024
MAX_COLUMN_CHARS = 64 * 1024
ColumnValue = Annotated[str, msgspec.Meta(max_length=MAX_COLUMN_CHARS)] | int | float | bool


class Fetch(_Msg, tag="fetch"):
    """Worker to orchestrator: send me these items of a chunk leased to me (a worker that
    cannot read the dataset). One fetch at a time: the next goes only after the last
    ``items`` reply arrived, which is the back-pressure."""

    chunk_id: ChunkId
    keys: Annotated[list[Key], msgspec.Meta(min_length=1, max_length=MAX_FETCH_KEYS)]


class ItemData(msgspec.Struct, omit_defaults=True, gc=False):
    """One item's bytes as the orchestrator read them, or why it could not. ``width`` and
    ``height`` (0: not given) are the original's size when ``data`` was shrunk on the way
    (prepared by a dataworker or the orchestrator), so rows keep the dataset's sizes."""

    key: Key
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_ITEM_BYTES)] | None = None
    error: Reason | None = None
    columns: Annotated[dict[StatName, ColumnValue], msgspec.Meta(max_length=MAX_STATS)] = {}
    width: Side = 0
    height: Side = 0


class Items(_Msg, tag="items"):
    """Orchestrator to worker: items of one fetch, in order, split over several replies
    when large; ``last`` ends the fetch. ``error``: the whole fetch was refused."""

    chunk_id: str
    items: list[ItemData] = []
    last: bool = True
    error: str | None = None


MAX_PREPARED_ITEMS = 256


class PrepRequest(_Msg, tag="prep_request"):
    """Dataworker to orchestrator: give me up to ``count`` chunks to prepare."""

    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUEST_COUNT)] = 1


class PrepLease(msgspec.Struct, omit_defaults=True, gc=False):
    """Items of one chunk a dataworker is to prepare (only those not prepared yet)."""

    chunk_id: str
    shard: str
    keys: list[str]
    deadline: float = 0.0


class PrepAssign(_Msg, tag="prep_assign"):
    """Orchestrator to dataworker: chunks to prepare, and how (the job's ``image`` section
    plus ``format`` and ``quality``). No chunks: come back after ``retry_after`` seconds
    (the buffer is full, or nothing is left to prepare); ``finished``: the run is done."""

    chunks: list[PrepLease] = []
    image: dict[str, Any] = {}
    retry_after: float = 0.0
    finished: bool = False


class Prepared(_Msg, tag="prepared"):
    """Dataworker to orchestrator: prepared items of a chunk it holds for preparation.
    An item with ``error`` (unreadable here) is left for the orchestrator to read itself;
    ``last`` hands the rest of the chunk's preparation back."""

    chunk_id: ChunkId
    seq: Seq
    items: Annotated[list[ItemData], msgspec.Meta(max_length=MAX_PREPARED_ITEMS)]
    last: bool = False


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
    | Requeue
    | Stats
    | ErrorMsg
    | ReloadConfig
    | AddToken
    | RevokeToken
    | ListTokens
    | GetStats
    | AdminResult
    | Fetch
    | Items
    | PrepRequest
    | PrepAssign
    | Prepared
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
    except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: invalid UTF-8 in a str
        raise ProtocolError(f"malformed message: {exc}", close_code=4400) from exc
