"""The ``load`` cell of bench_orchestrator.py: N idle worker connections held while one real
worker captions.

Three processes. The orchestrator (in bench_orchestrator.py's process, on the server cores)
runs with its default limits and a job for the tiny offline model. A load generator (this
code, on the client cores) opens N authenticated worker connections in batches below
``limits.max_pending_handshakes``, holds them (sending a heartbeat now and then, ~100 a
second over all of them) and relays the real worker's connection through a small websocket
proxy that timestamps each ``request`` frame and the ``assign`` frame that answers it. The
worker (:class:`caption_flow.worker.client.Worker`, transformers engine, also on the client
cores) connects through that proxy and captions the whole image folder.

So the latency reported is the real worker's request -> assign time as seen one loopback hop
from the orchestrator (the proxy adds its own relay: the figure errs high, never low), and
nothing of ours is patched or wrapped. Memory per connection is the orchestrator's RSS
(``/proc/self/status`` VmRSS) once the N connections are up, minus before, over N.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import secrets
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

HANDSHAKE_BATCH = 200  # connections opened at once; the server allows 1000 saying hello
OPEN_TIMEOUT = 30.0  # per connection: TCP + websocket handshake, then hello -> welcome
HOLD_HEARTBEATS_PER_S = 100  # over all held connections together
FD_MARGIN = 256  # descriptors beyond the connections (database, sockets, model files)
KB_PER_CONN_MAX, P99_MS_MAX = 16.0, 50.0
HOLD_TOKEN_NAME, WORKER_TOKEN_NAME = "bench-hold", "bench-worker"


# ---------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------
def raise_fd_limit(need: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to ``need`` (within the hard limit); return
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _Tagged(msgspec.Struct):
    """Only a frame's ``type`` tag (every other key is skipped)."""

    type: str = ""


_tag_decoder = msgspec.msgpack.Decoder(_Tagged)


def _tag(frame: bytes | str) -> str:
    try:
        return _tag_decoder.decode(frame).type
    except (msgspec.DecodeError, TypeError):
        return ""


# ---------------------------------------------------------------------------------------------
# Load generator process
# ---------------------------------------------------------------------------------------------
@dataclass
class Proxy:
    """Relays one worker's websocket to the orchestrator, timing request -> assign."""

    upstream: str
    latencies: list[float] = field(default_factory=list)
    relayed: int = 0

    async def handle(self, down: Any) -> None:
        from websockets.asyncio.client import connect

        asked: deque[float] = deque()
        async with connect(
            self.upstream, compression=None, max_size=None, ping_interval=None, open_timeout=30
        ) as up:

            async def worker_to_server() -> None:
                async for frame in down:
                    if _tag(frame) == "request":
                        asked.append(time.monotonic())
                    await up.send(frame)
                    self.relayed += 1

            async def server_to_worker() -> None:
                async for frame in up:
                    if _tag(frame) == "assign" and asked:
                        self.latencies.append(time.monotonic() - asked.popleft())
                    await down.send(frame)
                    self.relayed += 1

            tasks = [
                asyncio.create_task(worker_to_server()),
                asyncio.create_task(server_to_worker()),
            ]
            with contextlib.suppress(Exception):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            code = up.close_code or 1000
            await down.close(code if code in (1000, 1001) or code >= 3000 else 1000)


async def _open_one(url: str, hello: bytes) -> Any:
    from websockets.asyncio.client import connect

    from caption_flow.protocol.messages import Welcome, decode

    ws = await connect(url, compression=None, ping_interval=None, open_timeout=OPEN_TIMEOUT)
    try:
        await ws.send(hello)
        reply = decode(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
    except BaseException:
        await ws.close()
        raise
    if not isinstance(reply, Welcome):
        await ws.close()
        raise RuntimeError(f"expected a welcome, got {type(reply).__name__}")
    return ws


async def _hold(spec: dict[str, Any]) -> dict[str, Any]:
    from websockets.asyncio.server import serve
    from websockets.protocol import State

    from caption_flow.protocol.messages import Heartbeat, Hello, encode

    n, url = spec["connections"], spec["url"]
    limit = raise_fd_limit(n + FD_MARGIN)
    if limit < n + FD_MARGIN:
        print(
            json.dumps(
                {
                    "error": f"load generator: file descriptor limit {limit} < {n} "
                    f"connections + {FD_MARGIN} (raise the hard limit: ulimit -Hn)"
                }
            ),
            flush=True,
        )
        return {}
    hello = encode(Hello(role="worker", token=spec["token"], name="held"))
    sockets: list[Any] = []
    errors: dict[str, int] = {}
    t0 = time.monotonic()
    deadline = t0 + spec["open_budget_s"]
    while len(sockets) < n and time.monotonic() < deadline:
        batch = min(HANDSHAKE_BATCH, n - len(sockets))
        opened = await asyncio.gather(
            *(_open_one(url, hello) for _ in range(batch)), return_exceptions=True
        )
        for ws in opened:
            if isinstance(ws, BaseException):
                name = f"{type(ws).__name__}: {ws}"[:120]
                errors[name] = errors.get(name, 0) + 1
            else:
                sockets.append(ws)
        if sum(errors.values()) > max(100, n // 10):
            break  # something is wrong: do not hammer on
    open_s = time.monotonic() - t0
    proxy = Proxy(url)
    relay = await serve(
        proxy.handle, "127.0.0.1", 0, compression=None, max_size=None, ping_interval=None
    )
    port = next(iter(relay.sockets)).getsockname()[1]
    print(
        json.dumps(
            {
                "ready": len(sockets),
                "open_s": open_s,
                "errors": errors,
                "proxy": f"ws://127.0.0.1:{port}",
            }
        ),
        flush=True,
    )

    beats = 0

    async def heartbeats() -> None:
        nonlocal beats
        frame = encode(Heartbeat(stats={"held": 1.0}))
        i = 0
        while sockets:
            await asyncio.sleep(1.0)
            for _ in range(min(HOLD_HEARTBEATS_PER_S, len(sockets))):
                ws = sockets[i % len(sockets)]
                i += 1
                if ws.state is State.OPEN:
                    with contextlib.suppress(Exception):
                        await ws.send(frame)
                        beats += 1

    beating = asyncio.create_task(heartbeats())
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop"
    beating.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beating
    dropped = sum(1 for ws in sockets if ws.state is not State.OPEN)
    relay.close()
    for i in range(0, len(sockets), 1000):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(
                    *(ws.close() for ws in sockets[i : i + 1000]), return_exceptions=True
                ),
                30,
            )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(relay.wait_closed(), 10)
    return {"latencies": proxy.latencies, "dropped": dropped, "heartbeats": beats}


def load_client_main(spec: dict[str, Any], run: Any) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, spec["cpus"])
    result = run(_hold(spec), spec["loop"])
    if result:
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------
def worker_main(spec: dict[str, Any], run: Any) -> None:
    """One real worker, transformers engine, until the orchestrator says the job is done."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, spec["cpus"])
    from caption_flow.config.models import WorkerConfig
    from caption_flow.worker.client import Worker

    config = WorkerConfig(
        server=spec["url"],
        token=spec["token"],
        name="real-worker",
        engine="transformers",
        decode_threads=1,
        exit_when_done=True,
        reconnect_max_seconds=1.0,
    )

    async def go() -> dict[str, Any]:
        t0 = time.monotonic()
        worker = Worker(config)
        await asyncio.wait_for(worker.run(), spec["timeout_s"])
        return {"seconds": time.monotonic() - t0, "items": worker.clock.items}

    print(json.dumps(run(go(), spec["loop"])), flush=True)


# ---------------------------------------------------------------------------------------------
# Orchestrator side
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadCell:
    connections: int
    held: int = 0
    open_s: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    latencies: list[float] = field(default_factory=list)
    items: int = 0
    worker_s: float = 0.0
    server_cpu: float = 0.0  # share of one core while the worker captioned
    stall_ms: float = 0.0
    gc_ms: tuple[float, float] = (0.0, 0.0)  # the server's garbage collector: total, longest
    dropped: int = 0
    heartbeats: int = 0
    error: str = ""

    @property
    def kb_per_conn(self) -> float:
        return (self.rss_after - self.rss_before) / max(self.held, 1) / 1024

    def percentile_ms(self, q: float) -> float:
        lat = sorted(self.latencies) or [0.0]
        return 1000 * lat[min(len(lat) - 1, int(len(lat) * q))]


def _job(model_dir: Path) -> Any:
    from caption_flow.config.models import ModelConfig, SamplingConfig

    return ModelConfig(
        model=str(model_dir),
        batch_size=4,
        max_model_len=512,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1, "video": 0},
        inference_prompts=["describe this image", "list the colours"],
        sampling=SamplingConfig(temperature=0.0, max_tokens=6, repetition_penalty=1.0),
    )


def _config(images: Path, data_dir: Path, model_dir: Path, tokens: dict[str, str]) -> Any:
    """Default limits throughout: this cell measures the server as it is shipped."""
    from caption_flow.config.models import (
        AuthConfig,
        DatasetConfig,
        OrchestratorConfig,
        StorageConfig,
        TokenEntry,
    )

    return OrchestratorConfig(
        host="127.0.0.1",
        port=0,
        dataset=DatasetConfig(type="local_folder", path=str(images), name="bench-load"),
        vllm=_job(model_dir),
        storage=StorageConfig(data_dir=data_dir),
        chunk_size=1,  # one request -> assign round trip per image: enough samples for a p99
        status_interval=3600,
        auth=AuthConfig(worker_tokens=[TokenEntry(name=k, token=v) for k, v in tokens.items()]),
    )


async def _spawn(flag: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    script = Path(__file__).with_name("bench_orchestrator.py")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        flag,
        json.dumps(spec),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def _line(proc: Any, timeout: float, what: str) -> dict[str, Any]:
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise RuntimeError(f"{what} died (see its stderr)")
    return dict(json.loads(line))


async def load_phase(
    args: Any,
    scratch: Path,
    client_cpus: list[int],
    watch_loop: Any,
    cpu_seconds: Any,
    gc_pauses: list[float],
) -> tuple[LoadCell, list[Any]]:
    """Run the cell; return it and its correctness checks (name, ok, detail)."""
    from caption_flow.demo.tiny_model import build_tiny_model, generate_images
    from caption_flow.orchestrator.server import Orchestrator
    from caption_flow.storage.reader import output_dataset

    n = args.load_connections
    cell = LoadCell(connections=n)
    limit = raise_fd_limit(n + FD_MARGIN)
    if limit < n + FD_MARGIN:
        cell.error = (
            f"orchestrator: file descriptor limit {limit} < {n} connections + "
            f"{FD_MARGIN}; raise the hard limit (ulimit -Hn) or lower "
            "--load-connections"
        )
        return cell, [("load: connections held", False, cell.error)]
    model_dir = build_tiny_model(args.tiny_model)
    images = scratch / "load-images"
    generate_images(images, args.load_images)
    tokens = {
        HOLD_TOKEN_NAME: secrets.token_urlsafe(16),
        WORKER_TOKEN_NAME: secrets.token_urlsafe(16),
    }
    data_dir = scratch / "load"
    orch = Orchestrator(_config(images, data_dir, model_dir, tokens))
    await orch.start()
    url = f"ws://127.0.0.1:{orch.port}"
    checks: list[Any] = []
    holder = worker = None
    try:
        gc.collect()
        cell.rss_before = rss_bytes()
        holder = await _spawn(
            "--load-spec",
            {
                "url": url,
                "token": tokens[HOLD_TOKEN_NAME],
                "connections": n,
                "cpus": client_cpus,
                "loop": args.loop,
                "open_budget_s": args.load_open_seconds,
            },
        )
        ready = await _line(
            holder, args.load_open_seconds + 2 * OPEN_TIMEOUT + 60, "load generator"
        )
        if "error" in ready:
            cell.error = ready["error"]
            return cell, [("load: connections held", False, cell.error)]
        cell.held, cell.open_s = ready["ready"], ready["open_s"]
        sessions = sum(1 for s in orch.sessions.values() if s.role == "worker")
        gc.collect()
        cell.rss_after = rss_bytes()
        print(
            f"  load: {cell.held:,} of {n:,} connections up in {cell.open_s:.1f}s "
            f"({sessions:,} sessions; errors {ready['errors'] or 'none'}); server RSS "
            f"{cell.rss_before / 2**20:.0f} -> {cell.rss_after / 2**20:.0f} MiB",
            flush=True,
        )
        if cell.held < n:
            cell.error = (
                f"only {cell.held:,} of {n:,} connections opened within "
                f"{args.load_open_seconds:g}s: {ready['errors']}"
            )
            checks.append(("load: connections held", False, cell.error))
            return cell, checks
        env = {
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        stall = asyncio.create_task(watch_loop())
        gc_pauses.clear()
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        worker = await _spawn(
            "--worker-spec",
            {
                "url": ready["proxy"],
                "token": tokens[WORKER_TOKEN_NAME],
                "cpus": client_cpus,
                "loop": args.loop,
                "timeout_s": args.load_worker_seconds,
            },
            env,
        )
        done = await _line(worker, args.load_worker_seconds + 60, "real worker")
        cell.server_cpu = (cpu_seconds() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        stall.cancel()
        cell.stall_ms = 1000 * await stall
        cell.gc_ms = (1000 * sum(gc_pauses), 1000 * max(gc_pauses, default=0.0))
        cell.items, cell.worker_s = done["items"], done["seconds"]
        await asyncio.wait_for(worker.wait(), 60)
        assert holder.stdin is not None
        holder.stdin.write(b"stop\n")
        await holder.stdin.drain()
        held = await _line(holder, 120, "load generator")
        await asyncio.wait_for(holder.wait(), 60)
        cell.latencies, cell.dropped = held["latencies"], held["dropped"]
        cell.heartbeats = held["heartbeats"]
        assert orch.book is not None
        items_done = orch.book.items_done
    finally:
        for proc in (holder, worker):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        await orch.stop()
    table = output_dataset(data_dir / "captions").to_table(columns=["item_key", "error"])
    keys = table.column("item_key").to_pylist()
    errors = table.num_rows - table.column("error").null_count
    checks += [
        (
            "load: connections held to the end",
            cell.dropped == 0,
            f"{cell.held - cell.dropped:,} of {n:,} (dropped {cell.dropped})",
        ),
        (
            "load: every image captioned, one row each, no error",
            len(keys) == len(set(keys)) == items_done == args.load_images and errors == 0,
            f"{len(keys):,} rows, {len(set(keys)):,} keys, {items_done:,} done, {errors} errors, "
            f"of {args.load_images:,}",
        ),
    ]
    return cell, checks


def default_model_dir() -> Path:
    """Reused across runs (the build is idempotent and checks its own marker)."""
    return Path(
        os.environ.get("CAPTIONFLOW_TINY_MODEL")
        or Path(tempfile.gettempdir()) / "captionflow-bench-tiny-model"
    )
