"""``caption-flow monitor``: the Textual app.

The stats feed (:mod:`caption_flow.monitor.feed`) posts each snapshot and each change of the
connection as a message; the handlers update the view model, and the widgets are redrawn
from it at most every ``refresh_rate`` seconds (the connection line at once).
"""

from __future__ import annotations

from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, Header

from caption_flow.config.models import MonitorConfig
from caption_flow.monitor.activity import ActivityTable
from caption_flow.monitor.buffer import BufferPanel
from caption_flow.monitor.contributors import ContributorsTable
from caption_flow.monitor.feed import StatsFeed
from caption_flow.monitor.graph import ThroughputGraph
from caption_flow.monitor.link import LinkStatus
from caption_flow.monitor.model import MonitorView
from caption_flow.monitor.progress import ProgressPanel
from caption_flow.monitor.workers import WorkersTable


class SnapshotReceived(Message):
    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__()
        self.snapshot = snapshot


class LinkChanged(Message):
    def __init__(self, link: str, detail: str) -> None:
        super().__init__()
        self.link = link
        self.detail = detail


class MonitorApp(App[None]):
    """Live view of one orchestrator. ``live=False`` shows ``snapshot`` and connects to
    nothing (layout tests, screenshots)."""

    TITLE = "captionflow monitor"
    CSS = """
    #top { height: auto; }
    #top > ProgressPanel { width: 1fr; }
    #top > ThroughputGraph { width: 1fr; }
    #bottom { height: 1fr; }
    #bottom > * { width: 1fr; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("r", "reconnect", "Reconnect now"),
    ]

    def __init__(
        self,
        config: MonitorConfig,
        *,
        live: bool = True,
        snapshot: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.view = MonitorView(config)
        if snapshot is not None:
            self.view.take(snapshot)
        self.live = live
        self.feed = StatsFeed(
            config,
            on_snapshot=lambda s: self.post_message(SnapshotReceived(s)),
            on_link=lambda link, detail: self.post_message(LinkChanged(link, detail)),
        )
        self._dirty = snapshot is not None

    def compose(self) -> ComposeResult:
        config = self.view.config
        yield Header()
        yield LinkStatus(id="link")
        with Horizontal(id="top"):
            yield ProgressPanel(id="progress")
            graph = ThroughputGraph(id="graph-panel")
            graph.display = config.show_throughput_graph
            yield graph
        yield BufferPanel(id="buffer")
        yield WorkersTable(self.view, id="workers")
        with Horizontal(id="bottom"):
            contributors = ContributorsTable(self.view, id="contributors")
            contributors.display = config.show_contributors
            yield contributors
            activity = ActivityTable(id="activity")
            activity.display = config.max_activity_items > 0
            yield activity
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(LinkStatus).show(self.view)
        self.redraw()
        self.set_interval(self.view.config.refresh_rate, self._redraw_if_changed)
        if self.live:
            self.run_worker(self.feed.run(), name="stats-feed", exclusive=True)

    def on_snapshot_received(self, message: SnapshotReceived) -> None:
        self.view.take(message.snapshot)
        if self.view.updates == 1:  # the first one without waiting for the timer
            self.redraw()
        else:
            self._dirty = True

    def on_link_changed(self, message: LinkChanged) -> None:
        self.view.set_link(message.link, message.detail)
        self.query_one(LinkStatus).show(self.view)

    def _redraw_if_changed(self) -> None:
        if self._dirty:
            self.redraw()

    def redraw(self) -> None:
        """Show the view model's snapshot in every widget."""
        self._dirty = False
        self.query_one(ProgressPanel).show(self.view)
        self.query_one(ThroughputGraph).show(self.view)
        self.query_one(BufferPanel).show(self.view)
        self.query_one(WorkersTable).show(self.view)
        self.query_one(ContributorsTable).show(self.view)
        self.query_one(ActivityTable).show(self.view)

    def action_reconnect(self) -> None:
        self.feed.retry_now()
