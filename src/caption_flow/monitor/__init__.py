"""The Textual monitor: a view model fed by the orchestrator's stats, one widget per file."""

from caption_flow.monitor.app import MonitorApp
from caption_flow.monitor.feed import StatsFeed, fetch_snapshot
from caption_flow.monitor.model import MonitorView, as_text

__all__ = ["MonitorApp", "MonitorView", "StatsFeed", "as_text", "fetch_snapshot"]
