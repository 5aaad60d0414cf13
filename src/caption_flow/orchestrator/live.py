"""What the orchestrator shows of a run while it goes: one snapshot of live figures (for
monitors, the dashboard, ``status`` and the run summary), pushed to monitors every second and
logged as a status line every ``status_interval``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from caption_flow.orchestrator.activity import eta_seconds
from caption_flow.protocol.messages import Stats

if TYPE_CHECKING:
    from caption_flow.orchestrator.server import Orchestrator

log = logging.getLogger("caption_flow.orchestrator.server")


def snapshot(o: Orchestrator) -> dict[str, Any]:
    """Live figures. One definition everywhere (summary, /metrics, monitors): an item is
    done once its row is stored (captioned or failed for good), failed when that row has
    an error (``NO_TEXT`` included, counted from the output itself, so restarts and
    requeues keep it right), captioned when done and not failed."""
    assert o.book is not None and o.desk is not None
    failed = o.store.items_failed
    now = time.time()
    done, total = o.book.items_done, o.book.items_total
    rate_avg = o.history.average_rate(done, now)
    sessions = o.sessions.values()
    return {
        "items_total": total,
        "items_done": done,
        "items_failed": failed,
        "items_captioned": done - failed,
        "rate": round(o.desk.rate.rate(), 2),
        "rate_avg": round(rate_avg, 2),
        "eta_s": eta_seconds(total - done, rate_avg or o.desk.rate.rate()),
        "chunks": o.book.counts(),
        "workers": sum(1 for s in sessions if s.role == "worker"),
        "sessions": [s.describe() for s in sessions],
        "uptime_s": round(now - o.started_at, 1),
        "time": round(now, 3),
        "model": o.job.model,
        "prompts": list(o.job.inference_prompts),
        "history": o.history.points(),
        "activity": o.activity.recent(),
        "contributors": o.leaderboard.rows,
        "prepared": {
            **o.buffer.stats(),
            "dataworkers": sum(1 for s in sessions if s.role == "dataworker"),
        },
    }


async def status_loop(o: Orchestrator) -> None:
    """One log line of progress every ``status_interval`` seconds."""
    while True:
        await asyncio.sleep(o.config.status_interval)
        s = snapshot(o)
        log.info(
            "status: %d/%d items (%.1f/s), chunks %s, %d workers",
            s["items_done"],
            s["items_total"],
            s["rate"],
            s["chunks"],
            s["workers"],
        )


async def monitor_loop(o: Orchestrator) -> None:
    """Every second: a throughput point for the history, and a snapshot to each monitor."""
    while True:
        await asyncio.sleep(1.0)
        if o.book is not None:
            o.history.record(o.book.items_done, time.time())
        monitors = [s for s in o.sessions.values() if s.role == "monitor"]
        if monitors:
            stats = Stats(snapshot=snapshot(o))
            await asyncio.gather(*(m.send(stats) for m in monitors))
