"""Progress: items done, failed and total, chunks by state, speed now and averaged, ETA."""

from __future__ import annotations

from rich.progress_bar import ProgressBar
from rich.table import Table
from textual.widgets import Static

from caption_flow.monitor.model import MonitorView, duration, progress


class ProgressPanel(Static):
    """A small key/value grid with a bar; redrawn from the view model."""

    DEFAULT_CSS = """
    ProgressPanel { height: auto; padding: 0 1; border: round $primary; }
    """

    def on_mount(self) -> None:
        self.border_title = "progress"

    def show(self, view: MonitorView) -> None:
        p = progress(view.snapshot)
        config = view.config
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row(
            "items",
            f"{p.done:,} of {p.total:,} done ({p.fraction:.1%})",
        )
        grid.add_row("", ProgressBar(total=max(p.total, 1), completed=p.done, width=40))
        if config.show_quality_metrics:
            grid.add_row("captioned", f"{p.captioned:,}   failed {p.failed:,}")
        if config.show_chunk_progress:
            grid.add_row("chunks", "   ".join(f"{k} {v:,}" for k, v in p.chunks.items()))
        grid.add_row("items/s", f"{p.rate:.2f} now   {p.rate_avg:.2f} average")
        eta = "finished" if p.total and p.done >= p.total else duration(p.eta_s)
        grid.add_row("eta", eta)
        grid.add_row("workers", str(p.workers))
        self.update(grid)
