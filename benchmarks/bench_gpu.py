"""GPU throughput in one command: a real-shape model, the whole pipeline, one table.

    python benchmarks/bench_gpu.py [--shape qwen2.5-vl-3b] [--model-dir DIR]
                                   [--batch-sizes 16,32,64] [--max-tokens 64] [--images 512]
                                   [--image-size 512x512] [--engines auto] [--out FILE]
                                   [--timeout 540] [--workdir DIR] [--repeats 1] [--json FILE]

1. **Model.** ``make_model.py`` builds the shape (random weights, real architecture and sizes,
   bf16) into ``--model-dir`` unless it holds it already, on the GPU when there is one
   (about 7.5 GB for the 3B shape). ``--shape tiny``: the project's tiny test model.
2. **Images.** ``--images`` photo-like JPEGs (quality 90) of exactly ``--image-size``, and
   the same files as one webdataset tar shard, which the pipeline reads.
3. **Per engine** (``auto``: vLLM where it imports, else transformers): the engine is loaded
   once; then for each batch size ``bench_engines.run_engine`` warms it up (three batches),
   runs the images through the engine alone (decoded beforehand) and through the pipeline
   (a real orchestrator on 127.0.0.1 and a real worker over a websocket, first assignment
   to last ack). One prompt, greedy, ``ignore_eos``: every item generates exactly
   ``--max-tokens`` tokens, so random weights give honest token counts.
4. **Table**, printed and written to ``--out`` after every cell (so a time-out keeps what
   was measured): images/s through the pipeline and alone, their ratio, output tokens/s
   (pipeline), engine busy (the worker's EngineClock over the pipeline's wall time), time to
   the first durable result (worker connect to first ack, engine warm), peak GPU memory
   (torch's peak in this process, and the most ``nvidia-smi`` showed used on GPU 0 during
   the cell, which includes vLLM's engine process and its pre-allocated KV cache), and the
   card's name ("CPU" without CUDA).

``--timeout`` bounds the whole run (model build included): at the deadline the table so far
is written with a line saying where it stopped, and the process exits with status 124.
Several GPUs: only GPU 0 is measured; ``caption-flow worker --gpus all`` across them is not
measured yet (a line under the table says so).

On the CPU, ``--shape tiny --engines transformers --images 8 --batch-sizes 4 --max-tokens 4``
runs in well under a minute (the test suite's smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_engines, make_model

import bench_engines as be
import make_model

TIMED_OUT = 124
#: captionflow's dependencies on this script's path that the lent GPU machines' image lacks
#: (it has torch, transformers, pyarrow, rich, uvloop, pillow, pyyaml, prometheus-client):
#: ``--download-wheels DIR`` fetches them at the versions installed here, for Python 3.12.
GPU_WHEELS = (
    "annotated-types",
    "braceexpand",
    "duckdb",
    "jsonschema",
    "jsonschema-specifications",
    "msgspec",
    "pydantic",
    "pydantic-core",
    "referencing",
    "rpds-py",
    "simplejpeg",
    "typing-extensions",
    "typing-inspection",
    "websockets",
)
MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
#: One warm-up batch left a one-off cost in the next pass (vLLM's CPU build: the first
#: engine-alone pass ran 4x slower than the later ones); three absorb it.
WARMUP_BATCHES = 3


@dataclass
class Cell:
    """One engine at one batch size."""

    engine: str
    batch_size: int
    device: str = ""
    load_s: float = 0.0  # the engine's load (first batch size only; later ones reuse it)
    pipeline_img_s: float = 0.0
    alone_img_s: float = 0.0
    tokens: int = 0
    tok_s: float = 0.0  # output tokens per pipeline wall second
    busy: float = 0.0  # engine busy / pipeline wall
    first_result_s: float = 0.0
    torch_peak_gib: float | None = None
    smi_peak_gib: float | None = None
    done: int = 0
    failed: int = 0
    # Every run's figures (JSON only), so a slow ratio can be told apart: feed gaps (engine
    # idle between calls) or engine calls that ran slower inside the pipeline.
    pipeline_runs_img_s: list[float] = field(default_factory=list)
    alone_runs_img_s: list[float] = field(default_factory=list)
    engine_calls: int = 0
    start_s: float = 0.0  # first assignment to first engine call
    gaps_s: float = 0.0  # engine idle between calls, summed
    max_gap_s: float = 0.0
    tail_s: float = 0.0  # last engine call to last ack


# ---------------------------------------------------------------------------------------------
# GPU memory
# ---------------------------------------------------------------------------------------------
def smi_used_mib() -> float | None:
    """Memory used on GPU 0 as nvidia-smi reports it (all processes), None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class MemoryWatch:
    """Samples nvidia-smi every ``interval`` seconds while in use; ``peak_gib`` after."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = smi_used_mib()
            if used is None:
                return
            self.peak_mib = max(used, self.peak_mib or 0.0)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_mib is None else self.peak_mib / 1024


def card_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"CPU ({be.cpu_model()})"
    count = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    return name if count == 1 else f"{name} (GPU 0 of {count})"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_images(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` photo-like JPEGs of exactly ``size`` (kept when already complete)."""
    from bench_dataworkers import photo

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    for i in range(count):
        photo(*size, seed=i).save(partial / f"img_{i:05d}.jpg", "JPEG", quality=90)
    os.replace(partial, folder)
    return folder


def download_wheels(folder: Path, python: str = "3.12") -> int:
    """``pip download`` the GPU_WHEELS, pinned to this environment's versions, as x86-64
    wheels for ``python`` (the GPU machines' interpreter); pip's exit status."""
    from importlib.metadata import version

    platforms = [arg for tag in MANYLINUX for arg in ("--platform", f"{tag}_x86_64")]
    pins = [f"{name}=={version(name)}" for name in GPU_WHEELS]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", *platforms,
               "-d", str(folder), *pins]  # fmt: skip
    return subprocess.call(command)


def resolve_engines(requested: list[str]) -> tuple[list[str], list[str]]:
    """(engines to run, notes). ``auto``: vLLM where it imports, else transformers."""
    notes: list[str] = []
    if requested != ["auto"]:
        return list(requested), notes
    why = be.vllm_unavailable()
    if why is None:
        return ["vllm"], notes
    notes.append(f"engines auto: transformers, since vLLM is unavailable ({why})")
    return ["transformers"], notes


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
COLUMNS = (
    "engine",
    "batch",
    "pipeline img/s",
    "alone img/s",
    "ratio",
    "out tok/s",
    "engine busy",
    "first result s",
    "torch peak GiB",
    "nvidia-smi peak GiB",
    "done/failed",
)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(cells: list[Cell], header: list[str], notes: list[str]) -> str:
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|---|" + "---:|" * (len(COLUMNS) - 1))
    for c in cells:
        ratio = f"{c.pipeline_img_s / c.alone_img_s:.2f}" if c.alone_img_s else "-"
        row = (
            c.engine,
            str(c.batch_size),
            f"{c.pipeline_img_s:.1f}",
            f"{c.alone_img_s:.1f}",
            ratio,
            f"{c.tok_s:.0f}",
            f"{100 * c.busy:.0f} %",
            f"{c.first_result_s:.2f}",
            _gib(c.torch_peak_gib),
            _gib(c.smi_peak_gib),
            f"{c.done}/{c.failed}",
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join([*lines, "", *notes]) + "\n"


class Report:
    """The table so far, rewritten to ``out`` after every cell; thread-safe (the time-out
    writes from its timer thread)."""

    def __init__(self, out: Path, json_out: Path | None) -> None:
        self.out = out
        self.json_out = json_out
        self.header: list[str] = []
        self.notes: list[str] = []
        self.cells: list[Cell] = []
        self.meta: dict[str, Any] = {}
        self.lock = threading.Lock()

    def write(self, final_note: str | None = None) -> str:
        with self.lock:
            notes = self.notes + ([final_note] if final_note else [])
            text = render(self.cells, self.header, notes)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(text)
            if self.json_out is not None:
                payload = {**self.meta, "notes": notes, "cells": [asdict(c) for c in self.cells]}
                self.json_out.write_text(json.dumps(payload, indent=2, default=str))
            return text


def start_deadline(report: Report, seconds: float, phase: list[str]) -> threading.Timer:
    """At the deadline: write what was measured, say where it stopped, exit 124 at once
    (an engine call cannot be interrupted from outside)."""

    def expire() -> None:
        text = report.write(f"**Stopped by --timeout {seconds:.0f} s during: {phase[0]}.**")
        sys.stdout.write(text)
        sys.stdout.flush()
        os._exit(TIMED_OUT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def cell_args(
    args: argparse.Namespace, engine: str, batch: int, image_dir: Path, model: str, left_s: float
) -> argparse.Namespace:
    """bench_engines' own arguments for one cell (its parser fills every default)."""
    argv = [
        "--engines", engine,
        "--model", model,
        "--batch-size", str(batch),
        "--max-tokens", str(args.max_tokens),
        "--image-dir", str(image_dir),
        "--image-size", args.image_size,
        "--dataset", "tar",
        "--ignore-eos",
        "--no-mm-cache",
        "--warmup-batches", str(WARMUP_BATCHES),
        "--repeats", str(args.repeats),
        "--max-model-len", str(512 if args.shape == "tiny" else 4096),
        "--timeout", str(max(1.0, left_s)),
        "--decode-threads", str(args.decode_threads),
    ]  # fmt: skip
    parsed = be.parse_args(argv)
    parsed.images = args.images
    return parsed


def measure(
    engine: str,
    args: argparse.Namespace,
    model: str,
    image_dir: Path,
    workdir: Path,
    gpu: bool,
    report: Report,
    deadline: float,
    phase: list[str],
) -> None:
    """Every batch size on one engine, loaded once; each finished cell goes to the report."""
    import torch

    captioner_class, _ = be.timed_classes()
    captioner = captioner_class(engine)
    try:
        for batch in args.batch_sizes:
            left = deadline - time.monotonic()
            phase[0] = f"{engine}, batch {batch}"
            be.err.print(f"[{engine}] batch {batch} ({left:.0f} s left)")
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            cargs = cell_args(args, engine, batch, image_dir, model, left)
            with MemoryWatch() as watch:
                result = be.run_engine(
                    engine, cargs, model, image_dir, workdir, gpu, captioner=captioner
                )
            run = result.median_run()
            alone_s = sorted(result.alone_s)[(len(result.alone_s) - 1) // 2]
            cell = Cell(
                engine=engine,
                batch_size=batch,
                device=result.device,
                load_s=result.load_s,
                pipeline_img_s=run.images_per_s,
                alone_img_s=args.images / alone_s if alone_s else 0.0,
                tokens=run.tokens,
                tok_s=run.tokens / run.wall_s if run.wall_s else 0.0,
                busy=run.busy_s / run.wall_s if run.wall_s else 0.0,
                first_result_s=run.first_result_s,
                torch_peak_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
                smi_peak_gib=watch.peak_gib,
                done=run.items_done,
                failed=run.items_failed,
                pipeline_runs_img_s=[r.images_per_s for r in result.runs],
                alone_runs_img_s=[args.images / t for t in result.alone_s if t],
                engine_calls=run.calls,
                start_s=run.start_s,
                gaps_s=run.gaps_s,
                max_gap_s=run.max_gap_s,
                tail_s=run.tail_s,
            )
            with report.lock:
                report.cells.append(cell)
                if batch == args.batch_sizes[0]:
                    report.notes.append(
                        f"{engine}: device {cell.device}, engine load {cell.load_s:.1f} s"
                    )
                if run.tokens != args.images * args.max_tokens:
                    report.notes.append(
                        f"{engine} batch {batch}: {run.tokens} tokens generated, not "
                        f"{args.images} x {args.max_tokens}"
                    )
            report.write()
            be.err.print(
                f"[{engine}] batch {batch}: {cell.pipeline_img_s:.1f} images/s pipeline, "
                f"{cell.alone_img_s:.1f} alone; table so far in {report.out}"
            )
    finally:
        captioner.keep_open = False
        captioner.close()
        del captioner
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()  # the next engine (vLLM) sizes its cache by free memory


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-vl-3b", choices=make_model.SHAPE_NAMES)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="model folder (built there if missing)"
    )
    parser.add_argument("--batch-sizes", default="16,32,64", help="comma-separated (16,32,64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per caption (64)")
    parser.add_argument("--images", type=int, default=512, help="images per pass (512)")
    parser.add_argument("--image-size", default="512x512", help="WxH of the JPEGs (512x512)")
    parser.add_argument(
        "--engines",
        default="auto",
        help="auto (vLLM where it imports, else transformers), or a comma-separated list of "
        "transformers, vllm",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; median (1)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="model, images and data dirs (default: $TMPDIR/captionflow-bench-gpu)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the table, markdown (default: WORKDIR/bench_gpu.md)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the cells here")
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="the pipeline worker's decode threads (0: one per core, the worker's default)",
    )
    parser.add_argument(
        "--timeout", type=float, default=540.0, help="seconds for the whole run (540)"
    )
    parser.add_argument(
        "--download-wheels",
        type=Path,
        default=None,
        metavar="DIR",
        help="only download the wheels a lent GPU machine lacks into DIR, then exit",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="trial runs (e.g. on a CPU): the real shape cut to this many text and vision "
        "blocks, every width, the vocabulary and the processor kept",
    )
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        parser.error("--batch-sizes takes numbers such as 16,32; --image-size WxH")
    args.image_wh = (width, height)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.engines != ["auto"] and not set(args.engines) <= {"transformers", "vllm"}:
        parser.error("--engines takes auto, or transformers and/or vllm")
    if not args.batch_sizes or min(*args.batch_sizes, args.images, args.max_tokens) < 1:
        parser.error("--batch-sizes, --images and --max-tokens must be at least 1")
    args.engines.sort(key=lambda e: e == "vllm")  # vLLM's CPU build takes over torch threads
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.download_wheels is not None:
        return download_wheels(args.download_wheels)
    started = time.monotonic()
    deadline = started + args.timeout
    workdir = (args.workdir or Path(tempfile.gettempdir()) / "captionflow-bench-gpu").absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report((args.out or workdir / "bench_gpu.md").absolute(), args.json)
    phase = ["start"]
    timer = start_deadline(report, args.timeout, phase)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gpu = be.setup_environment()
    cut = "" if args.layers is None else f" cut to {args.layers} layers (a trial)"
    report.header = [f"## bench_gpu: {args.shape}{cut} on {card_name()}", ""]
    report.write()

    status = 0
    try:
        build_and_measure(args, report, phase, gpu, workdir, deadline)
    except Exception as exc:  # a failed build, engine or run: keep the table, say what failed
        traceback.print_exc()
        report.notes.append(f"**Failed during {phase[0]}: {type(exc).__name__}: {exc}**")
        status = 1
    timer.cancel()
    report.notes.append(f"Whole run {time.monotonic() - started:.0f} s; table in {report.out}.")
    sys.stdout.write(report.write())
    return status


def build_and_measure(
    args: argparse.Namespace,
    report: Report,
    phase: list[str],
    gpu: bool,
    workdir: Path,
    deadline: float,
) -> None:
    import torch

    phase[0] = "model build"
    suffix = "" if args.layers is None else f"-{args.layers}-layers"
    model_dir = (args.model_dir or workdir / f"model-{args.shape}{suffix}").absolute()
    t0 = time.monotonic()
    found = (model_dir / "config.json").exists() and not (model_dir / make_model.MARKER).exists()
    if found and args.shape != "tiny":  # (the tiny model has a marker of its own)
        model = str(model_dir)  # a checkpoint from elsewhere (a real one, say): used as it is
        report.notes.append(f"model: {model_dir} used as found (not built by make_model.py)")
    else:
        device = "cuda" if gpu else "cpu"
        built = make_model.build_model(args.shape, model_dir, device=device, layers=args.layers)
        model = str(built)
    build_s = time.monotonic() - t0
    parameters = make_model.built_parameters(model_dir)
    dtype = "float32" if args.shape == "tiny" else "bf16"
    parameters_text = f" ({parameters / 1e9:.2f} B parameters)" if parameters else ""
    phase[0] = "images"
    image_dir = make_images(
        workdir / f"jpeg-{args.images}-{args.image_size}", args.images, args.image_wh
    )
    be.write_shard(image_dir)
    engines, notes = resolve_engines(args.engines)
    if "vllm" in engines and (why := be.vllm_unavailable()) is not None:
        engines.remove("vllm")  # imported now, so that its version is in the header
        notes.append(f"vllm skipped: {why}")
    report.header.append(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {be.machine_label()}; {be.versions(engines)}."
    )
    report.header.append(
        f"Model: {args.shape}{parameters_text}, random weights, {dtype} on disk "
        f"({build_s:.0f} s to build or find). {args.images} JPEGs of {args.image_size} in one "
        f"webdataset tar shard; one prompt, greedy, ignore_eos, {args.max_tokens} output "
        "tokens per image; chunks of 4 x batch. Pipeline: orchestrator + one worker over "
        "loopback, first assignment to last ack, engine warm. Alone: Captioner.caption on "
        f"pre-decoded images. ratio = pipeline / alone. {args.repeats} run(s) per cell. "
        f"Worker decode threads: {args.decode_threads or 'one per core'}."
    )
    report.notes.extend(notes)
    if gpu and torch.cuda.device_count() > 1:
        report.notes.append(
            f"{torch.cuda.device_count()} GPUs: only GPU 0 was measured; `caption-flow worker "
            "--gpus all` across them is not measured yet (TODO)."
        )
    report.meta = {"args": vars(args), "build_s": build_s}
    for engine in engines:
        measure(engine, args, model, image_dir, workdir, gpu, report, deadline, phase)


if __name__ == "__main__":
    sys.exit(main())
