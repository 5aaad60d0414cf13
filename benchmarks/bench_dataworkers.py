"""Dataworkers: preparing images, relaying them through the orchestrator, feeding an engine.

    .venv/bin/python benchmarks/bench_dataworkers.py [--quick] [--max-side 1024] [--json FILE]

Images: photo-like 1600x1200 originals (colour fields, a lighting gradient, grain), JPEG
quality 90 (about 410 KiB), every eighth one a PNG (about 3 MiB); hard links repeat them into
a ``local_folder`` dataset of a few thousand items. Everything runs on 127.0.0.1 in a
temporary folder (``--workdir DIR`` keeps it, logs included); every phase is bounded in time
and in count. One table at the end.

1. prepare   ``prepare_image`` on one thread, for each original format (JPEG, PNG), prepared
             format (JPEG, WebP; quality 90) and ``max_side`` (1024, 512): images per
             CPU-second of that thread (= per dataworker core) and per wall-second, mean
             original and prepared size.
2. relay     Real orchestrators (``python -m caption_flow orchestrator``, subprocesses, so
             their CPU time can be read from /proc/PID/stat) and a fetching client in this
             process that speaks the protocol as a GPU worker without the dataset: hello as a
             worker, ``request`` one chunk at a time, ``fetch`` its keys 64 at a time, read
             the ``items`` replies. It sends no results (its chunks never finish; the config
             lets a session hold any number). Rows:
               fill     one ``caption-flow dataworker`` subprocess (a thread per core) fills
                        the buffer with the first chunks of a dataset of JPEGs already at the
                        job's size, which it passes through without re-encoding: this row
                        measures the path dataworker -> orchestrator, not the preparing
               relay    then, that dataworker stopped, the fetcher takes those items from the
                        buffer
               prepare  another orchestrator, no dataworker: it reads the 1600x1200
                        originals and prepares them itself (``prepare.on_orchestrator`` true)
               raw      another one with ``on_orchestrator`` false: the originals' bytes
             Shown: images/s and MB/s of item bytes delivered, the orchestrator's CPU per
             image (all its threads). Relayed/served: items the orchestrator took from the
             buffer / read itself (its /metrics).
3. engine    A real ``Worker`` (read_dataset "no", its dataset path nonexistent) in this
             process, its engine a stand-in that sleeps 1/150 s per image of a batch of 16 (a
             GPU at 150 images/s), fed through a fresh orchestrator by 1 and 2 dataworker
             subprocesses (connected before the worker starts) and by the orchestrator alone
             (``--quick``: 1 dataworker and alone). From the end of the first batch over a
             fixed window: the share of the wall time the engine waited (1 - busy / wall, the
             worker's EngineClock) and the images/s it captioned.

On a machine with few cores every process here (orchestrator, dataworkers, worker, this
script) shares them: the rates of parts 2 and 3 are then limits of the machine, not of the
design. Part 1's per-CPU-second figure is the number to size dataworkers with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from caption_flow.config.models import ImageConfig, OrchestratorConfig, SamplingConfig
from caption_flow.engines.base import EngineSpec, Generation, GenerationRequest
from caption_flow.images.pool import usable_cores
from caption_flow.images.prepare import PrepareSettings, prepare_image
from caption_flow.worker.remote_source import FETCH_KEYS

SIZE = (1600, 1200)
PNG_EVERY = 8
GRAIN = 6  # +-6 levels of luminance grain: ~400 KiB per JPEG at quality 90
CHUNK_SIZE = 128
WARMUP_SECONDS = 60.0  # most a worker may take to caption its first batch
ENGINE_RATE = 150.0
ENGINE_BATCH = 16
WORKER_TOKEN = "bench-dataworkers-worker-token"
DATAWORKER_TOKEN = "bench-dataworkers-dataworker-token"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Row:
    part: str
    case: str
    images_per_s: float | None = None
    images_per_cpu_s: float | None = None
    mb_per_s: float | None = None
    orch_cpu_ms: float | None = None
    kib_in: float | None = None
    kib_out: float | None = None
    engine_waiting: float | None = None
    notes: str = ""


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields, a lighting gradient and grain: compresses like a photo (flat
    colour compresses far better, pure noise far worse)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 80 + 2, width // 80 + 2, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    ramp = (
        np.linspace(-40, 40, width, dtype=np.float32)[None, :]
        + np.linspace(-25, 25, height, dtype=np.float32)[:, None]
    )
    grain = rng.integers(-GRAIN, GRAIN + 1, (height, width, 1), dtype=np.int16)
    pixels = np.asarray(smooth, np.int16) + ramp.astype(np.int16)[:, :, None] + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_originals(
    folder: Path, count: int, size: tuple[int, int], png: bool = True
) -> list[Path]:
    """``count`` distinct images, JPEG quality 90 (every PNG_EVERY-th a PNG when ``png``)."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        image = photo(*size, seed=i)
        if png and i % PNG_EVERY == PNG_EVERY - 1:
            path = folder / f"{i:03d}.png"
            image.save(path, "PNG", compress_level=3)
        else:
            path = folder / f"{i:03d}.jpg"
            image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def link_dataset(originals: list[Path], folder: Path, count: int) -> Path:
    """A dataset of ``count`` items, hard links to the originals in turn (one shard)."""
    folder.mkdir(parents=True)
    for i in range(count):
        source = originals[i % len(originals)]
        os.link(source, folder / f"{i:06d}{source.suffix}")
    return folder


# ---------------------------------------------------------------------------------------------
# Part 1: prepare_image on one thread
# ---------------------------------------------------------------------------------------------
def prepare_rows(originals: list[Path], max_sides: Sequence[int], seconds: float) -> list[Row]:
    rows = []
    by_kind = {
        "JPEG": [p.read_bytes() for p in originals if p.suffix == ".jpg"],
        "PNG": [p.read_bytes() for p in originals if p.suffix == ".png"],
    }
    for kind, datas in by_kind.items():
        for fmt in ("jpeg", "webp"):
            for side in max_sides:
                settings = PrepareSettings(ImageConfig(max_side=side), fmt, 90)
                done = size_in = size_out = 0
                cpu0, wall0 = time.thread_time(), time.perf_counter()
                while done < min(8, len(datas)) or time.perf_counter() - wall0 < seconds:
                    data = datas[done % len(datas)]
                    size_out += len(prepare_image(data, settings).data)
                    size_in += len(data)
                    done += 1
                cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
                rows.append(
                    Row(
                        "1 prepare",
                        f"{kind} -> {fmt} {side}px",
                        images_per_s=done / wall,
                        images_per_cpu_s=done / cpu,
                        kib_in=size_in / done / 1024,
                        kib_out=size_out / done / 1024,
                        notes="one thread",
                    )
                )
    return rows


# ---------------------------------------------------------------------------------------------
# Processes: orchestrator and dataworkers
# ---------------------------------------------------------------------------------------------
def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class OrchestratorProcess:
    """``caption-flow orchestrator`` in a subprocess on 127.0.0.1, any free port."""

    def __init__(self, workdir: Path, dataset: Path, max_side: int, prepare: dict[str, Any]):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        section = {
            "host": "127.0.0.1",
            "port": 0,
            "dataset": {"type": "local_folder", "path": str(dataset), "name": "bench"},
            "vllm": {
                "model": "paced-stand-in",
                "batch_size": ENGINE_BATCH,
                "inference_prompts": ["describe this image"],
                "image": {"max_side": max_side},
            },
            "storage": {"data_dir": str(self.data_dir)},
            "chunk_size": CHUNK_SIZE,
            # The fetcher never finishes its chunks: let it hold as many as it asks for.
            "max_chunks_per_session": 1_000_000,
            "status_interval": 3600,
            "auth": {
                "worker_tokens": [{"name": "bench-worker", "token": WORKER_TOKEN}],
                "dataworker_tokens": [{"name": "bench-dataworker", "token": DATAWORKER_TOKEN}],
            },
            "prepare": {"buffer_memory_mb": 2048, **prepare},
        }
        OrchestratorConfig.model_validate(section)  # a typo here fails now, not in the child
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orchestrator.yaml"
        self.config.write_text(yaml.safe_dump({"orchestrator": section}))
        self.log = (workdir / "orchestrator.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "caption_flow", "orchestrator", "--config", str(self.config)],
            cwd=workdir,
            env=ENV,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.port = 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until it listens (its lock file names the port) and /metrics answers."""
        deadline = time.monotonic() + timeout
        lock = self.data_dir / "captionflow.lock"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"orchestrator exited; see {self.log.name}")
            with contextlib.suppress(OSError, ValueError):
                self.port = int(json.loads(lock.read_text()).get("port") or 0)
            if self.port and self.metrics().get("prepared_items") is not None:
                return
            time.sleep(0.1)
        raise RuntimeError(f"orchestrator not ready in {timeout:.0f}s; see {self.log.name}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """The captionflow_* samples of /metrics, by name without the prefix, labels kept
        (``items_relayed_total``, ``connections{role="dataworker"}``); empty while down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        values = {}
        for line in text.splitlines():
            if line.startswith("captionflow_"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name.removeprefix("captionflow_")] = float(value)
        return values

    def wait_dataworkers(
        self, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 60.0
    ) -> None:
        """Until all of ``procs`` are connected; on failure the logs' ends go to stderr."""
        deadline = time.monotonic() + timeout
        while self.metrics().get('connections{role="dataworker"}', 0) < len(procs):
            failed = [p for p in procs if p.poll() is not None]
            if failed or time.monotonic() > deadline:
                for path in sorted(self.workdir.glob("*.log")):
                    tail = path.read_text(errors="replace").splitlines()[-15:]
                    log(f"--- {path.name} (end)\n" + "\n".join(tail))
                what = "exited" if failed else f"not connected in {timeout:.0f}s"
                raise RuntimeError(f"dataworkers {what} (their logs are above)")
            time.sleep(0.05)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def start_dataworker(
    url: str, name: str, workdir: Path, message_mb: float
) -> subprocess.Popen[bytes]:
    """``caption-flow dataworker`` (a thread per core) with its own config file."""
    config = workdir / f"{name}.yaml"
    section = {"server": url, "token": DATAWORKER_TOKEN, "name": name, "message_mb": message_mb}
    config.write_text(yaml.safe_dump({"dataworker": section}))
    log = (workdir / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "caption_flow", "dataworker", "--config", str(config)],
        cwd=workdir,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------------------------------
# Part 2: a fetching client, and the relay cells
# ---------------------------------------------------------------------------------------------
@dataclass
class Fetched:
    items: int = 0
    errors: int = 0
    data_bytes: int = 0
    seconds: float = 0.0


async def fetch_items(url: str, want: int, seconds: float) -> Fetched:
    """As a GPU worker without the dataset: lease one chunk at a time and fetch its keys,
    FETCH_KEYS per ``fetch``, until ``want`` items or ``seconds`` (one fetch is finished)."""
    from websockets.asyncio.client import connect

    from caption_flow.protocol.messages import (
        Assign,
        Fetch,
        Hello,
        Items,
        Request,
        Welcome,
        decode,
        encode,
    )

    got = Fetched()
    async with connect(url, max_size=None, compression=None, open_timeout=30) as ws:
        await ws.send(encode(Hello(role="worker", token=WORKER_TOKEN, name="bench-fetcher")))
        if not isinstance(decode(await ws.recv()), Welcome):
            raise RuntimeError("the orchestrator did not welcome the fetcher")
        start = time.monotonic()
        deadline = start + seconds
        while got.items < want and time.monotonic() < deadline:
            await ws.send(encode(Request(count=1)))
            while not isinstance(assign := decode(await ws.recv()), Assign):
                pass
            if not assign.chunks:
                break
            keys = [ref.key for ref in assign.chunks[0].items][: want - got.items]
            for i in range(0, len(keys), FETCH_KEYS):
                await ws.send(
                    encode(Fetch(chunk_id=assign.chunks[0].chunk_id, keys=keys[i : i + FETCH_KEYS]))
                )
                while True:
                    reply = decode(await asyncio.wait_for(ws.recv(), 120))
                    if not isinstance(reply, Items):
                        continue
                    if reply.error is not None:
                        raise RuntimeError(f"fetch refused: {reply.error}")
                    for item in reply.items:
                        got.items += 1
                        got.errors += item.error is not None
                        got.data_bytes += len(item.data or b"")
                    if reply.last:
                        break
                if time.monotonic() >= deadline:
                    break
        got.seconds = time.monotonic() - start
    return got


def delta(after: dict[str, float], before: dict[str, float], *names: str) -> list[float]:
    return [after.get(n, 0.0) - before.get(n, 0.0) for n in names]


@dataclass
class Probe:
    """What the orchestrator (and dataworkers) had done at one moment."""

    at: float
    orch_cpu: float
    metrics: dict[str, float]
    feeder_cpu: float = 0.0

    @classmethod
    def take(cls, orch: OrchestratorProcess, feeders: Sequence[Any] = ()) -> Probe:
        return cls(
            time.monotonic(),
            orch.cpu(),
            orch.metrics(),
            sum(cpu_seconds(p.pid) for p in feeders if p.poll() is None),
        )


def relay_row(case: str, p0: Probe, p1: Probe, got: Fetched, kib_in: float | None) -> Row:
    relayed, served = delta(p1.metrics, p0.metrics, "items_relayed_total", "items_served_total")
    images = max(got.items, 1)
    cpu = p1.orch_cpu - p0.orch_cpu
    return Row(
        "2 relay",
        case,
        images_per_s=got.items / got.seconds,
        images_per_cpu_s=images / cpu if cpu > 0 else None,
        mb_per_s=got.data_bytes / got.seconds / 1e6,
        orch_cpu_ms=1000 * cpu / images,
        kib_in=kib_in,
        kib_out=got.data_bytes / images / 1024,
        notes=f"relayed/served {relayed:.0f}/{served:.0f}; img/CPU-s: orchestrator's"
        + (f"; {got.errors} errors" if got.errors else ""),
    )


def fill_and_relay(scratch: Path, sized: Path, args: argparse.Namespace) -> list[Row]:
    """One dataworker fills the buffer with the first chunks (images already at the job's
    size: passed through, so its CPU is not the limit), then the fetcher drains them."""
    fill = args.fill_items
    orch = OrchestratorProcess(
        scratch / "relay", sized, args.max_side, {"ahead_chunks": -(-fill // CHUNK_SIZE)}
    )
    try:
        orch.wait_ready()
        feeder = start_dataworker(orch.url, "feeder", orch.workdir, args.message_mb)
        try:
            orch.wait_dataworkers([feeder])
            p0 = Probe.take(orch, [feeder])
            deadline = time.monotonic() + args.fill_seconds
            while orch.metrics().get("prepared_items", 0) < fill:
                if feeder.poll() is not None:
                    raise RuntimeError(f"dataworker exited; see {orch.workdir / 'feeder.log'}")
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            p1 = Probe.take(orch, [feeder])
        finally:
            stop_process(feeder)
        buffered, added = delta(p1.metrics, p0.metrics, "prepared_items", "prepared_memory_bytes")
        held = p1.metrics.get("prepared_items", 0)  # what the fetcher then takes
        if buffered <= 0:
            raise RuntimeError("the dataworker prepared nothing in time")
        wall = p1.at - p0.at
        fill_row = Row(
            "2 relay",
            "fill: 1 dataworker -> buffer",
            images_per_s=buffered / wall,
            images_per_cpu_s=buffered / max(p1.feeder_cpu - p0.feeder_cpu, 1e-9),
            mb_per_s=added / wall / 1e6,
            orch_cpu_ms=1000 * (p1.orch_cpu - p0.orch_cpu) / buffered,
            kib_out=added / buffered / 1024,
            notes=f"{held:.0f}/{fill} buffered in time (passed through); img/CPU-s: dataworker's",
        )
        p0 = Probe.take(orch)
        got = asyncio.run(fetch_items(orch.url, int(held), args.fill_seconds))
        return [fill_row, relay_row("relay: buffer -> fetcher", p0, Probe.take(orch), got, None)]
    finally:
        orch.stop()


def orchestrator_reads(
    scratch: Path, dataset: Path, args: argparse.Namespace, kib_in: float, prepare: bool
) -> Row:
    """No dataworker: the orchestrator reads the originals and prepares them (or not)."""
    name = "own" if prepare else "raw"
    orch = OrchestratorProcess(
        scratch / name, dataset, args.max_side, {"on_orchestrator": prepare, "ahead_chunks": 0}
    )
    try:
        orch.wait_ready()
        want = args.own_items if prepare else args.raw_items
        p0 = Probe.take(orch)
        got = asyncio.run(fetch_items(orch.url, want, args.own_seconds))
        case = (
            f"orchestrator prepares ({usable_cores()} threads)"
            if prepare
            else "raw bytes (on_orchestrator false)"
        )
        return relay_row(case, p0, Probe.take(orch), got, kib_in)
    finally:
        orch.stop()


# ---------------------------------------------------------------------------------------------
# Part 3: a worker whose engine takes 1/150 s per image
# ---------------------------------------------------------------------------------------------
class PacedEngine:
    """Stands in for a GPU: a batch takes len(batch) / rate seconds; trivial captions."""

    def __init__(self, spec: EngineSpec, rate: float) -> None:
        self.spec = spec
        self.rate = rate

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[Generation]:
        time.sleep(len(requests) / self.rate)
        return [Generation("a caption", 1) for _ in requests]

    def close(self) -> None:
        pass


async def worker_window(
    url: str, nowhere: Path, seconds: float, probe: Any
) -> tuple[dict[str, float], Probe, Probe]:
    """Run a Worker; from the end of its first batch, watch its engine for ``seconds``.
    ``probe()`` (run in a thread) is taken at both ends of the window."""
    from caption_flow.config.models import WorkerConfig
    from caption_flow.engines.captioner import Captioner
    from caption_flow.worker.client import Worker

    config = WorkerConfig(
        server=url,
        token=WORKER_TOKEN,
        name="paced-worker",
        read_dataset="no",
        dataset_path=str(nowhere),
        reconnect_max_seconds=1.0,
    )
    paced = Captioner("transformers", loader=lambda kind, spec: PacedEngine(spec, ENGINE_RATE))
    worker = Worker(config, paced)
    task = asyncio.create_task(worker.run())
    started = time.monotonic()
    try:
        deadline = started + WARMUP_SECONDS
        while worker.clock.items < ENGINE_BATCH:
            if task.done():
                task.result()
                raise RuntimeError("the worker stopped before its first batch")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no batch captioned in {WARMUP_SECONDS:.0f}s")
            await asyncio.sleep(0.005)
        t0, busy0, items0 = time.monotonic(), worker.clock.busy_s, worker.clock.items
        p0 = await asyncio.to_thread(probe)
        await asyncio.sleep(seconds)
        t1, busy1, items1 = time.monotonic(), worker.clock.busy_s, worker.clock.items
        p1 = await asyncio.to_thread(probe)
        window = {"wall": t1 - t0, "busy": busy1 - busy0, "items": items1 - items0}
        window["first_batch_s"] = t0 - started
        return window, p0, p1
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        log(f"  worker stopped {time.monotonic() - started:.1f}s after it started")


def engine_row(scratch: Path, dataset: Path, args: argparse.Namespace, feeders: int) -> Row:
    """Dataworkers connected first (as long-running ones are), then the worker starts."""
    workdir = scratch / f"engine-{feeders}"
    orch = OrchestratorProcess(workdir, dataset, args.max_side, {})
    procs: list[subprocess.Popen[bytes]] = []
    began = time.monotonic()
    try:
        orch.wait_ready()
        log(f"  orchestrator ready in {time.monotonic() - began:.1f}s")
        procs = [
            start_dataworker(orch.url, f"feeder-{i}", workdir, args.message_mb)
            for i in range(feeders)
        ]
        orch.wait_dataworkers(procs)
        log(f"  {feeders} dataworkers connected at {time.monotonic() - began:.1f}s")
        window, p0, p1 = asyncio.run(
            worker_window(
                orch.url, workdir / "not-here", args.engine_seconds, lambda: Probe.take(orch, procs)
            )
        )
    finally:
        for proc in procs:
            stop_process(proc)
        orch.stop()
        log(f"  all stopped at {time.monotonic() - began:.1f}s")
    relayed, served = delta(p1.metrics, p0.metrics, "items_relayed_total", "items_served_total")
    wall = window["wall"]
    note = f"relayed/served {relayed:.0f}/{served:.0f}; 1st batch at {window['first_batch_s']:.1f}s"
    if feeders:
        note += f"; dataworkers used {(p1.feeder_cpu - p0.feeder_cpu) / wall:.2f} cores"
    return Row(
        "3 engine",
        f"{feeders} dataworker{'s' if feeders > 1 else ''}" if feeders else "orchestrator alone",
        images_per_s=window["items"] / wall,
        orch_cpu_ms=1000 * (p1.orch_cpu - p0.orch_cpu) / max(window["items"], 1),
        engine_waiting=1 - window["busy"] / wall,
        notes=note,
    )


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
HEADER = [
    "part",
    "case",
    "img/s",
    "img/CPU-s",
    "MB/s",
    "orch CPU ms/img",
    "KiB in",
    "KiB out",
    "engine waiting",
    "notes",
]


def cells(row: Row) -> list[str]:
    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    return [
        row.part,
        row.case,
        num(row.images_per_s, ".1f"),
        num(row.images_per_cpu_s, ".1f"),
        num(row.mb_per_s, ".1f"),
        num(row.orch_cpu_ms, ".2f"),
        num(row.kib_in, ".0f"),
        num(row.kib_out, ".0f"),
        num(row.engine_waiting, ".0%"),
        row.notes,
    ]


def render(title: str, rows: list[Row]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}")
        for line in [HEADER, *map(cells, rows)]:
            print("  ".join(cell.ljust(14) for cell in line))
        return
    table = Table(title=title)
    for name in HEADER:
        table.add_column(name, justify="left" if name in ("part", "case", "notes") else "right")
    for row in rows:
        table.add_row(*cells(row))
    Console(width=max(200, shutil.get_terminal_size().columns)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument(
        "--max-side", type=int, default=1024, help="the job's image size (parts 2 and 3)"
    )
    parser.add_argument(
        "--message-mb",
        type=float,
        default=4.0,
        help="the dataworkers' message_mb (prepared bytes per message)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument(
        "--workdir", type=Path, help="keep the images, data dirs and logs here (a new folder)"
    )
    args = parser.parse_args()
    quick = args.quick
    distinct = 16 if quick else 64
    prepare_seconds = 0.4 if quick else 3.0
    args.fill_items = 4 * CHUNK_SIZE if quick else 16 * CHUNK_SIZE
    args.fill_seconds = 15.0 if quick else 60.0
    args.own_items = FETCH_KEYS if quick else 4 * CHUNK_SIZE
    args.raw_items = 4 * CHUNK_SIZE if quick else 16 * CHUNK_SIZE
    args.own_seconds = 10.0 if quick else 30.0
    args.engine_seconds = 6.0 if quick else 30.0
    items = max(args.own_items, args.raw_items, int(ENGINE_RATE * (args.engine_seconds + 20)))
    began = time.monotonic()

    def done(what: str) -> None:
        log(f"{what} ({time.monotonic() - began:.0f}s)")

    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True)
            scratch = args.workdir
        else:
            prefix = "captionflow-bench-dataworkers-"
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        originals = write_originals(scratch / "originals", distinct, SIZE)
        sized = write_originals(
            scratch / "sized", distinct // 2, (args.max_side, args.max_side * 3 // 4), png=False
        )
        dataset = link_dataset(originals, scratch / "dataset", items)
        sized_dataset = link_dataset(sized, scratch / "sized-dataset", args.fill_items)
        kib_in = sum(p.stat().st_size for p in originals) / len(originals) / 1024
        done(f"{len(originals)} originals, mean {kib_in:.0f} KiB; {items:,} items")
        rows = prepare_rows(originals, (1024, 512), prepare_seconds)
        done("part 1")
        rows += fill_and_relay(scratch, sized_dataset, args)
        rows.append(orchestrator_reads(scratch, dataset, args, kib_in, prepare=True))
        rows.append(orchestrator_reads(scratch, dataset, args, kib_in, prepare=False))
        done("part 2")
        for feeders in (1, 0) if quick else (1, 2, 0):
            rows.append(engine_row(scratch, dataset, args, feeders))
            done(f"part 3, {feeders} dataworkers")
    render(
        f"dataworkers: prepare, relay, feed an engine at {ENGINE_RATE:.0f} img/s "
        f"({usable_cores()} cores; max_side {args.max_side} in parts 2-3; "
        f"{time.monotonic() - began:.0f}s)",
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
