"""The monitor's view model: what the widgets show, derived from the latest snapshot.

The stats feed updates it; widgets only read it. Everything here is plain data and pure
functions of a snapshot (the orchestrator's ``stats``, see ``Orchestrator.snapshot``), so
the same text serves ``caption-flow monitor --once`` and the tests can check it directly.
Keys a snapshot lacks (an older orchestrator) show as blanks, never as errors.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from caption_flow.config.models import MonitorConfig

CHUNK_STATES = ("pending", "leased", "done", "failed")
WORKER_ROLES = ("worker", "dataworker")


class Link:
    """Connection states the status line shows."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    REFUSED = "refused"


@dataclass
class MonitorView:
    """The latest snapshot and the state of the connection that brought it."""

    config: MonitorConfig
    snapshot: dict[str, Any] = field(default_factory=dict)
    link: str = Link.CONNECTING
    detail: str = ""  # why we are reconnecting or were refused
    connects: int = 0  # successful connections so far (more than one: it reconnected)
    updates: int = 0  # snapshots received

    def take(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.updates += 1

    def set_link(self, link: str, detail: str = "") -> None:
        if link == Link.CONNECTED:
            self.connects += 1
        self.link, self.detail = link, detail

    def link_text(self) -> str:
        server = self.config.server
        if self.link == Link.CONNECTED:
            again = " (reconnected)" if self.connects > 1 else ""
            return f"connected to {server}{again}"
        if self.link == Link.RECONNECTING:
            return f"orchestrator at {server} unreachable: {self.detail}; reconnecting"
        if self.link == Link.REFUSED:
            return f"refused by {server}: {self.detail}"
        return f"connecting to {server}..."


# -- formatting ---------------------------------------------------------------------------
def number(value: Any) -> str:
    """An integer count with thousands separators; blank when absent."""
    return "" if value is None else f"{int(value):,}"


def duration(seconds: float | None) -> str:
    """``3m 05s``, ``2h 07m``, ``1d 04h``; ``unknown`` for None."""
    if seconds is None:
        return "unknown"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def clock(unix: float) -> str:
    """Local wall-clock time of day."""
    return time.strftime("%H:%M:%S", time.localtime(unix))


# -- sections ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    done: int
    failed: int
    captioned: int
    total: int
    chunks: dict[str, int]
    rate: float
    rate_avg: float
    eta_s: float | None
    workers: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def progress(snapshot: dict[str, Any]) -> Progress:
    chunks = snapshot.get("chunks") or {}
    return Progress(
        done=int(snapshot.get("items_done", 0)),
        failed=int(snapshot.get("items_failed", 0)),
        captioned=int(snapshot.get("items_captioned", 0)),
        total=int(snapshot.get("items_total", 0)),
        chunks={state: int(chunks.get(state, 0)) for state in CHUNK_STATES},
        rate=float(snapshot.get("rate", 0.0)),
        rate_avg=float(snapshot.get("rate_avg", 0.0)),
        eta_s=snapshot.get("eta_s"),
        workers=int(snapshot.get("workers", 0)),
    )


def throughput(history: list[list[float]]) -> list[float]:
    """Items per second in each interval between history points (``[[t, done], ...]``);
    a requeue that lowered the total counts as zero, not as negative throughput."""
    rates = []
    for (t0, done0), (t1, done1) in itertools.pairwise(history):
        span = t1 - t0
        rates.append(max(0.0, (done1 - done0) / span) if span > 0 else 0.0)
    return rates


# The role column: what a row's items/s and done count. A worker's items are captioned, a
# dataworker's are prepared (read and decoded for GPU workers), so its row says so.
ROLE_LABELS = {"worker": "caption", "dataworker": "data"}


def worker_columns(config: MonitorConfig) -> list[str]:
    columns = ["worker", "role", "contributor", "engine / model", "gpu"]
    if config.show_worker_queues:
        columns += ["queued", "unacked"]
    return [*columns, "items/s", "busy", "chunk", "done", "heartbeat"]


def worker_rows(snapshot: dict[str, Any], config: MonitorConfig) -> dict[str, list[str]]:
    """One row per connected worker and dataworker, keyed by session id. A dataworker
    captions nothing: its items/s is images prepared per second, its engine cell the MB/s
    it sends, its done count the items it prepared."""
    rows: dict[str, list[str]] = {}
    for s in snapshot.get("sessions") or []:
        role = s.get("role")
        if role not in WORKER_ROLES:
            continue
        data = role == "dataworker"
        engine = " / ".join(x for x in (s.get("engine"), s.get("model")) if x)
        if data and s.get("mb_per_s") is not None:
            engine = f"prepares: {float(s['mb_per_s']):.1f} MB/s out"
        row = [
            str(s.get("name", "")),
            ROLE_LABELS[role],
            str(s.get("contributor", "")),
            engine,
            str(s.get("gpu", "")),
        ]
        if config.show_worker_queues:
            queued = s.get("queued_chunks")
            if queued is not None and s.get("queued_items") is not None:
                row.append(f"{int(queued)} ({int(s['queued_items'])} items)")
            else:
                row.append(number(queued))
            row.append(number(s.get("unacked")))
        rate, busy, age = s.get("items_per_s"), s.get("engine_busy"), s.get("heartbeat_age_s")
        row += [
            "" if rate is None else f"{float(rate):.2f}",
            "" if busy is None else f"{float(busy):.0%}",
            str(s.get("current_chunk") or ""),
            number(s.get("prepared" if data else "items_done")),
            "none yet" if age is None else f"{duration(age)} ago",
        ]
        rows[str(s.get("session", s.get("name", "")))] = row
    return rows


def contributor_columns(config: MonitorConfig) -> list[str]:
    columns = ["contributor", "captions", "items", "share"]
    if config.show_quality_metrics:
        columns += ["failed", "trust"]
    return columns


def contributor_rows(snapshot: dict[str, Any], config: MonitorConfig) -> dict[str, list[str]]:
    """The leaderboard, largest share first (the orchestrator's ``contributors`` key)."""
    rows: dict[str, list[str]] = {}
    entries = sorted(
        snapshot.get("contributors") or [],
        key=lambda c: (-float(c.get("items") or 0), str(c.get("contributor"))),
    )
    for c in entries:
        share = c.get("share")
        row = [
            str(c.get("contributor", "")),
            number(c.get("captions")),
            number(c.get("items")),
            "" if share is None else f"{float(share):.1%}",
        ]
        if config.show_quality_metrics:
            trust = c.get("trust_level")
            row += [number(c.get("failed")), "" if trust is None else str(trust)]
        rows[str(c.get("contributor", ""))] = row
    return rows


@dataclass(frozen=True)
class Buffer:
    """The orchestrator's buffer of prepared items (``prepared`` key; older orchestrators
    have none)."""

    items: int
    memory_bytes: int
    memory_limit: int
    disk_bytes: int
    disk_limit: int
    relayed: int  # items sent on to GPU workers, prepared by dataworkers
    served: int  # items the orchestrator read and prepared itself
    dataworkers: int


def buffer(snapshot: dict[str, Any]) -> Buffer | None:
    raw = snapshot.get("prepared")
    if not isinstance(raw, dict):
        return None
    return Buffer(**{name: int(raw.get(name) or 0) for name in Buffer.__dataclass_fields__})


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def fill(used: int, limit: int) -> str:
    """``12.0 MiB / 64.0 MiB (19%)``; no percentage without a ceiling."""
    share = f" ({used / limit:.0%})" if limit > 0 else ""
    return f"{mib(used)} / {mib(limit)}{share}"


def buffer_counts(b: Buffer) -> str:
    plural = "" if b.dataworkers == 1 else "s"
    return (
        f"relayed {b.relayed:,}, served by orchestrator {b.served:,}; "
        f"{b.dataworkers} dataworker{plural}"
    )


def buffer_line(b: Buffer) -> str:
    """The buffer in one line, for ``--once``."""
    memory, disk = fill(b.memory_bytes, b.memory_limit), fill(b.disk_bytes, b.disk_limit)
    return (
        f"prepared buffer: {b.items:,} items, {memory} in memory, {disk} on disk; "
        f"{buffer_counts(b)}"
    )


def activity_rows(snapshot: dict[str, Any], limit: int) -> list[list[str]]:
    """The newest ``limit`` activity entries, newest first."""
    entries = list(snapshot.get("activity") or [])[-limit:] if limit > 0 else []
    return [
        [clock(float(e.get("t", 0))), str(e.get("kind", "")), str(e.get("text", ""))]
        for e in reversed(entries)
    ]


# -- plain text (``--once``) -----------------------------------------------------------------
def as_text(snapshot: dict[str, Any], config: MonitorConfig) -> str:
    """One snapshot as plain text for scripts: ``key: value`` lines, then the tables."""
    p = progress(snapshot)
    lines = [f"items done: {p.done} of {p.total} ({p.fraction:.1%})"]
    if config.show_quality_metrics:
        lines.append(f"captioned: {p.captioned}")
        lines.append(f"failed: {p.failed}")
    if config.show_chunk_progress:
        lines.append("chunks: " + ", ".join(f"{k} {v}" for k, v in p.chunks.items()))
    lines.append(f"items/s: {p.rate:.2f} now, {p.rate_avg:.2f} average")
    lines.append(f"eta: {duration(p.eta_s)}")
    lines.append(f"workers: {p.workers}")
    prepared = buffer(snapshot)
    if prepared is not None:
        lines.append(buffer_line(prepared))
    lines.append(f"model: {snapshot.get('model', '')}")
    sections = [
        ("workers", worker_columns(config), list(worker_rows(snapshot, config).values())),
    ]
    if config.show_contributors and snapshot.get("contributors") is not None:
        rows = list(contributor_rows(snapshot, config).values())
        sections.append(("contributors", contributor_columns(config), rows))
    if config.max_activity_items:
        rows = activity_rows(snapshot, config.max_activity_items)
        sections.append(("activity", ["time", "kind", "what"], rows))
    for title, columns, rows in sections:
        if rows:
            lines += ["", f"{title}:", "\t".join(columns), *("\t".join(r) for r in rows)]
    return "\n".join(lines)
