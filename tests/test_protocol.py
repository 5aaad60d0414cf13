"""The Sans-I/O protocol core: frames in, messages out, no sockets."""

from __future__ import annotations

import msgspec
import pytest

from caption_flow.errors import ProtocolError
from caption_flow.protocol.connection import ClientConnection, Identity, ServerConnection, State
from caption_flow.protocol.messages import (
    Ack,
    Assign,
    ChunkLease,
    Hello,
    ItemRef,
    ItemResult,
    Request,
    Results,
    SetConfig,
    Welcome,
    decode,
    encode,
)


def authenticate(role: str, token: str) -> Identity | None:
    return Identity(role, "alice") if token == "good" else None


def hello(role: str = "worker", token: str = "good", **kw: object) -> bytes:
    return encode(Hello(role=role, token=token, **kw))  # type: ignore[arg-type]


def test_every_message_round_trips_through_its_tag() -> None:
    messages = [
        hello(),
        encode(Assign(chunks=[ChunkLease("s:0", "s", [ItemRef(3, "a.jpg")], 12.5)])),
        encode(
            Results(
                chunk_id="s:0",
                seq=7,
                items=[ItemResult(3, "a.jpg", outputs={"captions": ["x"]}, width=4, height=5)],
            )
        ),
        encode(Ack(seq=7, accepted=1)),
    ]
    decoded = [decode(m) for m in messages]
    assert isinstance(decoded[0], Hello) and decoded[0].token == "good"
    assert isinstance(decoded[1], Assign) and decoded[1].chunks[0].items[0].key == "a.jpg"
    assert isinstance(decoded[2], Results) and decoded[2].items[0].outputs == {"captions": ["x"]}
    assert decoded[3] == Ack(seq=7, accepted=1)


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1garbage",  # not msgpack
        msgspec.msgpack.encode({"type": "no_such_type"}),
        msgspec.msgpack.encode({"chunks": []}),  # no tag: never guessed from keys
        msgspec.msgpack.encode({"type": "request", "count": "many"}),
        msgspec.msgpack.encode([1, 2, 3]),
        b"\x81\xa4type\xa2\xc3\x28",  # a str that is not UTF-8
        # Out of the bounds every field carries:
        msgspec.msgpack.encode({"type": "request", "count": 10**6}),
        msgspec.msgpack.encode(
            {"type": "results", "chunk_id": "c", "seq": 1, "items": [{"item_id": -1, "key": "k"}]}
        ),
        msgspec.msgpack.encode(
            {
                "type": "results",
                "chunk_id": "c",
                "seq": 1,
                "items": [{"item_id": 1, "key": "k", "width": 2**40}],
            }
        ),
        msgspec.msgpack.encode(
            {
                "type": "results",
                "chunk_id": "c",
                "seq": 1,
                "items": [{"item_id": 1, "key": "k"}] * 10_001,
            }
        ),
        msgspec.msgpack.encode({"type": "heartbeat", "stats": {f"s{i}": 1.0 for i in range(33)}}),
        msgspec.msgpack.encode({"type": "hello", "role": "worker", "token": "t" * 513}),
        msgspec.msgpack.encode(
            {"type": "hello", "role": "worker", "token": "t", "held_chunks": ["c"] * 65}
        ),
        msgspec.msgpack.encode({"type": "release", "chunk_id": "c", "reason": "r" * 2001}),
        # Items over the connection and dataworkers' messages:
        msgspec.msgpack.encode({"type": "fetch", "chunk_id": "c", "keys": ["k"] * 257}),
        msgspec.msgpack.encode({"type": "fetch", "chunk_id": "c", "keys": []}),
        msgspec.msgpack.encode({"type": "prep_request", "count": 65}),
        msgspec.msgpack.encode({"type": "prep_request", "count": 0}),
        msgspec.msgpack.encode(
            {"type": "prepared", "chunk_id": "c", "seq": 1, "items": [{"key": "k"}] * 257}
        ),
        msgspec.msgpack.encode({"type": "prepared", "chunk_id": "c", "seq": -1, "items": []}),
        msgspec.msgpack.encode(
            {"type": "prepared", "chunk_id": "c", "seq": 1, "items": [{"key": "k", "width": -1}]}
        ),
        msgspec.msgpack.encode(
            {"type": "prepared", "chunk_id": "c", "seq": 1, "items": [{"key": "k" * 1025}]}
        ),
        msgspec.msgpack.encode(
            {
                "type": "prepared",
                "chunk_id": "c",
                "seq": 1,
                "items": [{"key": "k", "columns": {"t": "x" * (64 * 1024 + 1)}}],
            }
        ),
        msgspec.msgpack.encode(
            {
                "type": "prepared",
                "chunk_id": "c",
                "seq": 1,
                "items": [{"key": "k", "error": "e" * 2001}],
            }
        ),
    ],
)
def test_malformed_frames_are_protocol_errors_with_4400(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert info.value.close_code == 4400


def test_text_frames_are_refused() -> None:
    with pytest.raises(ProtocolError):
        decode('{"type": "hello"}')


def test_server_requires_hello_first() -> None:
    server = ServerConnection(authenticate)
    with pytest.raises(ProtocolError) as info:
        server.receive(encode(Request(count=1)))
    assert info.value.close_code == 4400
    assert server.state is State.CLOSED


def test_bad_token_closes_with_4001() -> None:
    server = ServerConnection(authenticate)
    with pytest.raises(ProtocolError) as info:
        server.receive(hello(token="bad"))
    assert info.value.close_code == 4001


def test_wrong_protocol_version_is_refused() -> None:
    server = ServerConnection(authenticate)
    with pytest.raises(ProtocolError) as info:
        server.receive(hello(version=99))
    assert info.value.close_code == 4426


def test_roles_may_only_send_their_own_messages() -> None:
    server = ServerConnection(authenticate)
    assert isinstance(server.receive(hello(role="worker")), Hello)
    assert server.identity == Identity("worker", "alice")
    assert isinstance(server.receive(encode(Request(count=2))), Request)
    with pytest.raises(ProtocolError) as info:
        server.receive(encode(SetConfig(config={"model": "x"})))
    assert info.value.close_code == 4003


def test_monitor_cannot_request_work() -> None:
    server = ServerConnection(authenticate)
    server.receive(hello(role="monitor"))
    with pytest.raises(ProtocolError) as info:
        server.receive(encode(Request()))
    assert info.value.close_code == 4003


def test_client_expects_welcome_then_server_messages() -> None:
    client = ClientConnection()
    with pytest.raises(ProtocolError):
        ClientConnection().receive(encode(Ack(seq=1)))
    welcome = client.receive(encode(Welcome(session_id="s1", contributor="alice")))
    assert isinstance(welcome, Welcome) and client.state is State.OPEN
    assert isinstance(client.receive(encode(Ack(seq=1))), Ack)
    with pytest.raises(ProtocolError):
        client.receive(hello())
