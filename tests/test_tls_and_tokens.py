"""TLS (wss://) with a certificate made here, and tokens stored hashed in the config."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from support import orchestrator_config
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage

from caption_flow.config.models import AuthConfig, TLSConfig, TokenEntry
from caption_flow.orchestrator.auth import hash_token
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.protocol.messages import Assign, Hello, Request, Welcome, decode, encode
from caption_flow.security.certs import generate_self_signed


async def test_wss_with_hashed_tokens(tmp_path: Path, image_folder) -> None:
    images = image_folder(3)
    made = generate_self_signed(["localhost"], tmp_path / "certs", days=1)
    cert, key = made.cert, made.key
    config = orchestrator_config(tmp_path / "data", images[0].parent, tmp_path / "no-model")
    config = config.model_copy(
        update={
            "ssl": TLSConfig(cert=cert, key=key),
            "auth": AuthConfig(
                worker_tokens=[TokenEntry(name="carol", token=hash_token("s3cret"))]
            ),
        }
    )
    orch = Orchestrator(config)
    await orch.start()
    client_tls = ssl.create_default_context(cafile=str(cert))
    uri = f"wss://localhost:{orch.port}"
    try:
        async with connect(uri, ssl=client_tls) as ws:
            await ws.send(encode(Hello(role="worker", token="s3cret")))
            welcome = decode(await ws.recv())
            assert isinstance(welcome, Welcome) and welcome.contributor == "carol"
            await ws.send(encode(Request(count=1)))
            assert isinstance(decode(await ws.recv()), Assign)
        async with connect(uri, ssl=client_tls) as ws:  # the hash itself is not a token
            await ws.send(encode(Hello(role="worker", token=hash_token("s3cret"))))
            try:
                await asyncio.wait_for(ws.recv(), 5)
                raise AssertionError("a hashed token must not be accepted as a token")
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 4001
        # Plain ws:// to a TLS port does not get in.
        with pytest.raises((OSError, InvalidHandshake, InvalidMessage, TimeoutError)):
            async with connect(f"ws://localhost:{orch.port}", open_timeout=5):
                pass
    finally:
        await orch.stop()
