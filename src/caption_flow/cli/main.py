"""``caption-flow``: one click group, one small function per subcommand."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler

from caption_flow.cli.configs import dataset_type_for, orchestrator_config, worker_config
from caption_flow.errors import CaptionFlowError

console = Console(stderr=True)


#: Libraries whose INFO and DEBUG lines are about their own internals, never shown.
_QUIET_LOGGERS = (
    "websockets",
    "transformers",
    "httpx",
    "httpcore",
    "filelock",
    "PIL",
    "urllib3",
    "fsspec",
    "huggingface_hub",
    "datasets",
    "asyncio",
    "torch",
)


def _log_handler() -> logging.Handler:
    """Rich on a terminal; one plain line per record when redirected (no wrapping)."""
    if console.is_terminal:
        return RichHandler(console=console, show_path=False, rich_tracebacks=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    return handler


def _setup_logging(verbose: int, service: bool) -> None:
    """Called once per command, with ``-v`` counted before and after the subcommand."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_log_handler())
    root.setLevel(level)
    # Services log their status lines by default; run and demo show a progress bar instead.
    logging.getLogger("caption_flow").setLevel(
        min(level, logging.INFO) if verbose or service else logging.WARNING
    )
    # The CLI's own few lines (which config file was loaded) are always worth a line.
    logging.getLogger("caption_flow.cli").setLevel(min(level, logging.INFO))
    for noisy in _QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    vllm_level = "INFO" if verbose else "WARNING"
    logging.getLogger("vllm").setLevel(vllm_level)
    # vLLM configures its own logger (in its engine processes too) from the environment, at
    # INFO and on stdout by default: keep it quiet unless -v, and off stdout, where the
    # summary table goes. A user's own setting wins.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", vllm_level)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def _verbosity(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    """``-v`` after the subcommand adds to ``-v`` before it; logging is set up here."""
    before = ctx.find_root().params.get("verbose", 0) or 0
    _setup_logging(before + value, service=ctx.info_name in ("orchestrator", "worker"))


def verbose_option(command: Any) -> Any:
    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_verbosity,
        help="-v: progress logs, -vv: debug (also accepted before the subcommand)",
    )(command)


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="-v: progress logs, -vv: debug")
@click.version_option(package_name="caption-flow")
def cli(verbose: int) -> None:
    """Caption very large image datasets with vision-language models on many GPUs."""
    # Logging is set up by each subcommand's own -v, which adds this count to its own.


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option("--host", help="address to listen on")
@click.option("--port", type=int, help="port to listen on (0: any free port)")
@click.option("--data-dir", type=click.Path(file_okay=False), help="state and output folder")
def orchestrator(
    config_path: str | None, host: str | None, port: int | None, data_dir: str | None
) -> None:
    """Serve a dataset to workers and store their captions."""
    from caption_flow.orchestrator.server import Orchestrator

    config = orchestrator_config(
        config_path, {"host": host, "port": port, "storage.data_dir": data_dir}
    )

    async def serve() -> None:
        orch = Orchestrator(config)
        await orch.start()
        console.print(f"orchestrator listening on {config.host}:{orch.port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(orch.failed.wait())
        await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        console.print("stopping: flushing captions to Parquet")
        await orch.stop()
        if orch.fatal is not None:
            raise CaptionFlowError(orch.fatal)

    _run(serve())


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option("--server", help="orchestrator URL, ws://host:port or wss://host:port")
@click.option("--token", help="worker token")
@click.option("--name", help="worker name shown in the monitor")
@click.option("--gpu-id", type=int, help="pin this process to one GPU")
@click.option("--batch-size", type=int, help="images per engine batch (overrides the job)")
@click.option("--model", help="model to use instead of the orchestrator's")
@click.option("--precision", help="dtype: auto, float16, bfloat16, float32")
@click.option("--engine", type=click.Choice(["auto", "transformers", "vllm"]))
@click.option("--dataset-path", help="where this host sees the dataset")
@click.option("--exit-when-done", is_flag=True, default=None, help="stop when nothing is left")
@click.option(
    "--allow-remote-code",
    is_flag=True,
    default=None,
    help="let the orchestrator's job turn on trust_remote_code (off by default)",
)
@click.option(
    "--ack-log",
    type=click.Path(dir_okay=False),
    help="append one JSON line per acknowledged item to this file",
)
def worker(config_path: str | None, **flags: Any) -> None:
    """Caption chunks leased by an orchestrator."""
    config = worker_config(config_path, flags)
    if config.gpu_id is not None:
        # Before anything imports torch or vLLM, so CUDA only ever sees this GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(config.gpu_id)
    from caption_flow.worker.client import Worker

    async def work() -> None:
        w = Worker(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, w.stop)
        await w.run()

    _run(work())


def _run_and_report(orch_cfg: Any, worker_cfg: Any) -> None:
    from caption_flow.cli.progress import ItemsProgress, summary_table
    from caption_flow.runner import run_local
    from caption_flow.storage.reader import sample_captions

    with ItemsProgress(console) as bar:
        summary = _run(run_local(orch_cfg, worker_cfg, progress=bar.update))
    field = orch_cfg.vllm.output_field
    samples = sample_captions(Path(summary.output_dir), field=field)
    Console().print(summary_table(summary, samples))


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option("--dataset", help="image folder, tar shards or a Hugging Face dataset")
@click.option("--model", help="model id or local path")
@click.option("--data-dir", type=click.Path(file_okay=False), help="state and output folder")
@click.option("--prompt", "prompts", multiple=True, help="a prompt (repeat for several)")
@click.option("--batch-size", type=int, help="images per engine batch")
@click.option("--engine", type=click.Choice(["auto", "transformers", "vllm"]), default="auto")
@click.option("--port", type=int, default=0, help="port for the local orchestrator")
def run(
    config_path: str | None,
    dataset: str | None,
    model: str | None,
    data_dir: str | None,
    prompts: tuple[str, ...],
    batch_size: int | None,
    engine: str,
    port: int,
) -> None:
    """Orchestrator plus one local worker: caption a dataset on this machine."""
    overrides: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "vllm.model": model,
        "storage.data_dir": data_dir,
        "vllm.inference_prompts": list(prompts) or None,
        "vllm.batch_size": batch_size,
    }
    if dataset is not None:
        overrides["dataset.path"] = dataset
        overrides["dataset.type"] = dataset_type_for(dataset)
    orch_cfg = orchestrator_config(config_path, overrides)
    worker_cfg = worker_config(None, {"engine": engine, "name": "local"})
    _run_and_report(orch_cfg, worker_cfg)


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="caption-flow-demo")
@click.option("--images", type=int, default=48, help="how many images to generate")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers")
def demo(workdir: str, images: int, engine: str) -> None:
    """Caption generated images with a tiny local model: no GPU, no network."""
    from caption_flow.demo.run_demo import demo_configs

    console.print("[bold]captionflow demo[/]: building a tiny random model and test images")
    orch_cfg, worker_cfg = demo_configs(Path(workdir), images=images, engine=engine)
    _run_and_report(orch_cfg, worker_cfg)
    console.print(
        "The model is tiny and randomly initialised, so the captions are gibberish. "
        "With a real model id and a GPU, `caption-flow run --dataset DIR --model ID` "
        "captions for real."
    )


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option("--data-dir", type=click.Path(file_okay=False), help="state and output folder")
@click.option("--failed", is_flag=True, required=True, help="caption failed items and chunks again")
def requeue(config_path: str | None, data_dir: str | None, failed: bool) -> None:
    """Put failed items back in the queue (the orchestrator must be stopped; while it runs,
    an admin sends the `requeue` message instead)."""
    from caption_flow.storage.store import CaptionStore

    config = orchestrator_config(config_path, {"storage.data_dir": data_dir})

    async def reopen() -> None:
        store = CaptionStore(config.storage.data_dir)
        await store.start()
        try:
            reopened = await store.requeue_failed()
        finally:
            await store.close(flush=False)
        console.print(
            f"{reopened.item_count} failed items and {len(reopened.chunks)} failed chunks "
            "will be captioned at the next start of the orchestrator"
        )

    _run(reopen())


def main() -> None:
    try:
        cli(standalone_mode=True)
    except CaptionFlowError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
