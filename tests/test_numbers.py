"""One definition of done, failed and captioned, everywhere: the run summary, the snapshot,
``/metrics`` and the Parquet output agree, across restarts; one caption entry per prompt even
when a generation is empty; a re-run with nothing left says so; an empty dataset is an error.

The engine is a stub (tests/support.py): what is tested is the orchestrator, the store and the
runner, with a real websocket, real SQLite and real Parquet.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import PROMPTS, TIME_UNIT, StubEngine, orchestrator_config, read_rows, running

from caption_flow.config.models import WorkerConfig
from caption_flow.engines.base import CaptionInput, Generation
from caption_flow.engines.captioner import Captioner
from caption_flow.errors import SourceError
from caption_flow.runner import run_local
from caption_flow.storage.rows import NO_TEXT, StoredItem, records_to_table

pytestmark = pytest.mark.timeout(120)

SILENT_WIDTH = 40  # images this wide get no text for any prompt (stored as NO_TEXT); the
# generated test images are at least 63 pixels wide


class QuietStub(StubEngine):
    """Returns "" for the first prompt of every image, and for every prompt of an image
    ``SILENT_WIDTH`` pixels wide; the usual stub caption otherwise."""

    def generate(self, requests: Any, sampling: Any) -> list[Any]:
        out = super().generate(requests, sampling)
        return [
            Generation("", 1) if r.prompt == PROMPTS[0] or r.image.width == SILENT_WIDTH else g
            for r, g in zip(requests, out, strict=True)
        ]


def quiet_captioner() -> Captioner:
    return Captioner("transformers", loader=lambda kind, spec: QuietStub(spec))


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(captionflow_\w+) (\S+)$", text, re.M)}


def test_one_entry_per_prompt_when_a_generation_is_empty() -> None:
    from PIL import Image

    batch = [
        CaptionInput("a", Image.new("RGB", (64, 48))),
        CaptionInput("b", Image.new("RGB", (SILENT_WIDTH, 40))),
    ]
    captioner = quiet_captioner()
    outputs = captioner.caption(batch, orchestrator_config(Path("d"), Path("i"), Path("m")).vllm)
    assert outputs[0].outputs == {"captions": ["", f"{PROMPTS[1]} 64x48"]}
    assert outputs[1].outputs == {"captions": ["", ""]} and outputs[1].error is None

    # The store keeps the positions too; blank text is stored as "".
    table = records_to_table(
        [
            _record(
                [
                    StoredItem(0, "a", {"captions": ["", "b"]}),
                    StoredItem(1, "c", {"captions": [" ", ""]}),
                ]
            )
        ]
    ).to_pylist()
    assert table[0]["captions"] == ["", "b"] and table[0]["error"] is None
    assert table[1]["captions"] == ["", ""] and table[1]["error"] == NO_TEXT


def _record(items: list[StoredItem]) -> Any:
    from caption_flow.storage.rows import JournalRecord

    return JournalRecord("d", "s", "s:0", "m", "alice", "w", 0.0, items)


def _worker(**kw: Any) -> WorkerConfig:
    return WorkerConfig(engine="transformers", decode_threads=2, heartbeat_seconds=1.0, **kw)


async def test_summary_metrics_and_parquet_agree_on_failures(
    tmp_path: Path, image_folder, caplog: pytest.LogCaptureFixture
) -> None:
    images = image_folder(7)
    folder = images[0].parent
    from PIL import Image

    for n in range(2):
        Image.new("RGB", (SILENT_WIDTH, 30), (n * 90, 20, 20)).save(folder / f"silent_{n}.png")
    (folder / "broken.jpg").write_bytes(images[0].read_bytes()[:200])
    (folder / "empty.png").write_bytes(b"")
    data = tmp_path / "data"
    config = orchestrator_config(data, folder, tmp_path / "no-model", chunk_size=4)

    caplog.set_level(logging.INFO, logger="caption_flow")
    summary = await asyncio.wait_for(
        run_local(config, _worker(), captioner=quiet_captioner()), 60 * TIME_UNIT
    )

    rows = read_rows(data)
    assert len(rows) == 11 and len({r["item_key"] for r in rows}) == 11
    errors = collections.Counter(r["error"] for r in rows if r["error"] is not None)
    assert {r["item_key"] for r in rows if r["error"] == NO_TEXT} == {
        "silent_0.png",
        "silent_1.png",
    }
    captioned = [r for r in rows if r["error"] is None]
    assert len(captioned) == 7
    assert all(
        r["captions"][0] == "" and r["captions"][1].startswith(PROMPTS[1]) for r in captioned
    )
    failed = sum(errors.values())
    assert failed == 4 and errors[NO_TEXT] == 2
    assert (summary.items_total, summary.items_done) == (11, 11)
    assert summary.items_failed == failed and summary.items_captioned == 11 - failed
    assert summary.items_this_run == 11 and not summary.nothing_left
    reasons = {f.reason: f for f in summary.failures}
    assert reasons[NO_TEXT].count == errors[NO_TEXT]
    assert sum(f.count for f in summary.failures) == failed
    assert "empty.png" in {k for f in summary.failures for k in f.examples}
    # At -v the orchestrator names each failed item as it stores it.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("item ")]
    assert any(m.startswith("item broken.jpg failed:") for m in logged), logged
    assert sum(1 for m in logged if m.endswith(NO_TEXT)) == errors[NO_TEXT]

    # A restart counts the failures from the output itself: /metrics and the snapshot agree.
    async with running(config) as orch:
        snapshot = orch.snapshot()
        figures = await asyncio.to_thread(metrics, orch.port)
    assert (snapshot["items_done"], snapshot["items_failed"]) == (11, failed)
    assert snapshot["items_captioned"] == 11 - failed
    assert figures["captionflow_items_done"] == 11
    assert figures["captionflow_items_failed"] == failed
    assert figures["captionflow_items_captioned"] == 11 - failed

    # A run that finds everything done invents no throughput.
    again = await asyncio.wait_for(
        run_local(config, _worker(), captioner=quiet_captioner()), 60 * TIME_UNIT
    )
    assert again.nothing_left and again.items_this_run == 0 and again.items_per_s == 0.0
    assert (again.items_done, again.items_failed) == (11, failed)
    assert "nothing left to do" in caplog.text

    # Requeued failures leave the output, and the failed count with them.
    async with running(config) as orch:
        await orch.requeue_failed()
        snapshot = orch.snapshot()
    assert (snapshot["items_done"], snapshot["items_failed"]) == (11 - failed, 0)


async def test_an_empty_dataset_is_an_error_for_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = orchestrator_config(tmp_path / "data", tmp_path / "empty", tmp_path / "no-model")
    with pytest.raises(SourceError, match="has no items"):
        await run_local(config, _worker(), captioner=quiet_captioner())


def test_an_empty_folder_makes_run_exit_non_zero(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    args = ["run", "--dataset", "empty", "--data-dir", "d", "--model", str(tiny_model_dir)]
    done = subprocess.run(
        [sys.executable, "-m", "caption_flow", *args],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no items" in errors[0], done.stderr


def test_the_summary_says_what_was_done_and_why_items_failed() -> None:
    from rich.console import Console

    from caption_flow.cli.progress import summary_table
    from caption_flow.runner import RunSummary
    from caption_flow.storage.reader import FailureReason

    def render(summary: RunSummary) -> str:
        console = Console(record=True, width=200)
        console.print(summary_table(summary, []))
        return console.export_text()

    base = {"items_total": 10, "chunks": {"done": 2}, "elapsed_s": 2.0, "output_dir": "out"}
    text = render(
        RunSummary(
            items_done=10,
            items_failed=3,
            items_done_before=6,
            failures=[FailureReason(NO_TEXT, 2, ["a.jpg", "b.jpg"]), FailureReason("bad", 1)],
            **base,  # type: ignore[arg-type]
        )
    )
    assert "7 of 10" in text and "4 items this run, 2.0 items/s, 6 done before" in text
    assert NO_TEXT in text and "a.jpg, b.jpg" in text
    text = render(
        RunSummary(items_done=10, items_failed=0, items_done_before=10, nothing_left=True, **base)
    )  # type: ignore[arg-type]
    assert "nothing left to do" in text and "items/s" not in text
