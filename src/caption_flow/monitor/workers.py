"""Connected workers and dataworkers: who, on what, how busy, holding which chunk, last heard
when."""

from __future__ import annotations

from textual.widgets import DataTable

from caption_flow.monitor.model import MonitorView, worker_columns, worker_rows
from caption_flow.monitor.table_sync import sync_rows


class WorkersTable(DataTable[str]):
    DEFAULT_CSS = """
    WorkersTable { height: 1fr; border: round $primary; }
    """

    def __init__(self, view: MonitorView, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.border_title = "workers"
        self.add_columns(*worker_columns(view.config))

    def show(self, view: MonitorView) -> None:
        rows = worker_rows(view.snapshot, view.config)
        sessions = view.snapshot.get("sessions") or []
        data = sum(1 for s in sessions if s.get("role") == "dataworker")
        title = f"workers ({len(rows) - data})"
        self.border_title = f"{title} and dataworkers ({data})" if data else title
        sync_rows(self, rows)
