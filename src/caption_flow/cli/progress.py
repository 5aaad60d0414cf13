"""Rich progress bar and summary table for ``run`` and ``demo``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
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


def summary_table(summary: RunSummary, samples: list[tuple[str, str]]) -> Table:
    table = Table(title="captionflow run", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("items captioned", f"{summary.items_done} of {summary.items_total}")
    table.add_row("items failed", str(summary.items_failed))
    table.add_row("chunks", ", ".join(f"{k} {v}" for k, v in summary.chunks.items() if v))
    table.add_row("time", f"{summary.elapsed_s:.1f} s ({summary.items_per_s:.1f} items/s)")
    table.add_row("output (Parquet)", summary.output_dir)
    for key, caption in samples:
        table.add_row(f"sample: {key}", caption)
    return table
