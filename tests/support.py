"""Helpers shared by the network tests: configs, a started orchestrator, reading the output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from caption_flow.config.models import (
    AuthConfig,
    DatasetConfig,
    ModelConfig,
    OrchestratorConfig,
    SamplingConfig,
    StorageConfig,
    TokenEntry,
    WorkerConfig,
)
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.storage.reader import output_dataset
from caption_flow.worker.client import Worker

# One scaled unit for every wait in the tests: a slow machine changes this number only.
TIME_UNIT = float(os.environ.get("CAPTIONFLOW_TEST_TIME_UNIT", "1.0"))

WORKER_TOKENS = {"alice": "alice-secret", "bob": "bob-secret"}
ADMIN_TOKEN = "admin-secret"
MONITOR_TOKEN = "monitor-secret"
PROMPTS = ["describe this image", "list the colours"]


def job(model_dir: Path, prompts: list[str] | None = None, max_tokens: int = 6) -> ModelConfig:
    return ModelConfig(
        model=str(model_dir),
        batch_size=4,
        max_model_len=512,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1, "video": 0},
        inference_prompts=prompts or PROMPTS,
        sampling=SamplingConfig(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0),
    )


def orchestrator_config(
    data_dir: Path, images: Path, model_dir: Path, **overrides: Any
) -> OrchestratorConfig:
    base = OrchestratorConfig(
        host="127.0.0.1",
        port=0,
        dataset=DatasetConfig(type="local_folder", path=str(images), name="test"),
        vllm=job(model_dir),
        storage=StorageConfig(data_dir=data_dir, compact_seconds=0.5, group_commit_ms=2),
        chunk_size=5,
        lease_seconds=30 * TIME_UNIT,
        status_interval=3600,
        auth=AuthConfig(
            worker_tokens=[TokenEntry(name=n, token=t) for n, t in WORKER_TOKENS.items()],
            admin_tokens=[TokenEntry(name="root", token=ADMIN_TOKEN)],
            monitor_tokens=[TokenEntry(name="watcher", token=MONITOR_TOKEN)],
        ),
    )
    return base.model_copy(update=overrides)


def worker_config(port: int, name: str = "alice", **overrides: Any) -> WorkerConfig:
    return WorkerConfig(
        server=f"ws://127.0.0.1:{port}",
        token=WORKER_TOKENS[name],
        name=f"worker-{name}",
        engine="transformers",
        heartbeat_seconds=1.0,
        reconnect_max_seconds=1.0,
        decode_threads=2,
        exit_when_done=True,
        **overrides,
    )


async def eventually(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Wait until ``condition()`` holds; fail after ``seconds`` (scaled by TIME_UNIT)."""
    deadline = time.monotonic() + seconds * TIME_UNIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds * TIME_UNIT:.0f}s: {what}"
        await asyncio.sleep(0.02)


def read_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Every output row in the Parquet parts."""
    if not any((data_dir / "captions").glob("part-*.parquet")):
        return []
    return output_dataset(data_dir / "captions").to_table().to_pylist()


@contextlib.asynccontextmanager
async def running(config: OrchestratorConfig) -> AsyncIterator[Orchestrator]:
    """A started orchestrator, stopped on the way out whatever happened inside."""
    orch = Orchestrator(config)
    await orch.start()
    try:
        yield orch
    finally:
        await orch.stop()


async def caption_all(
    config: OrchestratorConfig, names: Sequence[str] = ("alice",), **worker_kw: Any
) -> tuple[list[Worker], dict[str, Any]]:
    """Start an orchestrator, run workers until the dataset is done, stop it.

    Returns the workers and the orchestrator's last snapshot.
    """
    async with running(config) as orch:
        workers = [Worker(worker_config(orch.port, name, **worker_kw)) for name in names]
        await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), timeout=180 * TIME_UNIT)
        return workers, orch.snapshot()


class StubEngine:
    """An engine without a model, for what cannot happen on this machine (a GPU running out
    of memory, a lost CUDA context). ``fail(requests)`` may raise; otherwise each request
    gets a caption made from its prompt and image size. ``calls`` records batch sizes."""

    def __init__(
        self,
        spec: Any,
        fail: Any = None,
        delay_s: float = 0.0,
    ) -> None:
        self.spec = spec
        self.fail = fail
        self.delay_s = delay_s
        self.calls: list[int] = []

    def generate(self, requests: Sequence[Any], sampling: Any) -> list[Any]:
        import time

        from caption_flow.engines.base import Generation

        self.calls.append(len(requests))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail is not None:
            self.fail(requests)
        return [Generation(f"{r.prompt} {r.image.width}x{r.image.height}", 1) for r in requests]

    def close(self) -> None:
        pass


def cuda_out_of_memory(requests: Sequence[Any]) -> None:
    """Raise what the transformers engine raises when CUDA runs out of memory: torch's real
    OutOfMemoryError, wrapped in our EngineError. Stubbed: no GPU here."""
    import torch

    from caption_flow.errors import EngineError

    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError as exc:
        raise EngineError(f"out of memory while generating {len(requests)} captions") from exc


def stub_loader(engines: list[StubEngine], **kw: Any) -> Any:
    """A Captioner ``loader`` that builds StubEngines and keeps them in ``engines``."""

    def load(kind: Any, spec: Any) -> StubEngine:
        engine = StubEngine(spec, **kw)
        engines.append(engine)
        return engine

    return load


CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def run_cli(
    *args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``caption-flow ARGS`` as a real subprocess, output captured; the time-out scales."""
    return subprocess.run(
        [sys.executable, "-m", "caption_flow", *args],
        cwd=cwd,
        env=CLI_ENV if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout * TIME_UNIT,
    )


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a subprocess that must be told its port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str) -> float | None:
    """One value of the orchestrator's /metrics (``captionflow_<name>``); None while it is
    down or before it has listed the dataset."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    match = re.search(rf"^captionflow_{name} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Blocking twin of :func:`eventually`, for tests that drive subprocesses."""
    deadline = time.monotonic() + seconds * TIME_UNIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds * TIME_UNIT:.0f}s: {what}"
        time.sleep(0.1)


# The original caption-flow README's example configs (issue 9), every documented key kept.
WORKER_TOKEN = "quickstart-worker-token-4f1a"
MONITOR_TOKEN = "quickstart-monitor-token-9c2e"


def original_orchestrator_yaml(port: int, images: Path, model: Path) -> str:
    """The original README's orchestrator.yaml, every key kept; values substituted: the
    address, the paths, the tiny model's context length and dtype, short generations and
    tokens of our own."""
    return textwrap.dedent(f"""\
        orchestrator:
          host: 127.0.0.1
          port: {port}
          # ssl:
          #   cert: /path/fullchain.pem
          #   key:  /path/privkey.pem

          dataset:
            type: local
            path: {images}
            name: quickstart
            version: "1.0"

          vllm:
            model: {model}
            tensor_parallel_size: 1
            max_model_len: 512
            dtype: float32
            gpu_memory_utilization: 0.92
            enforce_eager: true
            disable_mm_preprocessor_cache: true
            limit_mm_per_prompt: {{ image: 1 }}

            batch_size: 8

            sampling:
              temperature: 0.7
              top_p: 0.95
              max_tokens: 6
              repetition_penalty: 1.05
              skip_special_tokens: true
              stop: ["<|end|>", "<|endoftext|>", "<|im_end|>"]

            inference_prompts:
              - "describe this image in detail"
              - "provide a comprehensive description of the visual content"
              - "what are the key elements in this image?"

          storage:
            data_dir: ./caption_data
            checkpoint_dir: ./checkpoints
            caption_buffer_size: 100
            checkpoint_interval: 1000

          # chunking/queueing
          chunk_size: 1000
          chunks_per_request: 2
          chunk_buffer_multiplier: 3
          min_chunk_buffer: 10

          auth:
            worker_tokens:
              - {{ token: "{WORKER_TOKEN}", name: "example worker" }}
            dataworker_tokens:
              - {{ token: "dataworker-token-quickstart", name: "data feeder 1" }}
            monitor_tokens:
              - {{ token: "{MONITOR_TOKEN}", name: "default monitor" }}
            admin_tokens:
              - {{ token: "admin-secret-2024-quickstart", name: "admin" }}
        """)


def original_worker_yaml(port: int, vllm: bool = True) -> str:
    return textwrap.dedent(f"""\
        worker:
          server: ws://127.0.0.1:{port}   # use wss:// in prod
          token: {WORKER_TOKEN}
          name: local-gpu
          gpu_id: 0
          vllm: {str(vllm).lower()}

          # local queues
          readahead_size: 256
          inference_queue_size: 128
        """)


def original_monitor_yaml(port: int) -> str:
    return textwrap.dedent(f"""\
        monitor:
          server: ws://127.0.0.1:{port}
          token: {MONITOR_TOKEN}
          refresh_rate: 1.0
          show_contributors: true
          show_quality_metrics: true
          max_activity_items: 20
          show_chunk_progress: true
          show_worker_queues: true
          show_throughput_graph: true
        """)


# -- raw protocol clients (admin, metrics tests): no model, exactly the frames we choose ------
async def raw_hello(port: int, role: str, token: str, name: str = "raw") -> Any:
    """A websocket that said hello as ``role``; the welcome (or a refusal) is left unread."""
    from websockets.asyncio.client import connect

    from caption_flow.protocol.messages import Hello, encode

    ws = await connect(f"ws://127.0.0.1:{port}", compression=None)
    await ws.send(encode(Hello(role=role, token=token, name=name)))  # type: ignore[arg-type]
    return ws


async def close_code(ws: Any, seconds: float) -> int | None:
    """Read (and drop) frames until the server closes ``ws``; its close code."""
    from websockets.exceptions import ConnectionClosed

    try:
        async with asyncio.timeout(seconds * TIME_UNIT):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return None if exc.rcvd is None else exc.rcvd.code


async def raw_caption_chunk(ws: Any, seq: int, captions: Sequence[str] = PROMPTS) -> int:
    """On a welcomed worker socket: lease one chunk, send a caption per prompt for each of
    its items, wait for the ack. Returns the items sent (0: nothing left to lease)."""
    from caption_flow.protocol.messages import (
        Ack,
        Assign,
        ItemResult,
        Request,
        Results,
        decode,
        encode,
    )

    async with asyncio.timeout(30 * TIME_UNIT):
        await ws.send(encode(Request(count=1)))
        while not isinstance(assign := decode(await ws.recv()), Assign):
            pass
        if not assign.chunks:
            return 0
        chunk = assign.chunks[0]
        items = [
            ItemResult(item_id=i.item_id, key=i.key, outputs={"captions": list(captions)})
            for i in chunk.items
        ]
        await ws.send(encode(Results(chunk_id=chunk.chunk_id, seq=seq, items=items)))
        while not isinstance(decode(await ws.recv()), Ack):
            pass
    return len(items)


class FakeHub:
    """A local stand-in for the Hugging Face hub's HTTP API (the hub is out of reach in tests):
    the endpoints ``HfApi`` uses to create a dataset repo, list its files, check a card's YAML
    header and commit regular (non-LFS) files. Files live in memory; ``fail_commits_after=N``
    makes every commit after the first N answer 500. Use as a context manager; pass
    ``endpoint`` to ``HfApi``."""

    def __init__(self) -> None:
        import base64
        import json
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        import yaml

        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.commits: list[tuple[str, list[str]]] = []
        self.fail_commits_after: int | None = None  # commit number that answers 500
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def do_GET(self) -> None:
                hub.requests.append(f"GET {self.path}")
                path = urlparse(self.path).path
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
                if m and m.group(1) in hub.repos:
                    files = hub.repos[m.group(1)]
                    tree = [
                        {"type": "file", "path": p, "oid": "0" * 40, "size": len(d)}
                        for p, d in sorted(files.items())
                    ]
                    return self._reply(200, tree)
                self._reply(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})

            def do_POST(self) -> None:
                hub.requests.append(f"POST {self.path}")
                path = urlparse(self.path).path
                body = self._body()
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    if repo in hub.repos:
                        url = f"{hub.endpoint}/datasets/{repo}"
                        return self._reply(409, {"error": "exists", "url": url})
                    hub.repos[repo] = {}
                    hub.private[repo] = payload.get("visibility") == "private" or bool(
                        payload.get("private")
                    )
                    return self._reply(
                        200, {"url": f"{hub.endpoint}/datasets/{repo}", "name": repo}
                    )
                if path == "/api/validate-yaml":
                    # The hub checks the card's YAML header; so does this stand-in (it must parse).
                    content = json.loads(body)["content"]
                    header = content.split("---\n")[1] if content.startswith("---\n") else ""
                    try:
                        yaml.safe_load(header)
                    except yaml.YAMLError as exc:
                        return self._reply(400, {"error": str(exc)})
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)$", path)
                if m:
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        },
                    )
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/commit/([^/]+)$", path)
                if m and m.group(1) in hub.repos:
                    if (
                        hub.fail_commits_after is not None
                        and len(hub.commits) >= hub.fail_commits_after
                    ):
                        return self._reply(500, {"error": "hub down"})
                    files = hub.repos[m.group(1)]
                    changed = []
                    for line in body.decode().splitlines():
                        op = json.loads(line)
                        if op["key"] == "file":
                            files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                            changed.append(op["value"]["path"])
                        elif op["key"] == "deletedFile":
                            files.pop(op["value"]["path"], None)
                            changed.append("-" + op["value"]["path"])
                    hub.commits.append((m.group(1), changed))
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(
                        200,
                        {
                            "commitUrl": f"{hub.endpoint}/datasets/{m.group(1)}/commit/{oid}",
                            "commitOid": oid,
                        },
                    )
                self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class RawClient:
    """A websocket spoken to in raw msgpack maps, as a hostile or hand-written client
    would: what tests of the wire (attacks, refusals, bounds) send and read."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        import msgspec

        await self.ws.send(msgspec.msgpack.encode(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next message, whatever its type."""
        import msgspec

        frame = await asyncio.wait_for(self.ws.recv(), timeout * TIME_UNIT)
        assert isinstance(frame, bytes), "text frames are not part of the protocol"
        decoded: dict[str, Any] = msgspec.msgpack.decode(frame)
        return decoded

    async def recv_type(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next message of ``kind``, skipping pushes of other kinds."""
        for _ in range(100):
            message = await self.recv(timeout)
            if message["type"] == kind:
                return message
        raise AssertionError(f"no {kind} message")

    async def closed_with(self) -> int | None:
        """Read until the server closes; its close code."""
        from websockets.exceptions import ConnectionClosed

        try:
            for _ in range(100):
                await asyncio.wait_for(self.ws.recv(), 10 * TIME_UNIT)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        raise AssertionError("the server kept the connection open")
