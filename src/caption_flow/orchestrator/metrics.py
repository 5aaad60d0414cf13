"""Prometheus metrics of one orchestrator, in a registry of its own (never the global one,
so several orchestrators in one process, as in tests, keep apart).

Figures the orchestrator already keeps (items, chunks, connections, rows committed) are read
when scraped; what only passes by (latencies, bytes) is counted as it happens.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from caption_flow.orchestrator.server import Orchestrator

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Compactions failed in a row before /health says the store is failing (one may be a blip).
COMPACT_FAILURES_UNHEALTHY = 2


class _Figures:
    """Collector of what the orchestrator holds anyway, read at scrape time."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator

    def collect(self) -> Iterator[Metric]:
        o = self._orchestrator
        if o.book is None or o.desk is None:
            return
        done, failed = o.book.items_done, o.store.items_failed
        for name, value, doc in (
            ("items_total", o.book.items_total, "items in the dataset"),
            ("items_done", done, "items stored, captioned or failed for good"),
            ("items_failed", failed, "items stored with an error"),
            ("items_captioned", done - failed, "items stored with a caption"),
            ("items_per_second", o.desk.rate.rate(), "items stored per second, lately"),
            ("workers", sum(s.role == "worker" for s in o.sessions.values()), "GPU workers"),
        ):
            yield GaugeMetricFamily(f"captionflow_{name}", doc, value=value)
        outcome = GaugeMetricFamily(
            "captionflow_items_by_outcome", "items stored, by outcome", labels=["outcome"]
        )
        outcome.add_metric(["captioned"], done - failed)
        outcome.add_metric(["failed"], failed)
        yield outcome
        chunks = GaugeMetricFamily("captionflow_chunks", "chunks by state", labels=["status"])
        for status, count in o.book.counts().items():
            chunks.add_metric([status], count)
        yield chunks
        roles = Tally(s.role for s in o.sessions.values())
        connections = GaugeMetricFamily(
            "captionflow_connections", "open connections by role", labels=["role"]
        )
        for role in ("worker", "dataworker", "monitor", "admin"):
            connections.add_metric([role], roles.get(role, 0))
        yield connections
        yield CounterMetricFamily(
            "captionflow_results_committed",
            "result rows committed to the journal since start",
            value=o.store.committed_rows,
        )
        buffer = o.buffer
        for name, value, doc in (
            ("prepared_items", buffer.items, "prepared items waiting for workers"),
            ("prepared_memory_bytes", buffer.memory_bytes, "prepared bytes held in memory"),
            ("prepared_disk_bytes", buffer.disk_bytes, "prepared bytes spilled to disk"),
        ):
            yield GaugeMetricFamily(f"captionflow_{name}", doc, value=value)
        for name, value, doc in (
            ("items_relayed", buffer.relayed, "items sent to workers as dataworkers prepared them"),
            ("items_served", buffer.served, "items the orchestrator read for workers itself"),
        ):
            yield CounterMetricFamily(f"captionflow_{name}", doc, value=value)


class Metrics:
    """The registry, the instruments the server feeds, and the store's health."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator
        self.registry = CollectorRegistry()
        self.commit_seconds = Histogram(
            "captionflow_commit_seconds",
            "from a results message read to its items durable (its ack)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lease_seconds = Histogram(
            "captionflow_lease_seconds",
            "from a worker's request to its chunks sent",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "captionflow_received_bytes", "websocket payload bytes received", registry=self.registry
        )
        self.bytes_out = Counter(
            "captionflow_sent_bytes", "websocket payload bytes sent", registry=self.registry
        )
        self.registry.register(_Figures(orchestrator))
        # Why the last results commit failed; None once one succeeds again.
        self.commit_error: str | None = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def store_problem(self) -> str | None:
        """Why the store is failing now (for /health), or None while it is healthy."""
        if self.commit_error is not None:
            return f"results commit failed: {self.commit_error}"
        failures = self._orchestrator.store.compact_failures
        if failures >= COMPACT_FAILURES_UNHEALTHY:
            return f"compaction failed {failures} times in a row"
        return None
