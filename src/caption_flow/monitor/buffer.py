"""The orchestrator's prepared-item buffer: how full it is in memory and on disk, where its
items went, how many dataworkers feed it. Hidden when the orchestrator reports none."""

from __future__ import annotations

from rich.progress_bar import ProgressBar
from rich.table import Table
from textual.widgets import Static

from caption_flow.monitor.model import MonitorView, buffer, buffer_counts, fill

BAR_WIDTH = 30


def gauge(used: int, limit: int) -> Table:
    """A fill bar and its figures, side by side."""
    row = Table.grid(padding=(0, 2))
    row.add_row(
        ProgressBar(total=max(limit, 1), completed=min(used, max(limit, 1)), width=BAR_WIDTH),
        fill(used, limit),
    )
    return row


class BufferPanel(Static):
    DEFAULT_CSS = """
    BufferPanel { height: auto; padding: 0 1; border: round $primary; }
    """

    def on_mount(self) -> None:
        self.border_title = "prepared buffer"

    def show(self, view: MonitorView) -> None:
        b = buffer(view.snapshot)
        self.display = b is not None
        if b is None:
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("items", f"{b.items:,} waiting; {buffer_counts(b)}")
        grid.add_row("memory", gauge(b.memory_bytes, b.memory_limit))
        grid.add_row("disk", gauge(b.disk_bytes, b.disk_limit))
        self.update(grid)
