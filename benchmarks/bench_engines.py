"""Engine throughput through the real pipeline: a worker against a real orchestrator.

    python benchmarks/bench_engines.py [--images N] [--max-tokens T] [--batch-size B]
                                       [--engines transformers,vllm] [--model PATH_OR_ID]
                                       [--repeats R] [--torch-threads K] [--json FILE]
                                       [--image-dir DIR] [--dataset folder|tar] [--ignore-eos]
                                       [--no-mm-cache] [--warmup-batches W]

For each engine that is available here (transformers always; vLLM only where ``import vllm``
works, otherwise a line under the table says why it was skipped), in this one process:

1. **Load.** A :class:`Captioner` for that engine loads the model (timed: "load s"), then
   captions one batch of ``B`` images to warm it up (first-call costs: lazy initialisation,
   kernel selection; timed: "warm-up s"; ``--warmup-batches`` for more). ``import vllm``
   is timed apart, below the table.
2. **Engine alone.** The ``N`` images, decoded beforehand, go through ``Captioner.caption``
   in batches of ``B`` on one extra thread (as the worker runs its engine): the engine's own
   rate with no reading, decoding or network.
3. **Pipeline.** A real :class:`Orchestrator` (127.0.0.1, port 0, a fresh data dir, the
   images as a ``local_folder`` dataset, chunks of ``4 x B`` images) and a real
   :class:`Worker` that connects to it over a websocket and is handed the already-loaded
   captioner. Measured from the worker's first ``Assign`` that carries chunks to the ``Ack``
   of its last results (results are durable then), so model load is excluded by warming up
   first, not by skipping batches. Reported: images/s over that wall time, engine busy (the
   worker's ``EngineClock`` busy time, as its heartbeats report it, over that wall time),
   generated tokens (also from the ``EngineClock``) per engine-busy second and per wall
   second.

Steps 2 and 3 run ``--repeats`` times (3) on the same warm engine; the table shows the run
with the median wall time, and the range of rates over the runs in brackets.

The job is one prompt, greedy (temperature 0, repetition penalty 1), a fixed ``max_tokens``.
The tiny model (built offline, random weights) never emits its end token, so every item
generates exactly ``max_tokens`` tokens; a real model may stop earlier (the token columns
then say so; ``--ignore-eos`` makes every item generate exactly ``max_tokens``, as
``bench_gpu.py`` does with random-weight models of a real shape). ``--dataset tar`` has the
pipeline read the images from one webdataset tar shard of the same files (written beside
them); ``--image-dir`` takes image files made elsewhere.

A second table splits the median run's wall time into: start (first assign to first engine
call: reading and decoding the first batch), engine calls (next to the same images through
the engine alone), gaps between engine calls (the engine waiting for decoded images, e.g. at
chunk boundaries) and tail (last engine call to last ack: sending results, group commit,
fsync). When both engines ran, the greedy captions are compared item by item
(identical on the CPU with the tiny model).

Device selection is the engines' own: the first CUDA GPU when torch sees one, else the CPU.
Without CUDA, vLLM (the CPU build) gets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (its engine
core runs in this process) and ``VLLM_CPU_KVCACHE_SPACE=1`` unless they are set already; it
then takes over torch's thread settings for the rest of the process, so vLLM always runs
after transformers. ``--torch-threads K`` calls ``torch.set_num_threads(K)`` before any
engine loads ("thr" in the device column: torch's intra-op threads on the CPU). ``--model``
takes a local folder (or a hub id, where the hub is reachable) instead of the tiny model, e.g.
a real checkpoint on a GPU box; with ``--image-size 640x480`` the generated images are closer
to real ones. On a GPU, vLLM runs with CUDA graphs (``enforce_eager`` off); on the CPU eager.

With the tiny model the whole run takes under a minute on a 2-core machine (most of it is
vLLM's start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(width=None if Console().is_terminal else 160)  # no wrapping in a pipe
err = Console(stderr=True)

PROMPT = "describe this image in detail"


# ---------------------------------------------------------------------------------------------
# Machine and environment
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def machine_label() -> str:
    import torch

    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    label = f"{cpu_model()}, {cores} cores"
    if usable != cores:
        label += f" ({usable} usable)"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        label += ", GPU: " + ", ".join(names)
    else:
        label += ", no GPU"
    return label


def versions(engines: Sequence[str]) -> str:
    import torch
    import transformers

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    parts.append(f"transformers {transformers.__version__}")
    if "vllm" in engines and "vllm" in sys.modules:
        parts.append(f"vllm {sys.modules['vllm'].__version__}")
    return ", ".join(parts)


def vllm_unavailable() -> str | None:
    """None when vLLM imports; else why not. The import itself takes seconds."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "vllm is not installed"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install is as good as none: skip it, say why
        return f"import vllm failed: {type(exc).__name__}: {str(exc)[:120]}"
    return None


# ---------------------------------------------------------------------------------------------
# Measurement hooks
# ---------------------------------------------------------------------------------------------
def timed_classes() -> tuple[type, type]:
    """A Captioner that records each call's interval and stays open across runs, and a Worker
    that records when its first chunks were assigned and when its last results were acked.
    (Imported late: after the environment is set.)"""
    from caption_flow.engines.captioner import Captioner
    from caption_flow.protocol.messages import Ack, Assign
    from caption_flow.worker.client import Worker

    class TimedCaptioner(Captioner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.calls: list[tuple[float, float]] = []
            self.engine_ids: set[int] = set()
            self.keep_open = True  # Worker.run closes its captioner; repeats reuse it

        def caption(self, batch, job):  # type: ignore[no-untyped-def]
            started = time.monotonic()
            outputs = super().caption(batch, job)
            self.calls.append((started, time.monotonic()))
            self.engine_ids |= {id(e) for e in self.engines.values()}
            return outputs

        def close(self) -> None:
            if not self.keep_open:
                super().close()

    class TimedWorker(Worker):
        first_assign: float | None = None
        first_ack: float | None = None
        last_ack: float | None = None

        async def _on_message(self, message: Any) -> None:
            now = time.monotonic()
            if isinstance(message, Assign) and message.chunks and self.first_assign is None:
                self.first_assign = now
            await super()._on_message(message)
            if isinstance(message, Ack):
                self.last_ack = now
                if self.first_ack is None:
                    self.first_ack = now

    return TimedCaptioner, TimedWorker


# ---------------------------------------------------------------------------------------------
# One engine
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One pipeline run: a fresh orchestrator and worker, the same warm engine."""

    wall_s: float = 0.0  # first assign to last ack
    busy_s: float = 0.0  # the worker's EngineClock
    tokens: int = 0
    items_done: int = 0
    items_failed: int = 0
    connect_to_assign_s: float = 0.0
    first_result_s: float = 0.0  # connect to the first ack: the first durable result
    start_s: float = 0.0  # first assign to first engine call
    calls: int = 0
    gaps_s: float = 0.0  # engine idle between calls
    max_gap_s: float = 0.0
    tail_s: float = 0.0  # last engine call to last ack
    median_item_ms: float = 0.0
    captions: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.items_done / self.wall_s if self.wall_s else 0.0


@dataclass
class Result:
    engine: str
    skipped: str | None = None
    device: str = ""
    load_s: float = 0.0
    warmup_s: float = 0.0
    alone_s: list[float] = field(default_factory=list)
    alone_tokens: int = 0
    runs: list[Run] = field(default_factory=list)
    reloaded: bool = False

    def median_run(self) -> Run:
        """The run with the median wall time (the lower one of two middles)."""
        ordered = sorted(self.runs, key=lambda r: r.wall_s)
        return ordered[(len(ordered) - 1) // 2]


def write_shard(image_dir: Path) -> Path:
    """The images of ``image_dir`` as one webdataset tar shard beside it (``NAME.tar``,
    member ``KEY.EXT`` per file, key = the file's stem); written once, renamed into place."""
    import tarfile

    shard = image_dir.parent / f"{image_dir.name}.tar"
    if not shard.exists():
        partial = shard.with_suffix(f".tar.{os.getpid()}.tmp")
        with tarfile.open(partial, "w") as tar:
            for path in sorted(p for p in image_dir.iterdir() if p.is_file()):
                tar.add(path, arcname=path.name)
        os.replace(partial, shard)
    return shard


def dataset_config(image_dir: Path, kind: str) -> Any:
    """The pipeline's dataset: the folder itself, or (``tar``) the same files in one shard."""
    from caption_flow.config.models import DatasetConfig

    if kind == "tar":
        path = str(write_shard(image_dir))
        return DatasetConfig(type="webdataset", path=path, name="bench-images")
    return DatasetConfig(type="local_folder", path=str(image_dir), name="bench-images")


def build_job(args: argparse.Namespace, model: str, gpu: bool) -> Any:
    from caption_flow.config.models import ModelConfig, SamplingConfig

    return ModelConfig(
        model=model,
        batch_size=args.batch_size,
        max_model_len=args.max_model_len or (4096 if args.model else 512),
        enforce_eager=not gpu,  # CUDA graphs help decoding on a GPU; the CPU has none
        limit_mm_per_prompt={"image": 1},
        # The passes show the engine the same images again; a real run sees each once.
        disable_mm_preprocessor_cache=args.no_mm_cache,
        inference_prompts=[PROMPT],
        sampling=SamplingConfig(
            temperature=0.0,
            max_tokens=args.max_tokens,
            repetition_penalty=1.0,
            ignore_eos=args.ignore_eos,
        ),
    )


def engine_device(engine: Any) -> str:
    device = getattr(engine, "device", None)
    if device is None:
        with contextlib.suppress(Exception):
            from vllm.platforms import current_platform

            device = current_platform.device_type
    return str(device or "?")


async def pipeline_run(
    captioner: Any,
    worker_class: type,
    engine: str,
    job: Any,
    image_dir: Path,
    data_dir: Path,
    args: argparse.Namespace,
) -> Run:
    from caption_flow.config.models import OrchestratorConfig, StorageConfig, WorkerConfig
    from caption_flow.orchestrator.server import Orchestrator
    from caption_flow.runner import local_configs
    from caption_flow.storage.reader import output_dataset

    orchestrator_config = OrchestratorConfig(
        host="127.0.0.1",
        port=0,
        dataset=dataset_config(image_dir, args.dataset),
        vllm=job,
        storage=StorageConfig(data_dir=data_dir),
        chunk_size=args.chunk_size or 4 * args.batch_size,
        lease_seconds=600,
        status_interval=3600,
    )
    worker_config = WorkerConfig(
        name=f"bench-{engine}", engine=engine, decode_threads=args.decode_threads
    )
    orchestrator_config, worker_config = local_configs(orchestrator_config, worker_config)
    orchestrator = Orchestrator(orchestrator_config)
    await orchestrator.start()
    worker_config = worker_config.model_copy(
        update={"server": f"ws://127.0.0.1:{orchestrator.port}"}
    )
    worker = worker_class(worker_config, captioner=captioner)
    calls_before = len(captioner.calls)
    connect = time.monotonic()
    task = asyncio.create_task(worker.run(), name="bench-worker")
    try:
        await asyncio.wait_for(asyncio.shield(task), args.timeout)
    except TimeoutError:
        raise RuntimeError(f"the pipeline did not finish within {args.timeout} s") from None
    finally:
        if not task.done():
            worker.stop()
        await asyncio.gather(task, return_exceptions=True)
        snapshot = orchestrator.snapshot()
        await orchestrator.stop()
    task.result()  # a worker failure (bad model, unreadable data) ends the benchmark here

    calls = captioner.calls[calls_before:]
    if worker.first_assign is None or worker.last_ack is None or not calls:
        raise RuntimeError("the worker finished without doing any work")
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(calls)]
    run = Run(
        wall_s=worker.last_ack - worker.first_assign,
        busy_s=worker.clock.busy_s,
        tokens=worker.clock.tokens,
        items_done=snapshot["items_done"],
        items_failed=snapshot["items_failed"],
        connect_to_assign_s=worker.first_assign - connect,
        first_result_s=(worker.first_ack or worker.last_ack) - connect,
        start_s=calls[0][0] - worker.first_assign,
        calls=len(calls),
        gaps_s=sum(gaps),
        max_gap_s=max(gaps, default=0.0),
        tail_s=worker.last_ack - calls[-1][1],
    )
    table = output_dataset(orchestrator.store.parts_dir).to_table(
        columns=["item_key", "captions", "processing_ms"]
    )
    keys = table.column("item_key").to_pylist()
    captions = table.column("captions").to_pylist()
    run.captions = {k: (c[0] if c else "") for k, c in zip(keys, captions, strict=True)}
    times = [t for t in table.column("processing_ms").to_pylist() if t is not None]
    run.median_item_ms = statistics.median(times) if times else 0.0
    return run


def run_engine(
    engine: str,
    args: argparse.Namespace,
    model: str,
    image_dir: Path,
    workdir: Path,
    gpu: bool,
    captioner: Any = None,
) -> Result:
    """Load (unless ``captioner``, from ``timed_classes``, is given: then its engine is reused
    and it stays open), warm up, then the engine-alone and pipeline passes."""
    import torch

    from caption_flow.engines.base import CaptionInput
    from caption_flow.engines.captioner import job_stages
    from caption_flow.images import decode_image

    captioner_class, worker_class = timed_classes()
    result = Result(engine=engine)
    job = build_job(args, model, gpu)
    files = sorted(p for p in image_dir.iterdir() if p.is_file())
    inputs = []
    for path in files:
        image, _, _ = decode_image(path.read_bytes(), job.image)
        inputs.append(CaptionInput(key=path.stem, image=image))
    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]

    owned = captioner is None
    if owned:
        captioner = captioner_class(engine)
    # Warm-up and the engine-alone pass run on one extra thread, as the worker runs its engine.
    thread = ThreadPoolExecutor(1, thread_name_prefix="bench-engine")
    try:
        err.print(f"[{engine}] loading {model}")
        t0 = time.monotonic()
        # The engine the worker's jobs will ask for, loaded now so that its load is timed on
        # its own (a worker loads it lazily inside its first batch).
        spec = captioner.stage_spec(job, job_stages(job)[0])
        loaded = thread.submit(captioner._engine, spec).result()
        result.load_s = time.monotonic() - t0
        result.device = engine_device(loaded)
        t0 = time.monotonic()
        for i in range(args.warmup_batches):
            thread.submit(captioner.caption, batches[i % len(batches)], job).result()
        result.warmup_s = time.monotonic() - t0
        if not result.device.startswith("cuda"):
            threads = thread.submit(torch.get_num_threads).result()
            result.device += f", {threads} thr"  # torch's intra-op threads
        warm_engines = {id(e) for e in captioner.engines.values()}

        for repeat in range(args.repeats):
            if not args.skip_engine_alone:
                err.print(f"[{engine}] {repeat + 1}/{args.repeats} engine alone")
                tokens = 0
                t0 = time.monotonic()
                for batch in batches:
                    outputs = thread.submit(captioner.caption, batch, job).result()
                    tokens += sum(o.tokens for o in outputs)
                result.alone_s.append(time.monotonic() - t0)
                result.alone_tokens = tokens
            err.print(f"[{engine}] {repeat + 1}/{args.repeats} pipeline")
            data_dir = workdir / f"data-{engine}-{repeat}"
            shutil.rmtree(data_dir, ignore_errors=True)
            run = asyncio_run(
                pipeline_run(captioner, worker_class, engine, job, image_dir, data_dir, args)
            )
            result.runs.append(run)
            err.print(f"[{engine}]   {run.images_per_s:.1f} images/s")
        result.reloaded = captioner.engine_ids != warm_engines
    finally:
        thread.shutdown(wait=True)
        if owned:
            captioner.keep_open = False
            captioner.close()
            del captioner
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    return result


def asyncio_run(coro: Any) -> Any:
    """uvloop where installed, as the command line uses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def report(results: list[Result], args: argparse.Namespace, label: str, env: str) -> None:
    repeats = "" if args.repeats == 1 else f" Median of {args.repeats} runs (range in brackets)."
    warmup = "one batch" if args.warmup_batches == 1 else f"{args.warmup_batches} batches"
    images = f"{args.images} images of {args.image_size}"
    if args.image_dir is not None:
        images = f"{args.images} images from {args.image_dir}"
    main = Table(
        title=f"Engines through the pipeline on {label}",
        caption=f"{env}. {images}, batch {args.batch_size}, "
        f"chunk {args.chunk_size or 4 * args.batch_size}, max_tokens {args.max_tokens}, greedy, "
        "one prompt. Pipeline: first assignment to last ack over a loopback websocket; the "
        f"engine was loaded and warmed up ({warmup}) before, so load is excluded. Engine alone: "
        f"Captioner.caption on pre-decoded images, batch after batch.{repeats}",
        caption_justify="left",
    )
    columns = (
        "engine",
        "device",
        "load s",
        "warm-up s",
        "alone img/s",
        "pipeline img/s",
        "wall s",
        "engine busy",
        "tokens",
        "tok/s busy",
        "tok/s wall",
        "done/failed",
    )
    for name in columns:
        main.add_column(name, justify="left" if name in ("engine", "device") else "right")
    for r in results:
        if r.skipped:
            main.add_row(r.engine, "skipped (below)", *[""] * (len(columns) - 2))
            continue
        m = r.median_run()
        rates = [run.images_per_s for run in r.runs]
        rate = f"{m.images_per_s:.1f}"
        if len(rates) > 1:
            rate += f" [{min(rates):.0f}-{max(rates):.0f}]"
        alone = "-"
        if r.alone_s:
            alone_rates = [args.images / t for t in r.alone_s]
            alone = f"{args.images / statistics.median(r.alone_s):.1f}"
            if len(alone_rates) > 1:
                alone += f" [{min(alone_rates):.0f}-{max(alone_rates):.0f}]"
        main.add_row(
            r.engine,
            r.device,
            f"{r.load_s:.2f}",
            f"{r.warmup_s:.2f}",
            alone,
            rate,
            f"{m.wall_s:.2f}",
            f"{100 * m.busy_s / m.wall_s:.0f} %",
            f"{m.tokens}",
            f"{m.tokens / m.busy_s:.0f}" if m.busy_s else "-",
            f"{m.tokens / m.wall_s:.0f}",
            f"{m.items_done}/{m.items_failed}",
        )
    console.print(main)

    for r in results:
        if r.skipped:
            console.print(f"{r.engine} skipped: {r.skipped}")
    ran = [r for r in results if not r.skipped]
    if not ran:
        return
    split = Table(
        title="Where the median run's wall time went (first assign to last ack)",
        caption="start: first assign to first engine call (read + decode the first batch); "
        "engine: inside Captioner.caption; alone s: the same images through the engine alone "
        "(median); gaps: the engine idle between calls; tail: last "
        "call to last ack (send results, group commit, fsync, ack). item ms: median per item "
        "from its decode starting to its batch's captions (the processing_ms column).",
        caption_justify="left",
    )
    for name in (
        "engine",
        "connect to assign ms",
        "start ms",
        "engine calls",
        "engine s",
        "alone s",
        "gaps ms (max)",
        "tail ms",
        "item ms",
    ):
        split.add_column(name, justify="left" if name == "engine" else "right")
    for r in ran:
        m = r.median_run()
        engine_s = m.wall_s - m.start_s - m.gaps_s - m.tail_s
        split.add_row(
            r.engine,
            f"{1000 * m.connect_to_assign_s:.0f}",
            f"{1000 * m.start_s:.0f}",
            f"{m.calls}",
            f"{engine_s:.2f}",
            f"{statistics.median(r.alone_s):.2f}" if r.alone_s else "-",
            f"{1000 * m.gaps_s:.0f} ({1000 * m.max_gap_s:.0f})",
            f"{1000 * m.tail_s:.0f}",
            f"{m.median_item_ms:.0f}",
        )
    console.print(split)

    for r in ran:
        if r.reloaded:
            console.print(f"[yellow]{r.engine}: the worker loaded another engine during a run")
        if r.alone_s and r.alone_tokens != r.median_run().tokens:
            console.print(
                f"{r.engine}: tokens differ between engine alone ({r.alone_tokens}) "
                f"and pipeline ({r.median_run().tokens})"
            )
    if len(ran) >= 2:
        first, second = ran[0].runs[-1].captions, ran[1].runs[-1].captions
        common = sorted(first.keys() & second.keys())
        same = sum(first[k] == second[k] for k in common)
        console.print(
            f"greedy captions identical between {ran[0].engine} and {ran[1].engine}: "
            f"{same} of {len(common)}"
            + (f", e.g. {common[0]}: {first[common[0]]!r}" if common else "")
        )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images to caption (64)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per caption (16)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per engine call (8)")
    parser.add_argument(
        "--chunk-size", type=int, default=0, help="images per leased chunk (0: 4 x batch size)"
    )
    parser.add_argument(
        "--engines",
        default="transformers,vllm",
        help="comma-separated, in order (transformers,vllm); unavailable ones are skipped",
    )
    parser.add_argument(
        "--model", default=None, help="a model folder or hub id instead of the tiny model"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=0, help="0: 512 for the tiny model, else 4096"
    )
    parser.add_argument("--image-size", default="96x72", help="WxH of the generated images (96x72)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep model, images and data dirs here"
    )
    parser.add_argument(
        "--image-dir",
        type=Path,
        default=None,
        help="caption these image files instead of generated ones (--images is then ignored)",
    )
    parser.add_argument(
        "--dataset",
        choices=["folder", "tar"],
        default="folder",
        help="the pipeline reads the images as a local_folder (folder) or from one "
        "webdataset tar shard of the same files (tar)",
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="every item generates exactly --max-tokens tokens (random-weight models)",
    )
    parser.add_argument(
        "--no-mm-cache",
        action="store_true",
        help="turn vLLM's multimodal preprocessor cache off (later passes over the same "
        "images would otherwise skip preprocessing that a real run pays once per image)",
    )
    parser.add_argument(
        "--warmup-batches",
        type=int,
        default=1,
        help="batches captioned to warm the engine up before any pass (1)",
    )
    parser.add_argument(
        "--skip-engine-alone", action="store_true", help="skip the engine-alone pass"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per pipeline run"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="pipeline runs per engine; the median is shown (3)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads before any engine loads (0: torch's default); on the CPU "
        "it applies to both engines, vLLM's CPU build running in this process",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="the pipeline worker's decode_threads (0: one per core, the worker's default)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ("transformers", "vllm")]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; use transformers and/or vllm")
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        parser.error("--image-size takes WxH, e.g. 640x480")
    args.image_wh = (width, height)
    if min(args.images, args.max_tokens, args.batch_size, args.repeats) < 1:
        parser.error("--images, --max-tokens, --batch-size and --repeats must be at least 1")
    # vLLM's CPU build, running in this process, pins torch's threads for the rest of it.
    args.engines.sort(key=lambda e: e == "vllm")
    return args


class _DropRepeatedWarning(logging.Filter):
    """vLLM's CPU worker, in-process, warns on every request that torch.set_num_threads is
    disabled (its renderer calls it per request): drop that line, keep everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


def setup_environment(torch_threads: int = 0) -> bool:
    """Logging and the settings both engines expect here; True when CUDA is available."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_DropRepeatedWarning())
    gpu = cuda_available()
    if not gpu:  # vLLM's CPU build: in-process engine core (fast start), a 1 GiB KV cache
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    return gpu


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = setup_environment(args.torch_threads)

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-eng-")))
        else:
            workdir = args.workdir.absolute()
            workdir.mkdir(parents=True, exist_ok=True)

        from caption_flow.demo.tiny_model import build_tiny_model, generate_images

        if args.model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            t0 = time.monotonic()
            model = str(build_tiny_model(workdir / "tiny-qwen2-vl"))
            err.print(f"tiny model ready in {time.monotonic() - t0:.1f} s")
        else:
            model = args.model
            if Path(model).expanduser().is_dir():
                model = str(Path(model).expanduser().absolute())
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
        image_dir = args.image_dir or workdir / f"images-{args.images}-{args.image_size}"
        if not image_dir.is_dir():
            generate_images(image_dir, args.images, size=args.image_wh)
        elif args.image_dir is not None:
            args.images = sum(1 for p in image_dir.iterdir() if p.is_file())

        results: list[Result] = []
        notes: list[str] = []
        for engine in args.engines:
            if engine == "vllm":
                t0 = time.monotonic()
                why = vllm_unavailable()
                if why is not None:
                    err.print(f"[vllm] skipped: {why}")
                    results.append(Result(engine=engine, skipped=why))
                    continue
                notes.append(f"import vllm took {time.monotonic() - t0:.1f} s (not in load s)")
            results.append(run_engine(engine, args, model, image_dir, workdir, gpu))

    report(results, args, machine_label(), versions(args.engines))
    for note in notes:
        console.print(note)
    if args.json is not None:
        rows = [asdict(r) for r in results]
        for row in rows:
            for run in row["runs"]:
                run.pop("captions")
        payload = {"machine": machine_label(), "args": vars(args), "results": rows}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
