"""``caption-flow``: one click group, one small function per subcommand."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from caption_flow.cli.admin import admin, contributors, status
from caption_flow.cli.certs import generate_cert, inspect_cert
from caption_flow.cli.configs import (
    dataset_type_for,
    dataworker_config,
    orchestrator_config,
    tls_overrides,
    worker_config,
)
from caption_flow.cli.export import export_command, publish_command, stats_command
from caption_flow.cli.logs import console, verbose_option
from caption_flow.cli.monitor import monitor
from caption_flow.cli.preflight import check_port_free, port_error
from caption_flow.cli.scan import scan_chunks_command
from caption_flow.errors import CaptionFlowError
from caption_flow.sources.check import check_dataset

log = logging.getLogger(__name__)

FROM_CONFIG = "config file"
CONFIG_HELP = "YAML file (default: the first found, see the README; the one used is logged)"
RUN_CONFIG_HELP = (
    "YAML file with an orchestrator section (default: the first found, ./examples "
    "excluded; the one used is logged)"
)


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _serve(make_client: Callable[[], Any]) -> None:
    """Run a worker or dataworker (made inside the event loop) until it stops; SIGINT and
    SIGTERM ask it to stop cleanly."""

    async def serve() -> None:
        client = make_client()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, client.stop)
        await client.run()

    _run(serve())


class _Group(click.Group):
    """The original tool's command names (``scan_chunks``, ``generate_cert``) work as hidden
    aliases of ours (``scan-chunks``): one rule for every command, present and future."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and "_" in cmd_name:
            found = super().get_command(ctx, cmd_name.replace("_", "-"))
        return found


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option("-v", "--verbose", count=True, help="-v: progress logs, -vv: debug")
@click.version_option(package_name="caption-flow")
def cli(verbose: int) -> None:
    """Caption very large image datasets with vision-language models on many GPUs."""
    # Logging is set up by each subcommand's own -v, which adds this count to its own.


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--host", help="address to listen on", show_default=FROM_CONFIG + ", else 0.0.0.0")
@click.option(
    "--port",
    type=int,
    help="port to listen on (0: any free port)",
    show_default=FROM_CONFIG + ", else 8765",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="state and output folder",
    show_default=FROM_CONFIG + ", else ./caption_data",
)
@click.option(
    "--force-new-dataset",
    is_flag=True,
    default=None,
    help="if the data directory holds another dataset's run, move that run (state.db, "
    "captions/) aside into DATA_DIR/replaced/<time>/ and start a new one; nothing is deleted "
    "(without it, such a directory is refused)",
)
@click.option("--cert", type=click.Path(dir_okay=False), help="TLS certificate (fullchain.pem)")
@click.option("--key", type=click.Path(dir_okay=False), help="TLS private key (privkey.pem)")
@click.option(
    "--no-ssl", is_flag=True, help="serve plain ws:// even if the config names a certificate"
)
@click.option(
    "--vllm",
    is_flag=True,
    help="accepted for the original tool's command lines: each worker chooses its engine",
)
@verbose_option
def orchestrator(
    config_path: str | None,
    host: str | None,
    port: int | None,
    data_dir: str | None,
    force_new_dataset: bool | None,
    cert: str | None,
    key: str | None,
    no_ssl: bool,
    vllm: bool,
) -> None:
    """Serve a dataset to workers and store their captions."""
    from caption_flow.orchestrator.server import Orchestrator

    config = orchestrator_config(
        config_path,
        {
            "host": host,
            "port": port,
            "storage.data_dir": data_dir,
            "storage.force_new_dataset": force_new_dataset,
            **tls_overrides(cert, key, no_ssl),
        },
    )
    if vllm:
        log.info(
            "--vllm: every worker chooses its engine (worker --vllm or engine: vllm); "
            "the orchestrator serves both"
        )
    check_dataset(config.dataset)
    check_port_free(config.host, config.port)

    async def serve() -> None:
        orch = Orchestrator(config)
        try:
            await orch.start()
        except OSError as exc:
            clear = port_error(exc, config.host, config.port)
            if clear is None:
                raise
            await orch.stop()
            raise clear from None
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
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--server", help="orchestrator URL, ws://host:port or wss://host:port")
@click.option("--token", help="worker token")
@click.option("--name", help="worker name shown in the monitor")
@click.option("--gpu-id", type=int, help="pin this process to one GPU")
@click.option("--batch-size", type=int, help="images per engine batch (overrides the job)")
@click.option("--model", help="model to use instead of the orchestrator's")
@click.option("--precision", help="dtype: auto, float16, bfloat16, float32")
@click.option(
    "--engine",
    type=click.Choice(["auto", "transformers", "vllm", "openai"]),
    help="inference engine: auto is vLLM on a CUDA GPU with vLLM installed, else transformers; "
    "openai sends requests to the config's endpoints",
    show_default=FROM_CONFIG + ", else auto",
)
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
@click.option("--vllm", is_flag=True, help="use the vLLM engine (same as --engine vllm)")
@click.option(
    "--no-verify-ssl",
    is_flag=True,
    help="accept a certificate that cannot be verified (self-signed, in development)",
)
@click.option(
    "--gpus",
    help="start one worker process per GPU: all, or a list such as 0,1,3 (each gets "
    "--gpu-id N and the name NAME-gpuN; they stop together)",
)
@verbose_option
def worker(
    config_path: str | None, vllm: bool, no_verify_ssl: bool, gpus: str | None, **flags: Any
) -> None:
    """Caption chunks leased by an orchestrator."""
    if vllm:
        if flags["engine"] not in (None, "vllm"):
            raise click.UsageError(f"--vllm contradicts --engine {flags['engine']}")
        flags["engine"] = "vllm"
    if no_verify_ssl:
        flags["verify_ssl"] = False
    config = worker_config(config_path, flags)
    if gpus is not None:
        from caption_flow.cli.gpus import run_per_gpu

        sys.exit(run_per_gpu(gpus, config.name, click.get_current_context()))
    if config.gpu_id is not None:
        # Before anything imports torch or vLLM, so CUDA only ever sees this GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(config.gpu_id)
    from caption_flow.worker.client import Worker

    _serve(lambda: Worker(config))


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--server", help="orchestrator URL, ws://host:port or wss://host:port")
@click.option("--token", help="dataworker token")
@click.option("--name", help="name shown in the monitor")
@click.option("--dataset-path", help="where this host sees the dataset")
@click.option("--threads", type=int, help="images prepared at once (0: one per core)")
@click.option("--exit-when-done", is_flag=True, default=None, help="stop when nothing is left")
@click.option(
    "--no-verify-ssl",
    is_flag=True,
    help="accept a certificate that cannot be verified (self-signed, in development)",
)
@verbose_option
def dataworker(config_path: str | None, no_verify_ssl: bool, **flags: Any) -> None:
    """Prepare items (read, shrink, re-encode) for GPU workers without the dataset."""
    if no_verify_ssl:
        flags["verify_ssl"] = False
    config = dataworker_config(config_path, flags)
    from caption_flow.dataworker.client import DataWorker

    _serve(lambda: DataWorker(config))


def _check_models(job: Any) -> None:
    """A missing model folder or unreachable hub id fails here, before anything starts."""
    from caption_flow.engines.hub import loadable_location

    loadable_location(job.model, job.revision)
    for stage in job.stages:
        if stage.model is not None and stage.model != job.model:
            loadable_location(stage.model)


def _run_and_report(orch_cfg: Any, worker_cfg: Any) -> None:
    from caption_flow.cli.progress import ItemsProgress, summary_table
    from caption_flow.runner import run_local
    from caption_flow.storage.reader import sample_captions

    check_dataset(orch_cfg.dataset)
    check_port_free(orch_cfg.host, orch_cfg.port)
    _check_models(orch_cfg.vllm)
    try:
        with ItemsProgress(console) as bar:
            summary = _run(run_local(orch_cfg, worker_cfg, progress=bar.update))
    except OSError as exc:  # the port was taken between the check and the start
        clear = port_error(exc, orch_cfg.host, orch_cfg.port)
        if clear is None:
            raise
        raise clear from None
    field = orch_cfg.vllm.output_field
    samples = sample_captions(Path(summary.output_dir), field=field)
    Console().print(summary_table(summary, samples))


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=RUN_CONFIG_HELP)
@click.option(
    "--dataset",
    help="image folder, tar shards (.tar, pattern or folder of tars), a .parquet file or "
    "folder, or a Hugging Face dataset id",
    show_default=FROM_CONFIG + ", else ./images",
)
@click.option(
    "--model",
    help="model id or local path",
    show_default=FROM_CONFIG + ", else Qwen/Qwen2.5-VL-3B-Instruct",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="state and output folder",
    show_default=FROM_CONFIG + ", else ./caption_data",
)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="a prompt (repeat for several)",
    show_default=FROM_CONFIG,
)
@click.option(
    "--batch-size", type=int, help="images per engine batch", show_default=FROM_CONFIG + ", else 8"
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "transformers", "vllm"]),
    default="auto",
    help="inference engine: auto is vLLM on a CUDA GPU with vLLM installed, else transformers",
)
@click.option("--port", type=int, default=0, help="port for the local orchestrator (0: any free)")
@click.option(
    "--force-new-dataset",
    is_flag=True,
    default=None,
    help="if the data directory holds another dataset's run, move that run (state.db, "
    "captions/) aside into DATA_DIR/replaced/<time>/ and start a new one; nothing is deleted "
    "(without it, such a directory is refused)",
)
@verbose_option
def run(
    config_path: str | None,
    dataset: str | None,
    model: str | None,
    data_dir: str | None,
    prompts: tuple[str, ...],
    batch_size: int | None,
    engine: str,
    port: int,
    force_new_dataset: bool | None,
) -> None:
    """Orchestrator plus one local worker: caption a dataset on this machine."""
    overrides: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "vllm.model": model,
        "storage.data_dir": data_dir,
        "storage.force_new_dataset": force_new_dataset,
        "vllm.inference_prompts": list(prompts) or None,
        "vllm.batch_size": batch_size,
    }
    if dataset is not None:
        overrides["dataset.path"] = dataset
        overrides["dataset.type"] = dataset_type_for(dataset)
    # No ./examples fallback: run is new, and the sample's model and paths would surprise.
    orch_cfg = orchestrator_config(config_path, overrides, examples=False)
    worker_cfg = worker_config(None, {"engine": engine, "name": "local"}, examples=False)
    _run_and_report(orch_cfg, worker_cfg)


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="caption-flow-demo",
    help="folder for the tiny model, the images and the output (reused by the next demo)",
)
@click.option("--images", type=int, default=48, help="how many images to generate")
@click.option(
    "--engine",
    type=click.Choice(["transformers", "vllm"]),
    default="transformers",
    help="inference engine (vLLM is set up for this machine's CPU or GPU)",
)
@verbose_option
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
@verbose_option
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


cli.add_command(monitor)
cli.add_command(generate_cert)
cli.add_command(inspect_cert)
cli.add_command(scan_chunks_command, "scan-chunks")
cli.add_command(export_command, "export")
cli.add_command(stats_command, "stats")
cli.add_command(publish_command, "publish")
cli.add_command(admin)
cli.add_command(status)
cli.add_command(contributors)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except CaptionFlowError as exc:
        # One line, never wrapped or read as markup: it must survive a log file and grep.
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
