"""Recent activity: connections, disconnections, failures, config changes, revocations."""

from __future__ import annotations

from textual.widgets import DataTable

from caption_flow.monitor.model import MonitorView, activity_rows


class ActivityTable(DataTable[str]):
    DEFAULT_CSS = """
    ActivityTable { height: 1fr; border: round $primary; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="none", show_cursor=False, **kwargs)  # type: ignore[arg-type]
        self.border_title = "recent activity"
        self.add_columns("time", "kind", "what")
        self._shown: list[list[str]] = []

    def show(self, view: MonitorView) -> None:
        rows = activity_rows(view.snapshot, view.config.max_activity_items)
        if rows != self._shown:  # newest first: the whole list shifts, so redraw it
            self._shown = rows
            self.clear()
            self.add_rows(rows)
