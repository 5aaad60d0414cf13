"""The monitor: the orchestrator's history and activity log (plain logic), the view model,
the Textual app headless against a real orchestrator and worker, and its layout (SVG)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    MONITOR_TOKEN,
    TIME_UNIT,
    WORKER_TOKENS,
    eventually,
    orchestrator_config,
    worker_config,
)
from textual.geometry import Region
from textual.widget import Widget
from websockets.asyncio.client import connect

from caption_flow.config.models import MonitorConfig
from caption_flow.monitor import MonitorApp, as_text
from caption_flow.monitor.activity import ActivityTable
from caption_flow.monitor.app import SnapshotReceived
from caption_flow.monitor.buffer import BufferPanel
from caption_flow.monitor.link import LinkStatus
from caption_flow.monitor.model import (
    Link,
    buffer,
    buffer_line,
    throughput,
    worker_columns,
    worker_rows,
)
from caption_flow.monitor.progress import ProgressPanel
from caption_flow.monitor.workers import WorkersTable
from caption_flow.orchestrator.activity import (
    ActivityLog,
    ThroughputHistory,
    eta_seconds,
)
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.protocol.messages import (
    Assign,
    Heartbeat,
    Hello,
    Request,
    Welcome,
    decode,
    encode,
)
from caption_flow.worker.client import Worker

SIZE = (140, 42)


# -- activity.py: plain logic --------------------------------------------------------------
def test_history_keeps_one_point_per_bucket_and_only_the_newest() -> None:
    history = ThroughputHistory(bucket_s=10, keep_s=60)
    for second in range(0, 100):
        history.record(second * 2, now=1000.0 + second)
    points = history.points()
    assert len(points) == 6  # 60 s of 10 s buckets
    # A bucket holds the last sample taken in it.
    assert points == [[1049.0 + 10 * i, (49 + 10 * i) * 2] for i in range(6)]
    # Average since the oldest point kept: 2 items per second.
    assert history.average_rate(109 * 2, now=1109.0) == pytest.approx(2.0)
    # A clock that steps back never adds an older bucket after a newer one.
    history.record(500, now=1005.0)
    assert history.points()[-1] == [1099.0, 500] and len(history.points()) == 6


def test_history_average_needs_a_bucket_of_history() -> None:
    history = ThroughputHistory(bucket_s=10, keep_s=3600)
    assert history.average_rate(5, now=0.0) == 0.0
    history.record(0, now=100.0)
    assert history.average_rate(5, now=102.0) == 0.0  # too short to say: unknown, not 2.5/s
    assert history.average_rate(30, now=115.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        ThroughputHistory(bucket_s=10, keep_s=5)


def test_eta() -> None:
    assert eta_seconds(100, 4.0) == 25.0
    assert eta_seconds(100, 0.0) is None
    assert eta_seconds(0, 0.0) == 0.0


def test_activity_log_is_bounded_and_checks_kinds() -> None:
    log = ActivityLog(keep=3)
    for i in range(5):
        log.add("connect", f"worker w{i}", now=float(i))
    assert len(log) == 3
    assert [e["text"] for e in log.recent()] == ["worker w2", "worker w3", "worker w4"]
    assert [e["text"] for e in log.recent(2)] == ["worker w3", "worker w4"]
    assert log.recent(0) == []
    log.add("failure", "x" * 10_000, now=9.0)
    assert len(log.recent(1)[0]["text"]) == 240
    with pytest.raises(ValueError, match="unknown activity kind"):
        log.add("gossip", "no", now=10.0)


# -- the view model ------------------------------------------------------------------------
T0 = 1_700_000_000.0
FIXED: dict[str, Any] = {
    "items_total": 1000,
    "items_done": 420,
    "items_failed": 7,
    "items_captioned": 413,
    "rate": 3.25,
    "rate_avg": 2.8,
    "eta_s": 207.1,
    "chunks": {"pending": 100, "leased": 4, "done": 84, "failed": 1},
    "workers": 2,
    "uptime_s": 3700.0,
    "time": T0 + 3600,
    "model": "tiny/qwen2-vl",
    "prompts": ["describe this image"],
    "sessions": [
        {
            "session": "aaa111",
            "name": "gpu-box-0",
            "role": "worker",
            "contributor": "alice",
            "engine": "vllm",
            "model": "Qwen/Qwen2.5-VL-3B",
            "gpu": "cuda:0",
            "queued_chunks": 1.0,
            "queued_items": 5.0,
            "unacked": 2.0,
            "items_per_s": 2.1,
            "engine_busy": 0.93,
            "current_chunk": "shard-0003:15",
            "items_done": 250,
            "heartbeat_age_s": 1.2,
        },
        {
            "session": "bbb222",
            "name": "laptop",
            "role": "worker",
            "contributor": "bob",
            "engine": "transformers",
            "model": "",
            "gpu": "",
            "queued_chunks": 0.0,
            "unacked": 0.0,
            "items_per_s": 1.15,
            "engine_busy": 0.5,
            "current_chunk": "",
            "items_done": 170,
            "heartbeat_age_s": None,
        },
        {"session": "ccc333", "name": "monitor", "role": "monitor", "contributor": "watcher"},
    ],
    # A day's shape in an hour: slow start, a peak, a dip (a requeue lowers the total once).
    "history": [[T0 + 10 * i, sum(min(k, 40) % 23 for k in range(i))] for i in range(360)],
    "activity": [
        {"t": T0 + 5, "kind": "connect", "text": "worker gpu-box-0 (alice)"},
        {"t": T0 + 65, "kind": "connect", "text": "worker laptop (bob)"},
        {"t": T0 + 300, "kind": "failure", "text": "3 items of shard-0001:10 failed"},
        {"t": T0 + 900, "kind": "config", "text": "job updated (sampling), sent to 2 workers"},
    ],
    "contributors": [
        {"contributor": "bob", "items": 170, "failed": 4, "captions": 340, "share": 0.405},
        {"contributor": "alice", "items": 250, "failed": 3, "captions": 500, "share": 0.595},
    ],
}


def test_view_model_rows_and_plain_text() -> None:
    config = MonitorConfig()
    rows = worker_rows(FIXED, config)
    assert list(rows) == ["aaa111", "bbb222"]  # the monitor's own session is no worker
    assert rows["aaa111"] == [
        "gpu-box-0",
        "caption",
        "alice",
        "vllm / Qwen/Qwen2.5-VL-3B",
        "cuda:0",
        "1 (5 items)",
        "2",
        "2.10",
        "93%",
        "shard-0003:15",
        "250",
        "1s ago",
    ]
    assert rows["bbb222"][-1] == "none yet"
    quiet = MonitorConfig(show_worker_queues=False)
    assert "queued" not in worker_columns(quiet)
    assert len(worker_rows(FIXED, quiet)["aaa111"]) == len(worker_columns(quiet))
    assert throughput([[0, 0], [10, 50], [20, 40], [30, 70]]) == [5.0, 0.0, 3.0]
    text = as_text(FIXED, config)
    assert "items done: 420 of 1000 (42.0%)" in text
    assert "chunks: pending 100, leased 4, done 84, failed 1" in text
    assert "eta: 3m 27s" in text and "gpu-box-0" in text
    assert "prepared buffer" not in text  # an orchestrator without the buffer: nothing shown
    # Leaderboard: largest first; max_activity_items bounds the activity section.
    assert text.index("\nalice\t") < text.index("\nbob\t")
    one = as_text(FIXED, MonitorConfig(max_activity_items=1, show_quality_metrics=False))
    assert "job updated" in one and "gpu-box-0 (alice)" not in one and "failed:" not in one


MiB = 2**20
# The same run with a dataworker feeding the orchestrator's prepared-item buffer.
WITH_DATA: dict[str, Any] = {
    **FIXED,
    "sessions": [
        *FIXED["sessions"],
        {
            "session": "ddd444",
            "name": "loader-1",
            "role": "dataworker",
            "contributor": "carol",
            "engine": "",
            "model": "",
            "gpu": "",
            "items_per_s": 41.5,
            "mb_per_s": 12.34,
            "prepared": 5120,
            "items_done": 0,  # it captions nothing: never shown as its done count
            "current_chunk": "shard-0004:20",
            "heartbeat_age_s": 0.4,
        },
    ],
    "prepared": {
        "items": 1234,
        "memory_bytes": 16 * MiB,
        "memory_limit": 64 * MiB,
        "disk_bytes": 300 * MiB,
        "disk_limit": 1024 * MiB,
        "relayed": 5000,
        "served": 12,
        "dataworkers": 1,
    },
}


def test_dataworker_rows_say_what_they_prepare() -> None:
    config = MonitorConfig()
    rows = worker_rows(WITH_DATA, config)
    assert list(rows) == ["aaa111", "bbb222", "ddd444"]
    columns = worker_columns(config)
    data = dict(zip(columns, rows["ddd444"], strict=True))
    assert data["role"] == "data" and rows["aaa111"][1] == "caption"
    assert data["engine / model"] == "prepares: 12.3 MB/s out"
    assert data["items/s"] == "41.50"  # prepared images per second
    assert data["done"] == "5,120"  # items prepared, not its (zero) caption count
    assert (data["busy"], data["queued"], data["unacked"]) == ("", "", "")
    assert (data["chunk"], data["heartbeat"]) == ("shard-0004:20", "0s ago")
    # Without its MB/s yet (no heartbeat): blanks, still no caption figures.
    quiet = {"session": "e", "name": "new", "role": "dataworker", "items_done": 3}
    row = dict(zip(columns, worker_rows({"sessions": [quiet]}, config)["e"], strict=True))
    assert (row["role"], row["engine / model"], row["items/s"], row["done"]) == ("data", "", "", "")


def test_buffer_line_only_when_the_orchestrator_reports_it() -> None:
    assert buffer(FIXED) is None and buffer({**FIXED, "prepared": None}) is None
    b = buffer(WITH_DATA)
    assert b is not None and b.items == 1234 and b.dataworkers == 1
    line = (
        "prepared buffer: 1,234 items, 16.0 MiB / 64.0 MiB (25%) in memory, "
        "300.0 MiB / 1,024.0 MiB (29%) on disk; relayed 5,000, served by orchestrator 12; "
        "1 dataworker"
    )
    assert buffer_line(b) == line
    text = as_text(WITH_DATA, MonitorConfig())
    assert line in text.splitlines()
    assert "loader-1\tdata\tcarol\tprepares: 12.3 MB/s out" in text
    # Keys it lacks read as zero; no ceiling, no percentage.
    partial = buffer({"prepared": {"items": 3, "dataworkers": 2}})
    assert partial is not None
    assert buffer_line(partial) == (
        "prepared buffer: 3 items, 0.0 MiB / 0.0 MiB in memory, 0.0 MiB / 0.0 MiB on disk; "
        "relayed 0, served by orchestrator 0; 2 dataworkers"
    )


# -- layout: SVG snapshots of a fixed snapshot ----------------------------------------------
@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Activity times are local; the snapshots are taken in UTC."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def fixed_app(config: MonitorConfig, link: str = Link.CONNECTED, detail: str = "") -> MonitorApp:
    app = MonitorApp(config, live=False, snapshot=FIXED)
    app.view.set_link(link, detail)
    return app


def test_layout_everything_shown(snap_compare: Any, utc: None) -> None:
    app = fixed_app(MonitorConfig(server="ws://orchestrator.example:8765"))
    assert snap_compare(app, terminal_size=SIZE)


def test_layout_with_the_show_keys_off(snap_compare: Any, utc: None) -> None:
    config = MonitorConfig(
        server="ws://orchestrator.example:8765",
        show_contributors=False,
        show_quality_metrics=False,
        show_chunk_progress=False,
        show_worker_queues=False,
        show_throughput_graph=False,
        max_activity_items=2,
    )
    assert snap_compare(fixed_app(config), terminal_size=SIZE)


def test_layout_refused(snap_compare: Any, utc: None) -> None:
    app = fixed_app(
        MonitorConfig(server="ws://orchestrator.example:8765"),
        Link.REFUSED,
        "token refused for role 'monitor' (4001) (check monitor.token or --token)",
    )
    assert snap_compare(app, terminal_size=SIZE)


def test_layout_with_a_dataworker_and_the_buffer(snap_compare: Any, utc: None) -> None:
    app = MonitorApp(
        MonitorConfig(server="ws://orchestrator.example:8765"), live=False, snapshot=WITH_DATA
    )
    app.view.set_link(Link.CONNECTED)
    assert snap_compare(app, terminal_size=SIZE)


async def test_buffer_panel_appears_with_the_key_and_goes_with_it() -> None:
    """An orchestrator without the buffer shows no panel; one that starts reporting it (an
    upgrade behind the same address) shows it at the next redraw, and its dataworker row."""
    app = fixed_app(MonitorConfig(refresh_rate=0.05))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(BufferPanel)
        table = app.query_one(WorkersTable)
        assert not panel.display and table.row_count == 2
        app.post_message(SnapshotReceived(WITH_DATA))
        await eventually(lambda: panel.display and table.row_count == 3, 5, "buffer shown")
        await pilot.pause()
        text = shown(panel)
        assert "1,234 waiting; relayed 5,000, served by orchestrator 12; 1 dataworker" in text
        assert "16.0 MiB / 64.0 MiB (25%)" in text and "300.0 MiB / 1,024.0 MiB (29%)" in text
        assert table.get_row("ddd444")[:2] == ["loader-1", "data"]
        assert str(table.border_title) == "workers (2) and dataworkers (1)"
        app.post_message(SnapshotReceived(FIXED))
        await eventually(lambda: not panel.display and table.row_count == 2, 5, "buffer gone")


# -- live, against a real orchestrator and worker -------------------------------------------
def shown(widget: Widget) -> str:
    """The text a widget shows on screen now, its border included."""
    width, height = widget.outer_size
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, width, height)))


def monitor_config(port: int, token: str = MONITOR_TOKEN) -> MonitorConfig:
    return MonitorConfig(server=f"ws://127.0.0.1:{port}", token=token, refresh_rate=0.1)


@contextlib.asynccontextmanager
async def running(orch: Orchestrator) -> Any:
    await orch.start()
    try:
        yield orch
    finally:
        await orch.stop()


async def test_monitor_shows_a_live_run_and_its_numbers_match_the_orchestrator(
    tmp_path: Path, image_folder: Any, tiny_model_dir: Path
) -> None:
    image_folder(10)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tiny_model_dir)
    async with running(Orchestrator(config)) as orch:
        app = MonitorApp(monitor_config(orch.port))
        async with app.run_test(size=SIZE) as pilot:
            panel = app.query_one(ProgressPanel)
            await eventually(lambda: "0 of 10 done" in shown(panel), 10, "first snapshot shown")
            assert app.view.link == Link.CONNECTED
            worker = Worker(worker_config(orch.port).model_copy(update={"heartbeat_seconds": 0.2}))
            task = asyncio.create_task(worker.run())
            table = app.query_one(WorkersTable)
            seen: list[list[str]] = []

            def heartbeat_shown() -> bool:
                rows = [table.get_row_at(i) for i in range(table.row_count)]
                seen.extend(r for r in rows if r[-1] != "none yet")
                return bool(seen)

            # The worker's row, with what its hello and heartbeats said.
            await eventually(heartbeat_shown, 30, "a worker row with a heartbeat")
            assert seen[0][:4] == ["worker-alice", "caption", "alice", "transformers"]
            assert seen[0][-1].endswith("s ago")
            assert {r[9] for r in seen} <= {*orch.book.chunks, ""}  # the chunk column
            # The numbers move as items complete, then match the orchestrator's own.
            await eventually(lambda: "10 of 10 done" in shown(panel), 120, "all items shown")
            await asyncio.wait_for(task, 60 * TIME_UNIT)
            await pilot.pause(0.3)
            truth = orch.snapshot()
            text = shown(panel)
            assert f"{truth['items_done']} of {truth['items_total']} done" in text
            assert f"failed {truth['items_failed']}" in text
            assert f"captioned  {truth['items_captioned']}" in text
            chunks = truth["chunks"]
            assert f"done {chunks['done']}" in text and f"pending {chunks['pending']}" in text
            if "prepared" in truth:  # an orchestrator with the prepared-item buffer
                b = truth["prepared"]
                buffered = shown(app.query_one(BufferPanel))
                assert f"{b['items']:,} waiting; relayed {b['relayed']:,}" in buffered
                assert f"served by orchestrator {b['served']:,}" in buffered
            activity = shown(app.query_one(ActivityTable))
            assert "worker worker-alice (alice)" in activity  # its connection
            assert app.view.snapshot["history"]  # kept by the orchestrator, sent along
            await pilot.press("q")
        assert not app.is_running


async def test_wrong_token_is_a_clear_message(
    tmp_path: Path, image_folder: Any, tiny_model_dir: Path
) -> None:
    image_folder(2)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tiny_model_dir)
    async with running(Orchestrator(config)) as orch:
        app = MonitorApp(monitor_config(orch.port, token="not-the-token"))
        async with app.run_test(size=SIZE):
            await eventually(lambda: app.view.link == Link.REFUSED, 10, "refused")
            await asyncio.sleep(0.1)
            line = shown(app.query_one(LinkStatus))
            assert "refused" in line and "check monitor.token" in line
            assert app.view.updates == 0 and app.is_running  # no traceback, still open


async def test_monitor_survives_an_orchestrator_restart(
    tmp_path: Path, image_folder: Any, tiny_model_dir: Path
) -> None:
    image_folder(3)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tiny_model_dir)
    first = Orchestrator(config)
    await first.start()
    port = first.port
    app = MonitorApp(monitor_config(port))
    try:
        async with app.run_test(size=SIZE) as pilot:
            link = app.query_one(LinkStatus)
            await eventually(lambda: app.view.updates > 0, 10, "first snapshot")
            await first.stop()
            await eventually(lambda: "reconnecting" in shown(link), 10, "says it reconnects")
            async with running(Orchestrator(config.model_copy(update={"port": port}))) as second:
                await pilot.press("r")  # the binding cuts the back-off short
                await eventually(lambda: "(reconnected)" in shown(link), 15, "reconnected")
                before = app.view.updates
                await eventually(lambda: app.view.updates > before, 10, "snapshots again")
                assert app.view.snapshot["uptime_s"] < second.snapshot()["uptime_s"] + 1
                assert "0 of 3 done" in shown(app.query_one(ProgressPanel))
    finally:
        await first.stop()


async def test_heartbeats_shown_as_the_worker_said_but_never_who_it_is(
    tmp_path: Path, image_folder: Any
) -> None:
    """A worker's stats cannot overwrite its name or contributor, and the chunk it says it
    captions is shown only while that chunk is leased to it."""
    image_folder(10)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tmp_path / "no-model")
    async with running(Orchestrator(config)) as orch, connect(f"ws://127.0.0.1:{orch.port}") as ws:
        caps = {"engine": "vllm", "model": "m" * 500, "gpu": "cuda:1", "secret": "x"}
        hello = Hello(role="worker", token=WORKER_TOKENS["bob"], name="b", capabilities=caps)
        await ws.send(encode(hello))
        assert isinstance(decode(await ws.recv()), Welcome)
        await ws.send(encode(Request(count=1)))
        assign = decode(await ws.recv())
        assert isinstance(assign, Assign) and assign.chunks
        mine = assign.chunks[0].chunk_id
        others = sorted(set(orch.book.chunks) - {mine})

        def described() -> dict[str, Any]:
            return next(s for s in orch.snapshot()["sessions"] if s["role"] == "worker")

        stats = {"contributor": 1.0, "name": 2.0, "items_per_s": 3.5}
        await ws.send(encode(Heartbeat(stats=stats, chunk=mine)))
        await eventually(lambda: described().get("items_per_s") == 3.5, 5, "heartbeat seen")
        row = described()
        assert (row["name"], row["contributor"], row["current_chunk"]) == ("b", "bob", mine)
        assert (row["engine"], row["gpu"], len(row["model"])) == ("vllm", "cuda:1", 128)
        assert "secret" not in row and row["heartbeat_age_s"] < 5
        await ws.send(encode(Heartbeat(stats={"items_per_s": 4.0}, chunk=others[0])))
        await eventually(lambda: described().get("items_per_s") == 4.0, 5, "heartbeat seen")
        assert described()["current_chunk"] == ""
        activity = orch.snapshot()["activity"]
        assert activity[-1]["kind"] == "connect" and "worker b (bob)" in activity[-1]["text"]
