"""The contributors' leaderboard, as the orchestrator counts it (``contributors`` key)."""

from __future__ import annotations

from textual.widgets import DataTable

from caption_flow.monitor.model import MonitorView, contributor_columns, contributor_rows
from caption_flow.monitor.table_sync import sync_rows


class ContributorsTable(DataTable[str]):
    DEFAULT_CSS = """
    ContributorsTable { height: 1fr; border: round $primary; }
    """

    def __init__(self, view: MonitorView, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.border_title = "contributors"
        self.add_columns(*contributor_columns(view.config))

    def show(self, view: MonitorView) -> None:
        if "contributors" not in view.snapshot:
            self.border_title = "contributors (not reported by this orchestrator)"
        else:
            self.border_title = "contributors"
        sync_rows(self, contributor_rows(view.snapshot, view.config))
