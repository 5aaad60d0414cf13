"""``caption-flow export`` and ``caption-flow stats``: flags in, the export package does the work.

Both read only what ``state.db`` records as output and take no lock, so they run while the
orchestrator runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from caption_flow.cli.configs import orchestrator_config
from caption_flow.cli.logs import console, verbose_option
from caption_flow.errors import ConfigError

log = logging.getLogger(__name__)

DATA_DIR_HELP = "the orchestrator's state and output folder"


def _data_dir(config_path: str | None, data_dir: str | None) -> tuple[Path, Any]:
    """The data directory and, with --config, the orchestrator config."""
    if config_path is None:
        return Path(data_dir or "./caption_data"), None
    config = orchestrator_config(config_path, {"storage.data_dir": data_dir})
    return Path(config.storage.data_dir), config


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--since {value!r}: give a date or time such as 2025-01-31 or 2025-01-31T12:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@click.command("export")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "jsonl", "txt", "webdataset", "huggingface"]),
    required=True,
    help="parquet: files of --rows-per-file rows; jsonl: one line per item (.gz compresses); "
    "txt: a caption file per image; webdataset: tar shards with the images and captions; "
    "huggingface: parquet shards and a dataset card pushed to --repo",
)
@click.option(
    "--output",
    type=click.Path(),
    help="folder (parquet, webdataset, txt) or file (jsonl); txt without it writes beside "
    "the images of a folder dataset",
)
@click.option("--fields", help="output fields to export, comma-separated (default: all)")
@click.option("--include-failed", is_flag=True, help="export failed items too (with their error)")
@click.option("--where", help="a DuckDB filter on the row, such as 'len(captions[1]) > 20'")
@click.option("--limit", type=click.IntRange(min=0), help="at most this many items")
@click.option("--contributor", "contributors", multiple=True, help="only this contributor's items")
@click.option("--since", help="only items stored at or after this time (ISO 8601, UTC)")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=100_000, help="parquet")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, help="webdataset: items")
@click.option("--field", help="txt, webdataset: the field captions come from (default: captions)")
@click.option(
    "--caption",
    type=click.Choice(["first", "longest", "all"]),
    default="first",
    help="txt, webdataset: the first non-empty caption, the longest, or all (blank-line joined)",
)
@click.option(
    "--json-fields",
    help="jsonl: fields whose captions are JSON (a job's output_schema), comma-separated; "
    "written as parsed JSON values instead of strings",
)
@click.option("--overwrite", is_flag=True, help="replace existing caption files and exports")
@click.option(
    "--dataset-path", help="where this host sees the dataset (txt beside images, webdataset)"
)
@click.option("--repo", help="huggingface: the dataset repo, org/name")
@click.option("--private", is_flag=True, help="huggingface: create the repo private")
@click.option("--license", "license_id", help="huggingface: the card's licence id (e.g. cc-by-4.0)")
@verbose_option
def export_command(
    config_path: str | None,
    data_dir: str | None,
    fmt: str,
    output: str | None,
    fields: str | None,
    include_failed: bool,
    where: str | None,
    limit: int | None,
    contributors: tuple[str, ...],
    since: str | None,
    rows_per_file: int,
    shard_size: int,
    field: str | None,
    caption: Any,
    overwrite: bool,
    json_fields: str | None,
    dataset_path: str | None,
    repo: str | None,
    private: bool,
    license_id: str | None,
) -> None:
    """Write the committed captions out as parquet, jsonl, caption files or webdataset, or
    push them to a Hugging Face dataset repo."""
    from caption_flow.export import Selection, WriterOptions, export, recorded_dataset

    folder, config = _data_dir(config_path, data_dir)
    dataset = (config.dataset if config is not None else None) or recorded_dataset(folder)
    if dataset is not None and dataset_path is not None:
        dataset = dataset.model_copy(update={"path": dataset_path})
    selection = Selection(
        fields=tuple(f.strip() for f in fields.split(",") if f.strip()) if fields else None,
        include_failed=include_failed,
        where=where,
        limit=limit,
        contributors=contributors,
        since=_since(since),
    )
    options = WriterOptions(
        output=Path(output) if output else None,
        rows_per_file=rows_per_file,
        shard_size=shard_size,
        field=field,
        caption=caption,
        overwrite=overwrite,
        dataset=dataset,
        json_fields=tuple(f.strip() for f in (json_fields or "").split(",") if f.strip()),
    )
    with Progress(
        TextColumn("[bold]exporting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("export", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if fmt == "huggingface":
            _push(
                folder,
                repo,
                output,
                selection,
                rows_per_file,
                private,
                license_id,
                config,
                progress,
            )
            return
        result = export(folder, fmt, selection, options, progress)
    where_to = ", ".join(str(p) for p in result.files[:3]) + (
        " ..." if len(result.files) > 3 else ""
    )
    console.print(f"exported {result.rows} item(s) as {fmt} to {escape(where_to or '-')}")
    for reason, n in result.skipped.items():
        console.print(f"  {n} item(s) left out: {escape(reason)}")


def _push(
    folder: Path,
    repo: str | None,
    output: str | None,
    selection: Any,
    rows_per_file: int,
    private: bool,
    license_id: str | None,
    config: Any,
    progress: Callable[[int, int], None],
) -> None:
    from caption_flow.export.hub import push

    if not repo:
        raise ConfigError("--format huggingface needs --repo org/name")
    staging = Path(output) if output else Path(f"hf-export-{repo.replace('/', '--')}")
    result = push(
        folder,
        repo,
        staging,
        selection,
        private=private,
        config=config,
        license_id=license_id,
        rows_per_file=rows_per_file,
        progress=progress,
    )
    console.print(
        f"pushed {result.rows} item(s) to {escape(repo)}: {len(result.uploaded)} shard(s) "
        f"uploaded, {len(result.already_there)} already there, {len(result.removed)} stale "
        f"removed (local copy: {escape(str(staging))})"
    )


@click.command("publish")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@click.option(
    "--to",
    "target",
    required=True,
    help="huggingface (with --repo), or an fsspec URL or path: s3://bucket/run, gs://..., /mnt/b",
)
@click.option("--repo", help="the hub dataset repo, org/name (created private if missing)")
@click.option("--every", type=click.FloatRange(min=1), default=600.0, help="seconds between rounds")
@click.option("--once", is_flag=True, help="one round, then exit (for cron)")
@verbose_option
def publish_command(
    config_path: str | None,
    data_dir: str | None,
    target: str,
    repo: str | None,
    every: float,
    once: bool,
) -> None:
    """Copy each new part (and the contributors and jobs tables) off this machine as the run
    grows: resumable, beside a running orchestrator, until Ctrl-C."""
    import signal
    import threading

    from caption_flow.export.publish import Publisher

    folder, _ = _data_dir(config_path, data_dir)
    publisher = Publisher(folder, target, repo=repo, every_s=every)
    if once:
        done = publisher.publish_once()
        console.print(f"published {len(done.copied)} file(s), removed {len(done.removed)}")
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    publisher.start()
    console.print(f"publishing {escape(str(folder))} to {escape(repo or target)} every {every:g} s")
    while not stop.wait(1.0):
        pass
    publisher.stop()


@click.command("stats")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
@verbose_option
def stats_command(config_path: str | None, data_dir: str | None, as_json: bool) -> None:
    """Counts, caption lengths per field and prompt, failures and contributors of a run."""
    from caption_flow.export import collect_stats

    folder, _ = _data_dir(config_path, data_dir)
    stats = collect_stats(folder)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    out = Console()
    counts = Table(title="items", show_header=False)
    for key in ("items_total", "items_done", "items_in_journal", "rows", "rows_failed", "parts"):
        counts.add_row(key.replace("_", " "), f"{stats[key]:,}")
    out.print(counts)
    for name, prompts in stats["captions"].items():
        table = Table(title=f"caption length (characters): {name}")
        for column in ("prompt", "texts", "empty", "min", "median", "p90", "max"):
            table.add_column(column, justify="right")
        for p in prompts:
            table.add_row(
                *(
                    _figure(p[c])
                    for c in ("prompt", "texts", "empty", "min", "median", "p90", "max")
                )
            )
        out.print(table)
    if stats["failures"]:
        table = Table(title="failures by reason")
        table.add_column("count", justify="right")
        table.add_column("reason")
        for f in stats["failures"]:
            table.add_row(f"{f['count']:,}", escape(f["reason"]))
        out.print(table)
    table = Table(title="contributors")
    for column in ("contributor", "rows", "failed"):
        table.add_column(column, justify="right" if column != "contributor" else "left")
    for c in stats["contributors"]:
        table.add_row(escape(str(c["contributor"])), f"{c['rows']:,}", f"{c['failed']:,}")
    out.print(table)


def _figure(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"
