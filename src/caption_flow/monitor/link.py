"""One line saying whether the monitor is connected, reconnecting or refused, and why."""

from __future__ import annotations

from textual.widgets import Static

from caption_flow.monitor.model import Link, MonitorView


class LinkStatus(Static):
    DEFAULT_CSS = """
    LinkStatus { height: auto; padding: 0 1; background: $boost; }
    LinkStatus.-reconnecting { background: $warning 40%; }
    LinkStatus.-refused { background: $error 60%; text-style: bold; }
    """

    def show(self, view: MonitorView) -> None:
        self.update(view.link_text())
        self.set_class(view.link == Link.RECONNECTING, "-reconnecting")
        self.set_class(view.link == Link.REFUSED, "-refused")
