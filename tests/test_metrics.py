"""/metrics through prometheus-client and /health, against a real orchestrator fed by a raw
worker connection (no model: the frames are the test's)."""

from __future__ import annotations

import asyncio
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from support import (
    WORKER_TOKENS,
    eventually,
    orchestrator_config,
    raw_caption_chunk,
    raw_hello,
    running,
)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, port, path)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels), parsed by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_parse_and_count_what_happened(tmp_path: Path, image_folder: Any) -> None:
    image_folder(10)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tmp_path / "no-model")
    async with running(config) as orch:
        ws = await raw_hello(orch.port, "worker", WORKER_TOKENS["alice"])
        await ws.recv()  # welcome
        sent = await raw_caption_chunk(ws, seq=1)
        assert sent == 5
        status, text = await get(orch.port, "/metrics")
        assert status == 200
        got = samples(text)
        assert got[("captionflow_items_total", ())] == 10
        assert got[("captionflow_items_done", ())] == 5
        assert got[("captionflow_items_captioned", ())] == 5
        assert got[("captionflow_items_failed", ())] == 0
        assert got[("captionflow_items_by_outcome", (("outcome", "captioned"),))] == 5
        assert got[("captionflow_items_by_outcome", (("outcome", "failed"),))] == 0
        assert got[("captionflow_chunks", (("status", "done"),))] == 1
        assert got[("captionflow_chunks", (("status", "pending"),))] == 1
        assert got[("captionflow_connections", (("role", "worker"),))] == 1
        assert got[("captionflow_connections", (("role", "monitor"),))] == 0
        assert got[("captionflow_results_committed_total", ())] == 5
        assert got[("captionflow_commit_seconds_count", ())] == 1
        assert got[("captionflow_lease_seconds_count", ())] >= 1
        assert got[("captionflow_received_bytes_total", ())] > 0
        assert got[("captionflow_sent_bytes_total", ())] > 0
        await ws.close()
        # The old hand-written names still answer the plain regexes scripts use.
        assert "captionflow_items_total 10" in text


async def test_health_is_503_while_the_store_fails(tmp_path: Path, image_folder: Any) -> None:
    image_folder(10)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tmp_path / "no-model")
    config.storage.compact_rows = 1
    async with running(config) as orch:
        assert await get(orch.port, "/health") == (200, "ok\n")
        # A file where the parts folder should be: compaction fails, even for root.
        captions = tmp_path / "data" / "captions"
        shutil.rmtree(captions, ignore_errors=True)
        captions.write_text("not a folder")
        ws = await raw_hello(orch.port, "worker", WORKER_TOKENS["alice"])
        await ws.recv()
        assert await raw_caption_chunk(ws, seq=1) == 5  # durable in the journal all the same
        await eventually(
            lambda: orch.store.compact_failures >= 2, 20, "compaction failing twice in a row"
        )
        status, body = await get(orch.port, "/health")
        assert status == 503 and "compaction failed" in body
        captions.unlink()  # repaired: the next compaction works and health comes back
        await eventually(lambda: orch.store.compact_failures == 0, 30, "compaction recovering")
        assert await get(orch.port, "/health") == (200, "ok\n")
        await ws.close()
