"""Rich progress bar and summary table for ``run`` and ``demo``."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from caption_flow.runner import RunSummary


class ItemsProgress:
    """A progress bar fed with orchestrator snapshots."""

    def __init__(self, console: Console, description: str = "captioning") -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} items/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(description, total=None, rate=0.0)

    def __enter__(self) -> ItemsProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, snapshot: dict[str, Any]) -> None:
        self.progress.update(
            self.task,
            total=snapshot["items_total"] or None,
            completed=snapshot["items_done"],
            rate=snapshot["rate"],
        )


def summary_table(summary: RunSummary, samples: list[tuple[str, str]]) -> RenderableType:
    """The run's figures (the orchestrator's definitions: captioned + failed = done), then
    the top failure reasons with a few keys each."""
    table = Table(title="captionflow run", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("items captioned", f"{summary.items_captioned} of {summary.items_total}")
    table.add_row("items failed", str(summary.items_failed))
    left = summary.items_total - summary.items_done
    if left:
        table.add_row("items not done", f"{left} (their chunks failed or were not finished)")
    table.add_row("chunks", ", ".join(f"{k} {v}" for k, v in summary.chunks.items() if v))
    table.add_row("time", _timing(summary))
    table.add_row("output (Parquet)", summary.output_dir)
    for key, caption in samples:
        table.add_row(f"sample: {key}", caption)
    if not summary.failures:
        return table
    failures = Table(title="failures (top reasons)", show_header=True)
    failures.add_column("items", justify="right")
    failures.add_column("reason")
    failures.add_column("for example")
    for reason in summary.failures:
        failures.add_row(str(reason.count), reason.reason, ", ".join(reason.examples))
    return Group(table, failures)


def _timing(summary: RunSummary) -> str:
    """Throughput of this run only; none when it found nothing to do."""
    if summary.nothing_left:
        return (
            f"{summary.elapsed_s:.1f} s (nothing left to do: an earlier run finished this dataset)"
        )
    before = f", {summary.items_done_before} done before" if summary.items_done_before else ""
    return (
        f"{summary.elapsed_s:.1f} s ({summary.items_this_run} items this run, "
        f"{summary.items_per_s:.1f} items/s{before})"
    )
