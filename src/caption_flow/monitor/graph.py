"""Throughput over time, from the history the orchestrator keeps (so a late monitor sees
the past hours too)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline

from caption_flow.monitor.model import MonitorView, duration, throughput


class ThroughputGraph(Vertical):
    DEFAULT_CSS = """
    ThroughputGraph { height: auto; border: round $primary; padding: 0 1; }
    ThroughputGraph Sparkline { height: 5; }
    """

    def compose(self) -> ComposeResult:
        yield Label("items/s: no history yet", id="graph-title")
        yield Sparkline([], id="graph")

    def show(self, view: MonitorView) -> None:
        history = view.snapshot.get("history") or []
        rates = throughput(history)
        title = self.query_one("#graph-title", Label)
        if rates:
            span = history[-1][0] - history[0][0]
            title.update(
                f"items/s over the last {duration(span)}: peak {max(rates):.2f}, "
                f"latest {rates[-1]:.2f}"
            )
        else:
            title.update("items/s: no history yet")
        self.query_one(Sparkline).data = rates
